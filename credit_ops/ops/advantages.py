"""The advantage ops: group baselines, IBPO's reward shaping, per-token advantages and gates (docs/method.md §1).

The public functions validate their input; the ``*_op`` dispatchers below them run the kernels unchecked, for
credit_assign, which validates a whole batch once.
"""

import torch
from torch import Tensor

from credit_ops import _checks, reference
from credit_ops._backend import resolve

ADV_MODE_IDS = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "batch": 3}  # the kernels' modes (csrc/core/advantages.h)


def _native(device) -> bool:
    return resolve(device, triton=False) == "native"


def check_rewards(name: str, rewards: Tensor) -> None:
    _checks.tensor(name, rewards, dtypes=_checks.FLOAT_DTYPES, dim=1)
    _checks.finite(name, rewards)


def group_advantages_op(rewards: Tensor, group_ids: Tensor, num_groups: int, mode: str, eps: float) -> Tensor:
    if not _native(rewards.device):
        return reference.group_advantages(rewards, group_ids, mode=mode, eps=eps, num_groups=num_groups)
    if mode == "grpo_batch_std":  # TRL's scale_rewards="batch": the group-centred reward over the batch's std
        centred = torch.ops.credit.group_advantages(rewards, group_ids, int(num_groups), ADV_MODE_IDS["dr_grpo"], 0.0)
        std = rewards.double().std() if rewards.shape[0] > 1 else rewards.new_zeros((), dtype=torch.float64)
        return (centred.double() / (std + eps)).to(centred.dtype)
    return torch.ops.credit.group_advantages(rewards, group_ids, int(num_groups), ADV_MODE_IDS[mode], float(eps))


def ibpo_shaping_op(rewards, n_correct, n_valid, rho, lam, threshold) -> tuple[Tensor, Tensor]:
    if not _native(rewards.device):
        return reference.ibpo_shaping_counts(rewards, n_correct, n_valid, rho=rho, lam=lam, threshold=threshold)
    return torch.ops.credit.ibpo_shaping(rewards, n_correct, n_valid, float(rho), float(lam), float(threshold))


def token_advantages_op(
    seq_adv, mask, wrong, has_repair, lengths, starts, sign_guard, unmasked_weight, correct_in_loss
) -> tuple[Tensor, Tensor]:
    if not _native(seq_adv.device):
        return reference.token_advantages(
            seq_adv,
            mask,
            wrong=wrong,
            has_repair=has_repair,
            sign_guard=sign_guard,
            unmasked_weight=unmasked_weight,
            correct_in_loss=correct_in_loss,
            lengths=lengths,
            prompt_lengths=starts,
        )
    return torch.ops.credit.token_advantages(
        seq_adv,
        mask,
        wrong,
        has_repair,
        lengths,
        starts,
        bool(sign_guard),
        float(unmasked_weight),
        bool(correct_in_loss),
    )


def repair_advantages_op(seq_adv, mask, repair_of, selected, lengths, starts) -> tuple[Tensor, Tensor]:
    if not _native(seq_adv.device):
        return reference.repair_advantages(seq_adv, mask, repair_of, selected, lengths=lengths, starts=starts)
    return torch.ops.credit.repair_advantages(seq_adv, mask, repair_of, selected, lengths, starts)


def check_group_ids(group_ids: Tensor, n: int, num_groups: int | None) -> int:
    _checks.tensor("group_ids", group_ids, dtypes=_checks.INDEX_DTYPES, dim=1)
    _checks.shape("group_ids", group_ids, (n,), "(one group id per sample)")
    G = n if num_groups is None else int(num_groups)
    _checks.check(G >= 0, lambda: f"num_groups must be >= 0, got {G}")
    hint = "" if num_groups is not None else " (num_groups defaults to N; pass num_groups for larger ids)"
    _checks.within_range(group_ids, 0, G - 1, f"group_ids must lie in [0, {G}){hint}")
    return G


def check_lengths(name: str, lengths: Tensor | None, n: int, upper: int) -> Tensor | None:
    if lengths is None:
        return None
    _checks.tensor(name, lengths, dtypes=_checks.INDEX_DTYPES, dim=1)
    _checks.shape(name, lengths, (n,))
    _checks.within_range(lengths, 0, upper, f"{name} must lie in [0, {upper}]")
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
    grpo_batch_std: (r - mean) / (std of the whole batch + eps) (TRL's scale_rewards="batch"; TRL's eps is 1e-4)

    Groups may be unsorted and of any size; a group of one gets advantage 0. Statistics accumulate in
    float64 (atomics keyed by group id on CUDA: no sort, no host synchronisation).

    Shapes:
        rewards: (N,) float16 / bfloat16 / float32 / float64, finite
        group_ids: (N,) int32 / int64 in [0, num_groups); ``num_groups`` defaults to N, which fits any
            dense numbering without reading the ids on the host (pass it for sparse ids)
        returns: (N,) float32 (float64 for float64 rewards)
    """
    _checks.check(
        mode in reference.ADVANTAGE_MODES, lambda: f"mode must be one of {reference.ADVANTAGE_MODES}, got {mode!r}"
    )
    _checks.check(eps >= 0, lambda: f"eps must be >= 0, got {eps}")
    _checks.tensor("rewards", rewards, dtypes=_checks.FLOAT_DTYPES, dim=1)
    _checks.same_device(rewards=rewards, group_ids=group_ids)
    check_rewards("rewards", rewards)
    G = check_group_ids(group_ids, rewards.shape[0], num_groups)
    return group_advantages_op(rewards, group_ids, G, mode, eps)


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
    _checks.same_device(
        rewards=rewards, group_ids=group_ids, revision_correct=revision_correct, revision_valid=revision_valid
    )
    check_rewards("rewards", rewards)
    n = rewards.shape[0]
    for name, x in (("revision_correct", revision_correct), ("revision_valid", revision_valid)):
        _checks.tensor(name, x, dtypes=(torch.bool,), dim=2)
        if x.shape[0] != n:
            raise ValueError(f"{name} must have shape (N={n}, R), got {tuple(x.shape)}")
    _checks.shape("revision_valid", revision_valid, revision_correct.shape, "(the shape of revision_correct)")
    if group_ids is not None:
        _checks.tensor("group_ids", group_ids, dtypes=_checks.INDEX_DTYPES, dim=1)
        _checks.shape("group_ids", group_ids, (n,), "(one group id per sample)")
        _checks.within_range(group_ids, 0, None, "group_ids must be >= 0")
    n_valid = revision_valid.sum(1)
    n_correct = (revision_correct & revision_valid).sum(1)
    return ibpo_shaping_op(rewards, n_correct, n_valid, rho, lam, threshold)


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
    """Per-token advantages and gates from sequence advantages and edit masks (docs/method.md §1, step 6).

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
    _checks.same_device(
        seq_adv=seq_adv,
        mask=mask,
        wrong=wrong,
        has_repair=has_repair,
        lengths=lengths,
        prompt_lengths=prompt_lengths,
        repair_mask=repair_mask,
        repair_of=repair_of,
        repair_lengths=repair_lengths,
    )
    _checks.check(0.0 <= unmasked_weight <= 1.0, lambda: f"unmasked_weight must lie in [0, 1], got {unmasked_weight}")
    _checks.finite("seq_adv", seq_adv)
    ends = check_lengths("lengths", lengths, B, T)
    starts = check_lengths("prompt_lengths", prompt_lengths, B, T)
    adv, gates = token_advantages_op(
        seq_adv, mask, wrong, has_repair, ends, starts, sign_guard, unmasked_weight, correct_in_loss
    )
    if repair_mask is None:
        _checks.check(repair_of is None and repair_lengths is None, "repair_of/repair_lengths need repair_mask")
        return adv, gates
    _checks.tensor("repair_mask", repair_mask, dtypes=(torch.bool,), dim=2)
    M = repair_mask.shape[0]
    _checks.check(repair_of is not None, "repair_mask needs repair_of (the sample each repair row repairs)")
    _checks.tensor("repair_of", repair_of, dtypes=_checks.INDEX_DTYPES, dim=1)
    _checks.shape("repair_of", repair_of, (M,), "(one sample index per repair row)")
    _checks.within_range(repair_of, -1, B - 1, f"repair_of must lie in [0, {B}) or be -1 (padding)")
    r_ends = check_lengths("repair_lengths", repair_lengths, M, repair_mask.shape[1])
    src = repair_of.long()
    safe = src.clamp(min=0)
    selected = (src >= 0) & wrong[safe] & has_repair[safe] if B else torch.zeros_like(src, dtype=torch.bool)
    r_starts = starts[safe] if starts is not None and B else None
    r_adv, r_gates = repair_advantages_op(seq_adv, repair_mask, src, selected, r_ends, r_starts)
    return adv, gates, r_adv, r_gates
