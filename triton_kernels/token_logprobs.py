"""Triton kernels for token log-probabilities and entropy over (N, V) logits.

The forward reduces each row with the shared row reduction of softmax_rows.py (one program per row; the row in one
register tile up to 16384 logits, else streamed once with an online log-sum-exp in base 2), so its log-probs are
bitwise those of the policy-loss kernel and the fused LM head for the same row. The backward recomputes p from the
stored lse.
"""

import triton
import triton.language as tl
from credit_ops.triton_kernels.softmax_rows import _LOG2E, LN2, LOG2E, _row_outputs, _row_stats, row_config


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logprobs_ptr,
    entropy_ptr,
    lse_ptr,
    stride_b,
    stride_t,
    T,
    V,
    scale,
    ignore_index,
    ACC: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    ONE_TILE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 for N * V > 2^31
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if RETURN_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        return
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    m, s_sum, t_sum, _ = _row_stats(base, V, scale, ACC, RETURN_ENTROPY, ONE_TILE, BLOCK_V)
    lse2, logp, entropy = _row_outputs(base, label, m, s_sum, t_sum, scale, ACC)
    tl.store(logprobs_ptr + row, logp.to(ACC))
    tl.store(lse_ptr + row, (lse2 * LN2).to(ACC))
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, entropy.to(ACC))


@triton.jit
def _token_logprobs_bwd_kernel(
    grad_ptr,
    logits_ptr,
    labels_ptr,
    lse_ptr,
    grad_lp_ptr,
    grad_ent_ptr,
    entropy_ptr,
    stride_b,
    stride_t,
    T,
    V,
    scale,
    inv_t,
    ignore_index,
    ACC: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # d/dz (g * logp_y + ge * H) = (1/T) * (g * (onehot_y - p) - ge * p * (log p + H))
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    out = grad_ptr + row * V  # the gradient is allocated contiguous
    if label == ignore_index:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            tl.store(out + offs, tl.zeros((BLOCK_V,), out.dtype.element_ty), mask=offs < V)
        return
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    lse2 = tl.load(lse_ptr + row).to(ACC) * LOG2E
    g = tl.load(grad_lp_ptr + row).to(ACC)
    if WITH_ENTROPY:
        ge = tl.load(grad_ent_ptr + row).to(ACC)
        H = tl.load(entropy_ptr + row).to(ACC)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(ACC) * scale
        p = tl.exp2(z - lse2)
        d = -g * p
        if WITH_ENTROPY:
            d -= tl.where(p > 0, ge * p * ((z - lse2) * LN2 + H), 0.0)
        d = tl.where(offs == label, d + g, d) * inv_t
        tl.store(out + offs, d.to(out.dtype.element_ty), mask=offs < V)


def _acc(logits):
    import torch

    return tl.float64 if logits.dtype == torch.float64 else tl.float32


def _bwd_block_v(V: int) -> tuple[int, int]:
    # The backward's tiles change no reduction (each gradient element is computed on its own); small programs keep
    # many rows in flight per SM.
    block = min(triton.next_power_of_2(max(V, 1)), 2048)
    return block, (2 if block >= 512 else 1)


def token_logprobs_forward(
    logits,
    labels,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    block_v: int | None = None,
    num_warps: int | None = None,
):
    """logits (B, T, V) with unit stride along V, labels (B, T) contiguous -> logprobs, entropy or (0,), lse.
    block_v / num_warps override the launch configuration (benchmarks/sweep_token_logprobs.py only: the log-probs
    then no longer match the other kernels' bits)."""
    import torch

    B, T, V = logits.shape
    N = B * T
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logprobs = torch.empty(B, T, device=logits.device, dtype=out_dtype)
    lse = torch.empty(B, T, device=logits.device, dtype=out_dtype)
    entropy = torch.empty((B, T) if return_entropy else (0,), device=logits.device, dtype=out_dtype)
    if N == 0:
        return logprobs, entropy, lse
    one_tile, block, warps = row_config(V)
    if block_v or num_warps:  # the sweep's overrides: a different reduction order than every other kernel's
        one_tile, block, warps = False, block_v or block, num_warps or warps
    _token_logprobs_fwd_kernel[(N,)](
        logits,
        labels,
        logprobs,
        entropy,
        lse,
        logits.stride(0),
        logits.stride(1),
        T,
        V,
        _LOG2E / temperature,
        ignore_index,
        ACC=_acc(logits),
        RETURN_ENTROPY=return_entropy,
        ONE_TILE=one_tile,
        BLOCK_V=block,
        num_warps=warps,
    )
    return logprobs, entropy, lse


def token_logprobs_backward(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    """Contiguous gradient (B, T, V) in the logits' dtype; grad_entropy / entropy are None when unused."""
    import torch

    B, T, V = logits.shape
    N = B * T
    grad = torch.empty(B, T, V, device=logits.device, dtype=logits.dtype)
    if N == 0:
        return grad
    with_entropy = grad_entropy is not None
    block, warps = _bwd_block_v(V)
    _token_logprobs_bwd_kernel[(N,)](
        grad,
        logits,
        labels,
        lse,
        grad_logprobs,
        grad_entropy if with_entropy else grad_logprobs,
        entropy if with_entropy else lse,
        logits.stride(0),
        logits.stride(1),
        T,
        V,
        _LOG2E / temperature,
        1.0 / temperature,
        ignore_index,
        ACC=_acc(logits),
        WITH_ENTROPY=with_entropy,
        BLOCK_V=block,
        num_warps=warps,
    )
    return grad
