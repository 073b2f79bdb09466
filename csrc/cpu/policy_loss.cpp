// CPU kernels for the token-level policy losses (credit::policy_loss_fwd, credit::policy_loss_rows_): per row,
// pass 1 computes lse and entropy, the token's loss and coefficient c = w * dloss/dlogp follow from logp alone,
// and pass 2 writes d loss / d z = (c / T) (onehot - p) while the row is still in cache. Rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/policy_loss.h"
#include "cpu/softmax_rows.h"
#include "cpu/vec_math.h"

namespace credit::cpu {
namespace {

// fp32 -> bf16 by bit manipulation (round to nearest even, NaN kept quiet) so the loops vectorise.
CREDIT_INLINE uint16_t bf16_bits(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : static_cast<uint16_t>(r);
}

// Pass 2: out_j = -k e_j with k = c / (T S); the caller adds c / T at the label. out may alias e.
CREDIT_INLINE void grad_f32_impl(const float* e, float k, int64_t V, float* out) {
  for (int64_t j = 0; j < V; ++j) out[j] = -k * e[j];
}
CREDIT_INLINE void grad_bf16_impl(const float* e, float k, int64_t V, at::BFloat16* out) {
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
  for (int64_t j = 0; j < V; ++j) o[j] = bf16_bits(-k * e[j]);
}
CREDIT_CPU_DISPATCH(grad_f32, (const float* e, float k, int64_t V, float* out), (e, k, V, out))
CREDIT_CPU_DISPATCH(grad_bf16, (const float* e, float k, int64_t V, at::BFloat16* out), (e, k, V, out))
inline void row_grad(const float* e, float k, int64_t V, float* out) { grad_f32(e, k, V, out); }
inline void row_grad(const float* e, float k, int64_t V, at::BFloat16* out) { grad_bf16(e, k, V, out); }
inline void row_grad(const float* e, float k, int64_t V, at::Half* out) {
  for (int64_t j = 0; j < V; ++j) out[j] = static_cast<at::Half>(-k * e[j]);
}
inline void row_grad(const double* e, double k, int64_t V, double* out) {
  for (int64_t j = 0; j < V; ++j) out[j] = -k * e[j];
}

inline at::Tensor opt_as(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() && t->defined() ? t->to(dtype).contiguous() : at::Tensor();
}

}  // namespace

// The shared driver: logits (B, T, V) with unit stride along V (rows may be strided, e.g. a logits[:, :-1] slice);
// grad (B, T, V) contiguous or logits itself; every per-token tensor (B, T).
std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_rows(const at::Tensor& grad, const at::Tensor& logits,
                                                           const at::Tensor& labels,
                                                           const std::optional<at::Tensor>& advantages,
                                                           const at::Tensor& weights,
                                                           const std::optional<at::Tensor>& old_logprobs,
                                                           const std::optional<at::Tensor>& ref_logprobs,
                                                           double temperature, int64_t ignore_index,
                                                           const LossParams& params) {
  pl::check_rows(grad, logits, labels, advantages, weights, old_logprobs, ref_logprobs, temperature, params);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2), N = B * T;
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor y = labels.contiguous();
  const at::Tensor w = weights.to(acc_dtype).contiguous();
  const at::Tensor adv = opt_as(advantages, acc_dtype), old = opt_as(old_logprobs, acc_dtype),
                   ref = opt_as(ref_logprobs, acc_dtype);
  auto opts = logits.options().dtype(acc_dtype);
  at::Tensor loss_tok = at::zeros({B, T}, opts), logp = at::empty({B, T}, opts), entropy = at::empty({B, T}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "policy_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(y.scalar_type(), "policy_loss_cpu", [&] {
      const scalar_t* xp = logits.const_data_ptr<scalar_t>();
      scalar_t* gp = params.write_grad ? grad.data_ptr<scalar_t>() : nullptr;
      const int64_t sb = logits.stride(0), st = logits.stride(1);
      const index_t* yp = y.const_data_ptr<index_t>();
      const acc_t* wp = w.const_data_ptr<acc_t>();
      const acc_t* ap = adv.defined() ? adv.const_data_ptr<acc_t>() : nullptr;
      const acc_t* op = old.defined() ? old.const_data_ptr<acc_t>() : nullptr;
      const acc_t* rp = ref.defined() ? ref.const_data_ptr<acc_t>() : nullptr;
      acc_t* lt = loss_tok.mutable_data_ptr<acc_t>();
      acc_t* lp = logp.mutable_data_ptr<acc_t>();
      acc_t* ent = entropy.mutable_data_ptr<acc_t>();
      const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
      at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf;
        for (int64_t i = begin; i < end; ++i) {
          const int64_t label = yp[i];
          scalar_t* out = gp ? gp + i * V : nullptr;
          if (label == ignore_index) {
            lp[i] = 0, ent[i] = 0;
            if (out) std::fill(out, out + V, scalar_t(0));
            continue;
          }
          TORCH_CHECK(label >= 0 && label < V, "policy_loss: label ", label, " out of range [0, ", V, ")");
          const acc_t* z = row_as_acc<scalar_t, acc_t>(xp + (i / T) * sb + (i % T) * st, V, buf);
          const acc_t z_label = z[label];  // read first: in the in-place mode pass 1 overwrites the row
          // e_j goes to the fp32 gradient row itself, or to the private converted row (bf16/fp16).
          acc_t* e = nullptr;
          if (out) {
            if constexpr (std::is_same_v<scalar_t, acc_t>)
              e = reinterpret_cast<acc_t*>(out);
            else
              e = const_cast<acc_t*>(z);
          }
          acc_t m, S, Tt;
          row_exp(z, e, V, inv_t, &m, &S, &Tt);
          const acc_t logS = std::log(S);
          const acc_t logp_i = z_label * inv_t - (m + logS);
          lp[i] = logp_i, ent[i] = logS - Tt / S;
          acc_t c = wp[i];
          if (!params.coef_given) {
            acc_t l, dl;
            core::token_loss<acc_t>(logp_i, op ? op[i] : logp_i, rp ? rp[i] : acc_t(0), ap[i], params, &l, &dl);
            lt[i] = wp[i] * l;
            c = wp[i] * dl;
          }
          if (out) {
            c *= inv_t;
            row_grad(e, c / S, V, out);
            out[label] = static_cast<scalar_t>(static_cast<acc_t>(out[label]) + c);
          }
        }
      });
    });
  });
  return {loss_tok.sum(), logp, entropy};
}

namespace {

using pl::present;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& advantages, const at::Tensor& weights,
    const std::optional<at::Tensor>& old_logprobs, const std::optional<at::Tensor>& ref_logprobs,
    double temperature, int64_t ignore_index, double eps_low, double eps_high, double dual_clip, double beta,
    int64_t kl_type, bool write_grad) {
  const at::Tensor x = logits.stride(-1) == 1 ? logits : logits.contiguous();
  at::Tensor grad = write_grad ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  auto params = make_params(eps_low, eps_high, dual_clip, beta, kl_type, !present(old_logprobs), false, write_grad);
  auto [loss, logp, entropy] = policy_rows(grad, x, labels, advantages, weights, old_logprobs, ref_logprobs,
                                           temperature, ignore_index, params);
  return {loss, logp, entropy, grad};
}

// General in-place form used by the fused LM head and the in-place-gradient mode: writes the gradient into
// ``grad`` (which may be ``logits`` itself). coef_given: weights are dL/dlogp (a log-prob backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_rows_cpu(
    at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& advantages,
    const at::Tensor& weights, const std::optional<at::Tensor>& old_logprobs,
    const std::optional<at::Tensor>& ref_logprobs, double temperature, int64_t ignore_index, double eps_low,
    double eps_high, double dual_clip, double beta, int64_t kl_type, bool coef_given, bool write_grad) {
  auto params =
      make_params(eps_low, eps_high, dual_clip, beta, kl_type, !present(old_logprobs), coef_given, write_grad);
  return policy_rows(grad, logits, labels, advantages, weights, old_logprobs, ref_logprobs, temperature,
                     ignore_index, params);
}

}  // namespace

TORCH_LIBRARY_IMPL(credit, CPU, m) {
  m.impl("policy_loss_fwd", &policy_loss_fwd_cpu);
  m.impl("policy_loss_rows_", &policy_loss_rows_cpu);
  m.impl("policy_loss_cluster_ok", [](const at::Tensor&) { return false; });
}

}  // namespace credit::cpu
