"""Pure-PyTorch references: the spec (../shared/docs/SPEC.md) in code, the test oracle and the benchmark
baseline. Slow and memory-hungry on purpose: every intermediate is materialised, nothing is fused.
Selectable as a backend with ``credit_ops.use_backend("reference")``.
"""

import torch
from torch import Tensor


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---- token_logprobs (SPEC §3)
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
