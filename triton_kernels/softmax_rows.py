"""The one per-row softmax reduction of every Triton kernel that reports log-probs: token_logprobs, the policy-loss
row kernel and, through it, the fused LM head's chunks (the Triton counterpart of csrc/cpu/softmax_rows.cpp).

A row's log-sum-exp, log-prob and entropy must not depend on how many rows a launch holds, where the row sits,
which of these kernels runs or how the fused head chunks its tokens (docs: README "Backends and checks"). So every
kernel reduces a row of V logits with this same code (_row_stats, _row_outputs) at the same launch configuration,
row_config(V): the tile, and the number of warps, which lays the tile over threads and so fixes the tree of its
final sums. Nothing of it may depend on the number of rows, and none of it is autotuned. In base 2 (exp2 / log2
are the native units), with z2 = z * log2(e) / T:

- V <= ONE_TILE_MAX: the row in one register tile: m = max z2, s = sum 2^(z2 - m), t = sum 2^(z2 - m) (z2 - m);
- longer rows: streamed in STREAM_BLOCK tiles into vector accumulators s, t around a reference point m that moves
  only when a tile's max exceeds it by 2^RESCALE (lazy rescaling: almost every tile skips the vector rescale).

Then lse = ln2 (m + log2 s), logp = ln2 (z2_label - m - log2 s), H = ln2 (log2 s - t / s).
"""

import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)  # jit code may only read globals that are constexpr
LN2 = tl.constexpr(0.6931471805599453)
RESCALE = tl.constexpr(8.0)

# Read at every launch (tests shrink them to reach the streaming path on small rows; the sweep varies them).
ONE_TILE_MAX = 16384  # rows up to this many logits are held in registers (the policy loss reads them once)
# benchmarks/results/2026-11-26-H200-run2/sweep.txt (bf16, V = 151936): 2048 x 2 warps reads at 98.6% of the copy
# bandwidth (log-prob only); with the entropy 1024 x 2 was 5% faster, but one tile for both keeps a row's log-prob
# independent of whether the entropy is asked for.
STREAM_BLOCK, STREAM_WARPS = 2048, 2


def one_tile(V: int) -> bool:
    """Whether a row of V logits is held in one register tile rather than streamed."""
    return triton.next_power_of_2(max(V, 1)) <= ONE_TILE_MAX


def row_config(V: int) -> tuple[bool, int, int]:
    """(one tile?, BLOCK_V, num_warps) of every kernel's row reduction: a function of V alone."""
    if one_tile(V):
        block = triton.next_power_of_2(max(V, 1))
        return True, block, max(1, min(16, block // 512))
    return False, STREAM_BLOCK, STREAM_WARPS


@triton.jit
def _row_stats(base, V, scale, ACC: tl.constexpr, ENTROPY: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_V: tl.constexpr):
    """(m, s, t, z) of the row at base (log2 units, see the module docstring); z is the row's register tile when
    ONE_TILE (for a gradient pass), else m as a placeholder. t is 0 without ENTROPY."""
    if ONE_TILE:
        offs = tl.arange(0, BLOCK_V)
        z = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(ACC) * scale
        m = tl.max(z, 0)
        d = z - m
        e = tl.exp2(d)
        s_sum = tl.sum(e, 0)
        if ENTROPY:
            t_sum = tl.sum(tl.where(e > 0, e * d, 0.0), 0)  # e == 0 where z == -inf: 0 * -inf would be NaN
        else:
            t_sum = s_sum * 0.0
    else:
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((BLOCK_V,), ACC)
        t = tl.zeros((BLOCK_V,), ACC)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            zb = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(ACC) * scale
            # Lazy rescaling: m moves only when a tile exceeds it by 2^RESCALE (terms stay <= 2^RESCALE: no
            # overflow in fp32); alpha is then exactly 1.
            m_blk = tl.max(zb, 0)
            m_new = tl.where(m_blk > m + RESCALE, m_blk, m)
            alpha = tl.where(m_new > m, tl.exp2(m - m_new), 1.0)
            if ENTROPY:
                if m_new > m:
                    # t holds sum e (z - m): shifted, because H = lse - sum p z would cancel catastrophically for
                    # |z| ~ 1e4.
                    t = alpha * (t + tl.where(s > 0, (m - m_new) * s, 0.0))
            d = zb - tl.where(m_new > float("-inf"), m_new, 0.0)  # a row whose first tiles are all -inf: m = -inf
            e = tl.exp2(d)
            # Straight-line in every kernel, with or without the entropy: the compiler contracts it (s * alpha + e
            # into one FMA) alike everywhere, so s gets the same bits (a branch could be if-converted differently).
            s = s * alpha + e
            m = m_new
            if ENTROPY:
                t += tl.where(e > 0, e * d, 0.0)
        s_sum = tl.sum(s, 0)
        if ENTROPY:
            t_sum = tl.sum(t, 0)
        else:
            t_sum = s_sum * 0.0
        z = m
    return m, s_sum, t_sum, z


@triton.jit
def _row_outputs(base, label, m, s_sum, t_sum, scale, ACC: tl.constexpr):
    """(lse2 = lse / ln2, logp, entropy) of a row from its _row_stats."""
    log2_s = tl.log2(s_sum)
    lse2 = m + log2_s
    z_label = tl.load(base + label).to(ACC) * scale
    logp = (z_label - lse2) * LN2
    entropy = (log2_s - t_sum / s_sum) * LN2
    return lse2, logp, entropy
