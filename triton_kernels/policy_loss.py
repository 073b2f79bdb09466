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
too). The driver times the layouts that can take a call once per shape and keeps the faster (_layout).
(A Triton split-row kernel, P programs per row exchanging partials through global atomics with a streaming
fallback, measured 11.9 ms against the two-pass kernel's 7.6 ms on an H200 and was removed.)

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

KL_TYPES = {None: 0, "k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _token_coef(logp, row, adv_ptr, weight_ptr, old_ptr, ref_ptr, loss_ptr, lo, hi, dual_clip, beta,
                ACC: tl.constexpr, COEF_GIVEN: tl.constexpr, ON_POLICY: tl.constexpr, KL_TYPE: tl.constexpr,
                DUAL_CLIP: tl.constexpr, store_loss):  # fmt: skip
    """c = w * dloss/dlogp of the token (SPEC §4 clipped surrogate + beta * KL); stores w * loss when store_loss."""
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
        if store_loss:
            tl.store(loss_ptr + row, (w * pg).to(ACC))
        c = w * dpg
    return c


@triton.jit
def _policy_loss_fwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, adv_ptr, weight_ptr, old_ptr, ref_ptr,
    loss_ptr, logp_ptr, entropy_ptr,
    stride_b, stride_t, T, V, scale, inv_t, ignore_index, lo, hi, dual_clip, beta,
    ACC: tl.constexpr, COEF_GIVEN: tl.constexpr, WRITE_GRAD: tl.constexpr, ON_POLICY: tl.constexpr,
    KL_TYPE: tl.constexpr, DUAL_CLIP: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
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

    c = _token_coef(logp, row, adv_ptr, weight_ptr, old_ptr, ref_ptr, loss_ptr, lo, hi, dual_clip, beta, ACC,
                    COEF_GIVEN, ON_POLICY, KL_TYPE, DUAL_CLIP, True)  # fmt: skip

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


def _config(V: int, interpret: bool) -> tuple[bool, int, int]:
    block = triton.next_power_of_2(max(V, 1))
    if block <= _ONE_TILE_MAX:
        return True, block, max(1, min(16, block // 512))
    return False, _TILE_INTERPRET if interpret else _TILE, _TILE_WARPS


def policy_loss_forward(
    logits, labels, advantages, weights, old_logprobs, ref_logprobs, *, temperature: float, ignore_index: int,
    eps_low: float = 0.0, eps_high: float = 0.0, dual_clip: float = 0.0, beta: float = 0.0, kl_type: int = 0,
    grad=None, write_grad: bool = True, coef_given: bool = False,
):  # fmt: skip
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
    flags = dict(ACC=acc, COEF_GIVEN=coef_given, ON_POLICY=old_logprobs is None,
                 KL_TYPE=kl_type if beta != 0.0 else 0, DUAL_CLIP=dual_clip > 0)  # fmt: skip
    inplace = write_grad and (grad is logits or grad.data_ptr() == logits.data_ptr())

    def layouts(logits, grad, labels, tok):
        """The kernels that can take this call, as closures over their tensors (the call's, or a scratch copy of its
        first rows for timing in place); tok = (advantages, weights, old, ref, loss_tok, logp, entropy)."""
        adv, w, old, ref, loss_tok, logp, entropy = tok
        B, T, _ = logits.shape
        N = B * T
        ptrs = (logp if adv is None else adv, logp if w is None else w, logp if old is None else old,
                logp if ref is None else ref, loss_tok, logp, entropy)  # fmt: skip
        scalars = (logits.stride(0), logits.stride(1), T, V, _LOG2E / temperature, 1.0 / temperature, ignore_index,
                   1.0 - eps_low, 1.0 + eps_high, dual_clip, beta)  # fmt: skip

        def two_pass():
            one_tile, block, warps = _config(V, interpret)
            _policy_loss_fwd_kernel[(N,)](
                logits, grad if write_grad else logits, labels, *ptrs, *scalars, **flags, WRITE_GRAD=write_grad,
                ONE_TILE=one_tile, BLOCK_V=block, num_warps=warps,
            )  # fmt: skip

        def cluster():  # the CUDA Hopper kernel (csrc/cuda/policy_loss.cu): the same outputs, its own loss sum
            loss_c, lp, ent = torch.ops.credit.policy_loss_rows_(
                grad, logits, labels, adv, w, old, ref, temperature, ignore_index, eps_low, eps_high, dual_clip, beta,
                kl_type, coef_given, True,
            )  # fmt: skip
            logp.copy_(lp)
            entropy.copy_(ent)
            return loss_c

        runs = {"two_pass": two_pass}
        if write_grad and V > _ONE_TILE_MAX and logits.is_cuda and w is not None and cluster_ok(logits):
            runs["cluster"] = cluster
        return runs

    def scratch_layouts():
        """layouts() over a copy of the first (up to 2048) rows, for timing in place: every run overwrites the copy,
        the later ones read gradients as logits (finite values; the same work)."""
        n = min(N, 2048)
        rows = lambda t: None if t is None else t.reshape(-1)[:n].view(1, n)  # noqa: E731
        x = logits.reshape(N, V)[:n].clone().view(1, n, V)
        outs = [torch.empty(1, n, device=logits.device, dtype=acc_dtype) for _ in range(3)]
        tok = (rows(advantages), rows(weights), rows(old_logprobs), rows(ref_logprobs), *outs)
        return layouts(x, x, rows(labels), tok)

    tok = (advantages, weights, old_logprobs, ref_logprobs, loss_tok, logp, entropy)
    runs = layouts(logits, grad, labels, tok)
    loss = runs[_layout(runs, logits, N, V, inplace, scratch_layouts)]()
    if coef_given:
        loss = logp.new_zeros(())
    elif loss is None:
        loss = loss_tok.sum()
    return loss, logp, entropy, grad


def cluster_ok(logits) -> bool:
    """Whether the extension's Hopper cluster kernel takes these logits (sm_90, fp32/bf16/fp16, 16-byte rows)."""
    import torch

    if not torch._C._dispatch_has_kernel_for_dispatch_key("credit::policy_loss_rows_", "CUDA"):
        return False  # extension built without CUDA
    return torch.ops.credit.policy_loss_cluster_ok(logits)


LAYOUTS = ("two_pass", "cluster")
_LAYOUT_CHOICE: dict = {}


def _layout(runs, logits, N, V, inplace, scratch_layouts) -> str:
    """Which of the long-row kernels to run: timed once per (device, dtype, V, row-count bucket, in place) on the
    first CUDA call (a few launches and one synchronisation, once). A call that writes a separate gradient times the
    kernels on its own tensors (all write the same outputs); an in-place call (the logits become the gradient: a
    second run would read it as logits) times them on a copy of its first rows (scratch_layouts).
    CREDIT_OPS_ROWS_LAYOUT=two_pass / cluster forces one. A CUDA graph capture takes the cached choice or the
    two-pass kernel (no timing while capturing)."""
    import torch

    forced = os.environ.get("CREDIT_OPS_ROWS_LAYOUT")
    if forced:
        if forced not in LAYOUTS:
            raise ValueError(f"CREDIT_OPS_ROWS_LAYOUT must be one of {LAYOUTS}, got {forced!r}")
        if forced not in runs:
            raise ValueError(
                f"CREDIT_OPS_ROWS_LAYOUT={forced}: that kernel cannot take this call (available: {sorted(runs)}; "
                "cluster: rows over 16384 logits to write a gradient for, on a Hopper GPU, V x element size a "
                "multiple of 16 bytes)"
            )
        return forced
    if len(runs) == 1:
        return next(iter(runs))
    key = (logits.device, logits.dtype, V, min(N, 1 << 14).bit_length(), inplace)
    if key not in _LAYOUT_CHOICE:
        if torch.cuda.is_current_stream_capturing():
            return "two_pass"
        timed = scratch_layouts() if inplace else runs
        times = {}
        for name, fn in timed.items():
            fn()  # compile + warm-up
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(3):
                fn()
            end.record()
            end.synchronize()
            times[name] = begin.elapsed_time(end)
        _LAYOUT_CHOICE[key] = min(times, key=times.get)
    return _LAYOUT_CHOICE[key]
