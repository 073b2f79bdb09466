"""The public API of credit-ops: typed wrappers that validate input, pick a backend and call the ops.

Every function accepts tensors on CPU or CUDA; see credit_ops._backend for how the implementation is chosen
and credit_ops._checks for how (and when) value checks run.
"""

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from credit_ops import _checks, reference
from credit_ops._backend import pick


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of each label under softmax(logits / temperature), and optionally the entropy.

    logp[i] = log softmax(logits[i] / T)[labels[i]],   H[i] = -sum_v p[i, v] log p[i, v]

    One pass over the logits with an online log-sum-exp in fp32; under ``torch.no_grad()`` nothing of size
    (..., V) is allocated. Differentiable w.r.t. ``logits`` through both outputs. Positions whose label equals
    ``ignore_index`` give 0 for both and receive no gradient.

    Shapes:
        logits: (..., V) bfloat16 / float16 / float32 / float64, e.g. (B, T, V) or packed (N, V)
        labels: (...) int32 / int64, values in [0, V) or ``ignore_index``
        returns: logprobs (...) float32 (float64 for float64 logits); with ``return_entropy`` also
            entropy (...) of the same dtype
    """
    _checks.tensor("logits", logits, dtypes=_checks.FLOAT_DTYPES, min_dim=1)
    _checks.tensor("labels", labels, dtypes=_checks.INDEX_DTYPES)
    _checks.same_device(logits=logits, labels=labels)
    _checks.shape("labels", labels, logits.shape[:-1], "(the leading dimensions of logits)")
    _checks.check(temperature > 0, f"temperature must be > 0, got {temperature}")
    V = logits.shape[-1]
    _checks.check(V > 0, "logits must have a non-empty vocabulary dimension")
    _checks.ids_in_range("labels", labels, V, ignore_index=ignore_index)

    backend = pick(logits.device, gpu="triton")
    if backend == "reference":
        return reference.token_logprobs(
            logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
    op = torch.ops.credit.token_logprobs_fwd_triton if backend == "triton" else torch.ops.credit.token_logprobs_fwd
    x = _as_btv(logits)
    logprobs, entropy, _ = op(x, labels.reshape(x.shape[:2]), float(temperature), int(ignore_index),
                              bool(return_entropy))  # fmt: skip
    logprobs = logprobs.view(labels.shape)
    return (logprobs, entropy.view(labels.shape)) if return_entropy else logprobs


def _as_btv(logits: Tensor) -> Tensor:
    """(..., V) -> (B, T, V) without a copy where possible: the kernels take strided (B, T) rows, so the usual
    ``logits[:, :-1]`` slice of a (B, T + 1, V) model output is read in place."""
    if logits.dim() == 3:
        return logits
    if logits.dim() < 3:
        return logits.reshape((1,) * (3 - logits.dim()) + tuple(logits.shape))
    return logits.reshape(-1, logits.shape[-2], logits.shape[-1])


# ---- align_edits (SPEC §2)
class AlignEdits(NamedTuple):
    """Result of credit_ops.align_edits (see its docstring)."""

    mask_a: Tensor
    mask_b: Tensor
    region_a: Tensor
    region_b: Tensor
    distance: Tensor


_INSERT_ANCHORS = {"prev": 0, "next": 1, "none": 2}


def _pair_lengths(name: str, lengths: Tensor | None, ids_name: str, ids: Tensor) -> Tensor:
    P, L = ids.shape
    if lengths is None:
        return torch.full((P,), L, dtype=torch.int64, device=ids.device)
    _checks.tensor(name, lengths, dtypes=_checks.INDEX_DTYPES)
    _checks.shape(name, lengths, (P,), "(one length per pair)")
    _checks.same_device(**{name: lengths, ids_name: ids})
    _checks.values((lengths < 0) | (lengths > L), f"{name} must lie in [0, {L}] (the padded width)")
    return lengths.to(torch.int64)


def align_edits(
    a: Tensor, a_lengths: Tensor | None, b: Tensor, b_lengths: Tensor | None, *, insert_anchor: str = "prev"
) -> AlignEdits:
    """Token-level diff of each failed trajectory a[p] against its repair b[p]: the canonical Levenshtein edit
    script turned into masks and numbered edit regions (SPEC §2).

    The edit script is unique: trim the common prefix and suffix, then walk the DP matrix back from (n, m)
    preferring a diagonal step (match or substitution), then a deletion from a, then an insertion from b.
    Every backend returns the same bits as ``credit_ops.reference.align_edits``; ``distance`` is the unit-cost
    Levenshtein distance.

    - ``mask_a[t]``: a[t] is deleted or substituted, or anchors an insertion: b tokens inserted between a[t-1]
      and a[t] mark a[t-1] with ``insert_anchor="prev"`` (a[0] for an insertion before a[0]), a[t] with
      ``"next"`` (a[n-1] for an insertion after the end), nothing with ``"none"``. No a token is marked when
      a is empty.
    - ``mask_b[t]``: b[t] is inserted or substituted.
    - Regions: the maximal runs of consecutive edits along the alignment, numbered 0, 1, 2, ... from the
      start and shared by a and b (``region_a`` and ``region_b`` hold the same number for the two sides of
      one run). An anchored a token carries the region of the insertions it anchors; a matched token that
      anchors two runs (only possible at a[0] with "prev" or a[n-1] with "next") carries the first. -1 marks
      unflagged tokens and padding.

    Padding beyond the lengths is ignored (its values may also occur as real ids) and comes back unflagged.

    Shapes:
        a: (P, La) int32 / int64 token ids; a_lengths: (P,) int32 / int64 in [0, La], or None for La
        b: (P, Lb) int32 / int64 token ids; b_lengths: (P,) int32 / int64 in [0, Lb], or None for Lb
        returns AlignEdits(mask_a (P, La) bool, mask_b (P, Lb) bool, region_a (P, La) int32,
            region_b (P, Lb) int32, distance (P,) int32)
    """
    _checks.tensor("a", a, dtypes=_checks.INDEX_DTYPES, dim=2)
    _checks.tensor("b", b, dtypes=_checks.INDEX_DTYPES, dim=2)
    _checks.same_device(a=a, b=b)
    _checks.check(
        a.shape[0] == b.shape[0], f"a and b must hold the same number of pairs P, got {a.shape[0]} and {b.shape[0]}"
    )
    _checks.check(
        insert_anchor in _INSERT_ANCHORS,
        f"insert_anchor must be one of {tuple(_INSERT_ANCHORS)}, got {insert_anchor!r}",
    )
    a_lengths = _pair_lengths("a_lengths", a_lengths, "a", a)
    b_lengths = _pair_lengths("b_lengths", b_lengths, "b", b)
    if a.dtype != b.dtype:
        a, b = a.long(), b.long()
    if pick(a.device, gpu="native") == "reference":
        out = reference.align_edits(a, a_lengths, b, b_lengths, insert_anchor=insert_anchor)
    else:
        out = torch.ops.credit.align_edits(a, a_lengths, b, b_lengths, _INSERT_ANCHORS[insert_anchor])
    return AlignEdits(*out)


def segment_steps(tokens: Tensor, lengths: Tensor | None, delimiter_ids) -> Tensor:
    """Step index of every token: a step is a maximal run of tokens ending at (and including) a delimiter.

    step[p, t] = number of delimiter tokens in tokens[p, :t]; -1 at t >= lengths[p]. Any id of
    ``delimiter_ids`` ends a step (e.g. the ids of "\\n\\n"); an empty set gives one step per sequence.

    Shapes:
        tokens: (P, L) int32 / int64; lengths: (P,) int32 / int64 in [0, L], or None for L
        delimiter_ids: (D,) int32 / int64 (a list or int is accepted too)
        returns: (P, L) int32
    """
    _checks.tensor("tokens", tokens, dtypes=_checks.INDEX_DTYPES, dim=2)
    if not isinstance(delimiter_ids, Tensor):
        delimiter_ids = torch.as_tensor(delimiter_ids, dtype=torch.int64).reshape(-1)
    _checks.tensor("delimiter_ids", delimiter_ids, dtypes=_checks.INDEX_DTYPES, dim=1)
    lengths = _pair_lengths("lengths", lengths, "tokens", tokens)
    if pick(tokens.device, gpu="native") == "reference":
        return reference.segment_steps(tokens, lengths, delimiter_ids)
    L = tokens.shape[1]
    valid = torch.arange(L, device=tokens.device) < lengths.unsqueeze(1)  # (P, L)
    ends = torch.isin(tokens, delimiter_ids.to(device=tokens.device, dtype=tokens.dtype)) & valid
    steps = ends.to(torch.int32).cumsum(1, dtype=torch.int32) - ends.to(torch.int32)
    return steps.masked_fill(~valid, -1)


def step_masks(mask: Tensor, step_ids: Tensor) -> Tensor:
    """Lift a token mask to steps: a token is flagged when any token of its step is flagged.

    out[p, t] = step_ids[p, t] >= 0 and any(mask[p, u] for u with step_ids[p, u] == step_ids[p, t])

    Shapes:
        mask: (..., L) bool (or any dtype, nonzero = flagged)
        step_ids: (..., L) int32 / int64 in [-1, L) (from segment_steps; -1 = padding, never flagged)
        returns: (..., L) bool
    """
    _checks.tensor("mask", mask, min_dim=1)
    _checks.tensor("step_ids", step_ids, dtypes=_checks.INDEX_DTYPES)
    _checks.same_device(mask=mask, step_ids=step_ids)
    _checks.shape("step_ids", step_ids, mask.shape, "(the shape of mask)")
    L = mask.shape[-1]
    _checks.values((step_ids < -1) | (step_ids >= max(L, 1)), f"step_ids must lie in [-1, {L})")
    if pick(mask.device, gpu="native") == "reference":
        return reference.step_masks(mask, step_ids)
    idx = (step_ids.reshape(-1, L).to(torch.int64) + 1).clamp_(min=0)  # bucket 0 collects the padding
    flagged = mask.reshape(-1, L).to(torch.int32)
    hit = torch.zeros(idx.shape[0], L + 1, dtype=torch.int32, device=mask.device)
    hit.scatter_reduce_(1, idx, flagged, "amax")
    return ((hit.gather(1, idx) > 0) & (idx > 0)).reshape(mask.shape)


def truncate_regions(mask: Tensor, regions: Tensor, k) -> Tensor:
    """Keep only the flags of the first k edit regions (IOP's truncation to the first K differences).

    out = mask & (0 <= regions < k). Region numbers are shared between the two sides of an alignment, so
    truncating mask_a by region_a and mask_b by region_b with the same k keeps the same differences on both.
    With step ids as regions it keeps the flags of steps 0..k-1.

    Shapes:
        mask: (..., L) bool; regions: (..., L) int32 / int64 (-1 = no region)
        k: int >= 0, or a tensor (...) of them (one per row)
        returns: (..., L) bool
    """
    _checks.tensor("mask", mask, min_dim=1)
    _checks.tensor("regions", regions, dtypes=_checks.INDEX_DTYPES)
    _checks.same_device(mask=mask, regions=regions)
    _checks.shape("regions", regions, mask.shape, "(the shape of mask)")
    if isinstance(k, Tensor):
        _checks.tensor("k", k, dtypes=_checks.INDEX_DTYPES)
        _checks.same_device(mask=mask, k=k)
        _checks.check(
            k.dim() == 0 or tuple(k.shape) == tuple(mask.shape[:-1]),
            f"k must be a scalar or have shape {tuple(mask.shape[:-1])} (one per row), got {tuple(k.shape)}",
        )
        _checks.values(k < 0, "k must be >= 0")
    else:
        _checks.check(
            isinstance(k, int) and not isinstance(k, bool), f"k must be an int or a tensor, got {type(k).__name__}"
        )
        _checks.check(k >= 0, f"k must be >= 0, got {k}")
    if pick(mask.device, gpu="native") == "reference":
        return reference.truncate_regions(mask, regions, k)
    if isinstance(k, Tensor) and k.dim() > 0:
        k = k.unsqueeze(-1)
    return (mask != 0) & (regions >= 0) & (regions < k)


# ---- advantages (issue 5): group statistics, IBPO shaping, token advantages
from credit_ops._backend import get_backend as _get_backend  # noqa: E402

_ADV_MODE_IDS = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "batch": 3}


def _native(device) -> bool:
    # These ops have C++/CUDA kernels only: every backend but "reference" (a forced "triton" too) runs them.
    return _get_backend() != "reference"


def _check_rewards(name: str, rewards: Tensor) -> None:
    _checks.tensor(name, rewards, dtypes=_checks.FLOAT_DTYPES, dim=1)
    _checks.finite(name, rewards)


def _group_advantages(rewards: Tensor, group_ids: Tensor, num_groups: int, mode: str, eps: float) -> Tensor:
    if not _native(rewards.device):
        return reference.group_advantages(rewards, group_ids, mode=mode, eps=eps, num_groups=num_groups)
    return torch.ops.credit.group_advantages(rewards, group_ids, int(num_groups), _ADV_MODE_IDS[mode], float(eps))


def _ibpo_shaping(rewards, n_correct, n_valid, rho, lam, threshold) -> tuple[Tensor, Tensor]:
    if not _native(rewards.device):
        r = rewards.double()
        phi = torch.where(
            (r < threshold) & (n_valid > 0), rho * n_correct.double() / n_valid.clamp(min=1).double(), 0.0
        )
        dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
        return (r + lam * phi).to(dtype), phi.to(dtype)
    return torch.ops.credit.ibpo_shaping(rewards, n_correct, n_valid, float(rho), float(lam), float(threshold))


def _token_advantages(seq_adv, mask, wrong, has_repair, lengths, starts, sign_guard, unmasked_weight,
                      correct_in_loss) -> tuple[Tensor, Tensor]:  # fmt: skip
    if not _native(seq_adv.device):
        return reference.token_advantages(
            seq_adv, mask, wrong=wrong, has_repair=has_repair, sign_guard=sign_guard,
            unmasked_weight=unmasked_weight, correct_in_loss=correct_in_loss, lengths=lengths, prompt_lengths=starts,
        )  # fmt: skip
    return torch.ops.credit.token_advantages(
        seq_adv, mask, wrong, has_repair, lengths, starts, bool(sign_guard), float(unmasked_weight),
        bool(correct_in_loss),
    )  # fmt: skip


def _repair_advantages(seq_adv, mask, repair_of, selected, lengths, starts) -> tuple[Tensor, Tensor]:
    if not _native(seq_adv.device):
        return reference.repair_advantages(seq_adv, mask, repair_of, selected, lengths=lengths, starts=starts)
    return torch.ops.credit.repair_advantages(seq_adv, mask, repair_of, selected, lengths, starts)


def _check_group_ids(group_ids: Tensor, n: int, num_groups: int | None) -> int:
    _checks.tensor("group_ids", group_ids, dtypes=_checks.INDEX_DTYPES, dim=1)
    _checks.shape("group_ids", group_ids, (n,), "(one group id per sample)")
    G = n if num_groups is None else int(num_groups)
    _checks.check(G >= 0, f"num_groups must be >= 0, got {G}")
    hint = "" if num_groups is not None else " (num_groups defaults to N; pass num_groups for larger ids)"
    _checks.values((group_ids < 0) | (group_ids >= G), f"group_ids must lie in [0, {G}){hint}")
    return G


def _check_lengths(name: str, lengths: Tensor | None, n: int, upper: int) -> Tensor | None:
    if lengths is None:
        return None
    _checks.tensor(name, lengths, dtypes=_checks.INDEX_DTYPES, dim=1)
    _checks.shape(name, lengths, (n,))
    _checks.values((lengths < 0) | (lengths > upper), f"{name} must lie in [0, {upper}]")
    return lengths.long()


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    mode: str = "grpo",
    eps: float = 1e-6,
    num_groups: int | None = None,
) -> Tensor:
    """Advantage of every sample against the other samples of its group (GRPO-family baselines).

    grpo:    (r - mean) / (std + eps), std the unbiased sample standard deviation (as TRL and verl)
    dr_grpo: r - mean
    rloo:    r - mean of the *other* samples of the group = n / (n - 1) * (r - mean)
    batch:   (r - mean) / (std + eps) over the whole batch, group ids ignored

    Groups may be unsorted and of any size; a group of one gets advantage 0. Statistics accumulate in
    float64 (atomics keyed by group id on CUDA: no sort, no host synchronisation).

    Shapes:
        rewards: (N,) float16 / bfloat16 / float32 / float64, finite
        group_ids: (N,) int32 / int64 in [0, num_groups); ``num_groups`` defaults to N, which fits any
            dense numbering without reading the ids on the host (pass it for sparse ids)
        returns: (N,) float32 (float64 for float64 rewards)
    """
    _checks.check(mode in _ADV_MODE_IDS, f"mode must be one of {tuple(_ADV_MODE_IDS)}, got {mode!r}")
    _checks.check(eps >= 0, f"eps must be >= 0, got {eps}")
    _checks.tensor("rewards", rewards, dtypes=_checks.FLOAT_DTYPES, dim=1)
    _checks.same_device(rewards=rewards, group_ids=group_ids)
    _check_rewards("rewards", rewards)
    G = _check_group_ids(group_ids, rewards.shape[0], num_groups)
    return _group_advantages(rewards, group_ids, G, mode, eps)


def ibpo_shaping(
    rewards: Tensor,
    group_ids: Tensor | None,
    revision_correct: Tensor,
    revision_valid: Tensor,
    *,
    rho: float = 0.5,
    lam: float = 0.6,
    threshold: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """IBPO reward shaping by the outcome of counterfactual revisions.

    phi_i = mean over valid revisions k of rho * 1[R_i < threshold and revision k correct]   (0 for correct
    samples and for samples without a valid revision);   R'_i = R_i + lam * phi_i

    ``group_ids`` is validated (shape, >= 0) but not needed: the shaping is per sample, the group enters later
    through ``group_advantages(R', group_ids)``.

    Shapes:
        rewards: (N,) float, finite
        group_ids: (N,) int32 / int64, or None
        revision_correct, revision_valid: (N, R) bool, column k = reference revision k of sample i
        returns: shaped_rewards (N,), phi (N,), float32 (float64 for float64 rewards)
    """
    _check_rewards("rewards", rewards)
    n = rewards.shape[0]
    for name, x in (("revision_correct", revision_correct), ("revision_valid", revision_valid)):
        _checks.tensor(name, x, dtypes=(torch.bool,), dim=2)
        _checks.check(x.shape[0] == n, f"{name} must have shape (N={n}, R), got {tuple(x.shape)}")
    _checks.shape("revision_valid", revision_valid, revision_correct.shape, "(the shape of revision_correct)")
    if group_ids is not None:
        _checks.tensor("group_ids", group_ids, dtypes=_checks.INDEX_DTYPES, dim=1)
        _checks.shape("group_ids", group_ids, (n,), "(one group id per sample)")
        _checks.values(group_ids < 0, "group_ids must be >= 0")
    _checks.same_device(rewards=rewards, group_ids=group_ids, revision_correct=revision_correct,
                        revision_valid=revision_valid)  # fmt: skip
    n_valid = revision_valid.sum(1)
    n_correct = (revision_correct & revision_valid).sum(1)
    return _ibpo_shaping(rewards, n_correct, n_valid, rho, lam, threshold)


def token_advantages(
    seq_adv: Tensor,
    mask: Tensor,
    *,
    wrong: Tensor,
    has_repair: Tensor,
    sign_guard: bool = True,
    unmasked_weight: float = 0.0,
    correct_in_loss: bool = True,
    lengths: Tensor | None = None,
    prompt_lengths: Tensor | None = None,
    repair_mask: Tensor | None = None,
    repair_of: Tensor | None = None,
    repair_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token advantages and gates from sequence advantages and edit masks (SPEC §1 step 6).

    On a wrong sample with an accepted repair:  gate[t] = mask[t] ? 1 : unmasked_weight,
        A[t] = gate[t] * (sign_guard ? min(A_i, 0) : A_i)        (shaping never reinforces erroneous tokens)
    on every other sample:  gate[t] = 1, A[t] = A_i;  with ``correct_in_loss=False`` correct samples get 0.
    Tokens outside [prompt_lengths, lengths) get advantage 0 and gate 0.

    With ``repair_mask`` (the repairs' inserted/substituted tokens) also the repair rows: A = +|A_i| of the
    sample it repairs on its flagged tokens, gate = the flags; rows whose sample is correct, has no repair,
    or whose ``repair_of`` is -1 (padding) get 0; every other row is scored, so pass the chosen repair of each
    sample only (credit_assign picks them). Repair rows carry the prompt of their sample, so
    ``prompt_lengths[repair_of]`` applies to them too.

    Shapes:
        seq_adv: (B,) float;  mask: (B, T) bool;  wrong, has_repair: (B,) bool
        lengths, prompt_lengths: (B,) int32 / int64, optional
        repair_mask: (M, Tr) bool;  repair_of: (M,) int in [-1, B);  repair_lengths: (M,) int, optional
        returns: advantages (B, T), gates (B, T) float32 (float64 for float64 seq_adv), and with
            ``repair_mask`` also repair_advantages (M, Tr), repair_gates (M, Tr)
    """
    _checks.tensor("seq_adv", seq_adv, dtypes=_checks.FLOAT_DTYPES, dim=1)
    _checks.tensor("mask", mask, dtypes=(torch.bool,), dim=2)
    B, T = mask.shape
    _checks.shape("seq_adv", seq_adv, (B,), "(one advantage per row of mask)")
    for name, x in (("wrong", wrong), ("has_repair", has_repair)):
        _checks.tensor(name, x, dtypes=(torch.bool,), dim=1)
        _checks.shape(name, x, (B,), "(one flag per row of mask)")
    _checks.same_device(seq_adv=seq_adv, mask=mask, wrong=wrong, has_repair=has_repair, lengths=lengths,
                        prompt_lengths=prompt_lengths, repair_mask=repair_mask, repair_of=repair_of,
                        repair_lengths=repair_lengths)  # fmt: skip
    _checks.check(0.0 <= unmasked_weight <= 1.0, f"unmasked_weight must lie in [0, 1], got {unmasked_weight}")
    _checks.finite("seq_adv", seq_adv)
    ends = _check_lengths("lengths", lengths, B, T)
    starts = _check_lengths("prompt_lengths", prompt_lengths, B, T)
    adv, gates = _token_advantages(seq_adv, mask, wrong, has_repair, ends, starts, sign_guard, unmasked_weight,
                                   correct_in_loss)  # fmt: skip
    if repair_mask is None:
        _checks.check(repair_of is None and repair_lengths is None, "repair_of/repair_lengths need repair_mask")
        return adv, gates
    _checks.tensor("repair_mask", repair_mask, dtypes=(torch.bool,), dim=2)
    M = repair_mask.shape[0]
    _checks.check(repair_of is not None, "repair_mask needs repair_of (the sample each repair row repairs)")
    _checks.tensor("repair_of", repair_of, dtypes=_checks.INDEX_DTYPES, dim=1)
    _checks.shape("repair_of", repair_of, (M,), "(one sample index per repair row)")
    _checks.values((repair_of < -1) | (repair_of >= B), f"repair_of must lie in [0, {B}) or be -1 (padding)")
    r_ends = _check_lengths("repair_lengths", repair_lengths, M, repair_mask.shape[1])
    src = repair_of.long()
    safe = src.clamp(min=0)
    selected = (src >= 0) & wrong[safe] & has_repair[safe] if B else torch.zeros_like(src, dtype=torch.bool)
    r_starts = starts[safe] if starts is not None and B else None
    r_adv, r_gates = _repair_advantages(seq_adv, repair_mask, src, selected, r_ends, r_starts)
    return adv, gates, r_adv, r_gates


# ---- policy_loss (issue 3)
_PL_INPUTS = ("old_logprobs", "ref_logprobs", "mask", "gates")
_KL_INDEX = {"k1": 1, "k2": 2, "k3": 3}  # the kernels' kl_type


def _policy_config(loss_type, eps_low, eps_high, dual_clip, beta, kl_type, agg, max_length, temperature, ref):
    """Validate and resolve the scalar options of policy_loss; returns the resolved (eps_low, eps_high, agg)."""
    R = reference
    _checks.check(loss_type in R.LOSS_TYPES, f"unknown loss_type {loss_type!r}; expected one of {R.LOSS_TYPES}")
    agg = R.DEFAULT_AGG[loss_type] if agg is None else agg
    _checks.check(agg in R.AGGREGATIONS, f"unknown agg {agg!r}; expected one of {R.AGGREGATIONS} (or None)")
    _checks.check(kl_type in R.KL_TYPES, f"unknown kl_type {kl_type!r}; expected one of {R.KL_TYPES}")
    low, high = R.DEFAULT_EPS[loss_type]
    eps_low = low if eps_low is None else float(eps_low)
    eps_high = high if eps_high is None else float(eps_high)
    _checks.check(eps_low >= 0 and eps_high >= 0, f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    _checks.check(eps_low <= 1, f"eps_low must be <= 1 (the lower clip bound is 1 - eps_low), got {eps_low}")
    _checks.check(dual_clip is None or dual_clip > 1, f"dual_clip must be None or > 1, got {dual_clip}")
    _checks.check(beta >= 0, f"beta must be >= 0, got {beta}")
    _checks.check(beta == 0 or ref is not None, "beta > 0 needs ref_logprobs (the reference policy's log-probs)")
    _checks.check(
        agg != "seq_mean_token_sum_norm" or (max_length is not None and max_length > 0),
        f"agg='seq_mean_token_sum_norm' (the default of loss_type='dr_grpo') needs max_length > 0, got {max_length}",
    )
    _checks.check(temperature > 0, f"temperature must be > 0, got {temperature}")
    return eps_low, eps_high, agg


def _policy_tokens(labels, V, advantages, old_logprobs, ref_logprobs, mask, gates, ignore_index, acc):
    """Validate the (B, T) inputs; returns valid (B, T) acc, advantages (B, T) acc and the optional tensors in acc."""
    _checks.tensor("labels", labels, dtypes=_checks.INDEX_DTYPES, dim=2)
    B, T = labels.shape
    _checks.tensor("advantages", advantages, dtypes=_checks.FLOAT_DTYPES)
    _checks.check(
        tuple(advantages.shape) in ((B,), (B, T)),
        f"advantages must have shape ({B},) (per sequence) or ({B}, {T}) (per token), got {tuple(advantages.shape)}",
    )
    opt = dict(zip(_PL_INPUTS, (old_logprobs, ref_logprobs, mask, gates), strict=True))
    for name, t in opt.items():
        if t is not None:
            _checks.tensor(name, t, dtypes=None if name == "mask" else _checks.FLOAT_DTYPES)
            _checks.shape(name, t, (B, T), "(that of labels)")
    _checks.same_device(labels=labels, advantages=advantages, **opt)
    _checks.ids_in_range("labels", labels, V, ignore_index=ignore_index)
    if gates is not None:
        _checks.values((gates < 0) | (gates > 1) | torch.isnan(gates), "gates must lie in [0, 1]")
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & (mask != 0)
    adv = advantages.to(acc)
    adv = adv.unsqueeze(-1).expand(B, T) if adv.dim() == 1 else adv
    # padding may hold anything (-inf old log-probs, NaN advantages): 0 on invalid tokens keeps the stats finite
    cast = lambda t: None if t is None else torch.where(valid, t.to(acc), 0.0)  # noqa: E731
    return valid, cast(adv), cast(old_logprobs), cast(ref_logprobs), cast(gates)


def _pl_backend(device) -> str:
    """The policy-loss ops' GPU kernels are Triton: "native" on a CUDA device runs them too."""
    backend = pick(device, gpu="triton")
    return "triton" if backend == "native" and device.type == "cuda" else backend


class _PolicyLossInplace(torch.autograd.Function):
    """Token-level loss writing d loss / d logits into the logits' own storage (inplace_grad=True)."""

    @staticmethod
    def forward(ctx, logits, labels, adv, weights, old, ref, params, use_triton):
        x = logits.detach()
        if use_triton:
            from credit_ops.triton_kernels.policy_loss import policy_loss_forward

            loss, logp, ent, _ = policy_loss_forward(x, labels, adv, weights, old, ref, grad=x, **params)
        else:
            loss, logp, ent = torch.ops.credit.policy_loss_rows_(
                x, x, labels, adv, weights, old, ref, params["temperature"], params["ignore_index"],
                params["eps_low"], params["eps_high"], params["dual_clip"], params["beta"], params["kl_type"],
                False, True,
            )  # fmt: skip
        # The kernels wrote through a pointer: bump the version so autograd catches any saved use of the logits.
        torch.autograd.graph.increment_version(x)
        ctx.grad = x
        ctx.mark_non_differentiable(logp, ent)
        return loss, logp, ent

    @staticmethod
    def backward(ctx, grad_loss, _g1, _g2):
        grad = ctx.grad
        if grad_loss is None:
            grad = None
        elif bool(grad_loss != 1):
            grad.mul_(grad_loss.to(grad.dtype))
        return grad, None, None, None, None, None, None, None


class _SeqPolicyLossInplace(torch.autograd.Function):
    """GSPO family with inplace_grad=True: log-probs (one read), d loss / d logp from the O(B T) scalar graph, then
    d loss / d logits written over the logits (a second read, one write), all in the forward."""

    @staticmethod
    def forward(ctx, logits, labels, validf, adv, old, ref, gates, kw, temperature, ignore_index, use_triton):
        from credit_ops.triton_kernels.fused_linear import row_kernel

        rows = row_kernel(use_triton)
        x = logits.detach()
        _, logp, ent = rows(x, x, labels, None, torch.zeros_like(validf), None, None, temperature=temperature,
                            ignore_index=ignore_index, coef_given=True, write_grad=False)  # fmt: skip
        with torch.enable_grad():
            lp = logp.detach().requires_grad_(True)
            loss, _ = reference.policy_loss_from_logprobs(lp, ent, validf, adv, old_logprobs=old, ref_logprobs=ref,
                                                          gates=gates, **kw)  # fmt: skip
            (coef,) = torch.autograd.grad(loss, lp)
        rows(x, x, labels, None, coef.contiguous(), None, None, temperature=temperature, ignore_index=ignore_index,
             coef_given=True, write_grad=True)  # fmt: skip
        torch.autograd.graph.increment_version(x)  # the kernels wrote through a pointer
        ctx.grad = x
        ctx.mark_non_differentiable(logp, ent)
        return loss.detach(), logp, ent

    @staticmethod
    def backward(ctx, grad_loss, _g1, _g2):
        return _PolicyLossInplace.backward(ctx, grad_loss, _g1, _g2)[:1] + (None,) * 10


def policy_loss(
    logits: Tensor,
    labels: Tensor,
    advantages: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    mask: Tensor | None = None,
    gates: Tensor | None = None,
    loss_type: str = "dapo",
    eps_low: float | None = None,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    beta: float = 0.0,
    kl_type: str = "k3",
    agg: str | None = None,
    max_length: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    inplace_grad: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO-family clipped policy loss with per-token advantages and gates, straight from the logits (SPEC §4).

    ``logits[:, t]`` scores ``labels[:, t]``: pass logits already shifted against the labels (for a causal LM,
    ``logits[:, :-1]`` with ``labels = input_ids[:, 1:]``; the strided slice is read in place, not copied), or the
    model's full ``(B, T + 1, V)`` output, whose last position is then dropped (TRL / Liger's convention). The full
    output is cheaper in training: the gradient is written for the whole tensor, while a slice's gradient needs
    autograd to allocate a zeroed (B, T + 1, V) buffer and copy into it.
    With logp_t = log softmax(logits_t / T)[labels_t], l_t = logp_t - old_t, valid tokens M_t (mask and
    labels != ignore_index), gates g_t in [0, 1] (1 when None):

        grpo / dapo / dr_grpo / bnpo:  r_t = exp(l_t)
        gspo:        r_t = s_b = exp(sum_t M_t l_t / sum_t M_t)        (one ratio per sequence)
        gspo_token:  r_t = sg(s_b) * exp(logp_t - sg(logp_t))         (per-token advantages keep own gradient)
        gated_gspo:  r_t = s_b = exp(sum_t g_t M_t l_t / sum_t g_t M_t)  (IOP; only gated tokens get gradient)
        loss_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)  [min(., -dual_clip A_t) where A_t < 0]
                 + beta * KL_t(k1 | k2 | k3 against ref_logprobs)
        loss = sum_bt w_bt g_t loss_t, with w the aggregation weights (denominators count valid tokens):
            token_mean 1 / sum M; seq_mean_token_mean 1 / (B |y_b|); seq_mean_token_sum 1 / B;
            seq_mean_token_sum_norm 1 / (B max_length)

    ``agg=None`` takes TRL's aggregation of the loss type (grpo: seq_mean_token_mean; dapo, bnpo: token_mean;
    dr_grpo: seq_mean_token_sum_norm, which needs ``max_length``; GSPO family: seq_mean_token_mean, the mean of
    the per-sequence losses). ``eps_low/eps_high=None`` take 0.2 / 0.28 for token ratios and 3e-4 / 4e-4 for the
    GSPO family (SPEC §4). ``old_logprobs=None`` is on-policy: ratio 1, gradient still flowing.

    Token-level types run one fused kernel that reads each logit once per pass and writes d loss / d logits during
    the forward (backward only scales it by the incoming gradient, skipping even that when it is 1); the GSPO
    family runs a log-prob pass, O(B T) scalar math, and one gradient pass in backward. ``inplace_grad=True``
    (off by default) writes the gradient into the logits' own storage, during the forward, instead of a new
    (B, T, V) buffer: the logits' values are destroyed by the forward, so nothing else may need them later (autograd
    raises if a saved tensor is overwritten); eager mode only.

    Shapes:
        logits: (B, T, V) or (B, T + 1, V) bfloat16 / float16 / float32 / float64, unit stride along V
        labels: (B, T) int32 / int64 in [0, V) or ``ignore_index``
        advantages: (B,) per sequence or (B, T) per token
        old_logprobs, ref_logprobs, gates: (B, T) float; mask: (B, T) bool or numeric (nonzero = valid)
        returns: loss () float32 (float64 for float64 logits), differentiable w.r.t. logits; stats: dict of
            detached 0-d tensors clip_frac_low, clip_frac_high, clip_frac, ratio_mean, kl_mean, entropy_mean,
            num_tokens (means over valid tokens; no host synchronisation)
    """
    _checks.tensor("logits", logits, dtypes=_checks.FLOAT_DTYPES, dim=3)
    _checks.tensor("labels", labels, dtypes=_checks.INDEX_DTYPES, dim=2)
    B, T = labels.shape
    _checks.check(
        logits.shape[0] == B and logits.shape[1] in (T, T + 1),
        f"logits {tuple(logits.shape)} must be (B, T, V) aligned with labels {tuple(labels.shape)}, or the model's "
        "full (B, T + 1, V) output whose last position is dropped",
    )
    _checks.check(logits.shape[-1] > 0, "logits must have a non-empty vocabulary dimension")
    _checks.same_device(logits=logits, labels=labels)
    eps_low, eps_high, agg = _policy_config(loss_type, eps_low, eps_high, dual_clip, beta, kl_type, agg, max_length,
                                            temperature, ref_logprobs)  # fmt: skip
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid, adv, old, ref, g = _policy_tokens(labels, logits.shape[-1], advantages, old_logprobs, ref_logprobs, mask,
                                             gates, ignore_index, acc)  # fmt: skip
    backend = _pl_backend(logits.device)
    kw = dict(loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, beta=float(beta),
              kl_type=kl_type, agg=agg, max_length=max_length)  # fmt: skip
    if backend == "reference":
        return reference.policy_loss(logits[:, :T], labels, advantages, old_logprobs=old_logprobs,
                                     ref_logprobs=ref_logprobs, mask=mask, gates=gates, temperature=temperature,
                                     ignore_index=ignore_index, **kw)  # fmt: skip
    labels_eff = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    validf = valid.to(acc)
    if logits.shape[1] == T + 1:
        # The model's full output: score it in place with an ignored last position, so the gradient is written for
        # the whole tensor (zero last row) and autograd needs no (B, T + 1, V) buffer for a slice's backward.
        pad = lambda t, fill: None if t is None else torch.cat([t, t.new_full((B, 1), fill)], 1)  # noqa: E731
        labels_eff, validf, adv, old, ref, g = (pad(labels_eff, ignore_index), pad(validf, 0), pad(adv, 0),
                                                pad(old, 0), pad(ref, 0), pad(g, 0))  # fmt: skip
    inplace = inplace_grad and logits.requires_grad and torch.is_grad_enabled()
    if inplace:
        _checks.check(logits.is_contiguous(), "inplace_grad=True needs contiguous logits")
    if loss_type in reference.SEQUENCE_LOSSES:
        if inplace:
            loss, logp, ent = _SeqPolicyLossInplace.apply(
                logits, labels_eff.contiguous(), validf, adv, old, ref, g, kw, float(temperature), int(ignore_index),
                backend == "triton",
            )  # fmt: skip
            _, stats = reference.policy_loss_from_logprobs(logp, ent, validf, adv, old_logprobs=old, ref_logprobs=ref,
                                                           gates=g, **kw)  # fmt: skip
            return loss, stats
        logp, ent = token_logprobs(logits, labels_eff, temperature=temperature, ignore_index=ignore_index,
                                   return_entropy=True)  # fmt: skip
        return reference.policy_loss_from_logprobs(logp, ent.detach(), validf, adv, old_logprobs=old,
                                                   ref_logprobs=ref, gates=g, **kw)  # fmt: skip
    weights = reference.aggregation_weights(validf, agg, max_length)
    if g is not None:
        weights = weights * g
    kl = _KL_INDEX[kl_type] if beta != 0 else 0
    args = (adv.contiguous(), weights.contiguous(), None if old is None else old.contiguous(),
            None if ref is None else ref.contiguous())  # fmt: skip
    params = dict(temperature=float(temperature), ignore_index=int(ignore_index), eps_low=eps_low, eps_high=eps_high,
                  dual_clip=float(dual_clip or 0.0), beta=float(beta), kl_type=kl)  # fmt: skip
    if inplace:
        loss, logp, ent = _PolicyLossInplace.apply(logits, labels_eff.contiguous(), *args, params,
                                                   backend == "triton")  # fmt: skip
    else:
        op = torch.ops.credit.policy_loss_fwd_triton if backend == "triton" else torch.ops.credit.policy_loss_fwd
        write_grad = torch.is_grad_enabled() and logits.requires_grad
        loss, logp, ent, _ = op(logits, labels_eff, *args, *params.values(), write_grad)
    logp, ent = logp.detach(), ent.detach()
    ratio = torch.ones_like(logp) if old is None else torch.exp(logp - old)
    stats = reference.policy_loss_stats(ratio, adv, logp, ref, ent, validf, eps_low=eps_low, eps_high=eps_high,
                                        kl_type=kl_type)  # fmt: skip
    return loss, stats


class _FusedSequenceLoss(torch.autograd.Function):
    """The GSPO family through the fused LM head in three matmuls (fused_linear_sequence_loss_forward): gradients
    computed in the forward, chunk by chunk of whole sequences; the backward only scales them. Returns the loss and
    the (detached) statistics' values."""

    @staticmethod
    def forward(ctx, h, weight, bias, run):
        loss, stats, gh, gw, gb = run()
        ctx.has_bias = bias is not None
        ctx.save_for_backward(gh, gw, gb)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*stats)
        return loss, *stats

    @staticmethod
    def backward(ctx, grad_loss, *_grad_stats):
        from credit_ops._autograd import head_grads

        return *head_grads(ctx, grad_loss), None


def _fused_sequence_loss(h, weight, bias, labels_eff, validf, adv, old, ref, g, kw, chunk, temperature, ignore_index,
                         backend):  # fmt: skip
    """(loss, stats) of a GSPO-family loss, the loss differentiable w.r.t. h, weight, bias."""
    from credit_ops.triton_kernels.fused_linear import fused_linear_sequence_loss_forward

    B, T = labels_eff.shape
    # d loss / d logp of a chunk's sequences from the (B, T) scalar graph: the other sequences' log-probs do not
    # enter it (every aggregation is a sum over sequences with denominators from the mask alone), so they hold a
    # finite stand-in (the old log-probs: ratio 1) until their chunk comes.
    stand_in = (old if old is not None else torch.zeros_like(validf)).detach().clone()
    zeros = torch.zeros_like(validf)

    def coef_of(s, e, lp):
        stand_in.view(-1)[s:e] = lp
        with torch.enable_grad():
            leaf = stand_in.clone().requires_grad_(True)
            loss, _ = reference.policy_loss_from_logprobs(leaf, zeros, validf, adv, old_logprobs=old, ref_logprobs=ref,
                                                          gates=g, **kw)  # fmt: skip
            (coef,) = torch.autograd.grad(loss, leaf)
        return coef.view(-1)[s:e]

    def run():
        logp, ent, gh, gw, gb = fused_linear_sequence_loss_forward(
            h, weight, bias, labels_eff.reshape(-1), coef_of, seq_len=T, chunk=chunk, temperature=temperature,
            ignore_index=ignore_index, use_triton=backend == "triton",
        )  # fmt: skip
        loss, stats = reference.policy_loss_from_logprobs(logp.view(B, T), ent.view(B, T), validf, adv,
                                                          old_logprobs=old, ref_logprobs=ref, gates=g,
                                                          **kw)  # fmt: skip
        return loss, tuple(stats[k] for k in reference.STAT_NAMES), gh, gw, gb

    loss, *values = _FusedSequenceLoss.apply(h, weight, bias, run)
    return loss, dict(zip(reference.STAT_NAMES, values, strict=True))


def _fl_op(name: str, backend: str):
    return getattr(torch.ops.credit, f"{name}_triton" if backend == "triton" else name)


def _fused_linear_args(hidden, weight, labels, bias):
    _checks.tensor("weight", weight, dtypes=_checks.FLOAT_DTYPES, dim=2)
    _checks.tensor("hidden", hidden, dtypes=(weight.dtype,), min_dim=2)
    _checks.check(hidden.shape[-1] == weight.shape[1],
                  f"hidden's last dimension ({hidden.shape[-1]}) must equal weight.shape[1] ({weight.shape[1]}): "
                  "weight is the LM head's (V, H) matrix")  # fmt: skip
    _checks.check(weight.shape[0] > 0, "weight must have a non-empty vocabulary dimension")
    if bias is not None:
        _checks.tensor("bias", bias, dtypes=(weight.dtype,))
        _checks.shape("bias", bias, (weight.shape[0],), "(V,)")
    _checks.tensor("labels", labels, dtypes=_checks.INDEX_DTYPES)
    rows_ok = hidden.shape[:-1].numel() == labels.numel() and (hidden.dim() == 2 or hidden.shape[:-1] == labels.shape)
    _checks.check(rows_ok,
                  f"hidden {tuple(hidden.shape)} must hold one row per label {tuple(labels.shape)}: (N, H) or "
                  "labels.shape + (H,)")  # fmt: skip
    _checks.same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    return hidden.reshape(-1, hidden.shape[-1])


def _lm_head_autocast(fn):
    """Under torch.autocast the LM head's operands go to the autocast dtype (what nn.Linear would compute in) and
    the op runs with autocast off: its chunked matmuls write into buffers of the operands' dtype. Gradients reach
    the original (e.g. fp32 master) tensors through the casts."""

    @functools.wraps(fn)
    def wrapper(hidden, weight, labels, *args, bias=None, **kwargs):
        device = hidden.device.type if isinstance(hidden, Tensor) else "cpu"
        if not torch.is_autocast_enabled(device):
            return fn(hidden, weight, labels, *args, bias=bias, **kwargs)
        dtype = torch.get_autocast_dtype(device)
        cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dtype)  # noqa: E731
        with torch.autocast(device, enabled=False):
            return fn(cast(hidden), cast(weight), labels, *args, bias=cast(bias), **kwargs)

    return wrapper


@_lm_head_autocast
def fused_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """token_logprobs of the LM head's logits, hidden @ weight.T + bias, without materialising them.

    For the old-policy and reference passes (under ``torch.no_grad()`` it keeps one (chunk, V) logits buffer);
    differentiable w.r.t. hidden, weight and bias through the log-probs (the backward recomputes each chunk; the
    entropy is returned detached). ``chunk_size`` tokens per chunk (default: ~1 GiB of logits per chunk).

    Shapes:
        hidden: (N, H) or labels.shape + (H,), same dtype as weight; weight: (V, H); bias: (V,) or None
        labels: (N,) or any shape with N elements, int32 / int64 in [0, V) or ``ignore_index``
        returns: logprobs of labels.shape, float32 (float64 for float64 input); with return_entropy also entropy
    """
    h = _fused_linear_args(hidden, weight, labels, bias)
    _checks.check(temperature > 0, f"temperature must be > 0, got {temperature}")
    _checks.ids_in_range("labels", labels, weight.shape[0], ignore_index=ignore_index)
    backend = _pl_backend(hidden.device)
    if backend == "reference":
        out = reference.fused_linear_logprobs(h, weight, labels.reshape(-1), bias=bias, temperature=temperature,
                                              ignore_index=ignore_index, return_entropy=True)  # fmt: skip
    else:
        op = _fl_op("fused_linear_logprobs_fwd", backend)
        out = op(h, weight, bias, labels.reshape(-1), float(temperature), int(ignore_index), int(chunk_size or 0))
    logp, ent = out[0].view(labels.shape), out[1].detach().view(labels.shape)
    return (logp, ent) if return_entropy else logp


@_lm_head_autocast
def fused_linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    advantages: Tensor,
    *,
    bias: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    mask: Tensor | None = None,
    gates: Tensor | None = None,
    loss_type: str = "dapo",
    eps_low: float | None = None,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    beta: float = 0.0,
    kl_type: str = "k3",
    agg: str | None = None,
    max_length: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """credit_ops.policy_loss of the LM head's logits hidden @ weight.T + bias, never materialising them.

    Same semantics and options as :func:`policy_loss` (hidden row t scores labels[..., t]). Token-level loss types
    compute, per chunk of tokens, the logits (one matmul), the loss and d loss / d logits in place (one fused row
    kernel) and the gradient matmuls, all in the forward: three matmuls in total, one (chunk, V) buffer, and the
    backward only scales the stored gradients. The GSPO family needs a whole sequence's log-probs before any of its
    gradients: chunks of whole sequences get the logits, the log-probs, the sequences' d loss / d logp from the
    scalar graph, then the gradient (three matmuls, in the forward); when one sequence exceeds a chunk, or under
    torch.compile or no_grad, a log-prob pass now and a backward that recomputes the logits (four matmuls).
    bf16 operands with fp32 accumulation; lse, loss and statistics in fp32. grad_weight is accumulated over the
    chunks in the weight's dtype.

    Shapes:
        hidden: (B, T, H) or (N = B T, H); weight: (V, H); bias: (V,) or None
        labels: (B, T), or (N,) for a single sequence; the per-token tensors of policy_loss with labels' shape
        advantages: (B,) or (B, T) ((1,) or (N,) with 1-D labels)
        returns: loss (), stats (see policy_loss)
    """
    h = _fused_linear_args(hidden, weight, labels, bias)
    if labels.dim() == 1:  # a single packed sequence
        labels = labels.unsqueeze(0)
        unsq = lambda t: None if t is None else t.reshape(1, -1)  # noqa: E731
        advantages = advantages.reshape(1) if advantages.numel() == 1 else unsq(advantages)
        old_logprobs, ref_logprobs, mask, gates = map(unsq, (old_logprobs, ref_logprobs, mask, gates))
    V = weight.shape[0]
    eps_low, eps_high, agg = _policy_config(loss_type, eps_low, eps_high, dual_clip, beta, kl_type, agg, max_length,
                                            temperature, ref_logprobs)  # fmt: skip
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    valid, adv, old, ref, g = _policy_tokens(labels, V, advantages, old_logprobs, ref_logprobs, mask, gates,
                                             ignore_index, acc)  # fmt: skip
    backend = _pl_backend(hidden.device)
    kw = dict(loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, beta=float(beta),
              kl_type=kl_type, agg=agg, max_length=max_length)  # fmt: skip
    if backend == "reference":
        return reference.fused_linear_policy_loss(h, weight, labels, advantages, bias=bias, old_logprobs=old_logprobs,
                                                  ref_logprobs=ref_logprobs, mask=mask, gates=gates,
                                                  temperature=temperature, ignore_index=ignore_index, **kw)  # fmt: skip
    labels_eff = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    validf = valid.to(acc)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if loss_type in reference.SEQUENCE_LOSSES:
        from credit_ops.triton_kernels.fused_linear import sequence_chunk_rows

        chunk = sequence_chunk_rows(h.shape[0], labels.shape[1], V, h.dtype, chunk_size)
        if needs_grad and chunk > 0 and not torch.compiler.is_compiling():
            return _fused_sequence_loss(h, weight, bias, labels_eff, validf, adv, old, ref, g, kw, chunk,
                                        float(temperature), int(ignore_index), backend)  # fmt: skip
        # No gradient wanted, traced, or a sequence longer than a chunk: log-probs now, the gradient in a backward
        # that recomputes the logits (four matmuls).
        logp, ent = _fl_op("fused_linear_logprobs_fwd", backend)(h, weight, bias, labels_eff.reshape(-1),
                                                                 float(temperature), int(ignore_index),
                                                                 int(chunk_size or 0))  # fmt: skip
        return reference.policy_loss_from_logprobs(logp.view(labels.shape), ent.detach().view(labels.shape), validf,
                                                   adv, old_logprobs=old, ref_logprobs=ref, gates=g, **kw)  # fmt: skip
    weights = reference.aggregation_weights(validf, agg, max_length)
    if g is not None:
        weights = weights * g
    flat = lambda t: None if t is None else t.reshape(-1).contiguous()  # noqa: E731
    loss, logp, ent, _, _, _ = _fl_op("fused_linear_policy_loss_fwd", backend)(
        h, weight, bias, labels_eff.reshape(-1), flat(adv), flat(weights), flat(old), flat(ref), float(temperature),
        int(ignore_index), eps_low, eps_high, float(dual_clip or 0.0), float(beta), _KL_INDEX[kl_type] if beta else 0,
        int(chunk_size or 0), needs_grad,
    )  # fmt: skip
    logp, ent = logp.detach().view(labels.shape), ent.detach().view(labels.shape)
    ratio = torch.ones_like(logp) if old is None else torch.exp(logp - old)
    stats = reference.policy_loss_stats(ratio, adv, logp, ref, ent, validf, eps_low=eps_low, eps_high=eps_high,
                                        kl_type=kl_type)  # fmt: skip
    return loss, stats
