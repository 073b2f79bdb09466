// Portable SIMD helpers for the CPU kernels: GCC/Clang vector extensions of 16 x fp32 (one AVX-512 register, two
// AVX2 or four SSE ones), compiled per ISA through CREDIT_CPU_DISPATCH: one source serves every x86-64 machine.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#define CREDIT_INLINE __attribute__((always_inline)) inline

// CREDIT_CPU_DISPATCH(name, (params), (args)) defines `void name(params)` that runs name##_impl(args) compiled
// for AVX-512, AVX2+FMA or the baseline, chosen once from the CPU's feature bits. (GCC's target_clones with
// arch= dispatches on the CPU *model*, which VMs report generically, and falls back to SSE.)
#define CREDIT_CPU_DISPATCH(name, params, args)                                                       \
  __attribute__((target("avx512f,avx512bw,avx2,fma"))) void name##_avx512 params { name##_impl args; } \
  __attribute__((target("avx2,fma"))) void name##_avx2 params { name##_impl args; }                   \
  void name##_base params { name##_impl args; }                                                       \
  void name params {                                                                                  \
    switch (::credit::cpu::cpu_isa()) {                                                               \
      case ::credit::cpu::Isa::kAvx512: return name##_avx512 args;                                    \
      case ::credit::cpu::Isa::kAvx2: return name##_avx2 args;                                        \
      default: return name##_base args;                                                               \
    }                                                                                                 \
  }

namespace credit::cpu {

enum class Isa { kBase, kAvx2, kAvx512 };

inline Isa cpu_isa() {
  static const Isa isa = [] {
    // CREDIT_OPS_CPU_ISA=base|avx2 caps the choice (tests run every path on one machine).
    const char* cap = std::getenv("CREDIT_OPS_CPU_ISA");
    if (cap && std::strcmp(cap, "base") == 0) return Isa::kBase;
    __builtin_cpu_init();
    if (cap && std::strcmp(cap, "avx2") == 0)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2 : Isa::kBase;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBase;
  }();
  return isa;
}

typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
constexpr int kVec = 16;

CREDIT_INLINE vfloat splat(float x) { return vfloat{} + x; }
CREDIT_INLINE vfloat loadv(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
CREDIT_INLINE void storev(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
CREDIT_INLINE vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
CREDIT_INLINE float hsum(vfloat v) {
  float s = 0;
  for (int l = 0; l < kVec; ++l) s += v[l];
  return s;
}
CREDIT_INLINE float hmax(vfloat v) {
  float m = v[0];
  for (int l = 1; l < kVec; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// max(lo, x) that keeps a NaN x (vmax(x, lo) would return lo for it, silently masking a NaN logit; this is the
// same single max instruction with the operands swapped). -inf still clamps to lo.
CREDIT_INLINE vfloat vclamp_lo(vfloat x, float lo) { return vmax(splat(lo), x); }

// exp(x), Cephes-style range reduction + degree-6 polynomial (~1 ulp on the softmax range). Inputs are
// clamped to [-87, 88]: below, the result is ~1e-38 instead of a denormal (callers clamp -inf logits there).
// NaN in, NaN out (both clamps keep it).
CREDIT_INLINE vfloat vexp(vfloat x) {
  x = vclamp_lo(x, -87.0f);
  x = x > 88.0f ? splat(88.0f) : x;
  vfloat n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest without a branch
  vfloat r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  return p * __builtin_bit_cast(vfloat, bits);
}

}  // namespace credit::cpu
