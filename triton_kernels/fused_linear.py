"""Fused LM head + policy loss / log-probs: logits = hidden @ weight.T (+ bias) chunk by chunk over tokens, never
the full (N, V) logits.

Per chunk of n tokens: one matmul (tensor cores, fp32 accumulation, logits in the operands' dtype) into an (n, V)
buffer, then the policy-loss row kernel (policy_loss.py on GPU, the C++ credit::policy_loss_rows_ on CPU) computes
lse / logp / entropy / the loss in fp32 and overwrites the buffer with d loss / d logits, then the two gradient
matmuls read it: grad_hidden[chunk] = dlogits @ W and grad_W += dlogits.T @ hidden[chunk]. Token-level losses
thus cost the three matmuls plus one read and one write of each chunk, and need one chunk buffer of memory.
Sequence-level losses chunk by whole sequences and take the coefficients from the caller between the log-prob
pass and the gradient pass (fused_linear_sequence_loss_forward): three matmuls too.

Why cuBLAS and not a Triton tensor-core matmul with the softmax fused into it: the three matmuls are the floor
and cuBLAS runs them near the card's rate; fusing the row statistics into the logits matmul's epilogue would save
one read of each chunk (~0.15 ms per 2048 x 152k bf16 chunk on an H200, of ~10 ms of matmuls), and computing the
gradient inside the gradient matmuls' prologue would recompute exp() once per H tile (14-28x the exponentials).

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
    grads = _Grads(hidden, weight, bias, acc) if compute_grad else None
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
            grads.add(z, h, weight, s, e)
        del z, z3  # free this chunk's buffer before the next one is allocated
    none = [hidden.new_empty(0) for _ in range(3)]  # three tensors: a custom op's outputs may not alias
    return (loss, logp, entropy, *(grads.result() if compute_grad else none))


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


class _Grads:
    """grad_hidden (N, H), grad_weight (V, H) (accumulated over the chunks in the weight's dtype, as Liger does: an
    fp32 copy would cost V * H * 4 bytes) and grad_bias (V,) of a chunked loop."""

    def __init__(self, hidden, weight, bias, acc):
        self.h = torch.empty_like(hidden)
        self.w = torch.zeros_like(weight)
        self.b = torch.zeros(weight.shape[0], device=hidden.device, dtype=acc) if bias is not None else None
        self.bias_dtype = None if bias is None else bias.dtype

    def add(self, dz, h, weight, s, e):
        """dz (n, V) = d loss / d logits of hidden rows s:e (h): grad_hidden[s:e] = dz @ W, grad_W += dz.T @ h."""
        torch.mm(dz, weight, out=self.h[s:e])
        self.w.addmm_(dz.t(), h)
        if self.b is not None:
            self.b += dz.sum(0, dtype=self.b.dtype)

    def result(self):
        return self.h, self.w, self.h.new_empty(0) if self.b is None else self.b.to(self.bias_dtype)


def _grad_from_coef(rows, z, labels, coef, *, temperature, ignore_index):
    """Overwrites the logits chunk z (n, V) with coef (onehot - p) / T (coef (n,) = dL/dlogp)."""
    z3 = z.unsqueeze(0)
    rows(z3, z3, labels.view(1, -1), None, coef.view(1, -1), None, None, temperature=temperature,
         ignore_index=ignore_index, coef_given=True, write_grad=True)  # fmt: skip


def fused_linear_logprobs_backward(grad_logprobs, hidden, weight, bias, labels, *, temperature, ignore_index,
                                   chunk_size, use_triton):  # fmt: skip
    """d (sum_i g_i logp_i) w.r.t. hidden (N, H), weight (V, H) and bias (V,) ((0,) when None): the logits chunks
    are recomputed and overwritten by g (onehot - p) / T."""
    N = hidden.shape[0]
    V = weight.shape[0]
    rows = row_kernel(use_triton)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    g = grad_logprobs.to(acc).contiguous()
    grads = _Grads(hidden, weight, bias, acc)
    C = chunk_rows(N, V, hidden.dtype, chunk_size)
    for s in range(0, N, C):
        e = min(N, s + C)
        h = hidden[s:e]
        z = _logits(h, weight, bias)
        _grad_from_coef(rows, z, labels[s:e], g[s:e], temperature=temperature, ignore_index=ignore_index)
        grads.add(z, h, weight, s, e)
        del z
    return grads.result()


def sequence_chunk_rows(N: int, T: int, V: int, dtype: torch.dtype, chunk_size: int | None) -> int:
    """Rows per chunk holding whole sequences of T tokens (0 when one sequence exceeds the chunk budget)."""
    return chunk_rows(N, V, dtype, chunk_size) // T * T if T > 0 else 0


def fused_linear_sequence_loss_forward(hidden, weight, bias, labels, coef_of, *, seq_len, chunk, temperature,
                                       ignore_index, use_triton):  # fmt: skip
    """Sequence-level losses (the GSPO family) in three matmuls: a token's dL/dlogp depends on its whole sequence
    and on no other, so chunks of whole sequences (``chunk`` rows, a multiple of ``seq_len``) get their logits, the
    log-probs, then the coefficients coef_of(s, e, logp[s:e]) -> (e - s,), the gradient in place and the two
    gradient matmuls, without recomputing the logits in a backward.
    hidden (N, H), labels (N,) -> logp (N,), entropy (N,), grad_hidden, grad_weight, grad_bias ((0,) without bias)."""
    N = hidden.shape[0]
    rows = row_kernel(use_triton)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.empty(N, device=hidden.device, dtype=acc)
    entropy = torch.empty(N, device=hidden.device, dtype=acc)
    grads = _Grads(hidden, weight, bias, acc)
    assert chunk > 0 and chunk % seq_len == 0
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        h = hidden[s:e]
        z = _logits(h, weight, bias)
        z3 = z.unsqueeze(0)
        _, lp, ent = rows(z3, z3, labels[s:e].view(1, -1), None, logp.new_zeros(1, e - s), None, None,
                          temperature=temperature, ignore_index=ignore_index, coef_given=True,
                          write_grad=False)  # fmt: skip
        logp[s:e] = lp.view(-1)
        entropy[s:e] = ent.view(-1)
        coef = coef_of(s, e, logp[s:e]).to(acc).contiguous()
        _grad_from_coef(rows, z, labels[s:e], coef, temperature=temperature, ignore_index=ignore_index)
        grads.add(z, h, weight, s, e)
        del z, z3
    return (logp, entropy, *grads.result())
