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


# ---- policy_loss (issue 3)
if AVAILABLE:
    from credit_ops.triton_kernels import policy_loss as _pl

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
        old, ref = (None if t is None else t.contiguous() for t in (old_logprobs, ref_logprobs))
        loss, logp, ent, grad = _pl.policy_loss_forward(
            logits, labels.contiguous(), advantages.contiguous(), weights.contiguous(), old, ref,
            temperature=temperature, ignore_index=ignore_index, eps_low=eps_low, eps_high=eps_high,
            dual_clip=dual_clip, beta=beta, kl_type=kl_type, write_grad=write_grad,
        )  # fmt: skip
        return loss, logp, ent, grad if write_grad else logits.new_empty(0)


    # The fused LM head on GPU: torch matmuls around the Triton row kernel (the C++ CPU ops are in
    # csrc/cpu/fused_linear.cpp; these also run on CPU tensors under TRITON_INTERPRET=1).
    from credit_ops.triton_kernels import fused_linear as _fl

    def _c(t):
        return None if t is None else t.contiguous()

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
        return _fl.fused_linear_policy_loss_forward(
            hidden.contiguous(), weight.contiguous(), _c(bias), labels.contiguous(), _c(advantages), _c(weights),
            _c(old_logprobs), _c(ref_logprobs), temperature=temperature, ignore_index=ignore_index, eps_low=eps_low,
            eps_high=eps_high, dual_clip=dual_clip, beta=beta, kl_type=kl_type, chunk_size=chunk_size,
            use_triton=True, compute_grad=compute_grad,
        )  # fmt: skip

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
        return _fl.fused_linear_logprobs_forward(
            hidden.contiguous(), weight.contiguous(), _c(bias), labels.contiguous(), temperature=temperature,
            ignore_index=ignore_index, chunk_size=chunk_size, use_triton=True,
        )  # fmt: skip

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
        return _fl.fused_linear_logprobs_backward(
            grad_logprobs, hidden.contiguous(), weight.contiguous(), _c(bias), labels.contiguous(),
            temperature=temperature, ignore_index=ignore_index, chunk_size=chunk_size, use_triton=True,
        )  # fmt: skip
