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


# ---- policy_loss : the forward ops already computed d loss / d inputs; backward only scales them.
def scale_grad(grad, grad_output):
    """grad * grad_output (0-d). Eager calls skip the extra pass over grad when grad_output == 1 (the usual
    loss.backward()); that reads one scalar on the host. Traced or captured code always multiplies."""
    if grad_output is None or grad is None:
        return None
    traced = type(grad_output) is not torch.Tensor or torch.compiler.is_compiling()
    capturing = grad_output.is_cuda and torch.cuda.is_current_stream_capturing()
    if not traced and not capturing and bool(grad_output == 1):
        return grad
    return grad * grad_output.to(grad.dtype)


def _policy_loss_setup(ctx, inputs, output):
    # The outputs after the loss get no gradient; materialised, each would be a zero tensor of its shape: a (B, T, V)
    # zero-filled buffer (one more write pass and the gradient's memory again) for the gradient output.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[3])


def _policy_loss_backward(ctx, grad_loss, _grad_logp, _grad_entropy, _grad_grad):
    (grad,) = ctx.saved_tensors
    return (scale_grad(grad, grad_loss),) + (None,) * 13


for _name in ["credit::policy_loss_fwd"] + ["credit::policy_loss_fwd_triton"] * _triton_ops.AVAILABLE:
    torch.library.register_autograd(_name, _policy_loss_backward, setup_context=_policy_loss_setup)


def _fused_linear_policy_loss_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero (V, H) / (N, H) grads for the gradient outputs (see _policy_loss_setup)
    ctx.has_bias, ctx.computed = inputs[2] is not None, inputs[-1]
    ctx.save_for_backward(output[3], output[4], output[5])


def head_grads(ctx, grad_loss):
    """(hidden, weight, bias) gradients of a fused-head loss whose forward saved them: scaled by grad_loss."""
    gh, gw, gb = ctx.saved_tensors
    return scale_grad(gh, grad_loss), scale_grad(gw, grad_loss), scale_grad(gb, grad_loss) if ctx.has_bias else None


def _fused_linear_policy_loss_backward(ctx, grad_loss, _g1, _g2, _g3, _g4, _g5):
    if not ctx.computed:  # called without compute_grad: the forward computed no gradient to hand back
        return (None,) * 17
    return head_grads(ctx, grad_loss) + (None,) * 14


def _fused_linear_logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, chunk_size = inputs
    ctx.save_for_backward(hidden, weight, bias, labels)
    ctx.args = (temperature, ignore_index, chunk_size)


def _fused_linear_logprobs_backward(bwd_op):
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, weight, bias, labels = ctx.saved_tensors
        if grad_logprobs is None:
            return (None,) * 7
        gh, gw, gb = bwd_op(grad_logprobs, hidden, weight, bias, labels, *ctx.args)
        return gh, gw, (gb if bias is not None else None), None, None, None, None

    return backward


for _suffix in [""] + ["_triton"] * _triton_ops.AVAILABLE:
    torch.library.register_autograd(
        f"credit::fused_linear_policy_loss_fwd{_suffix}",
        _fused_linear_policy_loss_backward,
        setup_context=_fused_linear_policy_loss_setup,
    )
    torch.library.register_autograd(
        f"credit::fused_linear_logprobs_fwd{_suffix}",
        _fused_linear_logprobs_backward(getattr(torch.ops.credit, f"fused_linear_logprobs_bwd{_suffix}")),
        setup_context=_fused_linear_logprobs_setup,
    )
