"""Pure-PyTorch references: the specification (docs/method.md) in code, the test oracle and the benchmark
baseline. Slow and memory-hungry on purpose: every intermediate is materialised, nothing is fused.
Selectable as a backend with ``credit_ops.use_backend("reference")``.
"""

import torch
from torch import Tensor


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---- token_logprobs (docs/method.md §3)
def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(logits / T)[label] and the entropy of softmax(logits / T); 0 where label == ignore_index."""
    logp = torch.log_softmax(logits.to(_stats_dtype(logits)) / temperature, dim=-1)  # (..., V)
    ignore = labels == ignore_index
    safe = labels.masked_fill(ignore, 0).long()
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(ignore, 0.0)
    if not return_entropy:
        return out
    p = logp.exp()
    # p log p -> 0 where p == 0 (-inf logits); masking logp (not the product) keeps the gradient finite.
    entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1).masked_fill(ignore, 0.0)
    return out, entropy


# ---- policy_loss (docs/method.md §4)
TOKEN_LOSSES = ("grpo", "dapo", "dr_grpo", "bnpo")
SEQUENCE_LOSSES = ("gspo", "gspo_token", "gated_gspo")
LOSS_TYPES = TOKEN_LOSSES + SEQUENCE_LOSSES
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
KL_TYPES = ("k1", "k2", "k3")
# TRL's aggregation per loss type; the GSPO family averages per-sequence losses.
DEFAULT_AGG = {
    "grpo": "seq_mean_token_mean",
    "dapo": "token_mean",
    "bnpo": "token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
    "gspo": "seq_mean_token_mean",
    "gspo_token": "seq_mean_token_mean",
    "gated_gspo": "seq_mean_token_mean",
}
# (eps_low, eps_high) when not given: DAPO's clip-higher for token ratios, GSPO's for sequence ratios.
DEFAULT_EPS = {**{t: (0.2, 0.28) for t in TOKEN_LOSSES}, **{t: (3e-4, 4e-4) for t in SEQUENCE_LOSSES}}


EMPTY_ROWS = ("count", "skip")  # whether a row without valid tokens counts in the sequence means (TRL: yes; verl: no)


def aggregation_weights(valid: Tensor, agg: str, max_length: int | None = None, empty_rows: str = "count") -> Tensor:
    """(B, T) weights w with loss = sum_bt w_bt * loss_bt: zero on invalid tokens, denominators count valid tokens;
    the sequence means divide by B, or with empty_rows="skip" by the number of rows with a valid token."""
    B = valid.shape[0] if empty_rows == "count" else (valid.sum(-1) > 0).sum().clamp(min=1)
    if agg == "token_mean":
        return valid / valid.sum().clamp(min=1.0)
    if agg == "seq_mean_token_mean":
        return valid / (B * valid.sum(-1, keepdim=True).clamp(min=1.0))
    if agg == "seq_mean_token_sum":
        return valid / B
    if agg == "seq_mean_token_sum_norm":
        return valid / (B * max_length)
    raise ValueError(f"unknown agg {agg!r}")


def kl_estimate(logp: Tensor, ref_logp: Tensor, kl_type: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-ratios (Schulman's k1, k2, k3)."""
    d = ref_logp - logp
    if kl_type == "k1":
        return -d
    if kl_type == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1.0


def clipped_surrogate(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float, dual_clip: float | None) -> Tensor:
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), bounded by -c A where A < 0 with a dual clip c."""
    loss = -torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    return loss


def sequence_log_ratio(log_ratio: Tensor, weight: Tensor) -> Tensor:
    """(B, 1) weighted mean of the token log-ratios of each sequence; 0 for a sequence with no weight."""
    den = weight.sum(-1, keepdim=True)
    num = (weight * log_ratio).sum(-1, keepdim=True)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


def policy_token_ratio(logp, old_logp, valid, gates, loss_type):
    """Per-token importance ratio (B, T) of each loss type, differentiable w.r.t. logp as docs/method.md §4 defines."""
    log_ratio = logp - old_logp
    if loss_type in TOKEN_LOSSES:
        return torch.exp(log_ratio)
    if loss_type == "gated_gspo":
        s = torch.exp(sequence_log_ratio(log_ratio, gates * valid))
    else:
        s = torch.exp(sequence_log_ratio(log_ratio, valid))
    if loss_type == "gspo_token":
        return s.detach() * torch.exp(logp - logp.detach())
    return s.expand_as(logp)


STAT_NAMES = ("clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean", "kl_mean", "entropy_mean", "num_tokens")


def policy_loss_stats(ratio, adv, logp, ref_logp, entropy, valid, *, eps_low, eps_high, kl_type) -> dict:
    """Detached masked means over valid tokens: clip fractions (TRL's definitions), ratio, KL, entropy."""
    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        kl = kl_estimate(logp, ref_logp, kl_type) if ref_logp is not None else torch.zeros_like(logp)
        # the six masked means in one reduction (one kernel on GPU, not six)
        terms = torch.stack([t.to(valid.dtype) for t in (low, high, low | high, ratio, kl, entropy)])
        n = valid.sum()
        means = (terms * valid).flatten(1).sum(1) / n.clamp(min=1.0)
        return dict(zip(STAT_NAMES, (*means.unbind(), n), strict=True))


def loss_from_logprobs(
    logp,
    entropy,
    valid,
    advantages,
    *,
    old_logprobs,
    ref_logprobs,
    gates,
    loss_type,
    eps_low,
    eps_high,
    dual_clip,
    beta,
    kl_type,
    agg,
    max_length,
    weights=None,
    empty_rows="count",
    reduction="mean",
):
    """The loss of docs/method.md §4 from per-token log-probs (B, T) (differentiable), with every argument resolved:
    valid (B, T) float, advantages (B, T), gates / weights (B, T) float or None, agg a name. Returns (loss, stats),
    the loss per token (B, T), before aggregation, with reduction="none"."""
    # Padding may hold anything (-inf old log-probs, NaN advantages): invalid tokens get log-ratio 0, KL 0, A 0.
    vb = valid > 0
    pad = lambda t, fill: torch.where(vb, t.to(logp.dtype), fill)
    old = logp.detach() if old_logprobs is None else pad(old_logprobs, logp.detach())
    g = torch.ones_like(logp) if gates is None else pad(gates, torch.zeros_like(logp))
    w = torch.ones_like(logp) if weights is None else pad(weights, torch.zeros_like(logp))
    advantages = pad(advantages, torch.zeros_like(logp))
    ratio = policy_token_ratio(logp, old, valid, g, loss_type)
    per_token = clipped_surrogate(ratio, advantages, eps_low, eps_high, dual_clip)
    ref = None if ref_logprobs is None else pad(ref_logprobs, logp.detach())
    if beta != 0.0:
        per_token = per_token + beta * kl_estimate(logp, ref, kl_type)
    per_token = valid * g * w * per_token
    stats = policy_loss_stats(
        ratio, advantages, logp, ref, entropy, valid, eps_low=eps_low, eps_high=eps_high, kl_type=kl_type
    )
    if reduction == "none":
        return per_token, stats
    return (aggregation_weights(valid, agg, max_length, empty_rows) * per_token).sum(), stats


def policy_loss_from_logprobs(
    logprobs: Tensor,
    advantages: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    mask: Tensor | None = None,
    gates: Tensor | None = None,
    weights: Tensor | None = None,
    entropy: Tensor | None = None,
    loss_type: str = "dapo",
    eps_low: float | None = None,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    beta: float = 0.0,
    kl_type: str = "k3",
    agg: str | None = None,
    max_length: int | None = None,
    empty_rows: str = "count",
    reduction: str = "mean",
) -> tuple[Tensor, dict]:
    """Reference for credit_ops.policy_loss_from_logprobs: the loss from per-token log-probs (B, T)."""
    logp = logprobs.to(_stats_dtype(logprobs))
    valid = torch.ones_like(logp) if mask is None else (mask != 0).to(logp.dtype)
    adv = advantages.to(logp.dtype)
    adv = adv.unsqueeze(-1).expand_as(logp) if adv.dim() == 1 else adv
    default_low, default_high = DEFAULT_EPS[loss_type]
    return loss_from_logprobs(
        logp,
        torch.zeros_like(logp) if entropy is None else entropy.detach().to(logp.dtype),
        valid,
        adv,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        gates=gates,
        weights=weights,
        loss_type=loss_type,
        eps_low=default_low if eps_low is None else eps_low,
        eps_high=default_high if eps_high is None else eps_high,
        dual_clip=dual_clip,
        beta=beta,
        kl_type=kl_type,
        agg=agg or DEFAULT_AGG[loss_type],
        max_length=max_length,
        empty_rows=empty_rows,
        reduction=reduction,
    )


def policy_loss(
    logits: Tensor,
    labels: Tensor,
    advantages: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, dict]:
    """GRPO-family policy loss over logits (B, T, V) aligned with labels (B, T): see credit_ops.policy_loss. The
    other keyword arguments are policy_loss_from_logprobs'."""
    logp, entropy = token_logprobs(
        logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & (mask != 0)
    return policy_loss_from_logprobs(logp, advantages, mask=valid, entropy=entropy, **kwargs)


def fused_linear_policy_loss(hidden, weight, labels, advantages, *, bias=None, **kwargs):
    """Reference for credit_ops.fused_linear_policy_loss with labels (B, T): materialises hidden @ weight.T + bias."""
    logits = torch.nn.functional.linear(hidden, weight, bias).reshape(*labels.shape, weight.shape[0])
    return policy_loss(logits, labels, advantages, **kwargs)


def fused_linear_logprobs(
    hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100, return_entropy=False
):
    """Reference for credit_ops.fused_linear_logprobs: token_logprobs of hidden @ weight.T + bias."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return token_logprobs(
        logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )


# ---- align_edits (docs/method.md §2)
def _levenshtein_matrix(A: list, B: list) -> list:
    """D[i][j] = unit-cost edit distance of A[:i] and B[:j], one vectorised row at a time."""
    ar = torch.arange(len(B) + 1)
    bt = torch.tensor(B, dtype=torch.int64)
    row = ar.clone()
    rows = [row]
    for i, x in enumerate(A, 1):
        diag_up = torch.minimum(row[:-1] + (bt != x).long(), row[1:] + 1)  # (m,)
        up = torch.cat([torch.tensor([i]), diag_up])
        row = torch.cummin(up - ar, 0).values + ar  # D[i][j] = min_{k<=j} up[k] + (j - k): the insertions
        rows.append(row)
    return torch.stack(rows).tolist()


def _align_pair(a: list, b: list, insert_anchor: str):
    n, m = len(a), len(b)
    mask_a, mask_b, region_a, region_b = [False] * n, [False] * m, [-1] * n, [-1] * m
    p = 0
    while p < min(n, m) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(n, m) - p and a[n - 1 - s] == b[m - 1 - s]:
        s += 1
    A, B = a[p : n - s], b[p : m - s]
    D = _levenshtein_matrix(A, B)
    ops = []  # walked back from (len(A), len(B)): diagonal, then deletion from a, then insertion from b
    i, j = len(A), len(B)
    while i > 0 or j > 0:
        if i > 0 and j > 0 and D[i][j] == D[i - 1][j - 1] + (A[i - 1] != B[j - 1]):
            ops.append(("match" if A[i - 1] == B[j - 1] else "sub", p + i - 1, p + j - 1))
            i, j = i - 1, j - 1
        elif i > 0 and D[i][j] == D[i - 1][j] + 1:
            ops.append(("del", p + i - 1, None))
            i -= 1
        else:
            ops.append(("ins", p + i, p + j - 1))  # b[j - 1] goes into the gap before a[p + i]
            j -= 1
    region, in_run = -1, False
    for kind, x, y in reversed(ops):
        if kind == "match":
            in_run = False
            continue
        if not in_run:
            region, in_run = region + 1, True
        if kind in ("sub", "del"):
            mask_a[x], region_a[x] = True, region
        if kind in ("sub", "ins"):
            mask_b[y], region_b[y] = True, region
        if kind == "ins" and insert_anchor != "none" and n > 0:
            t = (x - 1 if x > 0 else 0) if insert_anchor == "prev" else (x if x < n else n - 1)
            if not mask_a[t]:  # a match token anchored by two runs keeps the first
                mask_a[t], region_a[t] = True, region
    return mask_a, mask_b, region_a, region_b, D[-1][-1]


def align_edits(a: Tensor, a_lengths: Tensor, b: Tensor, b_lengths: Tensor, *, insert_anchor: str = "prev"):
    """Canonical Levenshtein edit masks of each pair (a[p, :a_lengths[p]], b[p, :b_lengths[p]]): full DP
    matrix and traceback in Python. Returns (mask_a, mask_b, region_a, region_b, distance)."""
    P, La, Lb = a.shape[0], a.shape[1], b.shape[1]
    mask_a = torch.zeros(P, La, dtype=torch.bool)
    mask_b = torch.zeros(P, Lb, dtype=torch.bool)
    region_a = torch.full((P, La), -1, dtype=torch.int32)
    region_b = torch.full((P, Lb), -1, dtype=torch.int32)
    distance = torch.zeros(P, dtype=torch.int32)
    la, lb = a_lengths.tolist(), b_lengths.tolist()
    for r, (x, y) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
        ma, mb, ra, rb, d = _align_pair(x[: la[r]], y[: lb[r]], insert_anchor)
        mask_a[r, : la[r]] = torch.tensor(ma, dtype=torch.bool)
        mask_b[r, : lb[r]] = torch.tensor(mb, dtype=torch.bool)
        region_a[r, : la[r]] = torch.tensor(ra, dtype=torch.int32)
        region_b[r, : lb[r]] = torch.tensor(rb, dtype=torch.int32)
        distance[r] = d
    dev = a.device
    return mask_a.to(dev), mask_b.to(dev), region_a.to(dev), region_b.to(dev), distance.to(dev)


def segment_steps(tokens: Tensor, lengths: Tensor | None, delimiter_ids: Tensor) -> Tensor:
    """Step index of each token: a step ends at (and includes) a delimiter token; -1 beyond the length."""
    P, L = tokens.shape
    lens = [L] * P if lengths is None else lengths.tolist()
    delims = set(delimiter_ids.tolist())
    out = torch.full((P, L), -1, dtype=torch.int32)
    for r, row in enumerate(tokens.tolist()):
        step = 0
        for t in range(lens[r]):
            out[r, t] = step
            step += row[t] in delims
    return out.to(tokens.device)


def step_masks(mask: Tensor, step_ids: Tensor) -> Tensor:
    """Flag every token (step_ids >= 0) of a step that holds a flagged token."""
    flat_m, flat_s = mask.reshape(-1, mask.shape[-1]).tolist(), step_ids.reshape(-1, mask.shape[-1]).tolist()
    out = []
    for ms, ss in zip(flat_m, flat_s, strict=True):
        hit = {s for f, s in zip(ms, ss, strict=True) if f and s >= 0}
        out.append([s >= 0 and s in hit for s in ss])
    return torch.tensor(out, dtype=torch.bool, device=mask.device).reshape(mask.shape)


def truncate_regions(mask: Tensor, regions: Tensor, k) -> Tensor:
    """Keep the flags whose region index is in [0, k); k a scalar or one per row (mask.shape[:-1])."""
    k = torch.as_tensor(k, device=mask.device)
    k = k.unsqueeze(-1) if k.dim() > 0 else k
    return mask.bool() & (regions >= 0) & (regions < k)


# ---- advantages (docs/method.md §1, steps 5-6)
ADVANTAGE_MODES = ("grpo", "dr_grpo", "rloo", "batch", "grpo_batch_std")
# The algorithm table (docs/method.md §1). masks: token credit from edit masks and repair rows; shaping: IBPO's
# R' = R + lam * phi; mode: the group normalisation; correct_in_loss: False drops correct samples (IOP).
ALGORITHMS = {
    "grpo": dict(masks=False, shaping=False, mode="grpo", correct_in_loss=True),
    "dapo": dict(masks=False, shaping=False, mode="grpo", correct_in_loss=True),
    "dr_grpo": dict(masks=False, shaping=False, mode="dr_grpo", correct_in_loss=True),
    "ibpo": dict(masks=True, shaping=True, mode="grpo", correct_in_loss=True),
    "diff_feedback": dict(masks=True, shaping=False, mode="grpo", correct_in_loss=True),
    "iop": dict(masks=True, shaping=False, mode="grpo", correct_in_loss=False),
}


def group_advantages(
    rewards: Tensor, group_ids: Tensor, *, mode: str = "grpo", eps: float = 1e-6, num_groups: int | None = None
) -> Tensor:
    """Per-sample advantage against its group (or, for mode="batch", the whole batch); 0 in a group of one."""
    r = rewards.double()
    n_rows = r.shape[0]
    ids = torch.zeros_like(group_ids, dtype=torch.long) if mode == "batch" else group_ids.long()
    G = 1 if mode == "batch" else (n_rows if num_groups is None else num_groups)
    cnt = r.new_zeros(G).index_add_(0, ids, torch.ones_like(r))
    mean = r.new_zeros(G).index_add_(0, ids, r) / cnt.clamp(min=1)
    d = r - mean[ids]
    m2 = r.new_zeros(G).index_add_(0, ids, d * d)
    n = cnt[ids]
    if mode == "dr_grpo":
        adv = d
    elif mode == "rloo":
        adv = d * n / (n - 1)
    elif mode == "grpo_batch_std":
        adv = d / (r.std() + eps)
    else:
        adv = d / (torch.sqrt(m2[ids] / (n - 1)) + eps)
    return torch.where(n >= 2, adv, 0.0).to(_stats_dtype(rewards))


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
    """phi_i = mean over valid revisions k of rho * 1[i wrong and revision k correct]; R' = R + lam * phi."""
    valid = revision_valid.bool()
    n_correct = (revision_correct.bool() & valid).sum(1)
    return ibpo_shaping_counts(rewards, n_correct, valid.sum(1), rho=rho, lam=lam, threshold=threshold)


def ibpo_shaping_counts(rewards, n_correct, n_valid, *, rho, lam, threshold) -> tuple[Tensor, Tensor]:
    """IBPO's shaping from per-sample counts: n_correct of the n_valid revisions of sample i are correct."""
    r = rewards.double()
    phi = torch.where((r < threshold) & (n_valid > 0), rho * n_correct.double() / n_valid.clamp(min=1).double(), 0.0)
    dtype = _stats_dtype(rewards)
    return (r + lam * phi).to(dtype), phi.to(dtype)


def _scored_range(shape, lengths, starts, device) -> Tensor:
    t = torch.arange(shape[1], device=device)
    ok = torch.ones(shape, dtype=torch.bool, device=device)
    if lengths is not None:
        ok &= t < lengths.unsqueeze(1)
    if starts is not None:
        ok &= t >= starts.unsqueeze(1)
    return ok


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
) -> tuple[Tensor, Tensor]:
    """A[i, t] = gate[i, t] * A_i' with gate = mask (unmasked_weight elsewhere) and A_i' = min(A_i, 0) under
    the sign guard on wrong samples with a repair; gate = 1 and A_i' = A_i on every other scored token."""
    a = seq_adv.to(_stats_dtype(seq_adv))
    masked = (wrong & has_repair).unsqueeze(1)
    value = torch.where(masked.squeeze(1) & sign_guard, a.clamp(max=0), a).unsqueeze(1)
    gate = torch.where(masked, torch.where(mask, 1.0, unmasked_weight), 1.0).to(a.dtype)
    keep = _scored_range(mask.shape, lengths, prompt_lengths, mask.device)
    if not correct_in_loss:
        keep = keep & wrong.unsqueeze(1)
    gate = gate * keep
    return gate * value, gate


def repair_advantages(
    seq_adv: Tensor,
    mask: Tensor,
    repair_of: Tensor,
    selected: Tensor,
    *,
    lengths: Tensor | None = None,
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Repair rows: advantage +|A| of the repaired sample on the repair's flagged tokens, gate = those flags."""
    a = seq_adv.to(_stats_dtype(seq_adv))
    ok = selected & (repair_of >= 0) & (repair_of < a.shape[0])
    value = a[repair_of.clamp(0, max(a.shape[0] - 1, 0))].abs() if a.shape[0] else a.new_zeros(repair_of.shape)
    gate = (mask & ok.unsqueeze(1) & _scored_range(mask.shape, lengths, starts, mask.device)).to(a.dtype)
    return gate * value.unsqueeze(1), gate


def _completion_steps(tokens: list, delimiters: set) -> list:
    steps, s = [], 0
    for x in tokens:
        steps.append(s)
        s += x in delimiters
    return steps


def _widen_truncate(mask: list, region: list, tokens: list, granularity: str, delimiters: set, k) -> list:
    if granularity == "step":
        steps = _completion_steps(tokens, delimiters)
        flagged = sorted({s for s, m in zip(steps, mask, strict=True) if m})
        keep = set(flagged if k is None else flagged[:k])
        return [s in keep for s in steps]
    return [bool(m) and (k is None or 0 <= g < k) for m, g in zip(mask, region, strict=True)]


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
    align=None,
) -> dict:
    """credit_ops.credit_assign written the way RL frameworks write it: per-sample Python loops, group
    statistics from a dict of score lists (verl's compute_grpo_outcome_advantage), one row op per sample.
    ``align`` computes the diffs (default: this module's align_edits); everything after it is independent of
    the fused pipeline. Returns a dict with the CreditAssignment field names (metrics as Python floats)."""
    from collections import defaultdict

    cfg = ALGORITHMS[algorithm]
    mode = adv_mode or cfg["mode"]
    correct_in_loss = cfg["correct_in_loss"] if correct_in_loss is None else correct_in_loss
    align = align or align_edits
    dev = tokens.device
    N, T = tokens.shape
    lens, gid, R = lengths.tolist(), group_ids.tolist(), rewards.double().tolist()
    pl = prompt_lengths.tolist() if prompt_lengths is not None else [0] * N
    wrong = [r < threshold for r in R]
    delims = set(torch.as_tensor(delimiter_ids).reshape(-1).tolist()) if delimiter_ids is not None else set()

    M = 0 if repair_tokens is None else repair_tokens.shape[0]
    Tr = 0 if repair_tokens is None else repair_tokens.shape[1]
    use_masks = cfg["masks"] and M > 0
    chosen, attempts, accepts = {}, defaultdict(int), defaultdict(int)
    mask_rows, rmask_rows, dist, acc = {}, {}, [0] * M, [False] * M
    n_att = n_ver = n_rej = 0
    if use_masks:
        rof, rlen, rok = repair_of.tolist(), repair_lengths.tolist(), repair_correct.tolist()
        tok, rtok = tokens.tolist(), repair_tokens.tolist()
        for j in range(M):
            if rof[j] >= 0 and wrong[rof[j]]:
                attempts[rof[j]] += 1
                n_att += 1
                n_ver += bool(rok[j])
        live = [j for j in range(M) if rof[j] >= 0 and wrong[rof[j]] and rok[j]]  # only these can be accepted
        A = [tok[rof[j]][pl[rof[j]] : lens[rof[j]]] for j in live]
        B = [rtok[j][pl[rof[j]] : rlen[j]] for j in live]
        pad = lambda rows: torch.tensor([x + [0] * (max(T, Tr, 1) - len(x)) for x in rows] or [[0]], device=dev)
        length = lambda rows: torch.tensor([len(x) for x in rows] or [0], device=dev)
        out = align(pad(A), length(A), pad(B), length(B), insert_anchor=insert_anchor)
        ma, mb, ra, rb, d = (x.tolist() for x in out)
        for p, j in enumerate(live):
            i, a, b = rof[j], A[p], B[p]
            dist[j] = d[p]
            if d[p] / max(len(a), len(b), 1) > max_edit_ratio:
                n_rej += 1
                continue
            acc[j] = True
            accepts[i] += 1
            if i not in chosen or d[p] < dist[chosen[i]]:
                chosen[i] = j
            mask_rows[j] = _widen_truncate(ma[p][: len(a)], ra[p][: len(a)], a, granularity, delims, k)
            rmask_rows[j] = _widen_truncate(mb[p][: len(b)], rb[p][: len(b)], b, granularity, delims, k)

    shaped, phi = list(R), [0.0] * N
    if cfg["shaping"] and use_masks:
        for i in range(N):
            if wrong[i] and attempts.get(i, 0):
                phi[i] = rho * accepts.get(i, 0) / attempts[i]
                shaped[i] = R[i] + lam * phi[i]

    id2score = defaultdict(list)
    for i in range(N):
        id2score[0 if mode == "batch" else gid[i]].append(shaped[i])
    id2mean, id2std = {}, {}
    for g, scores in id2score.items():
        s = torch.tensor(scores, dtype=torch.float64)
        id2mean[g] = s.mean().item()
        id2std[g] = s.std().item() if len(scores) > 1 else 0.0
    seq_adv = []
    for i in range(N):
        g = 0 if mode == "batch" else gid[i]
        n = len(id2score[g])
        if n < 2:
            seq_adv.append(0.0)
        elif mode == "dr_grpo":
            seq_adv.append(shaped[i] - id2mean[g])
        elif mode == "rloo":
            seq_adv.append(shaped[i] - (id2mean[g] * n - shaped[i]) / (n - 1))
        else:
            seq_adv.append((shaped[i] - id2mean[g]) / (id2std[g] + eps))

    adv = torch.zeros(N, T, dtype=torch.float32, device=dev)
    gates = torch.zeros(N, T, dtype=torch.float32, device=dev)
    masks = torch.zeros(N, T, dtype=torch.bool, device=dev)
    for i in range(N):
        lo, hi = pl[i], lens[i]
        if not wrong[i] and not correct_in_loss:
            continue
        if wrong[i] and i in chosen:
            row = torch.tensor(mask_rows[chosen[i]], dtype=torch.bool, device=dev)
            masks[i, lo:hi] = row
            gates[i, lo:hi] = torch.where(row, 1.0, unmasked_weight)
            value = min(seq_adv[i], 0.0) if sign_guard else seq_adv[i]
        else:
            gates[i, lo:hi] = 1.0
            value = seq_adv[i]
        adv[i] = gates[i] * value

    r_adv = torch.zeros(M, Tr, dtype=torch.float32, device=dev)
    r_gates = torch.zeros(M, Tr, dtype=torch.float32, device=dev)
    selected = torch.zeros(M, dtype=torch.bool, device=dev)
    if use_masks and train_on_repair:
        for i, j in chosen.items():
            lo = pl[i]
            row = torch.tensor(rmask_rows[j], dtype=torch.float32, device=dev)
            r_gates[j, lo : lo + row.shape[0]] = row
            r_adv[j] = r_gates[j] * abs(seq_adv[i])
            selected[j] = True

    scored = sum(max(h - p, 0) for h, p in zip(lens, pl, strict=True))
    n_wrong = sum(wrong)
    metrics = {
        "reward_mean": sum(R) / max(N, 1),
        "accuracy": (N - n_wrong) / max(N, 1),
        "repair_success_rate": len(chosen) / max(len(attempts), 1),
        "repair_verified_rate": n_ver / max(n_att, 1),
        "rejected_repairs": float(n_rej),
        "mean_edit_distance": sum(dist[j] for j in chosen.values()) / max(len(chosen), 1),
        "active_token_ratio": gates.sum().item() / max(scored, 1),
        "phi_mean": sum(p for p, w in zip(phi, wrong, strict=True) if w) / max(n_wrong, 1),
    }
    f = lambda x: torch.tensor(x, dtype=torch.float32, device=dev)
    return {
        "advantages": adv,
        "gates": gates,
        "seq_advantages": f(seq_adv),
        "shaped_rewards": f(shaped),
        "phi": f(phi),
        "wrong": torch.tensor(wrong, dtype=torch.bool, device=dev),
        "has_repair": torch.tensor([i in chosen for i in range(N)], dtype=torch.bool, device=dev),
        "repair_index": torch.tensor([chosen.get(i, -1) for i in range(N)], dtype=torch.int64, device=dev),
        "masks": masks,
        "repair_advantages": r_adv,
        "repair_gates": r_gates,
        "repair_selected": selected,
        "repair_distance": torch.tensor(dist, dtype=torch.int32, device=dev),
        "repair_accepted": torch.tensor(acc, dtype=torch.bool, device=dev),
        "metrics": metrics,
    }
