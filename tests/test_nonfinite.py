"""Non-finite logits (project issue 16): a NaN or +inf logit anywhere in a row gives NaN log-probs, entropies,
losses and gradients on every backend, as torch.log_softmax does (a diverging model must not look healthy), or the
op raises; -inf logits (masked vocabulary entries) stay valid and match the reference."""

import re

import pytest
import torch

import credit_ops
from credit_ops import reference as R
from tests.conftest import backend_devices

BACKENDS = backend_devices()
IDS = [f"{b}-{d}" for b, d in BACKENDS]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# V = 37: scalar tails only; 100: SIMD body + tail (CPU); 20000: Triton's streamed (two-pass) policy-loss layout
VOCABS = [37, 100, 20000]
BAD = {"nan": float("nan"), "posinf": float("inf")}
LABEL = 5


def _raises_on_nonfinite(fn):
    """fn() -> outputs, or None when the op rejected the non-finite input with a clear error (also allowed)."""
    try:
        return fn()
    except (RuntimeError, ValueError) as e:
        if re.search(r"nan|finite|inf", str(e), re.IGNORECASE):
            return None
        raise


def _logits(V, dtype, device, bad=None, where="away"):
    x = (torch.randn(2, 3, V, dtype=torch.float64) * 2).to(dtype)
    if bad is not None:
        x[0, 1, LABEL if where == "label" else V - 2] = bad
    return x.to(device)


def _labels(device):
    y = torch.full((2, 3), LABEL)
    y[1, 2] = -100
    return y.to(device)


def _check_bad_row(outputs, grad):
    """Row (0, 1) holds the bad logit: NaN in every output and every gradient entry of that row; other rows (and
    the ignored position) stay finite."""
    for o in outputs:
        assert torch.isnan(o[0, 1]).item(), o
        good = torch.ones_like(o, dtype=torch.bool)
        good[0, 1] = False
        assert torch.isfinite(o[good]).all(), o
    if grad is not None:
        assert torch.isnan(grad[0, 1]).all()
        others = torch.ones(grad.shape[:2], dtype=torch.bool, device=grad.device)
        others[0, 1] = False
        assert torch.isfinite(grad[others]).all()
        assert (grad[1, 2] == 0).all()  # ignored position


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("where", ["away", "label"])
def test_token_logprobs_nonfinite(backend, device, dtype, V, bad, where):
    x = _logits(V, dtype, device, BAD[bad], where).requires_grad_()
    y = _labels(device)

    def run():
        with credit_ops.use_backend(backend):
            lp, h = credit_ops.token_logprobs(x, y, return_entropy=True)
            (lp.sum() + 0.5 * h.sum()).backward()
        return lp.detach(), h.detach()

    out = _raises_on_nonfinite(run)
    if out is None:
        return
    lp, h = out
    _check_bad_row([lp, h], x.grad.float())
    with torch.no_grad(), credit_ops.use_backend(backend):
        lp2 = credit_ops.token_logprobs(x.detach(), y)
    assert torch.isnan(lp2[0, 1]).item()


# In place is a kernel mode (not the reference's); the long-row layout (V = 20000) once, in fp32, out of place.
POLICY_CASES = [
    pytest.param(backend, device, dtype, V, mode, id=f"{backend}-{device}-{str(dtype).split('.')[-1]}-V{V}-{mode}")
    for backend, device in BACKENDS
    for dtype in DTYPES
    for V in VOCABS
    for mode in ("on_policy", "off_policy_kl", "inplace", "gspo")
    if not (mode == "inplace" and backend == "reference")
    and not (V == 20000 and (dtype != torch.float32 or mode == "inplace"))
]


@pytest.mark.parametrize("backend,device,dtype,V,mode", POLICY_CASES)
@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("where", ["away", "label"])
def test_policy_loss_nonfinite(backend, device, dtype, V, bad, where, mode):
    x0 = _logits(V, dtype, device, BAD[bad], where)
    y = _labels(device)
    adv = torch.randn(2, 3, device=device)
    kw = {}
    if mode == "off_policy_kl":
        kw = dict(
            old_logprobs=torch.full((2, 3), -3.0, device=device),
            ref_logprobs=torch.full((2, 3), -3.5, device=device),
            beta=0.1,
            dual_clip=3.0,
        )
    elif mode == "gspo":  # a sequence ratio: the log-prob pass, then the gradient from the coefficients
        kw = dict(loss_type="gspo", old_logprobs=torch.full((2, 3), -3.0, device=device))
    x = x0.clone().requires_grad_()

    def run():
        with credit_ops.use_backend(backend):
            # in place: a non-leaf, like an LM head's output, whose storage receives the gradient
            loss, _ = credit_ops.policy_loss(
                x * 1.0 if mode == "inplace" else x, y, adv, inplace_grad=mode == "inplace", **kw
            )
            loss.backward()
        return loss.detach(), x.grad

    out = _raises_on_nonfinite(run)
    if out is None:
        return
    loss, grad = out
    assert torch.isnan(loss).item(), loss
    grad = grad.float()
    assert torch.isnan(grad[0, 1]).all()
    others = torch.ones(2, 3, dtype=torch.bool, device=device)
    others[0] = mode != "gspo"  # gspo: the NaN reaches its whole sequence through the sequence ratio
    others[0, 1] = False
    # a NaN loss makes every gradient NaN only through the loss's own backward; rows are independent here
    assert torch.isfinite(grad[others]).all()


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [37, 100])
def test_neginf_logits_stay_valid(backend, device, dtype, V):
    x = _logits(V, dtype, device)
    x[..., ::3] = float("-inf")  # a masked vocabulary (the labels' entries stay finite)
    x[..., LABEL] = 1.0
    x[0, 0, : V // 2] = float("-inf")  # a row whose first SIMD blocks are all -inf
    x[0, 0, LABEL] = float("-inf")
    x[0, 0, V - 1] = 0.5
    y = _labels(device)
    y[0, 0] = V - 1
    xr = x.detach().clone().double().requires_grad_()
    lp_r, h_r = R.token_logprobs(xr, y, return_entropy=True)
    (lp_r.sum() + h_r.sum()).backward()
    xg = x.clone().requires_grad_()
    with credit_ops.use_backend(backend):
        lp, h = credit_ops.token_logprobs(xg, y, return_entropy=True)
        (lp.sum() + h.sum()).backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype != torch.bfloat16 else dict(atol=2e-2, rtol=2e-2)
    assert torch.isfinite(lp).all() and torch.isfinite(h).all() and torch.isfinite(xg.grad).all()
    torch.testing.assert_close(lp.double(), lp_r.detach(), **tol)
    torch.testing.assert_close(h.double(), h_r.detach(), **tol)
    torch.testing.assert_close(xg.grad.double(), xr.grad.to(xg.grad.dtype).double(), **tol)

    adv = torch.randn(2, 3, device=device)
    old = lp_r.detach().float() - 0.1
    xg = x.clone().requires_grad_()
    with credit_ops.use_backend(backend):
        loss, _ = credit_ops.policy_loss(xg, y, adv, old_logprobs=old)
        loss.backward()
    xr = x.detach().clone().double().requires_grad_()
    loss_r, _ = R.policy_loss(xr, y, adv, old_logprobs=old)
    loss_r.backward()
    assert torch.isfinite(loss) and torch.isfinite(xg.grad).all()
    torch.testing.assert_close(loss.double(), loss_r.detach(), **tol)
    torch.testing.assert_close(xg.grad.double(), xr.grad.to(xg.grad.dtype).double(), **tol)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("in_", ["hidden", "weight"])
@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_fused_linear_nonfinite(backend, device, in_, bad):
    N, H, V = 6, 16, 40
    hidden = torch.randn(N, H, device=device)
    weight = torch.randn(V, H, device=device) * 0.3
    labels = torch.randint(0, V, (N,), device=device)
    labels[5] = -100
    if in_ == "hidden":
        hidden[2, 3] = BAD[bad]  # row 2's logits all NaN (+inf: mixed +-inf / NaN)
        bad_rows = torch.zeros(N, dtype=torch.bool)
        bad_rows[2] = True
    else:
        weight[7, 3] = BAD[bad]  # vocabulary entry 7: NaN in every row (+inf: +inf where hidden[:, 3] > 0, else -inf)
        hidden[0, 3] = 1.0
        hidden[1, 3] = -1.0  # +inf weight: a valid -inf logit in this row
        bad_rows = torch.ones(N, dtype=torch.bool) if bad == "nan" else hidden[:, 3].cpu() > 0
        bad_rows[5] = False
    adv = torch.randn(N, device=device)
    h = hidden.clone().requires_grad_()
    h2 = hidden.clone().requires_grad_()

    def run():
        with credit_ops.use_backend(backend):
            lp = credit_ops.fused_linear_logprobs(h2, weight, labels)
            lp.sum().backward()  # the log-prob backward: policy_loss_rows_ with the coefficients given
            loss, _ = credit_ops.fused_linear_policy_loss(h.view(1, N, H), weight, labels.view(1, N), adv.view(1, N))
            loss.backward()
        return lp.detach(), loss.detach(), h.grad

    out = _raises_on_nonfinite(run)
    if out is None:
        return
    lp, loss, grad = out
    assert torch.isnan(lp[bad_rows]).all(), lp
    assert torch.isfinite(lp[~bad_rows]).all(), lp
    assert torch.isnan(loss).item(), loss
    assert torch.isnan(grad[bad_rows]).all()
    assert torch.isnan(h2.grad[bad_rows]).all()
    if in_ == "hidden":
        assert torch.isfinite(grad[~bad_rows]).all() and torch.isfinite(h2.grad[~bad_rows]).all()
