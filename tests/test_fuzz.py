"""Property tests (hypothesis, fixed budget, derandomized): token_logprobs, policy_loss, align_edits and
group_advantages on every kernel backend against credit_ops.reference, over random shapes (zero-size dimensions
included), strided, non-contiguous and expanded (stride-0) inputs, extreme values (+-1e4, -inf, subnormals) and
float dtypes."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import credit_ops
from credit_ops import reference as R
from tests.conftest import backend_devices

FUZZ = settings(
    max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
KERNELS = [pytest.param(b, d, id=f"{b}-{d}") for b, d in backend_devices() if b != "reference"]
NATIVE = [pytest.param(b, d, id=f"{b}-{d}") for b, d in backend_devices() if b == "native"]
FLOATS = [torch.float32, torch.float64, torch.bfloat16]
EXTREMES = [1e4, -1e4, float("-inf"), 1e-40, -1e-40, 0.0]


def _tol(dtype, x=None, base=2e-3, backend="native"):
    """fp32 / bf16 kernels accumulate in fp32 on the (rounded) input values, the reference in float64: the error
    of a log-prob grows with the logits' magnitude (an fp32 ulp of 1e4 is ~1e-3). Triton takes its float scalar
    arguments (1 / T, the clip bounds) in fp32."""
    if dtype == torch.float64:
        return dict(atol=1e-9, rtol=1e-9) if backend != "triton" else dict(atol=1e-6, rtol=1e-6)
    big = x[torch.isfinite(x)].abs().max().item() if x is not None and torch.isfinite(x).any() else 0.0
    return dict(atol=base + 4e-7 * big, rtol=1e-4)


def _values(data, shape, dtype):
    """Random logits of `shape` in dtype, a few entries replaced by extremes."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    scale = data.draw(st.sampled_from([1.0, 5.0, 30.0]), label="scale")
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    n = x.numel()
    if n:
        k = data.draw(st.integers(0, min(n, 6)), label="n_extreme")
        for _ in range(k):
            x.view(-1)[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from(EXTREMES))
    return x.to(dtype)


def _layout(data, x):
    """The same values as x (B, T, V), laid out contiguously, as a [:, :-1] slice, with rows in reverse order
    (negative strides are not allowed: a transposed copy instead), or expanded from one batch row (stride 0)."""
    kind = data.draw(st.sampled_from(["contiguous", "slice", "transposed", "expanded"]), label="layout")
    B, T, V = x.shape
    if kind == "slice":
        big = torch.zeros(B, T + 1, V, dtype=x.dtype)
        big[:, :T] = x
        return big[:, :T]
    if kind == "transposed":  # (B, T, V) view of a (T, B, V) tensor: rows strided, V unit
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "expanded" and B > 0:
        return x[:1].expand(B, T, V)
    return x


def _labels(data, B, T, V):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="label_seed"))
    y = torch.randint(0, V, (B, T), generator=g)
    ign = torch.rand(B, T, generator=g) < 0.2
    y[ign] = -100
    return y


def _finite_labels(x, y):
    """The label's own logit stays finite (a -inf label logit has logp -inf: valid, but its loss is not a
    number), and every row keeps one finite logit."""
    x = x.clone()
    B, T, V = x.shape
    for b in range(B):
        for t in range(T):
            j = int(y[b, t]) if y[b, t] >= 0 else 0
            if not torch.isfinite(x[b, t, j]):
                x[b, t, j] = 0.5
    return x


@pytest.mark.parametrize("backend,device", KERNELS)
@FUZZ
@given(
    data=st.data(),
    B=st.integers(0, 3),
    T=st.integers(0, 4),
    V=st.integers(1, 70),
    dtype=st.sampled_from(FLOATS),
    temperature=st.sampled_from([1.0, 0.7]),
    entropy=st.booleans(),
)
def test_token_logprobs_fuzz(backend, device, data, B, T, V, dtype, temperature, entropy):
    x = _values(data, (B, T, V), dtype)
    y = _labels(data, B, T, V)
    x = _finite_labels(x, y)
    if data.draw(st.booleans(), label="all_ignored") and B > 0 and T > 0:
        y[0] = -100
    base = x.detach().clone().requires_grad_()
    xr = x.double().requires_grad_()
    want = R.token_logprobs(xr, y, temperature=temperature, return_entropy=True)
    if data.draw(st.sampled_from(["plain", "layout"]), label="layout?") == "layout":
        with torch.no_grad():
            lp = _layout(data, x)
            want = R.token_logprobs(lp.double(), y, temperature=temperature, return_entropy=True)
            with credit_ops.use_backend(backend):
                got = credit_ops.token_logprobs(lp, y, temperature=temperature, return_entropy=True)
        torch.testing.assert_close(got[0].double(), want[0].detach(), **_tol(dtype, x, backend=backend))
        torch.testing.assert_close(got[1].double(), want[1].detach(), **_tol(dtype, x, backend=backend))
        return
    with credit_ops.use_backend(backend):
        got = credit_ops.token_logprobs(base * 1.0, y, temperature=temperature, return_entropy=True)
    torch.testing.assert_close(got[0].double(), want[0].detach(), **_tol(dtype, x, backend=backend))
    torch.testing.assert_close(got[1].double(), want[1].detach(), **_tol(dtype, x, backend=backend))
    g = torch.Generator().manual_seed(1)
    go = torch.randn(B, T, generator=g, dtype=torch.float64)
    ge = torch.randn(B, T, generator=g, dtype=torch.float64) if entropy else torch.zeros(B, T, dtype=torch.float64)
    (got[0].double() * go + got[1].double() * ge).sum().backward()
    (want[0] * go + want[1] * ge).sum().backward()
    bf16 = dict(atol=2e-2, rtol=2e-2)  # the gradient is rounded to bf16
    gtol = _tol(dtype, x, backend=backend) if dtype != torch.bfloat16 else bf16
    torch.testing.assert_close(base.grad.double(), xr.grad.to(dtype).double(), **gtol)


@pytest.mark.parametrize("backend,device", KERNELS)
@FUZZ
@given(
    data=st.data(),
    B=st.integers(0, 3),
    T=st.integers(0, 4),
    V=st.integers(1, 60),
    dtype=st.sampled_from(FLOATS),
    loss_type=st.sampled_from(["dapo", "grpo", "dr_grpo", "bnpo", "gspo"]),
    off_policy=st.booleans(),
    beta=st.sampled_from([0.0, 0.1]),
    full=st.booleans(),
)
def test_policy_loss_fuzz(backend, device, data, B, T, V, dtype, loss_type, off_policy, beta, full):
    x = _values(data, (B, T, V), dtype)
    y = _labels(data, B, T, V)
    x = _finite_labels(x, y)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="aux_seed"))
    adv_shape = data.draw(st.sampled_from([(B,), (B, T)]), label="adv_shape")
    adv = torch.randn(adv_shape, generator=g)
    if data.draw(st.booleans(), label="expanded_adv") and len(adv_shape) == 2 and T > 0:
        adv = adv[:, :1].expand(B, T)  # stride 0
    cur = R.token_logprobs(x.double(), y).float()
    kw = dict(loss_type=loss_type, beta=beta, mask=torch.rand(B, T, generator=g) > 0.2)
    if loss_type == "dr_grpo":
        kw["max_length"] = max(T, 1)
    if off_policy:
        kw["old_logprobs"] = (cur + 0.3 * torch.randn(B, T, generator=g)).clamp(max=0)
    if beta:
        kw["ref_logprobs"] = (cur + 0.5 * torch.randn(B, T, generator=g)).clamp(max=0)
    xr = x.double().requires_grad_()
    want, _ = R.policy_loss(
        xr, y, adv, **{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    )
    base = x.detach().clone().requires_grad_()
    inp = base * 1.0
    if full:  # the model's (B, T + 1, V) output: its last position is dropped
        inp = torch.cat([inp, torch.zeros(B, 1, V, dtype=dtype)], 1)
    with credit_ops.use_backend(backend):
        loss, _ = credit_ops.policy_loss(inp, y, adv, **kw)
    tol = _tol(dtype, x, base=1e-4, backend=backend)
    torch.testing.assert_close(loss.double(), want.detach(), **tol)
    if not want.requires_grad:
        return
    loss.backward()
    want.backward()
    gtol = tol if dtype != torch.bfloat16 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(base.grad.double(), xr.grad.to(dtype).double(), **gtol)


def _ids(data, P, L, vocab):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    return torch.randint(0, vocab, (P, L), generator=g)


@pytest.mark.parametrize("backend,device", NATIVE)
@FUZZ
@given(
    data=st.data(),
    P=st.integers(0, 4),
    La=st.integers(0, 12),
    Lb=st.integers(0, 12),
    vocab=st.sampled_from([2, 4, 50]),
    anchor=st.sampled_from(["prev", "next", "none"]),
    dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_align_edits_fuzz(backend, device, data, P, La, Lb, vocab, anchor, dtype):
    a = _ids(data, P, La, vocab).to(dtype)
    b = a.clone() if data.draw(st.booleans()) and La == Lb else _ids(data, P, Lb, vocab).to(dtype)
    if P and La and Lb and data.draw(st.booleans()):  # b: a with a few edits, the usual repair
        b = a.clone()
        b.view(-1)[data.draw(st.integers(0, b.numel() - 1))] = vocab
        Lb = La
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    la = torch.randint(0, La + 1, (P,), generator=g)
    lb = torch.randint(0, Lb + 1, (P,), generator=g)
    layout = data.draw(st.sampled_from(["contiguous", "strided", "expanded"]))
    if layout == "strided":  # every other column of a wider tensor
        wa = torch.zeros(P, 2 * La, dtype=dtype)
        wa[:, ::2] = a
        wb = torch.zeros(P, 2 * Lb, dtype=dtype)
        wb[:, ::2] = b
        a, b = wa[:, ::2], wb[:, ::2]
    elif layout == "expanded" and P:
        a, b, la, lb = a[:1].expand(P, La), b[:1].expand(P, Lb), la[:1].expand(P), lb[:1].expand(P)
    want = R.align_edits(a, la, b, lb, insert_anchor=anchor)
    with credit_ops.use_backend(backend):
        got = credit_ops.align_edits(a, la, b, lb, insert_anchor=anchor)
    for name, w in zip(("mask_a", "mask_b", "region_a", "region_b", "distance"), want, strict=True):
        assert torch.equal(getattr(got, name).cpu().to(w.dtype), w), name


@pytest.mark.parametrize("backend,device", NATIVE)
@FUZZ
@given(
    data=st.data(),
    N=st.integers(0, 24),
    G=st.integers(1, 6),
    dtype=st.sampled_from(FLOATS + [torch.float16]),
    mode=st.sampled_from(sorted(R.ADVANTAGE_MODES)),
)
def test_group_advantages_fuzz(backend, device, data, N, G, dtype, mode):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    r = torch.randn(N, generator=g, dtype=torch.float64) * data.draw(st.sampled_from([1.0, 100.0]))
    for _ in range(data.draw(st.integers(0, 3)) if N else 0):
        r[data.draw(st.integers(0, N - 1))] = data.draw(st.sampled_from([1e4, -1e4, 1e-40, 0.0]))
    r = r.to(dtype)
    ids = torch.randint(0, G, (N,), generator=g)
    layout = data.draw(st.sampled_from(["contiguous", "strided", "expanded"]))
    if layout == "strided":
        w = torch.zeros(2 * N, dtype=dtype)
        w[::2] = r
        r = w[::2]
    elif layout == "expanded" and N:
        r = r[:1].expand(N)
    want = R.group_advantages(r, ids, mode=mode, num_groups=G)
    with credit_ops.use_backend(backend):
        got = credit_ops.group_advantages(r, ids, mode=mode, num_groups=G)
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.cpu(), want, **tol)
