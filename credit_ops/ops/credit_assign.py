"""The one-call credit pipeline: a rollout batch with its repairs in, everything the policy loss needs out.

Composes the alignment ops (align_edits, segment_steps, step_masks, truncate_regions) and the advantage ops
(ibpo_shaping, group_advantages, token_advantages). Every step is a fixed-shape tensor op: on CUDA the whole
call runs without a host synchronisation (value checks run as device-side asserts, the default on CUDA; see
credit_ops._checks) and can be captured in a CUDA graph.

Input contract
--------------
Samples: ``tokens`` (N, T) right-padded, row i = [prompt (prompt_lengths[i] tokens, optional) | completion],
``lengths[i]`` = number of valid tokens of row i (prompt included). Only completion tokens are aligned and
scored; advantages and gates are 0 on the prompt and the padding.

Repairs: ``repair_tokens`` (M, Tr), laid out like ``tokens``: a repair row carries the prompt of the sample it
repairs (the policy context x), so its completion starts at ``prompt_lengths[repair_of]``. ``repair_of[j]``
is the sample repair j revises (-1 marks an unused, padded slot), ``repair_correct[j]`` its verification
result. Any number of repairs per sample (the K-1 revisions of IBPO), in any order.

Per repair, on wrong samples only (R < threshold): *attempted* = not padding; *verified* = attempted and
correct; *accepted* = verified and edit ratio <= max_edit_ratio, where the edit ratio is the Levenshtein
distance of the two completions over the longer completion's length (rapidfuzz's normalised distance).
A sample's repair is its accepted repair with the smallest distance (ties: lowest index), chosen on device
with a scatter-min. IBPO's phi counts accepted repairs among attempted ones (a rejected rewrite is not a
successful revision; docs/method.md §1 gives the reasons).
"""

from typing import NamedTuple

import torch
from torch import Tensor

from credit_ops import _checks
from credit_ops.ops.advantages import (
    check_group_ids,
    check_rewards,
    group_advantages_op,
    ibpo_shaping_op,
    repair_advantages_op,
    token_advantages_op,
)
from credit_ops.ops.align_edits import align_edits, segment_steps, step_masks, truncate_regions
from credit_ops.reference import ADVANTAGE_MODES, ALGORITHMS


class CreditAssignment(NamedTuple):
    """What ``policy_loss`` needs for one rollout batch, plus diagnostics. N samples, M repair slots.

    Shapes:
        (float outputs are float32, float64 for float64 rewards)
        advantages: (N, T) float32, per-token advantage of every sample row (0 on prompt and padding)
        gates: (N, T) float32 in [0, 1], the gate of gated losses (1 on scored tokens of sequence-credit
            rows, the edit mask on repaired rows, 0 on prompt, padding and dropped rows)
        seq_advantages: (N,) float32, the group-normalised (shaped) reward A_i
        shaped_rewards: (N,) float32, R' = R + lam * phi (R when shaping is off)
        phi: (N,) float32, IBPO's shaping term (0 when off)
        wrong: (N,) bool, R < threshold
        has_repair: (N,) bool, a wrong sample with an accepted repair (its tokens get masked credit)
        repair_index: (N,) int64, the chosen repair row of each sample, -1 if none
        masks: (N, T) bool, the (truncated, step-widened) edit mask of repaired samples in row coordinates
        repair_tokens: (M, Tr), the input repair rows (to be scored in the policy context by the loss)
        repair_of: (M,) int64, the sample each repair row repairs (-1 = padding)
        repair_advantages: (M, Tr) float32, +|A_i| on the chosen repairs' inserted/substituted tokens
        repair_gates: (M, Tr) float32, the chosen repairs' edit masks
        repair_selected: (M,) bool, rows that join the loss (chosen and ``train_on_repair``)
        repair_distance: (M,) int32, Levenshtein distance of each verified repair of a wrong sample to that
            sample's completion (0 for the other rows, which are not aligned)
        repair_accepted: (M,) bool, verified and within the edit ratio
        metrics: dict of 0-d float32 tensors: reward_mean, accuracy, repair_success_rate (wrong samples with
            an accepted repair / wrong samples with an attempt), repair_verified_rate (verified / attempted),
            rejected_repairs (verified but over max_edit_ratio, a count), mean_edit_distance (over chosen
            repairs), active_token_ratio (sum of gates / scored completion tokens), phi_mean (over wrong)
    """

    advantages: Tensor
    gates: Tensor
    seq_advantages: Tensor
    shaped_rewards: Tensor
    phi: Tensor
    wrong: Tensor
    has_repair: Tensor
    repair_index: Tensor
    masks: Tensor
    repair_tokens: Tensor | None
    repair_of: Tensor | None
    repair_advantages: Tensor | None
    repair_gates: Tensor | None
    repair_selected: Tensor | None
    repair_distance: Tensor | None
    repair_accepted: Tensor | None
    metrics: dict


def _shift_left(x: Tensor, by: Tensor, fill) -> Tensor:
    """Row p of x moved left by by[p] (the completion of a [prompt | completion] row starts at column 0)."""
    L = x.shape[1]
    idx = torch.arange(L, device=x.device) + by.unsqueeze(1)
    out = x.gather(1, idx.clamp(max=max(L - 1, 0)))
    return out.masked_fill(idx >= L, fill)


def _shift_right(x: Tensor, by: Tensor, fill) -> Tensor:
    L = x.shape[1]
    idx = torch.arange(L, device=x.device) - by.unsqueeze(1)
    return x.gather(1, idx.clamp(min=0)).masked_fill(idx < 0, fill)


def _first_k_steps(mask: Tensor, steps: Tensor, k) -> Tensor:
    """Keep the flags of the first k *flagged* steps of each row (steps from segment_steps, mask step-widened)."""
    prev = torch.nn.functional.pad(steps[:, :-1], (1, 0), value=-2)
    starts = mask & (steps != prev)
    rank = starts.to(torch.int32).cumsum(1, dtype=torch.int32) - 1
    return truncate_regions(mask, torch.where(mask, rank, -1), k)


def _edit_masks(mask, regions, tokens, lengths, granularity, delimiter_ids, k):
    if granularity == "step":
        steps = segment_steps(tokens, lengths, delimiter_ids)
        mask = step_masks(mask, steps)
        return mask if k is None else _first_k_steps(mask, steps, k)
    return mask if k is None else truncate_regions(mask, regions, k)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return (num.float() / den.float().clamp(min=1)).float()


def credit_assign(
    tokens: Tensor,
    lengths: Tensor,
    group_ids: Tensor,
    rewards: Tensor,
    repair_tokens: Tensor | None = None,
    repair_lengths: Tensor | None = None,
    repair_of: Tensor | None = None,
    repair_correct: Tensor | None = None,
    *,
    algorithm: str = "ibpo",
    prompt_lengths: Tensor | None = None,
    num_groups: int | None = None,
    granularity: str = "token",
    delimiter_ids=None,
    rho: float = 0.5,
    lam: float = 0.6,
    threshold: float = 0.5,
    sign_guard: bool = True,
    train_on_repair: bool = True,
    correct_in_loss: bool | None = None,
    max_edit_ratio: float = 0.5,
    insert_anchor: str = "prev",
    k=None,
    unmasked_weight: float = 0.0,
    adv_mode: str | None = None,
    eps: float = 1e-6,
) -> CreditAssignment:
    """Per-token advantages, gates and repair rows for a rollout batch (docs/method.md §1, steps 3-6), in one call.

    1. align every attempted repair with its sample (completions only) -> masks, regions, distances;
    2. accept verified repairs within ``max_edit_ratio``; per sample choose the closest accepted one;
    3. edit masks: token regions (``granularity="token"``) or whole steps (``"step"``, needs
       ``delimiter_ids``), truncated to the first ``k`` regions / flagged steps (``k=None``: all);
    4. IBPO shaping R' = R + lam * phi (``algorithm="ibpo"``), then group normalisation over the N samples
       (repairs never enter the statistics);
    5. token advantages (masked, sign-guarded credit on repaired wrong samples; sequence credit elsewhere;
       correct samples dropped when ``correct_in_loss`` is off) and repair rows (+|A_i| on their edits).

    ``algorithm``: grpo / dapo / dr_grpo (sequence credit only, repairs ignored), ibpo (shaping + masks),
    diff_feedback (masks, no shaping), iop (masks, correct samples out of the loss; use ``k`` for IOP's
    first-K truncation and the gates with ``gated_gspo``). ``correct_in_loss=None`` takes the algorithm's
    default (off for iop only); ``adv_mode`` overrides the group normalisation (grpo, dr_grpo, rloo, batch).
    ``num_groups`` defaults to N (group ids must then lie in [0, N)). See the module docstring for the
    input contract and credit_ops.credit_assign.CreditAssignment for the outputs.

    Shapes:
        tokens: (N, T) int32 / int64;  lengths: (N,) int in [0, T];  prompt_lengths: (N,) int, optional
        group_ids: (N,) int in [0, num_groups);  rewards: (N,) float, finite
        repair_tokens: (M, Tr) int;  repair_lengths: (M,) int;  repair_of: (M,) int in [-1, N);
        repair_correct: (M,) bool  (all four or none)
        k: None (all), an int, or an int tensor () / (N,) (one per sample)
        returns: CreditAssignment
    """
    _checks.check(algorithm in ALGORITHMS, lambda: f"algorithm must be one of {tuple(ALGORITHMS)}, got {algorithm!r}")
    cfg = ALGORITHMS[algorithm]
    mode = cfg["mode"] if adv_mode is None else adv_mode
    _checks.check(mode in ADVANTAGE_MODES, lambda: f"adv_mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    _checks.check(
        granularity in ("token", "step"), lambda: f"granularity must be 'token' or 'step', got {granularity!r}"
    )
    _checks.check(
        granularity == "token" or delimiter_ids is not None, "granularity='step' needs delimiter_ids (step ends)"
    )
    _checks.check(0.0 <= unmasked_weight <= 1.0, lambda: f"unmasked_weight must lie in [0, 1], got {unmasked_weight}")
    _checks.check(max_edit_ratio >= 0, lambda: f"max_edit_ratio must be >= 0, got {max_edit_ratio}")
    _checks.check(eps >= 0, lambda: f"eps must be >= 0, got {eps}")
    correct_in_loss = cfg["correct_in_loss"] if correct_in_loss is None else bool(correct_in_loss)

    _checks.tensor("tokens", tokens, dtypes=_checks.INDEX_DTYPES, dim=2)
    N, T = tokens.shape
    if isinstance(k, Tensor):
        _checks.tensor("k", k, dtypes=_checks.INDEX_DTYPES)
        _checks.check(
            k.dim() == 0 or tuple(k.shape) == (N,),
            lambda: f"k must be a 0-d tensor or (N,) per sample, got {tuple(k.shape)}",
        )
        _checks.same_device(tokens=tokens, k=k)
        _checks.within_range(k, 0, None, "k must be >= 0")
    else:
        ok = k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 0)
        _checks.check(ok, lambda: f"k must be None (all regions) or an int >= 0, got {k!r}")
    _checks.same_device(
        tokens=tokens,
        lengths=lengths,
        group_ids=group_ids,
        rewards=rewards,
        prompt_lengths=prompt_lengths,
        repair_tokens=repair_tokens,
        repair_lengths=repair_lengths,
        repair_of=repair_of,
        repair_correct=repair_correct,
    )
    _checks.tensor("rewards", rewards, dtypes=_checks.FLOAT_DTYPES, dim=1)
    _checks.shape("rewards", rewards, (N,), "(one reward per row of tokens)")
    check_rewards("rewards", rewards)
    _checks.tensor("lengths", lengths, dtypes=_checks.INDEX_DTYPES, dim=1)
    _checks.shape("lengths", lengths, (N,), "(one length per row of tokens)")
    G = check_group_ids(group_ids, N, num_groups)
    ends = lengths.long()
    _checks.within_range(ends, 0, T, f"lengths must lie in [0, {T}] (the width of tokens)")
    if prompt_lengths is not None:
        _checks.tensor("prompt_lengths", prompt_lengths, dtypes=_checks.INDEX_DTYPES, dim=1)
        _checks.shape("prompt_lengths", prompt_lengths, (N,), "(one per row of tokens)")
        starts = prompt_lengths.long()
        _checks.values((starts < 0) | (starts > ends), "prompt_lengths must lie in [0, lengths]")
    else:
        starts = None
    repairs = (repair_tokens, repair_lengths, repair_of, repair_correct)
    given = [x is not None for x in repairs]
    _checks.check(
        all(given) or not any(given),
        "repair_tokens, repair_lengths, repair_of and repair_correct must be given together",
    )
    if all(given):
        _checks.tensor("repair_tokens", repair_tokens, dtypes=_checks.INDEX_DTYPES, dim=2)
        M, Tr = repair_tokens.shape
        _checks.tensor("repair_lengths", repair_lengths, dtypes=_checks.INDEX_DTYPES, dim=1)
        _checks.shape("repair_lengths", repair_lengths, (M,), "(one per row of repair_tokens)")
        _checks.tensor("repair_of", repair_of, dtypes=_checks.INDEX_DTYPES, dim=1)
        _checks.shape("repair_of", repair_of, (M,), "(one sample index per row of repair_tokens)")
        _checks.tensor("repair_correct", repair_correct, dtypes=(torch.bool,), dim=1)
        _checks.shape("repair_correct", repair_correct, (M,), "(one verification result per repair)")
        _checks.within_range(
            repair_of, -1, N - 1, f"repair_of must name an existing sample in [0, {N}) (or be -1 for an unused slot)"
        )
        r_ends = repair_lengths.long()
        _checks.within_range(r_ends, 0, Tr, f"repair_lengths must lie in [0, {Tr}] (the width of repair_tokens)")
    else:
        M, Tr = 0, 0

    dev = tokens.device
    r = rewards.float() if rewards.dtype != torch.float64 else rewards
    wrong = rewards.double() < threshold  # in float64, as the shaping kernel and the loop reference compare
    use_masks = cfg["masks"] and M > 0
    has_repair = torch.zeros(N, dtype=torch.bool, device=dev)
    repair_index = torch.full((N,), -1, dtype=torch.int64, device=dev)
    masks = torch.zeros(N, T, dtype=torch.bool, device=dev)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    n_attempted = n_verified = n_accepted_samples = n_attempted_samples = n_rejected = zero
    mean_distance = zero
    if use_masks:
        src = repair_of.long()
        pad = src < 0
        safe = src.clamp(min=0)
        a_full = tokens[safe]  # (M, T): each repair's sample
        a_end = ends[safe]
        if starts is not None:
            r_start = starts[safe]
            _checks.values(~pad & (r_ends < r_start), "repair_lengths must cover the prompt of the repaired sample")
            a = _shift_left(a_full, r_start, 0)
            b = _shift_left(repair_tokens, r_start, 0)
            a_len = a_end - r_start
            b_len = (r_ends - r_start).clamp(min=0)
        else:
            r_start = None
            a, b, a_len, b_len = a_full, repair_tokens, a_end, r_ends
        attempted = ~pad & wrong[safe]
        verified = attempted & repair_correct
        # Only verified repairs of wrong samples can be accepted: the others are aligned as empty pairs.
        a_len = a_len.masked_fill(~verified, 0)
        b_len = b_len.masked_fill(~verified, 0)
        al = align_edits(a, a_len, b, b_len, insert_anchor=insert_anchor)
        distance = al.distance
        edit_ratio = distance.double() / torch.maximum(a_len, b_len).clamp(min=1).double()
        accepted = verified & (edit_ratio <= max_edit_ratio)

        # Closest accepted repair per sample: one scatter-min over (distance, row) packed into an int64.
        none = torch.iinfo(torch.int64).max
        key = torch.where(accepted, distance.long() * max(M, 1) + torch.arange(M, device=dev), none)
        best = torch.full((N,), none, dtype=torch.int64, device=dev).scatter_reduce(0, safe, key, "amin")
        has_repair = best != none
        repair_index = torch.where(has_repair, best % max(M, 1), -1)
        chosen = accepted & (best[safe] == key)

        k_pairs = k[safe] if isinstance(k, Tensor) and k.dim() == 1 else k  # per-sample k -> per pair
        mask_a = _edit_masks(al.mask_a, al.region_a, a, a_len, granularity, delimiter_ids, k_pairs)
        mask_b = _edit_masks(al.mask_b, al.region_b, b, b_len, granularity, delimiter_ids, k_pairs)
        if r_start is not None:
            mask_a = _shift_right(mask_a, r_start, False)
            mask_b = _shift_right(mask_b, r_start, False)
        masks = mask_a[repair_index.clamp(min=0)] & has_repair.unsqueeze(1)

        n_attempted = attempted.sum().float()
        n_verified = verified.sum().float()
        n_rejected = (verified & ~accepted).sum().float()
        n_valid = torch.zeros(N, dtype=torch.int64, device=dev).index_add(0, safe, attempted.long())
        n_attempted_samples = (n_valid > 0).sum().float()
        n_accepted_samples = has_repair.sum().float()
        mean_distance = _ratio((distance * chosen).sum(), chosen.sum())

    if cfg["shaping"] and use_masks:
        n_correct = torch.zeros(N, dtype=torch.int64, device=dev).index_add(0, safe, accepted.long())
        shaped, phi = ibpo_shaping_op(rewards, n_correct, n_valid, rho, lam, threshold)
    else:
        shaped, phi = r, torch.zeros_like(r)
    seq_adv = group_advantages_op(shaped, group_ids, G, mode, eps)
    adv, gates = token_advantages_op(
        seq_adv, masks, wrong, has_repair, ends, starts, sign_guard, unmasked_weight, correct_in_loss
    )

    if use_masks:
        selected = chosen & train_on_repair
        r_adv, r_gates = repair_advantages_op(seq_adv, mask_b, src, selected, r_ends, r_start)
        out_repairs = (repair_tokens, src, r_adv, r_gates, selected, distance, accepted)
    elif all(given):
        z = torch.zeros(M, Tr, dtype=seq_adv.dtype, device=dev)
        no = torch.zeros(M, dtype=torch.bool, device=dev)
        out_repairs = (
            repair_tokens,
            repair_of.long(),
            z,
            z.clone(),
            no,
            torch.zeros(M, dtype=torch.int32, device=dev),
            no.clone(),
        )
    else:
        out_repairs = (None,) * 7

    scored = (ends - (starts if starts is not None else 0)).clamp(min=0)
    metrics = {
        "reward_mean": r.float().mean() if N else zero,
        "accuracy": (~wrong).float().mean() if N else zero,
        "repair_success_rate": _ratio(n_accepted_samples, n_attempted_samples),
        "repair_verified_rate": _ratio(n_verified, n_attempted),
        "rejected_repairs": n_rejected,
        "mean_edit_distance": mean_distance,
        "active_token_ratio": _ratio(gates.float().sum(), scored.sum()),
        "phi_mean": _ratio((phi.float() * wrong).sum(), wrong.sum()),
    }
    return CreditAssignment(
        adv, gates, seq_adv, shaped, phi, wrong, has_repair, repair_index, masks, *out_repairs, metrics
    )
