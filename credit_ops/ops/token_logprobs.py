"""token_logprobs: log-probabilities (and entropies) of the labels under softmax(logits / T) (docs/method.md §3)."""

import torch
from torch import Tensor

from credit_ops import _checks, reference
from credit_ops._backend import resolve


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
    _checks.check(temperature > 0, lambda: f"temperature must be > 0, got {temperature}")
    V = logits.shape[-1]
    _checks.check(V > 0, "logits must have a non-empty vocabulary dimension")
    _checks.ids_in_range("labels", labels, V, ignore_index=ignore_index)

    backend = resolve(logits.device, triton=True)
    if backend == "reference":
        return reference.token_logprobs(
            logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
    op = torch.ops.credit.token_logprobs_fwd_triton if backend == "triton" else torch.ops.credit.token_logprobs_fwd
    x = as_btv(logits)
    reshaped = logits.dim() != 3  # (B, T, V) logits need no views of labels and outputs (each costs ~3 us a call)
    y = labels.reshape(x.shape[:2]) if reshaped else labels
    logprobs, entropy, _ = op(x, y, float(temperature), int(ignore_index), bool(return_entropy))
    if reshaped:
        logprobs = logprobs.view(labels.shape)
        entropy = entropy.view(labels.shape) if return_entropy else entropy
    return (logprobs, entropy) if return_entropy else logprobs


def as_btv(logits: Tensor) -> Tensor:
    """(..., V) -> (B, T, V) without a copy where possible: the kernels take strided (B, T) rows, so the usual
    ``logits[:, :-1]`` slice of a (B, T + 1, V) model output is read in place."""
    if logits.dim() == 3:
        return logits
    if logits.dim() < 3:
        return logits.reshape((1,) * (3 - logits.dim()) + tuple(logits.shape))
    return logits.reshape(-1, logits.shape[-2], logits.shape[-1])
