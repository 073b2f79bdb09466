"""Triton-backed ops, registered with torch.library.custom_op (they also run on CPU tensors under
TRITON_INTERPRET=1, which is how CI tests them). Fake kernels live in _meta.py, autograd in _autograd.py.
"""

import torch
from torch import Tensor

from credit_ops._backend import has_triton

AVAILABLE = has_triton()

if AVAILABLE:
    from credit_ops.triton_kernels import token_logprobs as _tlp

    @torch.library.custom_op("credit::token_logprobs_fwd_triton", mutates_args=())
    def token_logprobs_fwd_triton(
        logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, return_entropy: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        return _tlp.token_logprobs_forward(logits, labels.contiguous(), temperature, ignore_index, return_entropy)

    @torch.library.custom_op("credit::token_logprobs_bwd_triton", mutates_args=())
    def token_logprobs_bwd_triton(
        grad_logprobs: Tensor,
        grad_entropy: Tensor | None,
        logits: Tensor,
        labels: Tensor,
        lse: Tensor,
        entropy: Tensor | None,
        temperature: float,
        ignore_index: int,
    ) -> Tensor:
        contiguous = [None if t is None else t.contiguous() for t in (grad_logprobs, grad_entropy, lse, entropy)]
        g, ge, lse, entropy = contiguous
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        return _tlp.token_logprobs_backward(g, ge, logits, labels.contiguous(), lse, entropy, temperature,
                                            ignore_index)  # fmt: skip
