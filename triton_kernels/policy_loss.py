"""Triton kernels for the token-level policy losses (grpo / dapo / dr_grpo / bnpo) over (B, T, V) logits.

One launch for loss *and* gradient: the per-token loss depends on the row only through logp_t, so once the
row's log-sum-exp is known, the token's coefficient c_t = w_t * dloss_t/dlogp_t is known and d loss / d z =
c_t (onehot - p) / T can be written at once. One program per row (_policy_loss_fwd_kernel):
- V <= 16384: the row held in registers (one read, one write);
- longer rows: pass 1 online log-sum-exp + entropy, pass 2 the gradient, walking the row backwards so its first
  tiles are the ones pass 1 left in L2 (with thousands of rows in flight most of the second read misses L2).
On Hopper, long rows have a second layout, a CUDA kernel (csrc/cuda/policy_loss.cu, credit::policy_loss_rows_ on
CUDA): a thread-block cluster per row whose CTAs hold the row's slices in shared memory and combine their softmax
partials through distributed shared memory, so each logit is read once and its gradient written once (in place
too). credit_ops/ops/policy_loss.py (rows_forward) times the layouts that can take a call and keeps the faster.

The same kernel, with the coefficient given (COEF_GIVEN), is the backward of a log-prob, and with WRITE_GRAD off it
is a plain log-prob + entropy forward: the fused LM head uses all three on its logits chunks.
"""

import os

import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)
_ONE_TILE_MAX = 16384  # rows up to this many logits are held in registers (one read)
_TILE, _TILE_INTERPRET, _TILE_WARPS = 4096, 1024, 8  # streaming tile for longer rows (benchmarks/sweep_* tunes it)


@triton.jit
def _token_coef(
    logp,
    row,
    adv_ptr,
    weight_ptr,
    old_ptr,
    ref_ptr,
    loss_ptr,
    lo,
    hi,
    dual_clip,
    beta,
    ACC: tl.constexpr,
    COEF_GIVEN: tl.constexpr,
    ON_POLICY: tl.constexpr,
    KL_TYPE: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    store_loss,
):
    """c = w * dloss/dlogp of the token (docs/method.md §4: clipped surrogate + beta * KL); stores w * loss
    when store_loss."""
    w = tl.load(weight_ptr + row).to(ACC)
    if COEF_GIVEN:
        c = w
    else:
        A = tl.load(adv_ptr + row).to(ACC)
        if ON_POLICY:
            r = tl.full((), 1.0, ACC)
        else:
            r = tl.exp(logp - tl.load(old_ptr + row).to(ACC))
        u = r * A
        cl = tl.minimum(tl.maximum(r, lo), hi) * A
        pg = -tl.minimum(u, cl)
        dpg = tl.where(u <= cl, -u, 0.0)  # the clipped branch has no gradient
        if DUAL_CLIP:
            cap = -dual_clip * A
            capped = (A < 0) & (pg > cap)
            pg = tl.where(capped, cap, pg)
            dpg = tl.where(capped, 0.0, dpg)
        if KL_TYPE != 0:
            dr = tl.load(ref_ptr + row).to(ACC) - logp
            if KL_TYPE == 1:
                kl = -dr
                dkl = tl.full((), 1.0, ACC)
            elif KL_TYPE == 2:
                kl = 0.5 * dr * dr
                dkl = -dr
            else:
                ed = tl.exp(dr)
                kl = ed - dr - 1.0
                dkl = 1.0 - ed
            pg = pg + beta * kl
            dpg = dpg + beta * dkl
        # A NaN log-prob (NaN / +inf logits) stays NaN: the clip's minimum / maximum (and the on-policy ratio 1)
        # would otherwise turn it into a finite loss.
        bad = logp != logp
        pg = tl.where(bad, logp, pg)
        dpg = tl.where(bad, logp, dpg)
        if store_loss:
            tl.store(loss_ptr + row, (w * pg).to(ACC))
        c = w * dpg
    return c


@triton.jit
def _policy_loss_fwd_kernel(
    logits_ptr,
    grad_ptr,
    labels_ptr,
    adv_ptr,
    weight_ptr,
    old_ptr,
    ref_ptr,
    loss_ptr,
    logp_ptr,
    entropy_ptr,
    stride_b,
    stride_t,
    T,
    V,
    scale,
    inv_t,
    ignore_index,
    lo,
    hi,
    dual_clip,
    beta,
    ACC: tl.constexpr,
    COEF_GIVEN: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ON_POLICY: tl.constexpr,
    KL_TYPE: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    ONE_TILE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 for N * V > 2^31
    label = tl.load(labels_ptr + row).to(tl.int64)
    out = grad_ptr + row * V  # the gradient is contiguous (or the contiguous logits themselves)
    if label == ignore_index:
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                tl.store(out + offs, tl.zeros((BLOCK_V,), out.dtype.element_ty), mask=offs < V)
        if not COEF_GIVEN:
            tl.store(loss_ptr + row, 0.0)
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        return
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t

    # Pass 1: lse and entropy. t accumulates 2^(z - m) * (z - m) so it needs no rescaling by m.
    if ONE_TILE:
        offs = tl.arange(0, BLOCK_V)
        z_row = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(ACC) * scale
        m = tl.max(z_row, 0)
        d = z_row - m
        e = tl.exp2(d)
        s_sum = tl.sum(e, 0)
        t_sum = tl.sum(tl.where(e > 0, e * d, 0.0), 0)  # e == 0 where z == -inf: 0 * -inf would be NaN
    else:
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((BLOCK_V,), ACC)
        t = tl.zeros((BLOCK_V,), ACC)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(ACC) * scale
            m_new = tl.maximum(m, tl.max(z, 0))
            alpha = tl.exp2(m - m_new)
            d = z - m_new
            e = tl.exp2(d)
            # t' = sum e' (z - m_new) = alpha * (t + (m - m_new) * s) over the old terms
            t = alpha * (t + tl.where(s > 0, (m - m_new) * s, 0.0)) + tl.where(e > 0, e * d, 0.0)
            s = s * alpha + e
            m = m_new
        s_sum = tl.sum(s, 0)
        t_sum = tl.sum(t, 0)
    log2_s = tl.log2(s_sum)
    lse2 = m + log2_s
    z_label = tl.load(base + label).to(ACC) * scale
    logp = (z_label - lse2) * LN2
    tl.store(logp_ptr + row, logp.to(ACC))
    tl.store(entropy_ptr + row, ((log2_s - t_sum / s_sum) * LN2).to(ACC))

    c = _token_coef(
        logp,
        row,
        adv_ptr,
        weight_ptr,
        old_ptr,
        ref_ptr,
        loss_ptr,
        lo,
        hi,
        dual_clip,
        beta,
        ACC,
        COEF_GIVEN,
        ON_POLICY,
        KL_TYPE,
        DUAL_CLIP,
        True,
    )

    # Pass 2: d/dz = (c / T) (onehot - p)
    if WRITE_GRAD:
        c = c * inv_t
        if ONE_TILE:
            p = tl.exp2(z_row - lse2)
            g = tl.where(offs == label, c - c * p, -c * p)
            tl.store(out + offs, g.to(out.dtype.element_ty), mask=offs < V)
        else:
            n_blocks = tl.cdiv(V, BLOCK_V)
            for i in range(0, n_blocks):
                offs = (n_blocks - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
                z = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(ACC) * scale
                p = tl.exp2(z - lse2)
                g = tl.where(offs == label, c - c * p, -c * p)
                tl.store(out + offs, g.to(out.dtype.element_ty), mask=offs < V)


def one_tile(V: int) -> bool:
    """Whether a row of V logits is held in registers (one read) rather than streamed in two passes."""
    return triton.next_power_of_2(max(V, 1)) <= _ONE_TILE_MAX


def _config(V: int, interpret: bool) -> tuple[bool, int, int]:
    if one_tile(V):
        block = triton.next_power_of_2(max(V, 1))
        return True, block, max(1, min(16, block // 512))
    return False, _TILE_INTERPRET if interpret else _TILE, _TILE_WARPS


def policy_loss_forward(
    logits,
    labels,
    advantages,
    weights,
    old_logprobs,
    ref_logprobs,
    *,
    temperature: float,
    ignore_index: int,
    eps_low: float = 0.0,
    eps_high: float = 0.0,
    dual_clip: float = 0.0,
    beta: float = 0.0,
    kl_type: int = 0,
    grad=None,
    write_grad: bool = True,
    coef_given: bool = False,
):
    """Token policy loss over logits (B, T, V) (unit stride along V) -> (loss (), logprobs, entropy (B, T), grad).

    labels (B, T) (ignore_index rows give 0 and a zero gradient row), advantages / weights / old / ref (B, T)
    contiguous in the stats dtype; weights hold aggregation weight * mask * gate. grad: a contiguous (B, T, V)
    buffer for d loss / d logits (may be ``logits`` itself, for the in-place mode), allocated when None.
    With ``coef_given`` the weights are the coefficients dL/dlogp and the kernel is a log-prob backward (loss
    returned as 0); with ``write_grad`` off it is a log-prob + entropy forward.
    """
    import torch

    B, T, V = logits.shape
    N = B * T
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty(B, T, device=logits.device, dtype=acc_dtype)
    entropy = torch.empty(B, T, device=logits.device, dtype=acc_dtype)
    loss_tok = logp if coef_given else torch.empty(B, T, device=logits.device, dtype=acc_dtype)
    if write_grad and grad is None:
        grad = torch.empty(B, T, V, device=logits.device, dtype=logits.dtype)
    if N == 0:
        return logp.new_zeros(()), logp, entropy, grad
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    acc = tl.float64 if acc_dtype == torch.float64 else tl.float32
    one_tile, block, warps = _config(V, interpret)
    ptrs = (
        logp if advantages is None else advantages,
        logp if weights is None else weights,
        logp if old_logprobs is None else old_logprobs,
        logp if ref_logprobs is None else ref_logprobs,
        loss_tok,
        logp,
        entropy,
    )
    _policy_loss_fwd_kernel[(N,)](
        logits,
        grad if write_grad else logits,
        labels,
        *ptrs,
        logits.stride(0),
        logits.stride(1),
        T,
        V,
        _LOG2E / temperature,
        1.0 / temperature,
        ignore_index,
        1.0 - eps_low,
        1.0 + eps_high,
        dual_clip,
        beta,
        ACC=acc,
        COEF_GIVEN=coef_given,
        ON_POLICY=old_logprobs is None,
        KL_TYPE=kl_type if beta != 0.0 else 0,
        DUAL_CLIP=dual_clip > 0,
        WRITE_GRAD=write_grad,
        ONE_TILE=one_tile,
        BLOCK_V=block,
        num_warps=warps,
    )
    loss = logp.new_zeros(()) if coef_given else loss_tok.sum()
    return loss, logp, entropy, grad
