"""policy_loss_from_logprobs, per-token weights and empty_rows on every loss path, and TRL's batch-std advantages."""

import pytest
import torch

import credit_ops
from credit_ops import reference as R
from tests.conftest import backend_devices

LOSS_TYPES = R.LOSS_TYPES
AGGS = R.AGGREGATIONS


def batch(B=4, T=7, V=11, dtype=torch.float64, empty_row=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, -2:] = -100
    mask = torch.rand(B, T, generator=g) > 0.2
    if empty_row:
        mask[1] = False
    with torch.no_grad():
        cur = R.token_logprobs(logits, labels)
    kw = dict(
        old_logprobs=(cur + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).masked_fill(~mask, float("-inf")),
        ref_logprobs=cur + 0.3 * torch.randn(B, T, generator=g, dtype=dtype),
        gates=torch.rand(B, T, generator=g, dtype=dtype),
        weights=torch.rand(B, T, generator=g, dtype=dtype) * 3,
        mask=mask,
    )
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    return logits, labels, adv, kw


def options_id(loss_type, agg, empty_rows):
    return f"{loss_type}-{agg}-empty_{empty_rows}"


CASES = [
    pytest.param(lt, agg, er, id=options_id(lt, agg, er)) for lt in LOSS_TYPES for agg in AGGS for er in R.EMPTY_ROWS
]


@pytest.mark.parametrize("loss_type,agg,empty_rows", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference(loss_type, agg, empty_rows, reduction):
    logits, labels, adv, kw = batch(empty_row=True)
    logp = R.token_logprobs(logits, labels).requires_grad_(True)
    mask = kw.pop("mask") & (labels != -100)
    opts = dict(
        loss_type=loss_type,
        agg=agg,
        empty_rows=empty_rows,
        max_length=9,
        beta=0.05,
        dual_clip=3.0,
        reduction=reduction,
        mask=mask,
        **kw,
    )
    got, got_stats = credit_ops.policy_loss_from_logprobs(logp, adv, **opts)
    want, want_stats = R.policy_loss_from_logprobs(logp, adv, **opts)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(got.sum(), logp)
    (w,) = torch.autograd.grad(want.sum(), logp)
    torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert torch.all(g[~mask] == 0)
    for k in want_stats:
        torch.testing.assert_close(got_stats[k], want_stats[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("backend,device", backend_devices(), ids=lambda x: str(x))
def test_same_loss_as_policy_loss(loss_type, backend, device):
    """From the log-probs of logits, the loss and the gradient w.r.t. the logits are policy_loss's."""
    logits, labels, adv, kw = batch(dtype=torch.float64 if device == "cpu" else torch.float32)
    logits, labels, adv = logits.to(device), labels.to(device), adv.to(device)
    kw = {k: v.to(device) for k, v in kw.items()}
    x = logits.clone().requires_grad_(True)
    with credit_ops.use_backend(backend):
        want, want_stats = credit_ops.policy_loss(x, labels, adv, loss_type=loss_type, beta=0.1, max_length=9, **kw)
        (want_g,) = torch.autograd.grad(want, x)
        logp, ent = credit_ops.token_logprobs(x, labels, return_entropy=True)
        valid = kw.pop("mask") & (labels != -100)
        got, got_stats = credit_ops.policy_loss_from_logprobs(
            logp, adv, mask=valid, entropy=ent, loss_type=loss_type, beta=0.1, max_length=9, **kw
        )
        (got_g,) = torch.autograd.grad(got, x)
    # the Triton kernels' exp2 / log2 form differs from torch's log_softmax by ~1e-9 even in float64
    tol = 1e-5 if logits.dtype != torch.float64 else 1e-7 if backend == "triton" else 1e-9
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(got_g, want_g, rtol=tol, atol=tol)
    for k in want_stats:
        torch.testing.assert_close(got_stats[k], want_stats[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_weights_multiply_each_tokens_loss(loss_type):
    """Independent of the reference: the weighted per-token loss is the unweighted one times the weights, and a
    constant weight c scales the mean loss by c (the ratio, the statistics and the denominators do not move)."""
    logits, labels, adv, kw = batch()
    logp = R.token_logprobs(logits, labels)
    u = kw.pop("weights")
    base = dict(loss_type=loss_type, max_length=9, mask=kw.pop("mask") & (labels != -100), **kw)
    plain, plain_stats = credit_ops.policy_loss_from_logprobs(logp, adv, reduction="none", **base)
    weighted, weighted_stats = credit_ops.policy_loss_from_logprobs(logp, adv, reduction="none", weights=u, **base)
    torch.testing.assert_close(weighted, plain * u, rtol=1e-12, atol=1e-12)
    for k in plain_stats:
        torch.testing.assert_close(weighted_stats[k], plain_stats[k])
    mean, _ = credit_ops.policy_loss_from_logprobs(logp, adv, **base)
    scaled, _ = credit_ops.policy_loss_from_logprobs(logp, adv, weights=torch.full_like(u, 2.5), **base)
    torch.testing.assert_close(scaled, 2.5 * mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("loss_type", ["dapo", "gspo"])
def test_empty_rows_skip(agg, loss_type):
    """A fully masked row: the sequence means divide by the 3 non-empty rows instead of B = 4."""
    logits, labels, adv, kw = batch(empty_row=True)
    logp = R.token_logprobs(logits, labels)
    base = dict(loss_type=loss_type, agg=agg, max_length=9, mask=kw.pop("mask") & (labels != -100), **kw)
    count, _ = credit_ops.policy_loss_from_logprobs(logp, adv, **base)
    skip, _ = credit_ops.policy_loss_from_logprobs(logp, adv, empty_rows="skip", **base)
    factor = 1.0 if agg == "token_mean" else 4 / 3
    torch.testing.assert_close(skip, count * factor, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "gspo", "gated_gspo"])
@pytest.mark.parametrize("backend,device", backend_devices(), ids=lambda x: str(x))
def test_weights_and_empty_rows_on_every_path(loss_type, backend, device):
    """policy_loss (out of place and in place) and fused_linear_policy_loss take weights and empty_rows with the
    semantics of policy_loss_from_logprobs."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    B, T, H, V = 4, 6, 8, 13
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[2] = False
    adv = torch.randn(B, generator=g, dtype=dtype)
    u = torch.rand(B, T, generator=g, dtype=dtype) * 4
    gates = torch.rand(B, T, generator=g, dtype=dtype)
    hidden, weight, labels, mask, adv, u, gates = (t.to(device) for t in (hidden, weight, labels, mask, adv, u, gates))
    opts = dict(loss_type=loss_type, mask=mask, gates=gates, weights=u, empty_rows="skip")
    with torch.no_grad():
        old = R.token_logprobs(hidden @ weight.T, labels) + 0.1
    opts["old_logprobs"] = old
    h = hidden.clone().requires_grad_(True)
    logp = R.token_logprobs(h @ weight.T, labels)
    want, _ = R.policy_loss_from_logprobs(logp, adv, **opts)
    (want_g,) = torch.autograd.grad(want, h)
    tol = 1e-5 if dtype != torch.float64 else 1e-7 if backend == "triton" else 1e-9
    with credit_ops.use_backend(backend):
        for inplace in (False, True):
            x = h.detach().clone().requires_grad_(True)
            got, _ = credit_ops.policy_loss(x @ weight.T, labels, adv, inplace_grad=inplace, **opts)
            (got_g,) = torch.autograd.grad(got, x)
            torch.testing.assert_close(got, want.detach(), rtol=tol, atol=tol)
            torch.testing.assert_close(got_g, want_g, rtol=tol, atol=tol)
        x = h.detach().clone().requires_grad_(True)
        got, _ = credit_ops.fused_linear_policy_loss(x, weight, labels, adv, chunk_size=12, **opts)
        (got_g,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(got_g, want_g, rtol=tol, atol=tol)


def test_gradcheck():
    logits, labels, adv, kw = batch(B=2, T=4, V=5)
    logp = R.token_logprobs(logits, labels).requires_grad_(True)
    kw["mask"] = kw["mask"] & (labels != -100)
    # gspo_token's gradient is a stop-gradient construction: it has no derivative to check
    for loss_type in ("grpo", "gspo", "gated_gspo"):
        fn = lambda lp, lt=loss_type: credit_ops.policy_loss_from_logprobs(lp, adv, loss_type=lt, beta=0.1, **kw)[0]
        assert torch.autograd.gradcheck(fn, (logp,))


def test_compile_fullgraph():
    logits, labels, adv, kw = batch(dtype=torch.float32)
    logp = R.token_logprobs(logits, labels)
    kw["mask"] = kw["mask"] & (labels != -100)
    fn = lambda lp: credit_ops.policy_loss_from_logprobs(lp, adv, loss_type="dapo", beta=0.1, **kw)
    eager = fn(logp)
    compiled = torch.compile(fn, fullgraph=True)(logp)
    torch.testing.assert_close(compiled[0], eager[0])


def _bad(**over):
    logits, labels, adv, kw = batch()
    logp = R.token_logprobs(logits, labels)
    args = dict(logprobs=logp, advantages=adv, **kw)
    args.update(over)
    return args


BAD = {
    "negative_weights": (lambda: _bad(weights=-torch.ones(4, 7, dtype=torch.float64)), "weights must be >= 0"),
    "nan_weights": (lambda: _bad(weights=torch.full((4, 7), float("nan"), dtype=torch.float64)), "weights must"),
    "inf_weights": (lambda: _bad(weights=torch.full((4, 7), float("inf"), dtype=torch.float64)), "weights must"),
    "weights_shape": (lambda: _bad(weights=torch.ones(4, 6, dtype=torch.float64)), "weights"),
    "logprobs_1d": (lambda: _bad(logprobs=torch.zeros(7, dtype=torch.float64)), "logprobs"),
    "logprobs_int": (lambda: _bad(logprobs=torch.zeros(4, 7, dtype=torch.long)), "logprobs"),
    "nonfinite_valid_logprob": (
        lambda: _bad(logprobs=torch.full((4, 7), float("-inf"), dtype=torch.float64)),
        "finite on valid tokens",
    ),
    "nan_advantages": (
        lambda: _bad(advantages=torch.full((4, 7), float("nan"), dtype=torch.float64)),
        "advantages must be finite",
    ),
    "inf_per_sequence_advantages": (
        lambda: _bad(advantages=torch.tensor([0.0, float("inf"), 1.0, 2.0], dtype=torch.float64)),
        "advantages must be finite",
    ),
    "nan_old_logprobs": (
        lambda: _bad(old_logprobs=torch.full((4, 7), float("nan"), dtype=torch.float64)),
        "old_logprobs must be finite",
    ),
    "inf_ref_logprobs": (
        lambda: _bad(ref_logprobs=torch.full((4, 7), float("inf"), dtype=torch.float64)),
        "ref_logprobs must be finite",
    ),
    "reduction": (lambda: _bad(reduction="sum"), "reduction"),
    "empty_rows": (lambda: _bad(empty_rows="drop"), "empty_rows"),
    "loss_type": (lambda: _bad(loss_type="ppo"), "loss_type"),
    "entropy_shape": (lambda: _bad(entropy=torch.zeros(4, dtype=torch.float64)), "entropy"),
    "advantages_shape": (lambda: _bad(advantages=torch.zeros(3, dtype=torch.float64)), "advantages"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    make, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        credit_ops.policy_loss_from_logprobs(**make())


def test_masked_logprobs_may_be_anything():
    args = _bad()
    args["mask"] = torch.ones(4, 7, dtype=torch.bool)
    args["mask"][0, 0] = False
    args["old_logprobs"] = None
    args["logprobs"] = args["logprobs"].clone()
    args["logprobs"][0, 0] = float("-inf")
    loss, _ = credit_ops.policy_loss_from_logprobs(**args)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_grpo_batch_std_is_trls_batch_scaling(backend):
    """TRL's scale_rewards="batch", written out as TRL does it: group mean, the whole batch's std, eps 1e-4."""
    G, n_groups = 4, 5
    rewards = torch.rand(G * n_groups, dtype=torch.float32)
    rewards[:G] = 1.0  # one group with equal rewards
    grouped = rewards.view(-1, G)
    want = (rewards - grouped.mean(1).repeat_interleave(G)) / (rewards.std() + 1e-4)
    ids = torch.arange(G * n_groups) // G
    with credit_ops.use_backend(backend):
        got = credit_ops.group_advantages(rewards, ids, mode="grpo_batch_std", eps=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.all(got[:G] == 0)


@pytest.mark.parametrize("name", ["advantages", "old_logprobs", "ref_logprobs", "weights"])
@pytest.mark.parametrize("backend,device", backend_devices(), ids=lambda x: str(x))
def test_nonfinite_inputs_on_valid_tokens_are_rejected_on_every_path(name, backend, device):
    """NaN on a valid token is an error on the logits path and the fused head; on padding it is allowed."""
    logits, labels, adv, kw = batch(dtype=torch.float32)
    kw["advantages"] = adv
    kw = {k: v.to(device) for k, v in kw.items()}
    logits, labels = logits.to(device), labels.to(device)
    valid = kw["mask"] & (labels != -100)
    poisoned = kw[name].clone()
    poisoned[valid.nonzero()[0].tolist()] = float("nan")
    padded = kw[name].clone().masked_fill(~valid, float("nan"))
    hidden = torch.randn(4, 7, 5, device=device)
    weight = torch.randn(11, 5, device=device)
    with credit_ops.use_backend(backend):
        for value, ok in ((poisoned, False), (padded, True)):
            args = {**kw, name: value}
            advantages = args.pop("advantages")
            calls = (
                (credit_ops.policy_loss, (logits, labels)),
                (credit_ops.fused_linear_policy_loss, (hidden, weight, labels)),
            )
            for fn, leading in calls:
                if ok:
                    loss, _ = fn(*leading, advantages, beta=0.1, **args)
                    assert torch.isfinite(loss)
                else:
                    with pytest.raises(ValueError, match=f"{name} must be finite on valid tokens"):
                        fn(*leading, advantages, beta=0.1, **args)
