"""Fake (meta) kernels for every credit:: op, so torch.compile(fullgraph=True) can trace them."""

import torch

from credit_ops import _triton_ops


def _register(names, fn):
    for name in names:
        torch.library.register_fake(name)(fn)


def _stats_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ---- token_logprobs
def _token_logprobs_fwd_fake(logits, labels, temperature, ignore_index, return_entropy):
    bt = logits.shape[:2]
    new = lambda size: logits.new_empty(size, dtype=_stats_dtype(logits))  # noqa: E731
    return new(bt), new(bt if return_entropy else (0,)), new(bt)


def _token_logprobs_bwd_fake(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return logits.new_empty(logits.shape)


_TRITON = _triton_ops.AVAILABLE
_register(
    ["credit::token_logprobs_fwd"] + ["credit::token_logprobs_fwd_triton"] * _TRITON, _token_logprobs_fwd_fake
)
_register(
    ["credit::token_logprobs_bwd"] + ["credit::token_logprobs_bwd_triton"] * _TRITON, _token_logprobs_bwd_fake
)
