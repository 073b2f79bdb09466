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


@pytest.mark.parametrize("backend,device", KERNELS)
@FUZZ
@given(
    data=st.data(),
    N=st.integers(0, 12),
    H=st.integers(1, 9),
    V=st.integers(1, 40),
    dtype=st.sampled_from(FLOATS),
    loss_type=st.sampled_from(["dapo", "grpo", "gspo", "gated_gspo"]),
    chunk_size=st.sampled_from([None, 1, 3, 7]),
    active_only=st.booleans(),
)
def test_fused_linear_fuzz(backend, device, data, N, H, V, dtype, loss_type, chunk_size, active_only):
    """The fused LM head (log-probs and loss, dense and active-only) against the materialised reference: hidden
    strided or expanded, a stride-0 weight, extreme hidden values, padding, zero-valued gates."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    B = 2 if N % 2 == 0 and N else 1
    T = N // B
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    if h.numel():
        h.view(-1)[data.draw(st.integers(0, h.numel() - 1))] = data.draw(st.sampled_from([30.0, -30.0, 1e-40]))
    h = h.to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    layout = data.draw(st.sampled_from(["contiguous", "strided", "expanded_w"]), label="layout")
    if layout == "strided":  # every other hidden feature of a wider tensor
        wide = torch.zeros(B, T, 2 * H, dtype=dtype)
        wide[..., ::2] = h
        h = wide[..., ::2]
    elif layout == "expanded_w":  # one row of weights for every vocabulary entry (stride 0)
        w = w[:1].expand(V, H)
    bias = torch.randn(V, generator=g).to(dtype) if data.draw(st.booleans(), label="bias") else None
    y = _labels(data, B, T, V)
    adv = torch.randn(B, T, generator=g)
    gates = (torch.rand(B, T, generator=g) > 0.6).float()  # most tokens inactive: the active-only case
    kw = dict(loss_type=loss_type, gates=gates, mask=torch.rand(B, T, generator=g) > 0.2)
    d = lambda t: None if t is None else t.double()
    want, _ = R.fused_linear_policy_loss(
        d(h).requires_grad_(), d(w), y, adv.double(), bias=d(bias), **{**kw, "gates": gates.double()}
    )
    want_lp = R.fused_linear_logprobs(d(h), d(w), y, bias=d(bias))
    with credit_ops.use_backend(backend):
        lp = credit_ops.fused_linear_logprobs(h, w, y, bias=bias, chunk_size=chunk_size)
        loss, _ = credit_ops.fused_linear_policy_loss(
            h, w, y, adv, bias=bias, chunk_size=chunk_size, active_only=active_only and loss_type != "gspo", **kw
        )
    logits = (d(h) @ d(w).T + (0 if bias is None else d(bias))).reshape(B, T, V)
    tol = _tol(dtype, logits, base=1e-3 if dtype == torch.bfloat16 else 1e-4, backend=backend)
    if dtype == torch.bfloat16:  # the logits themselves are rounded to bf16 by the matmul
        tol = dict(atol=6e-2 + 8e-3 * logits.abs().max().item() if logits.numel() else 6e-2, rtol=2e-2)
    torch.testing.assert_close(lp.double(), want_lp, **tol)
    torch.testing.assert_close(loss.double(), want.detach(), **tol)


@pytest.mark.parametrize("backend,device", NATIVE)
@FUZZ
@given(
    data=st.data(),
    B=st.integers(0, 4),
    T=st.integers(0, 6),
    dtype=st.sampled_from(FLOATS),
    loss_type=st.sampled_from(["dapo", "grpo", "dr_grpo", "bnpo", "gspo", "gated_gspo"]),
    beta=st.sampled_from([0.0, 0.2]),
    reduction=st.sampled_from(["mean", "none"]),
)
def test_policy_loss_from_logprobs_fuzz(backend, device, data, B, T, dtype, loss_type, beta, reduction):
    """policy_loss_from_logprobs against the reference: strided and expanded inputs, extreme log-probs (down to
    -1e4 and subnormal), fully masked rows, both reductions, loss and gradient."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    lp = -(torch.rand(B, T, generator=g, dtype=torch.float64) * data.draw(st.sampled_from([0.1, 5.0])))
    for _ in range(data.draw(st.integers(0, 3)) if lp.numel() else 0):
        lp.view(-1)[data.draw(st.integers(0, lp.numel() - 1))] = data.draw(st.sampled_from([-1e4, -1e-40, 0.0]))
    old = (lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    if B and data.draw(st.booleans(), label="empty_row"):
        mask[0] = False
    layout = data.draw(st.sampled_from(["contiguous", "strided", "expanded"]), label="layout")
    if layout == "strided":
        wide = torch.zeros(B, 2 * T, dtype=torch.float64)
        wide[:, ::2] = adv
        adv = wide[:, ::2]
    elif layout == "expanded" and T:
        adv = adv[:, :1].expand(B, T)
    kw = dict(loss_type=loss_type, beta=beta, mask=mask, old_logprobs=old, reduction=reduction)
    if beta:
        kw["ref_logprobs"] = (lp - 0.3 * torch.rand(B, T, generator=g, dtype=torch.float64)).clamp(max=0)
    if loss_type == "dr_grpo":
        kw["max_length"] = max(T, 1)
    cast = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    x = lp.to(dtype).requires_grad_()
    xr = x.detach().double().requires_grad_()
    want, _ = R.policy_loss_from_logprobs(
        xr,
        adv.to(dtype).double(),
        **{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in cast.items()},
    )
    with credit_ops.use_backend(backend):
        got, _ = credit_ops.policy_loss_from_logprobs(x, adv.to(dtype), **cast)
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-2, rtol=2e-2)
    if dtype == torch.float32:
        tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    if want.requires_grad and want.numel():
        go = torch.randn(want.shape, generator=g, dtype=torch.float64)
        (got.double() * go).sum().backward()
        (want * go).sum().backward()
        torch.testing.assert_close(x.grad.double(), xr.grad, **tol)


@pytest.mark.parametrize("backend,device", NATIVE)
@FUZZ
@given(
    seed=st.integers(0, 2**31 - 1),
    n_groups=st.integers(1, 6),
    max_size=st.integers(1, 6),
    T=st.integers(1, 24),
    vocab=st.sampled_from([2, 3, 8]),
    algorithm=st.sampled_from(sorted(R.ALGORITHMS)),
    options=st.sampled_from([{}, dict(granularity="step", delimiter_ids=[1]), dict(k=1), dict(adv_mode="rloo")]),
)
def test_credit_assign_fuzz(backend, device, seed, n_groups, max_size, T, vocab, algorithm, options):
    """The one-call pipeline against the reference over random group structures (groups of one, unequal sizes,
    padded repair slots, repairs of correct samples, full rewrites), tiny vocabularies and every algorithm."""
    from tests.test_credit_assign import assert_matches_reference, rollout_batch

    batch = rollout_batch(n_groups, max_size, T, vocab, prompt=seed % 2 == 1 and T >= 8, seed=seed)  # prompts < 4
    with credit_ops.use_backend(backend):
        out = credit_ops.credit_assign(**batch, algorithm=algorithm, **options)
    assert_matches_reference(out, R.credit_assign(**batch, algorithm=algorithm, **options))


# ---- mixed devices: every tensor argument of every public op, moved to another device, is a clear error
OTHER = "cuda" if torch.cuda.is_available() else "meta"  # meta stands in for a second device on a CPU machine


def _op_calls():
    from tests.test_credit_assign import rollout_batch

    g = torch.Generator().manual_seed(0)
    B, T, V, H = 2, 3, 5, 4
    x, y = torch.randn(B, T, V, generator=g), torch.randint(0, V, (B, T), generator=g)
    adv, lp, gates = torch.randn(B, T, generator=g), -torch.rand(B, T, generator=g), torch.rand(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.3
    h, w, bias = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    a, la = torch.randint(0, 4, (2, 5), generator=g), torch.tensor([5, 3])
    r, gid, steps = torch.rand(6, generator=g), torch.tensor([0, 0, 0, 1, 1, 1]), torch.zeros(2, 5, dtype=torch.long)
    loss_args = dict(old_logprobs=lp, ref_logprobs=lp, mask=m, gates=gates, weights=gates)
    wrong = torch.tensor([True, False])
    return {
        "token_logprobs": (credit_ops.token_logprobs, dict(logits=x, labels=y)),
        "policy_loss": (credit_ops.policy_loss, dict(logits=x, labels=y, advantages=adv, **loss_args)),
        "policy_loss_from_logprobs": (
            credit_ops.policy_loss_from_logprobs,
            dict(logprobs=lp, advantages=adv, entropy=-lp, **loss_args),
        ),
        "fused_linear_logprobs": (
            credit_ops.fused_linear_logprobs,
            dict(hidden=h, weight=w, labels=y, bias=bias, select=m),
        ),
        "fused_linear_policy_loss": (
            credit_ops.fused_linear_policy_loss,
            dict(hidden=h, weight=w, labels=y, advantages=adv, bias=bias, **loss_args),
        ),
        "align_edits": (credit_ops.align_edits, dict(a=a, a_lengths=la, b=a.clone(), b_lengths=la.clone())),
        "segment_steps": (credit_ops.segment_steps, dict(tokens=a, lengths=la, delimiter_ids=[1])),
        "step_masks": (credit_ops.step_masks, dict(mask=a > 1, step_ids=steps)),
        "truncate_regions": (credit_ops.truncate_regions, dict(mask=a > 1, regions=steps, k=torch.tensor([1, 1]))),
        "group_advantages": (credit_ops.group_advantages, dict(rewards=r, group_ids=gid)),
        "ibpo_shaping": (
            credit_ops.ibpo_shaping,
            dict(
                rewards=r,
                group_ids=gid,
                revision_correct=torch.zeros(6, 2, dtype=torch.bool),
                revision_valid=torch.ones(6, 2, dtype=torch.bool),
            ),
        ),
        "token_advantages": (
            credit_ops.token_advantages,
            dict(seq_adv=torch.randn(2), mask=a > 1, wrong=wrong, has_repair=wrong, lengths=la, prompt_lengths=la // 3),
        ),
        "credit_assign": (credit_ops.credit_assign, rollout_batch()),
    }


MIXED = [
    pytest.param(op, arg, id=f"{op}-{arg}")
    for op, (_, kw) in _op_calls().items()
    for arg, v in kw.items()
    if torch.is_tensor(v)
]


@pytest.mark.parametrize("op,arg", MIXED)
def test_mixed_devices_are_rejected(op, arg):
    """(delimiter_ids, a small id set often given as a list, is copied to the tokens' device instead.)"""
    fn, kw = _op_calls()[op]
    fn(**kw)  # the call itself is valid
    with pytest.raises(ValueError, match="one device"):
        fn(**{**kw, arg: kw[arg].to(OTHER)})
