"""The policy losses' per-token bookkeeping on the CPU (credit::policy_loss_inputs, credit::policy_loss_stats, one
pass each) against the tensor-op path that CUDA, torch.compile and the triton backend run (ops/policy_loss.py
prepare / loss_stats with native_bookkeeping off): the same tensors bit for bit, the same first error for bad
input, the statistics up to summation order; random shapes, dtypes, strides, masks, padding holding NaN, every
aggregation, and the (B, T + 1) padding of the model's full output. policy_loss's one-call CPU path
(credit::policy_loss_cpu: inputs, row kernel and statistics in one C++ op with its autograd) against the op-by-op
path. Then the ops' registration (opcheck)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import credit_ops
from credit_ops import reference as R
from credit_ops.ops import policy_loss as PL

FUZZ = settings(
    max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _both(monkeypatch, fn):
    """fn() on the native path and on the tensor-op path: (native result or exception, tensor-op result or ...)."""
    out = []
    for native in (True, False):
        with monkeypatch.context() as m:
            if not native:
                m.setattr(PL, "native_bookkeeping", lambda t: False)
            try:
                out.append(fn())
            except ValueError as e:
                out.append(e)
    return out


def _strided(data, x):
    """x (B, T) as itself, a transposed-storage view, a column slice of a wider tensor, or expanded from one row."""
    kind = data.draw(st.sampled_from(["contiguous", "transposed", "slice", "expanded"]), label="layout")
    B, T = x.shape
    if kind == "transposed":
        return x.t().contiguous().t()
    if kind == "slice":
        wide = torch.full((B, T + 2), float("nan")) if x.is_floating_point() else torch.zeros(B, T + 2, dtype=x.dtype)
        wide[:, 1 : T + 1] = x
        return wide[:, 1 : T + 1]
    if kind == "expanded" and B > 0:
        return x[:1].expand(B, T)
    return x


@st.composite
def loss_inputs(draw):
    """A policy loss's per-token arguments and options, as keyword arguments of PL.prepare."""
    data = draw(st.data())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="seed"))
    B, T, V = draw(st.integers(0, 5)), draw(st.integers(0, 9)), draw(st.sampled_from([1, 7, 50]))
    from_logprobs = draw(st.booleans(), label="from_logprobs")
    labels = torch.randint(0, V, (B, T), generator=g, dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    labels = _strided(data, labels)
    valid = labels != -100
    nan_pad = lambda t: torch.where(valid, t, float("nan")) if draw(st.booleans(), label="nan padding") else t
    floats = lambda label: draw(st.sampled_from(FLOATS), label=label)
    per_seq = draw(st.booleans(), label="advantages per sequence")
    adv = torch.randn(B, generator=g) if per_seq else nan_pad(torch.randn(B, T, generator=g))
    adv[torch.rand(adv.shape, generator=g) < 0.2] = 0.0
    kw = dict(
        old_logprobs=None, ref_logprobs=None, mask=None, gates=None, weights=None, loss_type="dapo", eps_low=None,
        eps_high=None, dual_clip=None, beta=0.0, kl_type="k3", agg=None, max_length=None, empty_rows="count",
        temperature=1.0, ignore_index=-100,
    )  # fmt: skip
    if draw(st.booleans(), label="old"):
        kw["old_logprobs"] = _strided(data, nan_pad(-torch.rand(B, T, generator=g) * 3).to(floats("old dtype")))
    if draw(st.booleans(), label="ref"):
        kw["ref_logprobs"] = _strided(data, nan_pad(-torch.rand(B, T, generator=g) * 3).to(floats("ref dtype")))
        kw["beta"] = draw(st.sampled_from([0.0, 0.04]))
    if draw(st.booleans(), label="mask"):
        mask = torch.rand(B, T, generator=g) < 0.8
        kw["mask"] = _strided(data, mask.to(draw(st.sampled_from([torch.bool, torch.uint8, torch.float32]))))
    if draw(st.booleans(), label="gates"):
        kw["gates"] = _strided(data, torch.rand(B, T, generator=g).round(decimals=1).to(floats("gates dtype")))
    if draw(st.booleans(), label="weights"):
        kw["weights"] = _strided(data, nan_pad(torch.rand(B, T, generator=g) * 2).to(floats("weights dtype")))
    kw["agg"] = draw(st.sampled_from(R.AGGREGATIONS))
    kw["max_length"] = T + 3 if kw["agg"] == "seq_mean_token_sum_norm" else None
    kw["empty_rows"] = draw(st.sampled_from(R.EMPTY_ROWS))
    kw["acc"] = draw(st.sampled_from([torch.float32, torch.float64]))
    kw["advantages"] = adv.to(floats("advantages dtype")) if per_seq else _strided(data, adv.to(floats("adv dtype")))
    if from_logprobs:
        logprobs = nan_pad(-torch.rand(B, T, generator=g))
        return dict(labels=None, V=None, shape=(B, T), logprobs=logprobs, **kw)
    layout = dict(pad_last=draw(st.booleans(), label="pad_last"), flat=draw(st.booleans(), label="flat"))
    return dict(labels=labels, V=V, **layout, **kw)


def _prepare(kw):
    kw = dict(kw)
    return PL.prepare(kw.pop("labels"), kw.pop("V"), kw.pop("advantages"), **kw)


@FUZZ
@given(kw=loss_inputs())
def test_inputs_equal_the_tensor_op_path(kw):
    with pytest.MonkeyPatch.context() as monkeypatch:
        native, tensor_ops = _both(monkeypatch, lambda: _prepare(kw))
    if isinstance(native, ValueError) or isinstance(tensor_ops, ValueError):  # an expanded NaN reached a valid token
        assert str(native) == str(tensor_ops)
        return
    assert native[0] == tensor_ops[0]  # the options
    for name, a, b in zip(PL.TokenInputs._fields, native[1], tensor_ops[1], strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous(), name
            assert torch.equal(a, b), f"{name}: {a} != {b}"


@FUZZ
@given(kw=loss_inputs(), data=st.data())
def test_the_same_first_error(kw, data):
    """One or more bad values (out-of-range labels, NaN advantages / old / ref / weights / log-probs on valid tokens,
    gates outside [0, 1], negative weights): both paths raise the same message, the first check's."""
    B, T = kw["advantages"].shape[0], (kw["shape"] if kw["labels"] is None else kw["labels"].shape)[1]
    if B * T == 0:
        return
    kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    faults = ["advantages", "gates", "weights", "weights_negative", "old_logprobs", "ref_logprobs"]
    faults += ["labels"] if kw["labels"] is not None else ["logprobs"]
    picked = data.draw(st.lists(st.sampled_from(faults), min_size=1, max_size=3, unique=True), label="faults")
    b, t = data.draw(st.integers(0, B - 1), label="b"), data.draw(st.integers(0, T - 1), label="t")
    for fault in picked:
        name = "weights" if fault == "weights_negative" else fault
        x = kw[name]
        if x is None:
            kw[name] = x = torch.ones(B, T) if name != "gates" else torch.full((B, T), 0.5)
        x = kw[name] = x.clone() if x.dim() == 1 else x.contiguous().clone()
        value = {"labels": 10**6, "gates": 1.5, "weights_negative": -1.0}.get(fault, float("nan"))
        x[(b, t) if x.dim() == 2 else b] = value
    with pytest.MonkeyPatch.context() as monkeypatch:
        native, tensor_ops = _both(monkeypatch, lambda: _prepare(kw))
    assert type(native) is type(tensor_ops)
    if isinstance(native, ValueError):
        assert str(native) == str(tensor_ops)


@FUZZ
@given(kw=loss_inputs(), data=st.data())
def test_stats_match_the_tensor_op_path(kw, data):
    try:
        options, inputs = _prepare(kw)
    except ValueError:  # an expanded NaN reached a valid token (test_the_same_first_error's subject)
        return
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    logp = -torch.rand(inputs.valid.shape, generator=g, dtype=inputs.valid.dtype) * 2
    entropy = data.draw(st.sampled_from([None, "given"]), label="entropy")
    if entropy:
        entropy = torch.rand(inputs.valid.shape, generator=g).to(data.draw(st.sampled_from(FLOATS), label="ent"))
        entropy[inputs.valid == 0] = float("nan")  # padding: never read
    ratio = None
    if logp.dim() == 2 and data.draw(st.booleans(), label="sequence ratio"):
        ratio = torch.rand(inputs.valid.shape[0], 1, generator=g, dtype=logp.dtype).add(0.5).expand_as(logp)
    with pytest.MonkeyPatch.context() as monkeypatch:
        native, tensor_ops = _both(monkeypatch, lambda: PL.loss_stats(ratio, logp, entropy, inputs, options))
    assert list(native) == list(R.STAT_NAMES)
    tol = 1e-12 if logp.dtype == torch.float64 else 2e-6
    for name in R.STAT_NAMES:
        a, b = native[name], tensor_ops[name]
        assert a.dtype == b.dtype == logp.dtype and a.shape == () and not a.requires_grad, name
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=name)


def test_policy_loss_equal_on_both_paths(monkeypatch):
    """Through the public ops: the same loss and gradient bits, the same statistics up to rounding."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 6, 11
    logits = torch.randn(B, T + 1, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 4:] = -100
    kw = dict(
        old_logprobs=-torch.rand(B, T, generator=g),
        ref_logprobs=-torch.rand(B, T, generator=g),
        gates=torch.rand(B, T, generator=g),
        beta=0.04,
    )
    adv = torch.randn(B, generator=g)
    for loss_type in ("dapo", "grpo", "gspo"):
        results = []
        for native in (True, False):
            with monkeypatch.context() as m:
                if not native:
                    m.setattr(PL, "native_bookkeeping", lambda t: False)
                x = logits.clone().requires_grad_(True)
                loss, stats = credit_ops.policy_loss(x, labels, adv, loss_type=loss_type, **kw)
                loss.backward()
                results.append((loss, x.grad, stats))
        (loss_a, grad_a, stats_a), (loss_b, grad_b, stats_b) = results
        assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b), loss_type
        for name in R.STAT_NAMES:
            torch.testing.assert_close(stats_a[name], stats_b[name], atol=2e-6, rtol=2e-6)


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    B, T = 3, 5
    labels = torch.randint(0, 9, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    old = -torch.rand(B, T, generator=g)
    args = (labels, adv, old, None, mask, None, None, None, B, T, 9, -100, 1, 0, False, True, False, False)
    torch.library.opcheck(torch.ops.credit.policy_loss_inputs.default, args)
    out = torch.ops.credit.policy_loss_inputs(*args)
    assert len(out) == 5  # labels, valid, advantages, old, token weights: the tensors not given are left out
    logp = -torch.rand(B, T + 1, generator=g)
    stats_args = (logp, None, out[1], out[2], None, out[3], None, 0.2, 0.28, 3)
    torch.library.opcheck(torch.ops.credit.policy_loss_stats.default, stats_args)


@FUZZ
@given(data=st.data())
def test_one_call_equals_the_op_by_op_path(data):
    """policy_loss on CPU tensors: the one C++ call and the op-by-op path (prepare, policy_loss_fwd, loss_stats) give
    the same loss and gradient bits and the same statistics, over loss types, options, dtypes and layouts."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    B, T, V = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 7)), data.draw(st.sampled_from([3, 40, 301]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), label="dtype")
    full = data.draw(st.booleans(), label="(B, T + 1, V) logits")
    logits = (torch.randn(B, T + full, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.2] = -100
    adv = torch.randn(B, generator=g) if data.draw(st.booleans(), label="per sequence") else torch.randn(B, T)
    adv[torch.rand(adv.shape, generator=g) < 0.3] = 0.0
    kw = dict(loss_type=data.draw(st.sampled_from(R.TOKEN_LOSSES), label="loss_type"))
    if kw["loss_type"] == "dr_grpo":
        kw["max_length"] = T + 2
    if data.draw(st.booleans(), label="old"):
        kw["old_logprobs"] = -torch.rand(B, T, generator=g) * 3
    if data.draw(st.booleans(), label="ref"):
        kw.update(
            ref_logprobs=-torch.rand(B, T, generator=g) * 3, beta=0.04, kl_type=data.draw(st.sampled_from(R.KL_TYPES))
        )
    if data.draw(st.booleans(), label="mask"):
        kw["mask"] = torch.rand(B, T, generator=g) < 0.8
    if data.draw(st.booleans(), label="gates"):
        kw["gates"] = (torch.rand(B, T, generator=g) < 0.5).float()
    if data.draw(st.booleans(), label="weights"):
        kw["weights"] = torch.rand(B, T, generator=g) * 2
    if data.draw(st.booleans(), label="dual_clip"):
        kw["dual_clip"] = 3.0
    kw["empty_rows"] = data.draw(st.sampled_from(R.EMPTY_ROWS), label="empty_rows")
    kw["active_only"] = data.draw(st.booleans(), label="active_only")
    kw["temperature"] = data.draw(st.sampled_from([1.0, 0.7]), label="temperature")
    results = []
    with pytest.MonkeyPatch.context() as m:
        for one_call in (True, False):
            m.setattr(PL, "ONE_CALL", one_call)
            x = logits.clone().requires_grad_(True)
            loss, stats = credit_ops.policy_loss(x, labels, adv, **kw)
            (loss * 2).backward()  # an incoming gradient other than 1
            results.append((loss, x.grad, stats))
    (loss_a, grad_a, stats_a), (loss_b, grad_b, stats_b) = results
    assert loss_a.grad_fn is not None and torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    for name in R.STAT_NAMES:
        assert not stats_a[name].requires_grad
        torch.testing.assert_close(stats_a[name], stats_b[name], atol=1e-6, rtol=1e-6, msg=name)


def test_one_call_no_grad_and_opcheck():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 13, generator=g)
    labels = torch.randint(0, 13, (2, 5), generator=g)
    adv = torch.randn(2, generator=g)
    with torch.no_grad():
        loss, stats = credit_ops.policy_loss(logits.requires_grad_(True), labels, adv)
    assert loss.grad_fn is None and not loss.requires_grad
    args = (logits, labels, adv, None, None, None, None, None, 1.0, -100, 0.2, 0.28, 0.0, 0.0, 3, 0, 0, False, False)
    torch.library.opcheck(torch.ops.credit.policy_loss_cpu.default, args + (True,))
    torch.library.opcheck(torch.ops.credit.policy_loss_cpu.default, args + (False,))


@FUZZ
@given(data=st.data())
def test_fused_head_one_call_equals_the_op_by_op_path(data):
    """fused_linear_policy_loss on CPU tensors: the one C++ call (credit::fused_linear_policy_loss_cpu) and the
    op-by-op path (prepare, fused_linear_policy_loss_fwd's chunk loop, loss_stats) give the same loss and the same
    hidden / weight / bias gradient bits, and the same statistics; chunks, bias, compaction, dtypes."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    B, T, H, V = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6)), 8, data.draw(st.sampled_from([5, 64]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), label="dtype")
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / 3).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype) if data.draw(st.booleans(), label="bias") else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.2] = -100
    adv = torch.randn(B, T, generator=g)
    adv[torch.rand(B, T, generator=g) < 0.4] = 0.0
    kw = dict(loss_type=data.draw(st.sampled_from(["dapo", "grpo"]), label="loss_type"))
    if data.draw(st.booleans(), label="old"):
        kw["old_logprobs"] = -torch.rand(B, T, generator=g) * 3
    if data.draw(st.booleans(), label="ref"):
        kw.update(ref_logprobs=-torch.rand(B, T, generator=g) * 3, beta=0.04)
    if data.draw(st.booleans(), label="gates"):
        kw["gates"] = (torch.rand(B, T, generator=g) < 0.5).float()
    kw["active_only"] = data.draw(st.booleans(), label="active_only")
    kw["chunk_size"] = data.draw(st.sampled_from([None, 1, 4]), label="chunk_size")
    needs_grad = data.draw(st.booleans(), label="grad")
    results = []
    with pytest.MonkeyPatch.context() as m:
        for one_call in (True, False):
            m.setattr(PL, "ONE_CALL", one_call)
            leaves = [t.clone().requires_grad_(needs_grad) if t is not None else None for t in (hidden, weight, bias)]
            loss, stats = credit_ops.fused_linear_policy_loss(leaves[0], leaves[1], labels, adv, bias=leaves[2], **kw)
            grads = ()
            if needs_grad:
                (loss * 3).backward()
                grads = tuple(t.grad for t in leaves if t is not None)
            results.append((loss, grads, stats))
    (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = results
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)
    for name in R.STAT_NAMES:
        torch.testing.assert_close(stats_a[name], stats_b[name], atol=1e-6, rtol=1e-6, msg=name)


def test_fused_head_one_call_opcheck():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 4, generator=g).requires_grad_(True)
    weight = torch.randn(9, 4, generator=g).requires_grad_(True)
    bias = torch.randn(9, generator=g).requires_grad_(True)
    labels, adv = torch.randint(0, 9, (2, 3), generator=g), torch.randn(2, generator=g)
    scalars = (1.0, -100, 0.2, 0.28, 0.0, 0.0, 3, 0, 0, False, False, 4)
    for b in (None, bias):
        args = (hidden, weight, b, labels, adv, None, None, None, None, None) + scalars
        torch.library.opcheck(torch.ops.credit.fused_linear_policy_loss_cpu.default, args + (True,))
        torch.library.opcheck(torch.ops.credit.fused_linear_policy_loss_cpu.default, args + (False,))
