// CPU kernels for credit::token_logprobs_{fwd,bwd}: rows in parallel, two passes over each row
// (max, then exp-sums: softmax_rows.h) on an fp32 copy; entropy comes from the same exp-sums at no extra exp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/softmax_rows.h"
#include "cpu/vec_math.h"

namespace credit::cpu {
namespace {

// log-sum-exp and entropy of one row of z / T.
template <typename acc_t>
inline void row_stats(const acc_t* z, int64_t V, acc_t inv_t, acc_t* lse, acc_t* entropy) {
  acc_t m, S, Tt;
  row_exp(z, static_cast<acc_t*>(nullptr), V, inv_t, &m, &S, &Tt);
  *lse = m + std::log(S);
  *entropy = std::log(S) - Tt / S;
}

// d/dz of (g * logp_y + ge * H), without the one-hot term: (1/T) * (-g * p - ge * p * (log p + H)).
CREDIT_INLINE void row_grad_impl(const float* z, int64_t V, float inv_t, float lse, float H, float g, float ge,
                                 float* out) {
  const int64_t body = V - V % kVec;
  for (int64_t i = 0; i < body; i += kVec) {
    vfloat logp = vclamp_lo(loadv(z + i) * inv_t - lse, -87.0f);  // a NaN lse / logit gives a NaN gradient
    vfloat p = vexp(logp);
    storev(out + i, (-g * p - ge * p * (logp + H)) * inv_t);
  }
  for (int64_t i = body; i < V; ++i) {
    float logp = std::max(z[i] * inv_t - lse, -87.0f);
    float p = std::exp(logp);
    out[i] = inv_t * (-g * p - ge * p * (logp + H));
  }
}

CREDIT_CPU_DISPATCH(row_grad,
                    (const float* z, int64_t V, float inv_t, float lse, float H, float g, float ge, float* out),
                    (z, V, inv_t, lse, H, g, ge, out))

void row_grad(const double* z, int64_t V, double inv_t, double lse, double H, double g, double ge, double* out) {
  for (int64_t i = 0; i < V; ++i) {
    double logp = z[i] * inv_t - lse;
    double p = std::exp(logp);
    out[i] = p == 0.0 ? 0.0 : inv_t * (-g * p - ge * p * (logp + H));
  }
}

inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

// Rows of (B, T, V) logits with unit stride along V: row r = (b, t) starts at b * stride(0) + t * stride(1), so
// the usual logits[:, :-1] slice of a (B, T + 1, V) model output needs no copy.
inline at::Tensor unit_stride_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 3, "token_logprobs: logits must be (B, T, V), got ", logits.sizes());
  return logits.stride(2) == 1 ? logits : logits.contiguous();
}

template <typename scalar_t>
inline const scalar_t* row_ptr(const at::Tensor& x, const scalar_t* base, int64_t r) {
  const int64_t T = x.size(1);
  return base + (r / T) * x.stride(0) + (r % T) * x.stride(1);
}

inline at::ScalarType stats_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(const at::Tensor& logits,
                                                                      const at::Tensor& labels, double temperature,
                                                                      int64_t ignore_index, bool return_entropy) {
  const at::Tensor x = unit_stride_rows(logits);
  TORCH_CHECK(labels.sizes() == x.sizes().slice(0, 2), "token_logprobs_fwd: labels must be (B, T)");
  TORCH_CHECK(temperature > 0, "token_logprobs_fwd: temperature must be > 0");
  const at::Tensor y = labels.contiguous();
  const int64_t N = y.numel(), V = x.size(2);
  auto opts = x.options().dtype(stats_dtype(x));
  at::Tensor logprobs = at::empty(y.sizes(), opts);
  at::Tensor entropy = return_entropy ? at::empty(y.sizes(), opts) : at::empty({0}, opts);
  at::Tensor lse = at::empty(y.sizes(), opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "token_logprobs_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(y.scalar_type(), "token_logprobs_fwd_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const index_t* yp = y.const_data_ptr<index_t>();
      acc_t* lp = logprobs.mutable_data_ptr<acc_t>();
      acc_t* ls = lse.mutable_data_ptr<acc_t>();
      acc_t* ent = return_entropy ? entropy.mutable_data_ptr<acc_t>() : nullptr;
      const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
      at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf;
        for (int64_t i = begin; i < end; ++i) {
          const int64_t label = yp[i];
          if (label == ignore_index) {
            lp[i] = 0, ls[i] = 0;
            if (ent) ent[i] = 0;
            continue;
          }
          TORCH_CHECK(label >= 0 && label < V, "token_logprobs_fwd: label ", label, " out of range [0, ", V, ")");
          const acc_t* z = row_as_acc<scalar_t, acc_t>(row_ptr(x, xp, i), V, buf);
          acc_t row_lse, row_entropy;
          row_stats(z, V, inv_t, &row_lse, &row_entropy);
          ls[i] = row_lse;
          lp[i] = z[label] * inv_t - row_lse;
          if (ent) ent[i] = row_entropy;
        }
      });
    });
  });
  return {logprobs, entropy, lse};
}

at::Tensor token_logprobs_bwd_cpu(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                                  const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                  const std::optional<at::Tensor>& entropy, double temperature,
                                  int64_t ignore_index) {
  const at::Tensor x = unit_stride_rows(logits);
  const bool with_entropy = grad_entropy.has_value() && grad_entropy->defined() && grad_entropy->numel() > 0;
  TORCH_CHECK(!with_entropy || (entropy.has_value() && entropy->numel() == labels.numel()),
              "token_logprobs_bwd: entropy values are needed for its gradient");
  const at::Tensor y = labels.contiguous();
  const auto acc_dtype = stats_dtype(x);
  const at::Tensor g = grad_logprobs.to(acc_dtype).contiguous();
  const at::Tensor ge = with_entropy ? grad_entropy->to(acc_dtype).contiguous() : at::Tensor();
  const at::Tensor H = with_entropy ? entropy->to(acc_dtype).contiguous() : at::Tensor();
  const at::Tensor L = lse.to(acc_dtype).contiguous();
  const int64_t N = y.numel(), V = x.size(2);
  at::Tensor grad = at::empty(x.sizes(), x.options());  // contiguous (B, T, V)

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "token_logprobs_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(y.scalar_type(), "token_logprobs_bwd_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const index_t* yp = y.const_data_ptr<index_t>();
      const acc_t* gp = g.const_data_ptr<acc_t>();
      const acc_t* gep = with_entropy ? ge.const_data_ptr<acc_t>() : nullptr;
      const acc_t* hp = with_entropy ? H.const_data_ptr<acc_t>() : nullptr;
      const acc_t* lp = L.const_data_ptr<acc_t>();
      scalar_t* out = grad.mutable_data_ptr<scalar_t>();
      const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
      at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf, gbuf;
        for (int64_t i = begin; i < end; ++i) {
          const int64_t label = yp[i];
          scalar_t* row_out = out + i * V;
          if (label == ignore_index) {
            std::fill(row_out, row_out + V, scalar_t(0));
            continue;
          }
          TORCH_CHECK(label >= 0 && label < V, "token_logprobs_bwd: label ", label, " out of range [0, ", V, ")");
          const acc_t* z = row_as_acc<scalar_t, acc_t>(row_ptr(x, xp, i), V, buf);
          // The gradient row in acc_t: written straight into the output when the types agree.
          acc_t* d = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(row_out) : (gbuf.resize(V), gbuf.data());
          row_grad(z, V, inv_t, lp[i], gep ? hp[i] : acc_t(0), gp[i], gep ? gep[i] : acc_t(0), d);
          d[label] += inv_t * gp[i];
          if constexpr (!std::is_same_v<scalar_t, acc_t>)
            for (int64_t j = 0; j < V; ++j) row_out[j] = static_cast<scalar_t>(d[j]);
        }
      });
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(credit, CPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd_cpu);
}

}  // namespace credit::cpu
