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
        return _tlp.token_logprobs_backward(g, ge, logits, labels.contiguous(), lse, entropy, temperature, ignore_index)


if AVAILABLE:
    from credit_ops.ops import fused_linear as _fl
    from credit_ops.ops.policy_loss import rows_forward

    def _c(t):
        return None if t is None else t.contiguous()

    @torch.library.custom_op("credit::policy_loss_fwd_triton", mutates_args=())
    def policy_loss_fwd_triton(
        logits: Tensor,
        labels: Tensor,
        advantages: Tensor,
        weights: Tensor,
        old_logprobs: Tensor | None,
        ref_logprobs: Tensor | None,
        temperature: float,
        ignore_index: int,
        eps_low: float,
        eps_high: float,
        dual_clip: float,
        beta: float,
        kl_type: int,
        write_grad: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        grad = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype) if write_grad else logits
        loss, logp, entropy = rows_forward(
            grad,
            logits,
            labels.contiguous(),
            advantages.contiguous(),
            weights.contiguous(),
            _c(old_logprobs),
            _c(ref_logprobs),
            use_triton=True,
            temperature=temperature,
            ignore_index=ignore_index,
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip=dual_clip,
            beta=beta,
            kl_type=kl_type,
            write_grad=write_grad,
        )
        return loss, logp, entropy, grad if write_grad else logits.new_empty(0)

    # The fused LM head: the chunk loops of ops/fused_linear.py around the Triton row kernel (also on CPU tensors
    # under TRITON_INTERPRET=1).
    @torch.library.custom_op("credit::fused_linear_policy_loss_fwd_triton", mutates_args=())
    def fused_linear_policy_loss_fwd_triton(
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        advantages: Tensor,
        weights: Tensor,
        old_logprobs: Tensor | None,
        ref_logprobs: Tensor | None,
        temperature: float,
        ignore_index: int,
        eps_low: float,
        eps_high: float,
        dual_clip: float,
        beta: float,
        kl_type: int,
        chunk_size: int,
        compute_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _fl.policy_loss_forward(
            hidden,
            weight,
            bias,
            labels,
            advantages,
            weights,
            old_logprobs,
            ref_logprobs,
            temperature,
            ignore_index,
            eps_low,
            eps_high,
            dual_clip,
            beta,
            kl_type,
            chunk_size,
            compute_grad,
            use_triton=True,
        )

    @torch.library.custom_op("credit::fused_linear_logprobs_fwd_triton", mutates_args=())
    def fused_linear_logprobs_fwd_triton(
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        temperature: float,
        ignore_index: int,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        return _fl.logprobs_forward(
            hidden, weight, bias, labels, temperature, ignore_index, chunk_size, use_triton=True
        )

    @torch.library.custom_op("credit::fused_linear_logprobs_bwd_triton", mutates_args=())
    def fused_linear_logprobs_bwd_triton(
        grad_logprobs: Tensor,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        temperature: float,
        ignore_index: int,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _fl.logprobs_backward(
            grad_logprobs, hidden, weight, bias, labels, temperature, ignore_index, chunk_size, use_triton=True
        )
