// Device code of the Hopper policy-loss row kernel (host side: csrc/cuda/policy_loss.cu): a thread-block cluster
// of C CTAs per row, each CTA holding one slice of the row in shared memory. Each logit is read from device memory
// once and d loss / d logit written once (the two-pass floor of benchmarks/results/README.md), with no second
// read that must hit L2:
//   1. every CTA copies its slice into shared memory (one bulk asynchronous copy: the whole slice in flight at
//      once) and computes its softmax partial (max, sum of 2^(z - max), sum of 2^(z - max) (z - max)) and, where
//      the label falls in it, the label's logit;
//   2. cluster barrier; the first C lanes of every CTA read the C partials through distributed shared memory (in
//      parallel) and combine them into the row's log-sum-exp, entropy, log-prob and the token's coefficient
//      c = w dloss/dlogp;
//   3. every CTA writes its slice of the gradient c / T (onehot - p) from shared memory.
// Nothing of a slice is written before the whole slice is in shared memory and the label's logit is shared through
// the partials, so the gradient may overwrite the logits themselves (in-place mode).
//
// Plain CUDA behind a small interface (Hw: the cluster's rank / size / sync / arrive / wait / map and the bulk
// copy; the thread and block indices, __syncthreads, __shfl_xor_sync) so that
// csrc/tests/test_policy_loss_cluster_emulation.cpp runs this very code on CPU threads.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/policy_loss.h"

namespace credit::cuda_kernels {

constexpr int kRowThreads = 256;  // threads per CTA
constexpr int kMaxCluster = 8;    // the portable cluster size limit
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

// Softmax partial of a set of logits z (log2 units): m = max z, s = sum 2^(z - m), t = sum 2^(z - m) (z - m);
// zl = the label's logit where the set holds it, else -inf.
struct RowPartial {
  float m, s, t, zl;
};
__device__ __forceinline__ RowPartial empty_partial() { return {-INFINITY, 0.f, 0.f, -INFINITY}; }

struct RowArgs {
  const void* logits;  // (B, T, V) of the storage type, unit stride along V, rows 16-byte aligned, V * size % 16 == 0
  void* grad;          // (B * T, V) contiguous, may equal logits; unused without write_grad
  const void* labels;  // (B * T,) int32 or int64
  bool labels64;
  const float *adv, *weights, *old, *ref;  // (B * T,) fp32; adv / old / ref may be null (coef_given, on-policy, no KL)
  float *loss, *logp, *entropy;            // (B * T,) fp32 outputs; loss unused when coef_given
  int64_t T, V, stride_b, stride_t, slice;  // slice: logits per CTA, a multiple of 16 bytes' worth
  int64_t ignore_index;
  float scale, inv_t;  // scale = log2(e) / temperature
  core::LossParams params;
};

// 2^x with the hardware approximation (what Triton's exp2 lowers to); exact std::exp2 in the emulation.
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

__device__ __forceinline__ RowPartial combine(RowPartial a, RowPartial b) {
  const float zl = a.zl > b.zl ? a.zl : b.zl;
  // An all -inf partial has s = t = 0, unless it met a NaN logit: adding its s / t keeps that NaN.
  if (a.m == -INFINITY) return {b.m, b.s + a.s, b.t + a.t, zl};
  if (b.m == -INFINITY) return {a.m, a.s + b.s, a.t + b.t, zl};
  const float m = a.m > b.m ? a.m : b.m;
  const float ea = fast_exp2(a.m - m), eb = fast_exp2(b.m - m);
  // t' = sum e' (z - m) = e_a (t_a + (m_a - m) s_a) + e_b (...): the old terms re-centred on the new max
  return {m, ea * a.s + eb * b.s, ea * (a.t + (a.m - m) * a.s) + eb * (b.t + (b.m - m) * b.s), zl};
}

// Adds n logits (already in log2 units) to a running partial.
template <int n>
__device__ __forceinline__ void accumulate(const float (&z)[n], RowPartial& p) {
  float mx = z[0];
#pragma unroll
  for (int j = 1; j < n; ++j) mx = z[j] > mx ? z[j] : mx;
  if (mx > p.m) {
    const float alpha = fast_exp2(p.m - mx);  // 0 while p is empty (m = -inf)
    p.t = p.s > 0.f ? alpha * (p.t + (p.m - mx) * p.s) : 0.f;
    p.s *= alpha;
    p.m = mx;
  }
  // m = -inf: every logit so far is -inf or NaN; centring on 0 then adds 2^-inf = 0 for the -inf ones and
  // keeps a NaN one (NaN logits must give NaN, not be skipped).
  const float m = p.m == -INFINITY ? 0.f : p.m;
#pragma unroll
  for (int j = 0; j < n; ++j) {
    const float d = z[j] - m;
    const float e = fast_exp2(d);
    p.s += e;
    p.t += e > 0.f ? e * d : 0.f;  // e == 0 where z == -inf: 0 * -inf would be NaN
  }
}

template <typename S>
__device__ __forceinline__ float to_f32(S x);
template <typename S>
__device__ __forceinline__ S from_f32(float x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ RowPartial shfl_xor(const RowPartial& p, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, p.m, lane_mask), __shfl_xor_sync(0xffffffffu, p.s, lane_mask),
          __shfl_xor_sync(0xffffffffu, p.t, lane_mask), __shfl_xor_sync(0xffffffffu, p.zl, lane_mask)};
}

// Combine of the partials of the first n (<= 32) lanes of a warp, by butterfly shuffles; every lane gets it.
__device__ __forceinline__ RowPartial warp_combine(RowPartial p, int n) {
  for (int o = 1; o < n; o *= 2) p = combine(p, shfl_xor(p, o));
  return p;
}

// Combine of every thread's partial (warp shuffles, then one round through shared memory); thread 0 gets it.
template <int kThreads>
__device__ __forceinline__ RowPartial block_combine(RowPartial p, RowPartial* red) {
  static_assert(kThreads % 32 == 0 && kThreads <= 32 * 32);
  const int tid = static_cast<int>(threadIdx.x);
  p = warp_combine(p, 32);
  if (tid % 32 == 0) red[tid / 32] = p;
  __syncthreads();
  if (tid < 32) p = warp_combine(tid < kThreads / 32 ? red[tid] : empty_partial(), kThreads / 32);
  return p;
}

// One CTA of a row's cluster. Shared memory: `slice_mem` (args.slice logits), `red` (32 partials), `part`
// (this CTA's partial, read by the cluster), `bcast` (row results for the CTA's threads), `mbar` (the copy's
// barrier).
template <typename S, typename Hw, int kThreads>
__device__ void policy_rows_cluster_cta(const RowArgs& a, S* slice_mem, RowPartial* red, RowPartial* part,
                                        float* bcast, uint64_t* mbar) {
  constexpr int kVec = 16 / sizeof(S);  // logits per 16-byte access
  const int rank = Hw::rank(), C = Hw::size();
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t row = static_cast<int64_t>(blockIdx.x) / C;
  const int64_t label = a.labels64 ? static_cast<const int64_t*>(a.labels)[row]
                                   : static_cast<const int32_t*>(a.labels)[row];
  const int64_t start = rank * a.slice;
  const int64_t len = start < a.V ? (a.V - start < a.slice ? a.V - start : a.slice) : 0;
  const int64_t nvec = len / kVec;  // V and the slice are multiples of kVec (the host's conditions)
  S* out = a.params.write_grad ? static_cast<S*>(a.grad) + row * a.V + start : nullptr;

  if (label == a.ignore_index) {  // uniform over the cluster: no barrier is entered
    if (out) {
      for (int64_t i = tid; i < nvec; i += kThreads) __stcs(reinterpret_cast<uint4*>(out) + i, uint4{0, 0, 0, 0});
    }
    if (rank == 0 && tid == 0) {
      a.logp[row] = 0.f, a.entropy[row] = 0.f;
      if (!a.params.coef_given) a.loss[row] = 0.f;
    }
    return;
  }

  // 1. slice -> shared memory, then the CTA's partial
  const S* src = static_cast<const S*>(a.logits) + (row / a.T) * a.stride_b + (row % a.T) * a.stride_t + start;
  Hw::load(slice_mem, src, static_cast<uint32_t>(len * sizeof(S)), mbar);
  RowPartial p = empty_partial();
  for (int64_t i = tid; i < nvec; i += kThreads) {
    const uint4 raw = reinterpret_cast<const uint4*>(slice_mem)[i];
    S x[kVec];
    memcpy(x, &raw, 16);  // not a pointer cast: no aliasing of uint4 by S (registers either way)
    float z[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) z[j] = to_f32<S>(x[j]) * a.scale;
    accumulate(z, p);
  }
  p = block_combine<kThreads>(p, red);
  if (tid == 0) {
    if (label >= start && label < start + len) p.zl = to_f32<S>(slice_mem[label - start]) * a.scale;
    *part = p;
  }

  // 2. the row's statistics from the cluster's partials, read in parallel by the first C lanes
  Hw::sync();  // every part written (release / acquire); everyone is past block_combine's use of red
  if (tid < 32) {
    const RowPartial r = warp_combine(tid < C ? *Hw::map(part, tid) : empty_partial(), C);
    if (tid == 0) {
      const float log2_s = log2f(r.s);
      const float lse2 = r.m + log2_s;
      const float logp = (r.zl - lse2) * kLn2;
      float c = a.weights[row];
      if (!a.params.coef_given) {
        float l, dl;
        core::token_loss<float>(logp, a.old ? a.old[row] : logp, a.ref ? a.ref[row] : 0.f, a.adv[row], a.params,
                                &l, &dl);
        if (rank == 0) a.loss[row] = c * l;
        c *= dl;
      }
      if (rank == 0) a.logp[row] = logp, a.entropy[row] = (log2_s - r.t / r.s) * kLn2;
      bcast[0] = lse2;
      bcast[1] = c * a.inv_t;
    }
  }
  Hw::arrive();  // done reading the siblings' shared memory (they may exit after the matching wait)
  __syncthreads();

  // 3. d loss / d z = (c / T) (onehot - p), from shared memory
  if (out) {
    const float lse2 = bcast[0], c = bcast[1];
    const int64_t lab = label - start;  // outside [0, len) when another CTA holds the label
    for (int64_t i = tid; i < nvec; i += kThreads) {
      const uint4 raw = reinterpret_cast<const uint4*>(slice_mem)[i];
      S x[kVec], g[kVec];
      memcpy(x, &raw, 16);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float pj = fast_exp2(to_f32<S>(x[j]) * a.scale - lse2);
        g[j] = from_f32<S>(i * kVec + j == lab ? c - c * pj : -c * pj);
      }
      uint4 packed;
      memcpy(&packed, g, 16);
      __stcs(reinterpret_cast<uint4*>(out) + i, packed);
    }
  }
  Hw::wait();
}

}  // namespace credit::cuda_kernels
