// Row-wise softmax passes shared by the CPU kernels of token_logprobs, policy_loss and the fused LM head.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace credit::cpu {

// One pass over a row of logits z (after its max pass), at temperature 1 / inv_t:
//   m = max_j z_j / T,  S = sum_j e_j,  Tt = sum_j e_j d_j  with d_j = z_j / T - m, e_j = exp(d_j),
// so lse = m + log S and the entropy is log S - Tt / S. When e is non-null the e_j are stored there (e may alias
// z): the gradient pass then needs no second exp. fp32 rows run in explicit SIMD, chosen per CPU (vec_math.h).
void row_exp(const float* z, float* e, int64_t V, float inv_t, float* m, float* S, float* Tt);
void row_exp(const double* z, double* e, int64_t V, double inv_t, double* m, double* S, double* Tt);

// bf16 -> fp32 for a row (vectorised bit shifts).
void load_bf16(const c10::BFloat16* src, float* dst, int64_t V);

// A row as acc_t: the row itself when it already is, else converted into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_as_acc(const scalar_t* row, int64_t V, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    buf.resize(V);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
      load_bf16(row, buf.data(), V);
    else
      for (int64_t j = 0; j < V; ++j) buf[j] = static_cast<acc_t>(row[j]);
    return buf.data();
  }
}

}  // namespace credit::cpu
