"""Fused LM head + policy loss / log-probs: logits = hidden @ weight.T (+ bias) chunk by chunk over tokens, never
the full (N, V) logits.

Per chunk of n tokens: one matmul (tensor cores, fp32 accumulation, logits in the operands' dtype) into an (n, V)
buffer, then the policy-loss row kernel (policy_loss.py on GPU, the C++ credit::policy_loss_rows_ on CPU) computes
lse / logp / entropy / the loss in fp32 and overwrites the buffer with d loss / d logits, then the two gradient
matmuls read it: grad_hidden[chunk] = dlogits @ W and grad_W += dlogits.T @ hidden[chunk]. Token-level losses
thus cost the three matmuls plus one read and one write of each chunk, and need one chunk buffer of memory.

Plain torch around the row kernel, which is passed in (row_kernel): the Triton one on GPU (and on CPU under
TRITON_INTERPRET=1); csrc/cpu/fused_linear.cpp is the same loop in C++ for the CPU ops.
"""

import torch

# One logits chunk: ~1 GiB (2048 tokens at V = 152k, bf16). Every chunk re-reads and re-writes the accumulated
# grad_W (V x H: 1.1 GB for Qwen-7B's head) in its addmm, so fewer, larger chunks cut that traffic; the chunk is
# still ~1/4 of the full logits, and peak memory stays far below eager's (ANCHORS: <= 1/8).
CHUNK_BYTES = 1 << 30


def chunk_rows(N: int, V: int, dtype: torch.dtype, chunk_size: int | None) -> int:
    if chunk_size:
        return max(1, int(chunk_size))
    per_row = V * torch.empty((), dtype=dtype).element_size()
    rows = max(1, CHUNK_BYTES // max(per_row, 1))
    rows = 1 << (rows.bit_length() - 1)  # a power of two keeps the matmul tiles whole
    return max(1, min(rows, N))


def row_kernel(use_triton: bool):
    """(grad, logits (1, n, V), labels (1, n), adv, weights, old, ref, **params) -> (loss, logp, entropy)."""
    if use_triton:
        from credit_ops.triton_kernels.policy_loss import policy_loss_forward

        def rows(grad, logits, labels, adv, weights, old, ref, *, temperature, ignore_index, eps_low=0.0,
                 eps_high=0.0, dual_clip=0.0, beta=0.0, kl_type=0, coef_given=False, write_grad=True):  # fmt: skip
            loss, logp, ent, _ = policy_loss_forward(
                logits, labels, adv, weights, old, ref, temperature=temperature, ignore_index=ignore_index,
                eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, beta=beta, kl_type=kl_type,
                grad=grad if write_grad else None, write_grad=write_grad, coef_given=coef_given,
            )  # fmt: skip
            return loss, logp, ent

        return rows

    def rows(grad, logits, labels, adv, weights, old, ref, *, temperature, ignore_index, eps_low=0.0,
             eps_high=0.0, dual_clip=0.0, beta=0.0, kl_type=0, coef_given=False, write_grad=True):  # fmt: skip
        return torch.ops.credit.policy_loss_rows_(
            grad, logits, labels, adv, weights, old, ref, temperature, ignore_index, eps_low, eps_high, dual_clip,
            beta, kl_type, coef_given, write_grad,
        )  # fmt: skip

    return rows


def _logits(h, weight, bias):
    return torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())


def _sl(t, s, e):
    return None if t is None else t[s:e].view(1, -1)


def fused_linear_policy_loss_forward(
    hidden, weight, bias, labels, advantages, weights, old_logprobs, ref_logprobs, *, temperature, ignore_index,
    eps_low, eps_high, dual_clip, beta, kl_type, chunk_size, use_triton, compute_grad,
):  # fmt: skip
    """hidden (N, H), weight (V, H), bias (V,) or None, per-token (N,) tensors (stats dtype) ->
    loss (), logprobs (N,), entropy (N,), grad_hidden (N, H), grad_weight (V, H), grad_bias (V,); the gradients are
    (0,)-shaped when not compute_grad (and grad_bias when bias is None)."""
    N, _ = hidden.shape
    V = weight.shape[0]
    rows = row_kernel(use_triton)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.empty(N, device=hidden.device, dtype=acc)
    entropy = torch.empty(N, device=hidden.device, dtype=acc)
    loss = torch.zeros((), device=hidden.device, dtype=acc)
    grad_h = torch.empty_like(hidden) if compute_grad else hidden.new_empty(0)
    # Accumulated in the weight's dtype over few, large chunks (as Liger does): an fp32 copy would cost V*H*4 bytes.
    grad_w = torch.zeros_like(weight) if compute_grad else hidden.new_empty(0)
    grad_b = torch.zeros(V, device=hidden.device, dtype=acc) if compute_grad and bias is not None else None
    C = chunk_rows(N, V, hidden.dtype, chunk_size)
    for s in range(0, N, C):
        e = min(N, s + C)
        h = hidden[s:e]
        z = _logits(h, weight, bias)  # (n, V): becomes d loss / d logits in place
        z3 = z.unsqueeze(0)
        loss_c, lp, ent = rows(
            z3, z3, labels[s:e].view(1, -1), _sl(advantages, s, e), _sl(weights, s, e), _sl(old_logprobs, s, e),
            _sl(ref_logprobs, s, e), temperature=temperature, ignore_index=ignore_index, eps_low=eps_low,
            eps_high=eps_high, dual_clip=dual_clip, beta=beta, kl_type=kl_type, write_grad=compute_grad,
        )  # fmt: skip
        loss += loss_c
        logp[s:e] = lp.view(-1)
        entropy[s:e] = ent.view(-1)
        if compute_grad:
            torch.mm(z, weight, out=grad_h[s:e])
            grad_w.addmm_(z.t(), h)
            if grad_b is not None:
                grad_b += z.sum(0, dtype=acc)
        del z, z3  # free this chunk's buffer before the next one is allocated
    grad_b = hidden.new_empty(0) if grad_b is None else grad_b.to(bias.dtype)
    return loss, logp, entropy, grad_h, grad_w, grad_b


def fused_linear_logprobs_forward(hidden, weight, bias, labels, *, temperature, ignore_index, chunk_size,
                                  use_triton):  # fmt: skip
    """hidden (N, H), weight (V, H), labels (N,) -> logprobs (N,), entropy (N,) in fp32 (fp64 for fp64 input)."""
    N = hidden.shape[0]
    V = weight.shape[0]
    rows = row_kernel(use_triton)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.empty(N, device=hidden.device, dtype=acc)
    entropy = torch.empty(N, device=hidden.device, dtype=acc)
    C = chunk_rows(N, V, hidden.dtype, chunk_size)
    for s in range(0, N, C):
        e = min(N, s + C)
        z3 = _logits(hidden[s:e], weight, bias).unsqueeze(0)
        _, lp, ent = rows(
            z3, z3, labels[s:e].view(1, -1), None, logp.new_zeros(1, e - s), None, None, temperature=temperature,
            ignore_index=ignore_index, coef_given=True, write_grad=False,
        )  # fmt: skip
        logp[s:e] = lp.view(-1)
        entropy[s:e] = ent.view(-1)
        del z3
    return logp, entropy


def fused_linear_logprobs_backward(grad_logprobs, hidden, weight, bias, labels, *, temperature, ignore_index,
                                   chunk_size, use_triton):  # fmt: skip
    """d (sum_i g_i logp_i) w.r.t. hidden (N, H), weight (V, H) and bias (V,) ((0,) when None): the logits chunks
    are recomputed and overwritten by g (onehot - p) / T."""
    N = hidden.shape[0]
    V = weight.shape[0]
    rows = row_kernel(use_triton)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    g = grad_logprobs.to(acc).contiguous()
    grad_h = torch.empty_like(hidden)
    grad_w = torch.zeros_like(weight)
    grad_b = torch.zeros(V, device=hidden.device, dtype=acc) if bias is not None else None
    C = chunk_rows(N, V, hidden.dtype, chunk_size)
    for s in range(0, N, C):
        e = min(N, s + C)
        h = hidden[s:e]
        z = _logits(h, weight, bias)
        z3 = z.unsqueeze(0)
        rows(z3, z3, labels[s:e].view(1, -1), None, g[s:e].view(1, -1), None, None, temperature=temperature,
             ignore_index=ignore_index, coef_given=True, write_grad=True)  # fmt: skip
        torch.mm(z, weight, out=grad_h[s:e])
        grad_w.addmm_(z.t(), h)
        if grad_b is not None:
            grad_b += z.sum(0, dtype=acc)
        del z, z3
    return grad_h, grad_w, hidden.new_empty(0) if grad_b is None else grad_b.to(bias.dtype)
