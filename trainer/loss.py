"""The one call site of the policy loss: credit_ops.policy_loss over logits, or
credit_ops.fused_linear_policy_loss over hidden states (logits never materialised), docs/method.md §4.

Gradient accumulation normalises across the whole accumulated batch (all micro-batches, all processes): each
micro-batch's loss, which the op aggregates over its own rows, is re-weighted by its share of the global
normaliser (valid tokens for token_mean, sequences for the seq_mean_* aggregations), times the number of
processes because DDP averages gradients. The sum of the micro-batch gradients is then exactly the gradient
of the loss aggregated over the full batch.

Active-token compaction (loss.compact, on by default): tokens whose loss coefficient is exactly 0 (gate 0 outside
the edits of repaired samples, IOP's dropped correct samples, and with beta = 0 the zero advantages of groups with
equal rewards) are skipped by the loss kernel, or left out of the fused head's matmuls, and the fused head's
old-policy and reference passes compute only the tokens the loss reads. Loss and gradients are the dense ones. The
op's clip fractions, ratio and KL means then cover the active tokens (num_tokens, from the op, counts them); its
entropy_mean stays over every valid token (loss.whole_batch_entropy: the other tokens' logits without gradient, one
more read of their rows over logits, one of the three matmuls on the fused head), or covers the active ones too.
"""

import torch
from torch import Tensor

import credit_ops
from credit_ops.ops.policy_loss import active_tokens
from credit_ops.reference import DEFAULT_AGG, DEFAULT_EPS, SEQUENCE_LOSSES  # noqa: F401  (SEQUENCE_LOSSES re-exported)

from .rollout import Packed, forward_hidden, forward_logits


def loss_settings(cfg) -> dict:
    """Keyword arguments for the op, fixed for the run: the loss type's defaults (docs/method.md §4) for the
    clip range and aggregation unless the config sets them."""
    lt = cfg.loss_type
    eps_low, eps_high = DEFAULT_EPS[lt]
    return dict(
        loss_type=lt,
        eps_low=cfg.loss.eps_low if cfg.loss.eps_low >= 0 else eps_low,
        eps_high=cfg.loss.eps_high if cfg.loss.eps_high >= 0 else eps_high,
        dual_clip=cfg.loss.dual_clip or None,
        beta=cfg.loss.beta,
        kl_type=cfg.loss.kl_type,
        agg=cfg.loss.agg or DEFAULT_AGG[lt],
        max_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        active_only=cfg.loss.compact,
        whole_batch_entropy=cfg.loss.compact and cfg.loss.whole_batch_entropy,
    )


def normaliser(batch: Packed, agg: str) -> Tensor:
    """What the op divides by for this (micro-)batch: valid tokens or sequences. () float."""
    if agg == "token_mean":
        return batch.valid.sum().float()
    return torch.tensor(float(len(batch)), device=batch.labels.device)


def policy_loss(
    model,
    batch: Packed,
    advantages: Tensor,
    gates: Tensor | None,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    settings: dict,
    *,
    fused: bool,
    scale: float | Tensor = 1.0,
):
    """Loss of one micro-batch, scaled by its share of the accumulated batch, and the op's stats.

    Shapes: advantages (n, C) fp32, gates (n, C) or None, old/ref logprobs (n, C) fp32 or None (old None: on-policy,
    ratio 1); batch.labels (n, C).
    """
    kw = dict(settings, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, gates=gates)
    if fused:
        hidden = forward_hidden(model, batch)  # (n, C, H)
        head = _lm_head(model)
        # Under autocast the op itself runs the head in the autocast dtype.
        loss, stats = credit_ops.fused_linear_policy_loss(
            hidden, head.weight, batch.labels, advantages, bias=head.bias, **kw
        )
    else:
        logits = forward_logits(model, batch)  # (n, C, V)
        loss, stats = credit_ops.policy_loss(logits, batch.labels, advantages, **kw)
    return loss * scale, stats


def loss_tokens(batch: Packed, advantages: Tensor, gates: Tensor | None, settings: dict) -> Tensor | None:
    """(n, C) bool: the tokens whose old-policy and reference log-probs the loss reads under compaction (a superset
    of the op's active tokens: policy_loss.active_tokens on valid x gates); None without compaction or for the
    GSPO family (its sequence ratio reads every valid token)."""
    if not settings.get("active_only") or settings["loss_type"] in SEQUENCE_LOSSES:
        return None
    factors = batch.valid.float() if gates is None else batch.valid * gates
    return active_tokens(factors, advantages, settings["beta"])


@torch.no_grad()
def head_logprobs(model, batch: Packed, select: Tensor, *, temperature: float = 1.0, micro_batch: int = 0) -> Tensor:
    """The old-policy or reference pass through the fused head on the selected tokens only (loss_tokens):
    per-token log-probs (n, C) fp32, 0 where not selected (the loss never reads them), no gradient."""
    head, step, out = _lm_head(model), micro_batch or len(batch), []
    for s in range(0, len(batch), step):
        mb = batch.rows(slice(s, s + step))
        hidden = forward_hidden(model, mb)  # (n, C, H)
        lp = credit_ops.fused_linear_logprobs(
            hidden, head.weight, mb.labels, bias=head.bias, temperature=temperature, select=select[s : s + step]
        )
        out.append(lp.float())
    return torch.cat(out)


def _lm_head(model):
    inner = model.module if hasattr(model, "module") else model
    return inner.get_output_embeddings()
