"""credit_ops.fused_linear_policy_loss / fused_linear_logprobs: equal to the logits path and the reference, gradients
for hidden, weight and bias, chunking, no-grad mode, opcheck, torch.compile, bad input."""

import pytest
import torch

import credit_ops
from credit_ops import reference as R
from tests.conftest import backend_devices, large_outputs

KERNEL_BACKENDS = [(b, d) for b, d in backend_devices() if b != "reference" and (b, d) != ("native", "cuda")]
KERNEL_IDS = [f"{b}-{d}" for b, d in KERNEL_BACKENDS]


def sample(B=2, T=5, H=8, V=23, dtype=torch.float64, device="cpu", bias=True, per_token=True):
    hidden = torch.randn(B, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) / H**0.5 * 2
    b = torch.randn(V, dtype=torch.float64) * 0.5 if bias else None
    labels = torch.randint(0, V, (B, T))
    labels[0, -1] = -100
    cur = R.token_logprobs(torch.nn.functional.linear(hidden, weight, b), labels)
    kw = dict(
        old_logprobs=(cur + 0.3 * torch.randn(B, T, dtype=torch.float64)).float(),
        ref_logprobs=(cur + 0.3 * torch.randn(B, T, dtype=torch.float64)).float(),
        mask=torch.rand(B, T) > 0.2,
        gates=torch.rand(B, T),
    )
    adv = torch.randn(B, T) if per_token else torch.randn(B)
    cast = lambda t: None if t is None else t.to(dtype).to(device)
    kw = {k: v.to(device) for k, v in kw.items()}
    return cast(hidden), cast(weight), cast(b), labels.to(device), adv.to(device), kw


def grads(fn, hidden, weight, bias, scale=1.0):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss, stats = fn(*leaves)
    gs = torch.autograd.grad(loss * scale, leaves)
    return loss.detach(), stats, gs


def close(got, want, tol):
    want = want.detach().cpu().double()
    torch.testing.assert_close(
        got.detach().cpu().double(),
        want,
        rtol=tol,
        atol=tol * max(1.0, want.abs().max().item() if want.numel() else 1.0),
    )


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("loss_type", R.LOSS_TYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("chunk_size", [None, 3, 5], ids=["one_chunk", "chunks_cut_sequences", "chunk_per_sequence"])
def test_matches_reference(backend, device, loss_type, bias, chunk_size):
    """Every loss type; the GSPO family in three matmuls over chunks of whole sequences (one chunk, a sequence per
    chunk) and, when a chunk would cut a sequence, through the log-prob pass and a recomputing backward."""
    hidden, weight, b, labels, adv, kw = sample(device=device, bias=bias)
    opts = dict(loss_type=loss_type, beta=0.1, max_length=7, dual_clip=3.0, **kw)

    def ours(h, w, *bb):
        with credit_ops.use_backend(backend):
            return credit_ops.fused_linear_policy_loss(
                h, w, labels, adv, bias=bb[0] if bb else None, chunk_size=chunk_size, **opts
            )

    def ref(h, w, *bb):
        return R.fused_linear_policy_loss(
            h,
            w,
            labels.cpu(),
            adv.cpu(),
            bias=bb[0] if bb else None,
            **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in opts.items()},
        )

    cpu = lambda t: None if t is None else t.cpu()
    loss, stats, gs = grads(ours, hidden, weight, b, scale=1.7)
    want_loss, want_stats, want_gs = grads(ref, cpu(hidden), cpu(weight), cpu(b), scale=1.7)
    tol = 1e-9 if backend != "triton" else 1e-7 if device == "cpu" else 1e-5  # Triton: fp32 scalar args
    close(loss, want_loss, tol)
    for g, wg in zip(gs, want_gs, strict=True):
        close(g, wg, tol)
    for k, v in want_stats.items():
        close(stats[k], v, tol)


def err(a, b):
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "gspo", "gated_gspo"])
def test_equals_logits_path_fp32(backend, device, loss_type):
    """The fused LM head gives what policy_loss gives on the materialised logits, in float32."""
    hidden, weight, b, labels, adv, kw = sample(3, 6, 16, 97, torch.float32, device)
    opts = dict(loss_type=loss_type, beta=0.05, **kw)

    def fused(h, w, bb):
        return credit_ops.fused_linear_policy_loss(h, w, labels, adv, bias=bb, chunk_size=4, **opts)

    def logits_path(h, w, bb):
        return credit_ops.policy_loss(torch.nn.functional.linear(h, w, bb), labels, adv, **opts)

    with credit_ops.use_backend(backend):
        loss, stats, gs = grads(fused, hidden, weight, b)
        want_loss, want_stats, want_gs = grads(logits_path, hidden, weight, b)
    close(loss, want_loss, 1e-5)
    for k, v in want_stats.items():
        close(stats[k], v, 1e-5)
    for g, wg in zip(gs, want_gs, strict=True):
        assert g.dtype == torch.float32
        close(g, wg, 1e-5)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "gspo", "gated_gspo"])
def test_bf16_error_within_2x_eager(backend, device, loss_type):
    """bf16 hidden, weight and bias, against float64 on the same values: the loss and the gradients are at most 2x
    as far off as the same loss computed eagerly in bf16 (the head's matmul, log_softmax and the loss formulas all
    in bf16). The per-token inputs are bf16-representable, so rounding them costs the eager loss nothing."""
    hidden, weight, b, labels, adv, kw = sample(3, 6, 16, 97, torch.bfloat16, device)
    kw = {k: v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v for k, v in kw.items()}
    adv = adv.to(torch.bfloat16).float()
    opts = dict(loss_type=loss_type, beta=0.05, eps_low=0.2, eps_high=0.28, **kw)

    def fused(h, w, bb):
        with credit_ops.use_backend(backend):
            return credit_ops.fused_linear_policy_loss(h, w, labels, adv, bias=bb, chunk_size=4, **opts)

    def truth(h, w, bb):
        return R.fused_linear_policy_loss(
            h,
            w,
            labels.cpu(),
            adv.cpu(),
            bias=bb,
            **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in opts.items()},
        )

    def eager_bf16(h, w, bb):
        logits = torch.nn.functional.linear(h, w, bb)
        lp = torch.log_softmax(logits, -1).gather(-1, labels.cpu().clamp(min=0).unsqueeze(-1)).squeeze(-1)
        valid = ((labels.cpu() != -100) & kw["mask"].cpu()).to(torch.bfloat16)
        bf = lambda t: t.cpu().to(torch.bfloat16)
        return R.loss_from_logprobs(
            lp,
            torch.zeros_like(lp),
            valid,
            bf(adv),
            old_logprobs=bf(kw["old_logprobs"]),
            ref_logprobs=bf(kw["ref_logprobs"]),
            gates=bf(kw["gates"]),
            loss_type=loss_type,
            eps_low=0.2,
            eps_high=0.28,
            dual_clip=None,
            beta=0.05,
            kl_type="k3",
            agg=R.DEFAULT_AGG[loss_type],
            max_length=None,
        )

    cpu = [t.detach().cpu() for t in (hidden, weight, b)]
    loss, _, gs = grads(fused, hidden, weight, b)
    want_loss, _, want_gs = grads(truth, *(t.double() for t in cpu))
    eager_loss, _, eager_gs = grads(eager_bf16, *cpu)
    # The eager loss is one bf16 scalar: its rounding (up to half a bf16 ulp, 2^-9 relative) is part of its error
    # even where it happens to land next to the float64 value.
    assert err(loss, want_loss) <= 2 * max(err(eager_loss, want_loss), 2**-9 * abs(want_loss.item())) + 1e-6
    for name, g, wg, eg in zip(("hidden", "weight", "bias"), gs, want_gs, eager_gs, strict=True):
        assert g.dtype == torch.bfloat16
        assert err(g, wg) <= 2 * err(eg, wg) + 1e-7, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: full-size vocabulary")
@pytest.mark.parametrize("loss_type", ["dapo", "gspo"])
def test_real_vocab_cuda(loss_type):
    """V = 151936 bf16 (the long-row layouts in place on each chunk), several chunks, against the logits path."""
    torch.manual_seed(0)
    B, T, H, V = 4, 96, 256, 151936
    hidden = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(V, H, device="cuda") / H**0.5).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, T), device="cuda")
    adv = torch.randn(B, T, device="cuda")
    opts = dict(loss_type=loss_type, gates=torch.rand(B, T, device="cuda"), mask=torch.rand(B, T, device="cuda") > 0.1)

    def fused(h, w, *_):
        return credit_ops.fused_linear_policy_loss(h, w, labels, adv, chunk_size=128, **opts)

    def logits_path(h, w, *_):
        return credit_ops.policy_loss(torch.nn.functional.linear(h, w), labels, adv, **opts)

    loss, stats, gs = grads(fused, hidden, weight, None)
    want_loss, want_stats, want_gs = grads(logits_path, hidden, weight, None)
    close(loss, want_loss, 1e-3)
    for k, v in want_stats.items():
        close(stats[k], v, 1e-3)
    for g, wg in zip(gs, want_gs, strict=True):
        close(g, wg, 3e-2)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("loss_type", ["dapo", "gspo"])
def test_gradcheck(backend, device, loss_type):
    hidden, weight, b, labels, adv, kw = sample(2, 3, 4, 9, torch.float64, device)
    kw = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}

    def f(h, w, bb):
        with credit_ops.use_backend(backend):
            return credit_ops.fused_linear_policy_loss(
                h,
                w,
                labels,
                adv,
                bias=bb,
                loss_type=loss_type,
                beta=0.1,
                eps_low=0.2,
                eps_high=0.28,
                chunk_size=2,
                **kw,
            )[0]

    args = tuple(t.detach().requires_grad_(True) for t in (hidden, weight, b))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_logprobs(backend, device, bias):
    hidden, weight, b, labels, _, _ = sample(2, 5, 8, 31, torch.float64, device, bias=bias)
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight) + ((b,) if bias else ())]
    with credit_ops.use_backend(backend):
        lp, ent = credit_ops.fused_linear_logprobs(
            leaves[0],
            leaves[1],
            labels,
            bias=leaves[2] if bias else None,
            temperature=0.8,
            return_entropy=True,
            chunk_size=3,
        )
    cot = torch.randn_like(lp)
    gs = torch.autograd.grad((lp * cot).sum(), leaves)
    ref_leaves = [t.detach().cpu().clone().requires_grad_(True) for t in leaves]
    want_lp, want_ent = R.fused_linear_logprobs(
        ref_leaves[0],
        ref_leaves[1],
        labels.cpu(),
        bias=ref_leaves[2] if bias else None,
        temperature=0.8,
        return_entropy=True,
    )
    want_gs = torch.autograd.grad((want_lp * cot.cpu()).sum(), ref_leaves)
    tol = 1e-9 if backend != "triton" else 1e-7 if device == "cpu" else 1e-5  # Triton: fp32 scalar args
    assert lp.shape == labels.shape
    close(lp, want_lp, tol)
    close(ent, want_ent, tol)
    assert not ent.requires_grad
    for g, wg in zip(gs, want_gs, strict=True):
        close(g, wg, tol)
    # (N, H) hidden with flat labels, under no_grad: the old-policy / reference pass
    with torch.no_grad(), credit_ops.use_backend(backend):
        flat = credit_ops.fused_linear_logprobs(
            hidden.reshape(-1, 8), weight, labels.reshape(-1), bias=b, temperature=0.8
        )
    close(flat, want_lp.reshape(-1), tol)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
def test_packed_and_no_grad(backend, device):
    hidden, weight, b, labels, adv, kw = sample(1, 7, 8, 19, torch.float32, device)
    opts = dict(loss_type="grpo", beta=0.05, **kw)
    with credit_ops.use_backend(backend):
        want, _ = credit_ops.fused_linear_policy_loss(hidden, weight, labels, adv, bias=b, **opts)
        flat_opts = {k: v.reshape(-1) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
        packed, _ = credit_ops.fused_linear_policy_loss(
            hidden.reshape(-1, 8), weight, labels.reshape(-1), adv.reshape(-1), bias=b, **flat_opts
        )
        with torch.no_grad():
            h = hidden.clone().requires_grad_(True)
            nograd, _ = credit_ops.fused_linear_policy_loss(h, weight, labels, adv, bias=b, **opts)
    close(packed, want, 1e-6)
    close(nograd, want, 1e-6)
    assert not nograd.requires_grad


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
def test_opcheck(backend, device):
    hidden, weight, b, labels, adv, kw = sample(2, 3, 4, 11, torch.float32, device)
    w = torch.rand(6, device=device)
    flat = lambda t: t.reshape(-1).float()
    sfx = "_triton" if backend == "triton" else ""
    args = (
        hidden.reshape(-1, 4).requires_grad_(True),
        weight.requires_grad_(True),
        b.requires_grad_(True),
        labels.reshape(-1),
        flat(adv),
        w,
        flat(kw["old_logprobs"]),
        flat(kw["ref_logprobs"]),
        1.0,
        -100,
        0.2,
        0.28,
        0.0,
        0.1,
        3,
        2,
        True,
    )
    torch.library.opcheck(getattr(torch.ops.credit, f"fused_linear_policy_loss_fwd{sfx}"), args)
    torch.library.opcheck(getattr(torch.ops.credit, f"fused_linear_policy_loss_fwd{sfx}"), args[:-1] + (False,))
    lp_args = (args[0], args[1], None, args[3], 1.0, -100, 2)
    torch.library.opcheck(getattr(torch.ops.credit, f"fused_linear_logprobs_fwd{sfx}"), lp_args)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
@pytest.mark.parametrize("loss_type", ["dapo", "gspo"])
def test_compile_fullgraph(backend, device, loss_type):
    hidden, weight, b, labels, adv, kw = sample(2, 4, 8, 17, torch.float32, device)

    def f(h, w, bb):
        loss, stats = credit_ops.fused_linear_policy_loss(
            h, w, labels, adv, bias=bb, loss_type=loss_type, beta=0.1, chunk_size=3, **kw
        )
        return loss * 3.0, stats["entropy_mean"]

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    l1 = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    l2 = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    with credit_ops.use_backend(backend):
        out, ent = compiled(*l1)
        out.backward()
        want, want_ent = f(*l2)
        want.backward()
    close(out, want, 1e-6)
    close(ent, want_ent, 1e-6)
    for a, c in zip(l1, l2, strict=True):
        close(a.grad, c.grad, 1e-6)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
def test_backward_allocates_no_weight_sized_tensor(backend, device):
    """The backward hands back the gradients the forward computed: no zero (V, H) tensor is materialised for the
    outputs that get no gradient."""
    N, H, V = 33, 24, 517
    h = torch.randn(N, H, device=device, requires_grad=True)
    w = torch.randn(V, H, device=device, requires_grad=True)
    labels = torch.randint(0, V, (N,), device=device)
    with credit_ops.use_backend(backend):
        loss, _ = credit_ops.fused_linear_policy_loss(h, w, labels, torch.randn(N, device=device))
    got = {}
    seen = large_outputs(lambda: got.setdefault("g", torch.autograd.grad(loss, (h, w))), V * H)
    # On the CPU the C++ backward returns it without running an op: nothing seen
    assert {ptr for _, ptr in seen} <= {got["g"][1].data_ptr()}, seen


@pytest.mark.parametrize(
    "match,make",
    [
        pytest.param("weight.shape", lambda f, h, w, b, y, a: f(h, w[:, :3], y, a), id="weight_wrong_width"),
        pytest.param("hidden", lambda f, h, w, b, y, a: f(h.double(), w, y, a), id="hidden_dtype_not_weight_dtype"),
        pytest.param("one row per label", lambda f, h, w, b, y, a: f(h[:, :2], w, y, a), id="fewer_rows_than_labels"),
        pytest.param("bias", lambda f, h, w, b, y, a: f(h, w, y, a, bias=b[:5]), id="bias_wrong_length"),
        pytest.param("loss_type", lambda f, h, w, b, y, a: f(h, w, y, a, loss_type="x"), id="unknown_loss_type"),
        pytest.param(
            "max_length", lambda f, h, w, b, y, a: f(h, w, y, a, loss_type="dr_grpo"), id="dr_grpo_without_max_length"
        ),
        pytest.param("labels", lambda f, h, w, b, y, a: f(h, w, torch.full_like(y, 11), a), id="label_out_of_vocab"),
        pytest.param(
            "weight.shape",
            lambda f, h, w, b, y, a: credit_ops.fused_linear_logprobs(h, w[:, :2], y),
            id="logprobs_weight_wrong_width",
        ),
    ],
)
def test_bad_input(match, make):
    hidden, weight, b, labels, adv, _ = sample(2, 3, 4, 11, torch.float32)
    with pytest.raises(ValueError, match=match):
        make(credit_ops.fused_linear_policy_loss, hidden, weight, b, labels, adv)


def test_autocast_runs_the_head_in_the_autocast_dtype():
    """Under torch.autocast, fp32 master weights: the head computes in bf16 (like nn.Linear) and the gradients
    reach the fp32 tensors."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    weight = (torch.randn(40, 16) / 4).requires_grad_()
    labels = torch.randint(0, 40, (2, 5))
    adv = torch.randn(2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = credit_ops.fused_linear_policy_loss(hidden, weight, labels, adv)
        logp = credit_ops.fused_linear_logprobs(hidden, weight, labels)
    loss.backward()
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    want, _ = credit_ops.fused_linear_policy_loss(h16, w16, labels, adv)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(logp, credit_ops.fused_linear_logprobs(h16.detach(), w16.detach(), labels))
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(hidden.grad, h16.grad.float())
    torch.testing.assert_close(weight.grad, w16.grad.float())


@pytest.mark.parametrize("beta", [0.0, 0.1], ids=["no_kl", "kl"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
def test_active_only_matches_dense(backend, device, loss_type, beta):
    """active_only leaves tokens without loss or gradient out of the matmuls: the same loss and gradients as the
    dense computation, statistics over the active tokens (checked against the dense path's tokens)."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 4, 9, 8, 23
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).to(device)
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).to(device)
    bias = torch.randn(V, generator=g, dtype=dtype).to(device)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    adv[1] = 0.0  # a group with equal rewards
    gates = (torch.rand(B, T, generator=g) > 0.6).to(dtype)  # edits of repaired samples
    mask = torch.rand(B, T, generator=g) > 0.1
    old = torch.randn(B, T, generator=g, dtype=dtype) * 0.1 - 3.0
    ref = torch.randn(B, T, generator=g, dtype=dtype) * 0.1 - 3.0
    kw = dict(
        loss_type=loss_type,
        beta=beta,
        max_length=12,
        chunk_size=5,
        mask=mask.to(device),
        gates=gates.to(device),
        old_logprobs=old.to(device),
        ref_logprobs=ref.to(device),
    )
    results = []
    with credit_ops.use_backend(backend):
        for active_only in (False, True):
            x, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
            loss, stats = credit_ops.fused_linear_policy_loss(
                x, w, labels, adv.to(device), bias=b, active_only=active_only, **kw
            )
            results.append((loss, torch.autograd.grad(loss, (x, w, b)), stats))
    (dense, dense_g, dense_stats), (sparse, sparse_g, sparse_stats) = results
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    if backend == "triton":
        tol = dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 else tol
    torch.testing.assert_close(sparse, dense, **tol)
    for a, b in zip(sparse_g, dense_g, strict=True):
        torch.testing.assert_close(a, b, **tol)
    valid = mask & (labels.cpu() != -100)
    carries = valid & (gates > 0) & ((adv != 0) | (beta > 0))
    assert sparse_stats["num_tokens"].item() == carries.sum().item() < dense_stats["num_tokens"].item()


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [("reference", "cpu")], ids=lambda x: str(x))
def test_logprobs_select(backend, device):
    """select computes the selected tokens only: their log-probs, entropies and gradients are the full call's,
    the others are 0 and get no gradient."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 7, 6, generator=g, dtype=torch.float64).to(device)
    weight = torch.randn(19, 6, generator=g, dtype=torch.float64).to(device)
    labels = torch.randint(0, 19, (3, 7), generator=g).to(device)
    select = (torch.rand(3, 7, generator=g) > 0.6).to(device)
    with credit_ops.use_backend(backend):
        x = hidden.clone().requires_grad_(True)
        full, full_ent = credit_ops.fused_linear_logprobs(x, weight, labels, return_entropy=True)
        (full_g,) = torch.autograd.grad((full * select).sum(), x)
        y = hidden.clone().requires_grad_(True)
        part, part_ent = credit_ops.fused_linear_logprobs(y, weight, labels, return_entropy=True, select=select)
        (part_g,) = torch.autograd.grad(part.sum(), y)
    torch.testing.assert_close(part, torch.where(select, full, 0.0).detach(), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(part_ent, torch.where(select, full_ent, 0.0), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(part_g, full_g, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="select"):
        credit_ops.fused_linear_logprobs(hidden, weight, labels, select=select.float())
