"""Autograd formulas for every differentiable credit:: op (torch.library.register_autograd)."""

import torch

from credit_ops import _triton_ops


# ---- token_logprobs: d/dz of (g * logp_y + ge * H); the backward op recomputes p from the saved lse.
def _token_logprobs_setup(ctx, inputs, output):
    logits, labels, temperature, ignore_index, return_entropy = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.return_entropy = temperature, ignore_index, return_entropy


def _token_logprobs_backward(bwd_op):
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        logits, labels, lse, entropy = ctx.saved_tensors
        with_entropy = ctx.return_entropy and grad_entropy is not None
        grad = bwd_op(
            grad_logprobs,
            grad_entropy if with_entropy else None,
            logits,
            labels,
            lse,
            entropy if with_entropy else None,
            ctx.temperature,
            ctx.ignore_index,
        )
        return grad, None, None, None, None

    return backward


torch.library.register_autograd(
    "credit::token_logprobs_fwd",
    _token_logprobs_backward(torch.ops.credit.token_logprobs_bwd),
    setup_context=_token_logprobs_setup,
)
if _triton_ops.AVAILABLE:
    torch.library.register_autograd(
        "credit::token_logprobs_fwd_triton",
        _token_logprobs_backward(torch.ops.credit.token_logprobs_bwd_triton),
        setup_context=_token_logprobs_setup,
    )
