"""credit_ops.policy_loss: every backend against the reference and against TRL's GRPO formulas (reimplemented
here), float64 gradcheck, bf16 error vs eager bf16, in-place gradient, opcheck, torch.compile, bad input."""

import itertools

import pytest
import torch

import credit_ops
from credit_ops import reference as R
from tests.conftest import backend_devices, large_outputs

BACKENDS = backend_devices()
IDS = [f"{b}-{d}" for b, d in BACKENDS]
# native on CUDA runs the Triton kernels (there is no CUDA C++ kernel for this op): tested once, in test_native_cuda
KERNEL_BACKENDS = [(b, d) for b, d in BACKENDS if b != "reference" and (b, d) != ("native", "cuda")]
KERNEL_IDS = [f"{b}-{d}" for b, d in KERNEL_BACKENDS]


def sample(
    B=3,
    T=6,
    V=37,
    dtype=torch.float64,
    device="cpu",
    *,
    per_token=True,
    gates=True,
    mask=True,
    old=True,
    ref=True,
    ignore=True,
):
    logits = (torch.randn(B, T, V, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T))
    if ignore:
        labels[0, -2:] = -100
    # old log-probs near the current ones: ratios spread over both sides of the clip range
    cur = R.token_logprobs(logits.double(), labels)
    kw = {}
    if old:
        kw["old_logprobs"] = (cur + 0.3 * torch.randn(B, T, dtype=torch.float64)).float()
    if ref:
        kw["ref_logprobs"] = (cur + 0.5 * torch.randn(B, T, dtype=torch.float64)).float()
    if mask:
        m = torch.rand(B, T) > 0.25
        m[1] = False  # a fully masked sequence
        kw["mask"] = m
    if gates:
        g = torch.rand(B, T)
        g[g < 0.2] = 0.0
        kw["gates"] = g
    adv = torch.randn(B, T) if per_token else torch.randn(B)
    to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t
    return logits.to(device), labels.to(device), adv.to(device), {k: to(v) for k, v in kw.items()}


def run(backend, logits, labels, adv, **kw):
    with credit_ops.use_backend(backend):
        return credit_ops.policy_loss(logits, labels, adv, **kw)


def loss_and_grad(backend, logits, labels, adv, scale=1.0, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss, stats = run(backend, x, labels, adv, **kw)
    (g,) = torch.autograd.grad(loss * scale, x)
    return loss.detach(), g, stats


def expected(logits, labels, adv, scale=1.0, **kw):
    x = logits.detach().cpu().double().requires_grad_(True)
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    loss, stats = R.policy_loss(x, labels.cpu(), adv.cpu(), **cpu)
    (g,) = torch.autograd.grad(loss * scale, x)
    return loss.detach(), g, stats


def tol64(backend, device):
    """float64 tolerance: Triton passes float scalars (eps, beta, log2(e) / T) to kernels as fp32 (the interpreter
    keeps them in fp64 in places), which moves logp by ~1e-7 relative."""
    return 1e-9 if backend != "triton" else 1e-7 if device == "cpu" else 1e-5


def close(got, want, tol):
    """Both sides on the CPU in float64 (want may be a CUDA result too: assert_close also compares devices)."""
    torch.testing.assert_close(got.detach().cpu().double(), want.detach().cpu().double(), rtol=tol, atol=tol)


def check_all(backend, device, dtype, tol, *, scale=1.0, B=3, T=6, V=37, sample_kw=None, **kw):
    logits, labels, adv, extra = sample(B, T, V, dtype, device, **(sample_kw or {}))
    kw = {**extra, **kw}
    loss, g, stats = loss_and_grad(backend, logits, labels, adv, scale, **kw)
    want_loss, want_g, want_stats = expected(logits, labels, adv, scale, **kw)
    close(loss, want_loss, tol)
    gtol = {torch.bfloat16: 8e-3, torch.float16: 1e-3}.get(dtype, tol)  # the gradient is stored in logits' dtype
    torch.testing.assert_close(g.cpu().double(), want_g, rtol=gtol, atol=gtol * want_g.abs().max().item())
    assert set(want_stats) <= set(stats)
    for k, v in want_stats.items():
        assert not v.requires_grad
        close(stats[k], v, tol)
    return loss, g


AGGS = [None, *R.AGGREGATIONS]
AGG_IDS = ["default_agg", *R.AGGREGATIONS]
# (per_token, gates, mask) with named ids: per_token / per_seq advantages, gates / no_gates, mask / no_mask
FLAGS = [
    pytest.param(
        p, g, m, id=f"{'per_token' if p else 'per_seq'}-{'gates' if g else 'no_gates'}-{'mask' if m else 'no_mask'}"
    )
    for p, g, m in itertools.product([True, False], repeat=3)
]


# The full grid on every backend (the Triton interpreter runs its 280 cases in about 35 s).
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("per_token,gates,mask", FLAGS)
@pytest.mark.parametrize("agg", AGGS, ids=AGG_IDS)
@pytest.mark.parametrize("loss_type", R.LOSS_TYPES)
def test_parity_grid(backend, device, loss_type, agg, per_token, gates, mask):
    flags = dict(per_token=per_token, gates=gates, mask=mask)
    check_all(
        backend,
        device,
        torch.float64,
        tol64(backend, device),
        sample_kw=flags,
        loss_type=loss_type,
        agg=agg,
        max_length=9,
        beta=0.05,
        dual_clip=3.0,
    )


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("loss_type", R.LOSS_TYPES)
@pytest.mark.parametrize("kl_type", R.KL_TYPES)
def test_options(backend, device, loss_type, kl_type):
    """On-policy, KL types, no dual clip, temperature, explicit eps, a downstream scale on the loss."""
    check_all(
        backend,
        device,
        torch.float64,
        tol64(backend, device),
        sample_kw=dict(old=False),
        loss_type=loss_type,
        kl_type=kl_type,
        beta=0.1,
        temperature=0.7,
        eps_low=0.1,
        eps_high=0.3,
        max_length=8,
    )
    check_all(backend, device, torch.float64, tol64(backend, device), scale=-2.5, loss_type=loss_type, max_length=8)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("V", [37, 3001], ids=["V37", "V3001"])
def test_parity_dtypes(backend, device, dtype, V):
    for loss_type in ("dapo", "gspo"):
        check_all(backend, device, dtype, 1e-5, V=V, loss_type=loss_type, beta=0.05)


def test_long_rows_triton(monkeypatch):
    """Rows longer than one tile, forced on small rows: the two-pass kernel (online log-sum-exp over the tiles, the
    second pass backwards), -inf logits and a whole tile at -inf, in place too."""
    if "triton" not in [b for b, _ in BACKENDS]:
        pytest.skip("no triton backend")
    from credit_ops.triton_kernels import softmax_rows

    monkeypatch.setattr(softmax_rows, "ONE_TILE_MAX", 16)
    monkeypatch.setattr(softmax_rows, "STREAM_BLOCK", 16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, labels, adv, kw = sample(2, 5, 71, torch.float32, device)
    logits[0, 0, ::3] = float("-inf")
    logits[0, 1, 16:32] = float("-inf")  # a whole tile at -inf
    labels[0, 0], labels[0, 1] = 1, 0
    for loss_type in ("dapo", "grpo"):
        loss, g, stats = loss_and_grad("triton", logits, labels, adv, loss_type=loss_type, beta=0.1, **kw)
        want_loss, want_g, want_stats = expected(logits, labels, adv, loss_type=loss_type, beta=0.1, **kw)
        close(loss, want_loss, 1e-5)
        close(g, want_g, 1e-5)
        for k, v in want_stats.items():
            close(stats[k], v, 1e-5)
        # in place (inplace_grad, the fused LM head's chunks)
        x = logits.clone().requires_grad_(True)
        with credit_ops.use_backend("triton"):
            loss2, _ = credit_ops.policy_loss(
                x * 1.0, labels, adv, loss_type=loss_type, beta=0.1, inplace_grad=True, **kw
            )
        (g2,) = torch.autograd.grad(loss2, x)
        close(loss2, want_loss, 1e-5)
        close(g2, want_g, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: full-size vocabulary rows")
@pytest.mark.parametrize("rows", [64, 8192], ids=["few_rows", "more_rows_than_resident"])
def test_real_vocab_cuda(rows):
    """V = 151936, bf16, against the reference, through the default long-row kernel, for few and for many rows."""
    torch.manual_seed(0)
    B, T, V = rows // 64, 64, 151936
    logits = (torch.randn(B, T, V, device="cuda") * 3).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, T), device="cuda")
    labels[0, :3] = -100
    adv = torch.randn(B, T, device="cuda")
    gates = torch.rand(B, T, device="cuda")
    with torch.no_grad():
        cur = credit_ops.token_logprobs(logits, labels)
    kw = dict(
        old_logprobs=cur + 0.2 * torch.randn_like(cur),
        ref_logprobs=cur + 0.2 * torch.randn_like(cur),
        gates=gates,
        beta=0.05,
        loss_type="dapo",
    )
    for backend in ("triton", "reference"):
        x = logits.clone().requires_grad_(True)
        with credit_ops.use_backend(backend):
            loss, stats = credit_ops.policy_loss(x, labels, adv, **kw)
        (g,) = torch.autograd.grad(loss, x)
        if backend == "triton":
            got = (loss, g.float(), stats)
        else:
            want = (loss, g.float(), stats)
    close(got[0], want[0], 1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-2, atol=1e-2 * want[1].abs().max().item())
    for k in want[2]:  # a clip decision may flip on a token or two at fp32 rounding: 1 / 4096 = 2.4e-4
        torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-4, atol=6e-4 if "clip" in k else 1e-4)


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "fp32", "fp16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace_grad"])
@pytest.mark.parametrize("layout", ["cluster", "default"])
def test_long_rows_cuda(monkeypatch, layout, dtype, inplace):
    """Rows of V = 151936 against the float64 reference, ignored and masked rows, gates, KL, dual clip, in place
    too: the Hopper thread-block-cluster kernel (csrc/cuda/policy_loss.cu, 8 CTAs per row) forced, and the default
    rule's kernel (the Triton two-pass kernel)."""
    from credit_ops.ops import policy_loss as pl

    if layout == "cluster":
        if not HOPPER:
            pytest.skip("the cluster kernel runs on Hopper (sm_90) GPUs")
        monkeypatch.setenv("CREDIT_OPS_ROWS_LAYOUT", "cluster")
    else:
        monkeypatch.delenv("CREDIT_OPS_ROWS_LAYOUT", raising=False)
    logits, labels, adv, kw = sample(3, 41, 151936, dtype, "cuda")
    assert pl.cluster_ok(logits) == HOPPER
    kw.update(loss_type="dapo", beta=0.05, dual_clip=3.0)
    x = logits.clone().requires_grad_(True)
    with credit_ops.use_backend("triton"):
        loss, stats = credit_ops.policy_loss(x * 1.0 if inplace else x, labels, adv, inplace_grad=inplace, **kw)
    (g,) = torch.autograd.grad(loss, x)
    want_loss, want_g, want_stats = expected(logits, labels, adv, **kw)
    close(loss, want_loss, 1e-4)
    gtol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(g.cpu().double(), want_g, rtol=gtol, atol=gtol * want_g.abs().max().item())
    for k, v in want_stats.items():
        close(stats[k], v, 1e-4)


def test_rows_layout_env(monkeypatch):
    """CREDIT_OPS_ROWS_LAYOUT forces a long-row kernel; unknown names and kernels that cannot take the call fail
    clearly (on CPU the cluster kernel never can)."""
    if "triton" not in [b for b, _ in BACKENDS]:
        pytest.skip("no triton backend")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, labels, adv, kw = sample(2, 2, 16400, torch.float32, device)
    want_loss, want_g, _ = expected(logits, labels, adv, **kw)
    monkeypatch.setenv("CREDIT_OPS_ROWS_LAYOUT", "two_pass")
    loss, g, _ = loss_and_grad("triton", logits, labels, adv, **kw)
    close(loss, want_loss, 1e-5)
    close(g, want_g, 1e-5)
    monkeypatch.setenv("CREDIT_OPS_ROWS_LAYOUT", "rows")
    with pytest.raises(ValueError, match="must be one of"):
        loss_and_grad("triton", logits, labels, adv, **kw)
    if device == "cpu" or not HOPPER:
        monkeypatch.setenv("CREDIT_OPS_ROWS_LAYOUT", "cluster")
        with pytest.raises(ValueError, match="cannot take this call"):
            loss_and_grad("triton", logits, labels, adv, **kw)
        assert not torch.ops.credit.policy_loss_cluster_ok(logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_native_cuda():
    check_all("native", "cuda", torch.float32, 1e-5, loss_type="dapo", beta=0.1)
    check_all("native", "cuda", torch.float32, 1e-5, loss_type="gated_gspo", beta=0.1)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
# gspo_token is left out: its gradient is defined through stop-gradients, not as the derivative of its value.
@pytest.mark.parametrize("loss_type", [t for t in R.LOSS_TYPES if t != "gspo_token"])
def test_gradcheck(backend, device, loss_type):
    logits, labels, adv, kw = sample(2, 4, 7, torch.float64, device)
    kw = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}
    x = logits.detach().requires_grad_(True)

    def f(z):
        with credit_ops.use_backend(backend):
            return credit_ops.policy_loss(
                z, labels, adv, loss_type=loss_type, beta=0.1, max_length=5, eps_low=0.2, eps_high=0.28, **kw
            )[0]

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("loss_type", ["dapo", "gspo"])
def test_bf16_error_within_2x_eager(backend, device, loss_type):
    """Against float64 on the same bf16 values: at most 2x the error of the loss computed eagerly in bf16."""
    logits, labels, adv, kw = sample(4, 16, 512, torch.bfloat16, device, old=False)
    kw = dict(loss_type=loss_type, beta=0.05, ref_logprobs=kw["ref_logprobs"], mask=kw["mask"], gates=kw["gates"])
    loss, g, _ = loss_and_grad(backend, logits, labels, adv, **kw)
    want_loss, want_g, _ = expected(logits, labels, adv, **kw)

    # eager bf16: the same formulas with every tensor in bf16 (log_softmax in bf16 too)
    x = logits.detach().cpu().requires_grad_(True)
    lp = torch.log_softmax(x, -1).gather(-1, labels.cpu().clamp(min=0).unsqueeze(-1)).squeeze(-1)
    valid = ((labels.cpu() != -100) & kw["mask"].cpu()).to(torch.bfloat16)
    eager_loss, _ = R.loss_from_logprobs(
        lp,
        torch.zeros_like(lp),
        valid,
        adv.cpu().to(torch.bfloat16),
        old_logprobs=None,
        ref_logprobs=kw["ref_logprobs"].cpu().to(torch.bfloat16),
        gates=kw["gates"].cpu().to(torch.bfloat16),
        loss_type=loss_type,
        eps_low=0.2,
        eps_high=0.28,
        dual_clip=None,
        beta=0.05,
        kl_type="k3",
        agg=R.DEFAULT_AGG[loss_type],
        max_length=None,
    )
    (eager_g,) = torch.autograd.grad(eager_loss, x)
    err = lambda a, b: (a.detach().cpu().double() - b.double()).abs().max().item()
    # The eager loss is one bf16 scalar: its rounding (up to half a bf16 ulp, 2^-9 relative) is part of its error
    # even where it happens to land next to the float64 value.
    assert err(loss, want_loss) <= 2 * max(err(eager_loss, want_loss), 2**-9 * abs(want_loss.item())) + 1e-6
    assert err(g, want_g) <= 2 * err(eager_g, want_g) + 1e-7


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "gspo", "gated_gspo"])
def test_inplace_grad(backend, device, loss_type):
    logits, labels, adv, kw = sample(2, 5, 33, torch.float32, device)
    base = logits.detach().clone().requires_grad_(True)
    x = base * 1.0  # a non-leaf, like an LM head's output
    with credit_ops.use_backend(backend):
        loss, _ = credit_ops.policy_loss(x, labels, adv, loss_type=loss_type, inplace_grad=True, **kw)
    (loss * 3.0).backward()
    want_loss, want_g, _ = expected(logits, labels, adv, scale=3.0, loss_type=loss_type, **kw)
    close(loss, want_loss, 1e-5)
    close(base.grad, want_g, 1e-5)
    close(x.detach(), want_g, 1e-5)  # the logits' storage now holds the gradient


def test_inplace_grad_detects_reuse():
    logits, labels, adv, kw = sample(2, 5, 33, torch.float32)
    base = logits.detach().clone().requires_grad_(True)
    x = base.exp()  # exp's backward needs its output: overwriting it must be caught
    loss, _ = credit_ops.policy_loss(x, labels, adv, inplace_grad=True, **kw)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---- TRL's documented GRPO loss (GRPOTrainer._compute_loss), reimplemented independently.
def trl_loss(
    logits,
    labels,
    advantages,
    completion_mask,
    old,
    ref,
    *,
    loss_type,
    importance_sampling_level,
    beta,
    epsilon_low,
    epsilon_high,
    max_completion_length,
    temperature,
):
    logps = torch.log_softmax(logits / temperature, dim=-1)
    per_token_logps = torch.gather(logps, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if beta != 0.0:
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
    old = per_token_logps.detach() if old is None else old
    log_ratio = per_token_logps - old
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):  # single process: the normaliser is the batch's token count
        return (per_token_loss * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * completion_mask).sum() / (per_token_loss.size(0) * max_completion_length)
    raise AssertionError(loss_type)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo", "gspo"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_seq", "per_token"])
@pytest.mark.parametrize("on_policy", [False, True], ids=["off_policy", "on_policy"])
def test_matches_trl_formulas(backend, device, loss_type, per_token, on_policy):
    logits, labels, adv, kw = sample(
        3, 7, 29, torch.float64, device, per_token=per_token, gates=False, old=True, ignore=False
    )
    old = None if on_policy else kw["old_logprobs"].double()
    ref, mask = kw["ref_logprobs"].double(), kw["mask"]
    eps = (0.2, 0.28) if loss_type != "gspo" else (3e-4, 4e-4)
    loss, g, _ = loss_and_grad(
        backend,
        logits,
        labels,
        adv,
        loss_type=loss_type,
        old_logprobs=old,
        ref_logprobs=ref,
        mask=mask,
        beta=0.04,
        max_length=11,
        temperature=0.9,
    )
    x = logits.detach().cpu().requires_grad_(True)
    trl_type, level = ("grpo", "sequence") if loss_type == "gspo" else (loss_type, "token")
    want = trl_loss(
        x,
        labels.cpu(),
        adv.cpu(),
        mask.cpu().double(),
        None if old is None else old.cpu(),
        ref.cpu(),
        loss_type=trl_type,
        importance_sampling_level=level,
        beta=0.04,
        epsilon_low=eps[0],
        epsilon_high=eps[1],
        max_completion_length=11,
        temperature=0.9,
    )
    (want_g,) = torch.autograd.grad(want, x)
    close(loss, want.detach(), tol64(backend, device))
    close(g, want_g, tol64(backend, device))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
def test_ignore_and_mask_rows_get_zero_grad(backend, device):
    logits, labels, adv, kw = sample(2, 6, 21, torch.float32, device)
    _, g, stats = loss_and_grad(backend, logits, labels, adv, **kw)
    dead = (labels == -100) | ~kw["mask"]
    assert (g[dead] == 0).all()
    assert stats["num_tokens"].item() == (~dead).sum().item()


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("loss_type", ["dapo", "gspo", "gated_gspo"])
def test_garbage_in_padding(backend, device, loss_type):
    """-inf / NaN old, ref log-probs and advantages on masked tokens change nothing."""
    logits, labels, adv, kw = sample(2, 6, 21, torch.float32, device)
    kw.update(loss_type=loss_type, beta=0.1)
    loss, g, stats = loss_and_grad(backend, logits, labels, adv, **kw)
    dead = (labels == -100) | ~kw["mask"]
    dirty = dict(kw)
    dirty["old_logprobs"] = kw["old_logprobs"].masked_fill(dead, float("-inf"))
    dirty["ref_logprobs"] = kw["ref_logprobs"].masked_fill(dead, float("nan"))
    dirty["gates"] = kw["gates"].masked_fill(dead, 0.5)
    loss2, g2, stats2 = loss_and_grad(backend, logits, labels, adv.masked_fill(dead, float("nan")), **dirty)
    close(loss2, loss, 1e-6)
    close(g2, g, 1e-6)
    for k in stats:
        close(stats2[k], stats[k], 1e-6)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("loss_type", ["dapo", "gspo"])
def test_backward_allocates_no_logits_sized_tensor(backend, device, loss_type):
    """The token-level backward hands back the gradient the forward wrote: no (B, T, V) zeros for the outputs that
    get no gradient (autograd would materialise them), no copy."""
    logits, labels, adv, kw = sample(2, 7, 301, torch.float32, device)
    x = logits.requires_grad_(True)
    with credit_ops.use_backend(backend):
        loss, _ = credit_ops.policy_loss(x, labels, adv, loss_type=loss_type, beta=0.1, **kw)
    got = {}
    seen = large_outputs(lambda: got.setdefault("g", torch.autograd.grad(loss, x)[0]), x.numel())
    if loss_type == "dapo":  # on the CPU the C++ backward returns it without running an op: nothing seen
        assert {ptr for _, ptr in seen} <= {got["g"].data_ptr()}, seen
    else:  # the GSPO family's backward is the log-prob backward: it writes the one gradient tensor
        assert len({ptr for _, ptr in seen}) == 1, seen


def test_no_valid_tokens_gives_zero():
    logits, labels, adv, kw = sample(2, 3, 11, torch.float32)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for loss_type in ("dapo", "gspo", "grpo"):
        loss, g, stats = loss_and_grad("native", logits, labels, adv, loss_type=loss_type, mask=mask)
        assert loss.item() == 0 and (g == 0).all() and torch.isfinite(torch.stack(list(stats.values()))).all()


def test_strided_logits_slice():
    """logits[:, :-1] of a model output is read in place."""
    logits, labels, adv, kw = sample(2, 6, 19, torch.float32)
    full = torch.randn(2, 7, 19)
    full[:, :-1] = logits
    for backend, _ in KERNEL_BACKENDS[:1] + [b for b in KERNEL_BACKENDS if b[0] == "triton" and b[1] == "cpu"]:
        x = full.clone().requires_grad_(True)
        with credit_ops.use_backend(backend):
            loss, _ = credit_ops.policy_loss(x[:, :-1], labels, adv, **kw)
        loss.backward()
        want_loss, want_g, _ = expected(logits, labels, adv, **kw)
        close(loss, want_loss, 1e-5)
        close(x.grad[:, :-1], want_g, 1e-5)
        assert (x.grad[:, -1] == 0).all()


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "gspo", "gated_gspo"])
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace_grad"])
def test_full_model_output(backend, device, loss_type, inplace):
    """(B, T + 1, V) logits: the last position is dropped; the gradient covers the whole tensor (zero last row)."""
    logits, labels, adv, kw = sample(2, 5, 19, torch.float32, device)
    full = torch.randn(2, 6, 19, device=device)
    full[:, :-1] = logits
    kw.update(loss_type=loss_type, beta=0.1)
    base = full.clone().requires_grad_(True)
    x = base * 1.0
    with credit_ops.use_backend(backend):
        loss, stats = credit_ops.policy_loss(x, labels, adv, inplace_grad=inplace, **kw)
    loss.backward()
    want_loss, want_g, want_stats = expected(logits, labels, adv, **kw)
    close(loss, want_loss, 1e-5)
    close(base.grad[:, :-1], want_g, 1e-5)
    assert (base.grad[:, -1] == 0).all()
    for k, v in want_stats.items():
        close(stats[k], v, 1e-5)


# ---- registration: opcheck and torch.compile
def _op_args(device, dtype=torch.float32, V=13):
    logits, labels, adv, kw = sample(2, 4, V, dtype, device)
    w = R.aggregation_weights(((labels != -100) & kw["mask"]).float(), "token_mean") * kw["gates"]
    return (
        logits.requires_grad_(True),
        labels,
        adv.float(),
        w,
        kw["old_logprobs"],
        kw["ref_logprobs"],
        1.0,
        -100,
        0.2,
        0.28,
        3.0,
        0.1,
        3,
    )


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
def test_opcheck(backend, device):
    op = torch.ops.credit.policy_loss_fwd_triton if backend == "triton" else torch.ops.credit.policy_loss_fwd
    args = _op_args(device)
    torch.library.opcheck(op, args)
    args_on_policy = args[:4] + (None, None) + args[6:11] + (0.0, 0)
    torch.library.opcheck(op, args_on_policy)
    loss, _, _, grad = op(*args, False)  # no gradient wanted: nothing of size V is written
    assert grad.numel() == 0
    torch.testing.assert_close(loss, op(*args)[0])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_rows_op(device):
    """credit::policy_loss_rows_ (the CPU kernel; on CUDA the Hopper cluster kernel): opcheck, and the loss,
    log-probs, entropy and gradient it writes, into a separate buffer and in place, equal policy_loss_fwd's."""
    if device == "cuda" and not HOPPER:
        pytest.skip("policy_loss_rows_ on CUDA is the Hopper cluster kernel")
    logits, *rest = _op_args(device, V=64)  # V x 4 bytes a multiple of 16: the cluster kernel's rows
    logits = logits.detach()
    want = torch.ops.credit.policy_loss_fwd(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in (logits, *rest)))
    op = torch.ops.credit.policy_loss_rows_
    torch.library.opcheck(op.default, (torch.empty_like(logits), logits, *rest, False, True))
    grad = torch.empty_like(logits)
    x = logits.clone()
    for out, got in ((grad, op(grad, logits, *rest, False, True)), (x, op(x, x, *rest, False, True))):
        for g, w in zip((*got, out), want, strict=True):
            close(g, w, 1e-5)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("loss_type", ["dapo", "gated_gspo"])
def test_compile_fullgraph(backend, device, loss_type):
    logits, labels, adv, kw = sample(2, 5, 23, torch.float32, device)

    def f(x, labels, adv, old, ref, mask, gates):
        loss, stats = credit_ops.policy_loss(
            x, labels, adv, old_logprobs=old, ref_logprobs=ref, mask=mask, gates=gates, loss_type=loss_type, beta=0.1
        )
        return loss * 2.0, stats["clip_frac"]

    torch._dynamo.reset()
    inductor = device == "cuda" and loss_type == "dapo"  # inductor once; aot_eager traces the same graph faster
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if inductor else "aot_eager")
    args = (labels, adv, kw["old_logprobs"], kw["ref_logprobs"], kw["mask"], kw["gates"])
    with credit_ops.use_backend(backend):
        x1 = logits.clone().requires_grad_(True)
        out, clip = compiled(x1, *args)
        out.backward()
        x2 = logits.clone().requires_grad_(True)
        want, want_clip = f(x2, *args)
        want.backward()
    close(out, want.detach(), 1e-6)
    close(clip, want_clip, 1e-6)
    close(x1.grad, x2.grad, 1e-6)


# ---- bad input: one case each, named after what is wrong
BAD = [
    pytest.param("loss_type", dict(loss_type="ppo"), id="unknown_loss_type"),
    pytest.param("agg", dict(agg="sum"), id="unknown_agg"),
    pytest.param("kl_type", dict(kl_type="k4", beta=0.1), id="unknown_kl_type"),
    pytest.param("ref_logprobs", dict(beta=0.1, ref_logprobs=None), id="beta_without_ref"),
    pytest.param("max_length", dict(loss_type="dr_grpo"), id="dr_grpo_without_max_length"),
    pytest.param("max_length", dict(agg="seq_mean_token_sum_norm", max_length=0), id="max_length_zero"),
    pytest.param("eps_low", dict(eps_low=-0.1), id="negative_eps_low"),
    pytest.param("eps_low", dict(eps_high=-0.1), id="negative_eps_high"),
    pytest.param("dual_clip", dict(dual_clip=0.5), id="dual_clip_below_1"),
    pytest.param("temperature", dict(temperature=0.0), id="zero_temperature"),
    pytest.param("logits", dict(labels=torch.zeros(2, 5, dtype=torch.long)), id="labels_longer_than_logits"),
    pytest.param("labels", dict(labels=torch.full((2, 4), 11)), id="label_out_of_vocab"),
    pytest.param("advantages", dict(advantages=torch.zeros(3)), id="advantages_wrong_batch"),
    pytest.param("advantages", dict(advantages=torch.zeros(2, 5)), id="advantages_wrong_length"),
    pytest.param("mask", dict(mask=torch.ones(2, 5, dtype=torch.bool)), id="mask_wrong_shape"),
    pytest.param("gates", dict(gates=torch.full((2, 4), 1.5)), id="gates_above_1"),
    pytest.param("old_logprobs", dict(old_logprobs=torch.zeros(2, 3)), id="old_logprobs_wrong_shape"),
    pytest.param("logits", dict(logits=torch.zeros(2, 4)), id="logits_2d"),
    pytest.param("logits", dict(logits=torch.zeros(2, 6, 11)), id="logits_neither_T_nor_T_plus_1"),
    pytest.param("labels", dict(labels=torch.zeros(2, 4)), id="float_labels"),
]


@pytest.mark.parametrize("match,over", BAD)
def test_bad_input(match, over):
    logits, labels, adv, kw = sample(2, 4, 11, torch.float32)
    args = dict(logits=logits, labels=labels, advantages=adv, **kw)
    args.update(over)
    with pytest.raises(ValueError, match=match):
        credit_ops.policy_loss(args.pop("logits"), args.pop("labels"), args.pop("advantages"), **args)
