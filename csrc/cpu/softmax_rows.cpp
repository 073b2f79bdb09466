#include "cpu/softmax_rows.h"

#include <algorithm>
#include <cmath>

#include "cpu/vec_math.h"

namespace credit::cpu {
namespace {

template <bool kStore>
CREDIT_INLINE void row_exp_f32(const float* z, float* e, int64_t V, float inv_t, float* m_out, float* S_out,
                               float* T_out) {
  const int64_t body = V - V % kVec;
  vfloat mv = splat(-INFINITY);
  for (int64_t i = 0; i < body; i += kVec) mv = vmax(mv, loadv(z + i));
  float m = hmax(mv);
  for (int64_t i = body; i < V; ++i) m = z[i] > m ? z[i] : m;
  m *= inv_t;  // max commutes with the positive scale 1 / T

  vfloat s = {}, t = {};
  for (int64_t i = 0; i < body; i += kVec) {
    // -inf logits: clamping the shifted value keeps e * d finite (~0) instead of 0 * -inf. A NaN logit (or
    // +inf: m = +inf, d = inf - inf) passes the clamp as NaN, so S, lse and the entropy become NaN, as in
    // torch.log_softmax; the max pass above need not see it.
    vfloat d = vclamp_lo(loadv(z + i) * inv_t - m, -87.0f);
    vfloat ex = vexp(d);
    s += ex;
    t += ex * d;
    if constexpr (kStore) storev(e + i, ex);
  }
  float S = hsum(s), Tt = hsum(t);
  for (int64_t i = body; i < V; ++i) {
    float d = std::max(z[i] * inv_t - m, -87.0f);  // std::max(NaN, lo) is NaN, as above
    float ex = std::exp(d);
    S += ex;
    Tt += ex * d;
    if constexpr (kStore) e[i] = ex;
  }
  *m_out = m, *S_out = S, *T_out = Tt;
}

CREDIT_INLINE void row_exp_impl(const float* z, float* e, int64_t V, float inv_t, float* m, float* S, float* Tt) {
  if (e)
    row_exp_f32<true>(z, e, V, inv_t, m, S, Tt);
  else
    row_exp_f32<false>(z, e, V, inv_t, m, S, Tt);
}

CREDIT_INLINE void load_bf16_impl(const c10::BFloat16* src, float* dst, int64_t V) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t j = 0; j < V; ++j) dst[j] = __builtin_bit_cast(float, static_cast<uint32_t>(s[j]) << 16);
}

}  // namespace

CREDIT_CPU_DISPATCH(row_exp, (const float* z, float* e, int64_t V, float inv_t, float* m, float* S, float* Tt),
                    (z, e, V, inv_t, m, S, Tt))

CREDIT_CPU_DISPATCH(load_bf16, (const c10::BFloat16* src, float* dst, int64_t V), (src, dst, V))

void row_exp(const double* z, double* e, int64_t V, double inv_t, double* m_out, double* S_out, double* T_out) {
  double m = -INFINITY;
  for (int64_t i = 0; i < V; ++i) m = std::max(m, z[i]);
  m *= inv_t;
  double S = 0, Tt = 0;
  for (int64_t i = 0; i < V; ++i) {
    const double d = z[i] * inv_t - m;
    const double ex = std::exp(d);
    S += ex;
    Tt += ex == 0.0 ? 0.0 : ex * d;  // p log p -> 0 as p -> 0
    if (e) e[i] = ex;
  }
  *m_out = m, *S_out = S, *T_out = Tt;
}

}  // namespace credit::cpu
