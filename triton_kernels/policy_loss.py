"""Triton kernels for the token-level policy losses (grpo / dapo / dr_grpo / bnpo) over (B, T, V) logits.

One launch for loss *and* gradient: the per-token loss depends on the row only through logp_t, so once the
row's log-sum-exp is known, the token's coefficient c_t = w_t * dloss_t/dlogp_t is known and d loss / d z =
c_t (onehot - p) / T can be written at once. One program per row (_policy_loss_fwd_kernel), pass 1 being the row
reduction every log-prob kernel shares (softmax_rows.py: the same bits as token_logprobs for the same row):
- V <= 16384: the row held in registers (one read, one write);
- longer rows: pass 1 online log-sum-exp + entropy, pass 2 the gradient, walking the row backwards so its first
  tiles are the ones pass 1 left in L2 (with thousands of rows in flight most of the second read misses L2).
On Hopper, long rows have a second layout, a CUDA kernel (csrc/cuda/policy_loss.cu, credit::policy_loss_rows_ on
CUDA): a thread-block cluster per row whose CTAs hold the row's slices in shared memory and combine their softmax
partials through distributed shared memory, so each logit is read once and its gradient written once (in place
too). Its reduction order is its own, so credit_ops/ops/policy_loss.py (rows_forward) runs it only when
CREDIT_OPS_ROWS_LAYOUT=cluster asks for it.

The same kernel, with the coefficient given (COEF_GIVEN), is the backward of a log-prob, and with WRITE_GRAD off it
is a plain log-prob + entropy forward: the fused LM head uses all three on its logits chunks.
"""

import triton
import triton.language as tl
from credit_ops.triton_kernels.softmax_rows import _LOG2E, _row_outputs, _row_stats, one_tile, row_config

__all__ = ["one_tile", "policy_loss_forward"]


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

    # Pass 1: lse and entropy, by the row reduction every log-prob kernel shares (softmax_rows.py)
    m, s_sum, t_sum, z_row = _row_stats(base, V, scale, ACC, True, ONE_TILE, BLOCK_V)
    lse2, logp, entropy = _row_outputs(base, label, m, s_sum, t_sum, scale, ACC)
    tl.store(logp_ptr + row, logp.to(ACC))
    tl.store(entropy_ptr + row, entropy.to(ACC))

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
            offs = tl.arange(0, BLOCK_V)
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
    acc = tl.float64 if acc_dtype == torch.float64 else tl.float32
    one_tile, block, warps = row_config(V)
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
