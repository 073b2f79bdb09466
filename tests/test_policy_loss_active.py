"""active_only=True of policy_loss (over logits) and whole_batch_entropy of both loss ops: the rows whose loss
coefficient is exactly 0 are skipped in the kernel (zero gradient row, logits unread); loss and gradient equal the
dense computation's bit for bit, the statistics cover the active tokens (checked against the reference with the
active tokens as mask), and whole_batch_entropy gives the dense entropy_mean."""

import pytest
import torch

import credit_ops
from credit_ops import reference as R
from credit_ops.ops.policy_loss import active_tokens
from tests.conftest import backend_devices

KERNEL_BACKENDS = [(b, d) for b, d in backend_devices() if b != "reference" and (b, d) != ("native", "cuda")]
KERNEL_IDS = [f"{b}-{d}" for b, d in KERNEL_BACKENDS]
TOKEN_LOSSES = ["grpo", "dapo", "dr_grpo", "bnpo"]


def sample(B=4, T=7, V=29, dtype=torch.float64, device="cpu", seed=0):
    """Logits and the inputs of a credit-method batch: a group with equal rewards (advantage 0), gates 0 outside
    the edits, masked and ignored tokens, old and reference log-probs near the current ones."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, -2:] = -100
    adv = torch.randn(B, T, generator=g)
    adv[1] = 0.0
    gates = torch.rand(B, T, generator=g)
    gates[gates < 0.5] = 0.0
    mask = torch.rand(B, T, generator=g) > 0.15
    cur = R.token_logprobs(logits.double(), labels)
    old = (cur + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (cur + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    kw = dict(gates=gates, mask=mask, old_logprobs=old, ref_logprobs=ref)
    return logits.to(device), labels.to(device), adv.to(device), {k: v.to(device) for k, v in kw.items()}


def active_of(labels, adv, kw, beta):
    valid = (labels != -100) & kw["mask"]
    return active_tokens(valid * kw["gates"], adv, beta)


def loss_grad(backend, logits, labels, adv, **kw):
    x = logits.detach().clone().requires_grad_(True)
    with credit_ops.use_backend(backend):
        loss, stats = credit_ops.policy_loss(x, labels, adv, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g, stats


@pytest.mark.parametrize("beta", [0.0, 0.1], ids=["no_kl", "kl"])
@pytest.mark.parametrize("loss_type", TOKEN_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
def test_active_only_matches_dense(backend, device, dtype, loss_type, beta):
    logits, labels, adv, kw = sample(dtype=dtype, device=device)
    kw.update(loss_type=loss_type, beta=beta, max_length=9)
    dense, dense_g, _ = loss_grad(backend, logits, labels, adv, **kw)
    loss, g, stats = loss_grad(backend, logits, labels, adv, active_only=True, **kw)
    assert torch.equal(loss, dense) and torch.equal(g, dense_g)  # the same arithmetic on the active rows, 0 elsewhere
    active = active_of(labels, adv, kw, beta)
    assert 0 < active.sum() < ((labels != -100) & kw["mask"]).sum()
    assert torch.equal(g[~active], torch.zeros_like(g[~active]))
    if dtype == torch.float64:  # against the float64 oracle; its statistics with the active tokens as the mask
        x = logits.detach().cpu().requires_grad_(True)
        cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        want, want_stats = R.policy_loss(x, labels.cpu(), adv.cpu(), **cpu)
        (want_g,) = torch.autograd.grad(want, x)
        tol = 1e-9 if backend != "triton" else 1e-7
        torch.testing.assert_close(loss.cpu(), want.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(g.cpu(), want_g, rtol=tol, atol=tol)
        _, active_stats = R.policy_loss(logits.cpu(), labels.cpu(), adv.cpu(), **{**cpu, "mask": active.cpu()})
        for k, v in active_stats.items():
            torch.testing.assert_close(stats[k].cpu().double(), v.double(), rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
def test_skipped_rows_are_not_read(backend, device):
    """NaN logits in the skipped rows reach neither the loss nor the gradient (the dense computation's NaN
    propagation needs the row to be read): the result is that of clean logits."""
    logits, labels, adv, kw = sample(device=device)
    active = active_of(labels, adv, kw, 0.0)
    dirty = torch.where(active.unsqueeze(-1), logits, float("nan"))
    want, want_g, want_stats = loss_grad(backend, logits, labels, adv, active_only=True, **kw)
    loss, g, stats = loss_grad(backend, dirty, labels, adv, active_only=True, **kw)
    assert torch.equal(loss, want) and torch.equal(g, want_g)
    assert all(torch.equal(stats[k], want_stats[k]) for k in stats)


@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace_grad"])
@pytest.mark.parametrize("full_output", [False, True], ids=["shifted", "full_output"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
def test_whole_batch_entropy(backend, device, full_output, inplace):
    """whole_batch_entropy: entropy_mean is the dense one (every valid token), the other statistics those of
    active_only; with inplace_grad too (the skipped rows are read before the in-place kernel overwrites them) and
    on the model's full (B, T + 1, V) output."""
    logits, labels, adv, kw = sample(device=device)
    if full_output:
        logits = torch.cat([logits, torch.randn_like(logits[:, :1])], 1)
    _, _, dense = loss_grad(backend, logits, labels, adv, **kw)
    _, want_g, sparse = loss_grad(backend, logits, labels, adv, active_only=True, **kw)
    x = logits.detach().clone().requires_grad_(True)
    with credit_ops.use_backend(backend):
        loss, stats = credit_ops.policy_loss(
            x, labels, adv, active_only=True, whole_batch_entropy=True, inplace_grad=inplace, **kw
        )
    (g,) = torch.autograd.grad(loss, x)
    assert torch.equal(g, want_g)
    torch.testing.assert_close(stats["entropy_mean"], dense["entropy_mean"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(sparse["entropy_mean"], dense["entropy_mean"])  # the test can tell them apart
    for k in R.STAT_NAMES:
        if k != "entropy_mean":
            assert torch.equal(stats[k], sparse[k]), k


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS, ids=KERNEL_IDS)
def test_fused_linear_whole_batch_entropy(backend, device):
    """The fused head's whole_batch_entropy: the dense entropy_mean, the other statistics and the gradients those
    of active_only."""
    g = torch.Generator().manual_seed(5)
    B, T, H, V = 4, 9, 8, 23
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(device)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(device)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv[1] = 0.0
    gates = (torch.rand(B, T, generator=g) > 0.6).double().to(device)
    mask = (torch.rand(B, T, generator=g) > 0.1).to(device)
    kw = dict(gates=gates, mask=mask, chunk_size=5)
    out = {}
    with credit_ops.use_backend(backend):
        for name, opts in [
            ("dense", {}),
            ("active", dict(active_only=True)),
            ("whole", dict(active_only=True, whole_batch_entropy=True)),
        ]:
            x = hidden.clone().requires_grad_(True)
            loss, stats = credit_ops.fused_linear_policy_loss(x, weight, labels, adv.to(device), **kw, **opts)
            out[name] = (loss, torch.autograd.grad(loss, x)[0], stats)
    (_, _, dense), (a_loss, a_g, active), (w_loss, w_g, whole) = out["dense"], out["active"], out["whole"]
    assert torch.equal(w_loss, a_loss) and torch.equal(w_g, a_g)
    torch.testing.assert_close(whole["entropy_mean"], dense["entropy_mean"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(active["entropy_mean"], dense["entropy_mean"])
    for k in R.STAT_NAMES:
        if k != "entropy_mean":
            assert torch.equal(whole[k], active[k]), k


def test_active_only_compiles():
    """No host synchronisation and no graph break: torch.compile(fullgraph=True) gives the eager results."""
    logits, labels, adv, kw = sample(dtype=torch.float32)
    opts = dict(active_only=True, whole_batch_entropy=True, **kw)
    compiled = torch.compile(lambda x: credit_ops.policy_loss(x, labels, adv, **opts), fullgraph=True)
    x, y = (logits.clone().requires_grad_(True) for _ in range(2))
    loss, stats = compiled(x)
    want, want_stats = credit_ops.policy_loss(y, labels, adv, **opts)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, y)[0])
    torch.testing.assert_close(loss, want)
    for k in want_stats:
        torch.testing.assert_close(stats[k], want_stats[k], msg=k)
