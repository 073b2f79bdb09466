"""align_edits and the step ops: the token-level diff of a failed trajectory against its repair, as masks and
numbered edit regions, and the masks lifted to reasoning steps (docs/method.md §2)."""

from typing import NamedTuple

import torch
from torch import Tensor

from credit_ops import _checks, reference
from credit_ops._backend import resolve


class AlignEdits(NamedTuple):
    """Result of credit_ops.align_edits (see its docstring)."""

    mask_a: Tensor
    mask_b: Tensor
    region_a: Tensor
    region_b: Tensor
    distance: Tensor


INSERT_ANCHORS = {"prev": 0, "next": 1, "none": 2}


def pair_lengths(name: str, lengths: Tensor | None, ids_name: str, ids: Tensor) -> Tensor:
    P, L = ids.shape
    if lengths is None:
        return torch.full((P,), L, dtype=torch.int64, device=ids.device)
    _checks.tensor(name, lengths, dtypes=_checks.INDEX_DTYPES)
    _checks.shape(name, lengths, (P,), "(one length per pair)")
    _checks.same_device(**{name: lengths, ids_name: ids})
    _checks.within_range(lengths, 0, L, f"{name} must lie in [0, {L}] (the padded width)")
    return lengths.to(torch.int64)


def align_edits(
    a: Tensor, a_lengths: Tensor | None, b: Tensor, b_lengths: Tensor | None, *, insert_anchor: str = "prev"
) -> AlignEdits:
    """Token-level diff of each failed trajectory a[p] against its repair b[p]: the canonical Levenshtein edit
    script turned into masks and numbered edit regions (docs/method.md §2).

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
        a.shape[0] == b.shape[0],
        lambda: f"a and b must hold the same number of pairs P, got {a.shape[0]} and {b.shape[0]}",
    )
    _checks.check(
        insert_anchor in INSERT_ANCHORS,
        lambda: f"insert_anchor must be one of {tuple(INSERT_ANCHORS)}, got {insert_anchor!r}",
    )
    a_lengths = pair_lengths("a_lengths", a_lengths, "a", a)
    b_lengths = pair_lengths("b_lengths", b_lengths, "b", b)
    if a.dtype != b.dtype:
        a, b = a.long(), b.long()
    if resolve(a.device, triton=False) == "reference":
        out = reference.align_edits(a, a_lengths, b, b_lengths, insert_anchor=insert_anchor)
    else:
        out = torch.ops.credit.align_edits(a, a_lengths, b, b_lengths, INSERT_ANCHORS[insert_anchor])
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
    lengths = pair_lengths("lengths", lengths, "tokens", tokens)
    if resolve(tokens.device, triton=False) == "reference":
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
    _checks.within_range(step_ids, -1, max(L, 1) - 1, f"step_ids must lie in [-1, {L})")
    if resolve(mask.device, triton=False) == "reference":
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
            lambda: f"k must be a scalar or have shape {tuple(mask.shape[:-1])} (one per row), got {tuple(k.shape)}",
        )
        _checks.within_range(k, 0, None, "k must be >= 0")
    else:
        _checks.check(
            isinstance(k, int) and not isinstance(k, bool),
            lambda: f"k must be an int or a tensor, got {type(k).__name__}",
        )
        _checks.check(k >= 0, lambda: f"k must be >= 0, got {k}")
    if resolve(mask.device, triton=False) == "reference":
        return reference.truncate_regions(mask, regions, k)
    if isinstance(k, Tensor) and k.dim() > 0:
        k = k.unsqueeze(-1)
    return (mask != 0) & (regions >= 0) & (regions < k)
