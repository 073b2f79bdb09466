"""Triton kernels for token log-probabilities and entropy over (N, V) logits.

One program per row streams the row once in BLOCK_V chunks, in base 2 (exp2/log2 are the native units):
a reference point m (within 2^RESCALE of the running max) and vector accumulators s = sum 2^(z2 - m),
t = sum 2^(z2 - m) * (z2 - m) with z2 = z * log2(e) / T. Then lse = ln2 * (m + log2 s), H = ln2 * (log2 s - t / s).
"""

import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)  # jit code may only read globals that are constexpr
LN2 = tl.constexpr(0.6931471805599453)
RESCALE = tl.constexpr(8.0)


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
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((BLOCK_V,), ACC)
    t = tl.zeros((BLOCK_V,), ACC)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(ACC) * scale
        m_blk = tl.max(z, 0)
        # Lazy rescaling: the reference point m moves only when a block exceeds it by 2^RESCALE, so almost
        # every block skips the vector rescale (terms stay <= 2^RESCALE: no overflow risk in fp32).
        if m_blk > m + RESCALE:
            alpha = tl.exp2(m - m_blk)
            if RETURN_ENTROPY:
                # t holds sum e * (z - m): shifted, because H = lse - sum p z would cancel catastrophically
                # for |z| ~ 1e4.
                t = alpha * (t + tl.where(s > 0, (m - m_blk) * s, 0.0))
            s = s * alpha
            m = m_blk
        d = z - tl.where(m > float("-inf"), m, 0.0)  # a row whose first blocks are all -inf keeps m = -inf
        e = tl.exp2(d)
        s += e
        if RETURN_ENTROPY:
            t += tl.where(e > 0, e * d, 0.0)  # e == 0 where z == -inf (0 * -inf would be NaN)
    s_sum = tl.sum(s, 0)
    lse2 = m + tl.log2(s_sum)
    z_label = tl.load(base + label).to(ACC) * scale
    tl.store(logprobs_ptr + row, ((z_label - lse2) * LN2).to(ACC))
    tl.store(lse_ptr + row, (lse2 * LN2).to(ACC))
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, ((tl.log2(s_sum) - tl.sum(t, 0) / s_sum) * LN2).to(ACC))


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


def _block_v(V: int, entropy: bool = False) -> tuple[int, int]:
    # Chosen by benchmarks/sweep_token_logprobs.py on an H200 (bf16, V = 151936; benchmarks/results/): 2048 x 2
    # warps reads at 98.6% of the copy bandwidth, 1024 x 2 is the best with the entropy (81%); small programs
    # keep many rows in flight per SM.
    block = min(triton.next_power_of_2(max(V, 1)), 1024 if entropy else 2048)
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
    block_v / num_warps override the launch configuration (benchmarks/sweep_token_logprobs.py)."""
    import torch

    B, T, V = logits.shape
    N = B * T
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logprobs = torch.empty(B, T, device=logits.device, dtype=out_dtype)
    lse = torch.empty(B, T, device=logits.device, dtype=out_dtype)
    entropy = torch.empty((B, T) if return_entropy else (0,), device=logits.device, dtype=out_dtype)
    if N == 0:
        return logprobs, entropy, lse
    block, warps = _block_v(V, return_entropy)
    block, warps = block_v or block, num_warps or warps
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
    block, warps = _block_v(V)
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
