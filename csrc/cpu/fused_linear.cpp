// CPU fused LM head (credit::fused_linear_*): logits = hidden @ weight.T (+ bias) chunk by chunk over tokens, never
// the full (N, V) logits. Per chunk: one matmul into an (n, V) buffer, the policy-loss row kernel (policy_loss.cpp)
// overwriting it with d loss / d logits (rows in parallel), then grad_hidden[chunk] = dlogits @ W and
// grad_W += dlogits.T @ hidden[chunk]. grad_W accumulates in the weight's dtype (an fp32 copy would cost V * H * 4
// bytes); lse, loss and statistics are fp32 (fp64 for fp64 input).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "cpu/policy_loss.h"

namespace credit::cpu {
namespace {

constexpr int64_t kChunkBytes = int64_t(1) << 30;  // ~1 GiB of logits per chunk (as on GPU)

int64_t chunk_rows(int64_t N, int64_t V, int64_t elem, int64_t chunk_size) {
  if (chunk_size > 0) return chunk_size;
  int64_t rows = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(V * elem, 1));
  int64_t pow2 = 1;
  while (pow2 * 2 <= rows) pow2 *= 2;
  return std::max<int64_t>(1, std::min(pow2, N));
}

void check_args(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const at::Tensor& labels) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "fused_linear: hidden must be (N, H) and weight (V, H)");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "fused_linear: hidden and weight must share a dtype");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), "fused_linear: labels must be (N,)");
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "fused_linear: bias must be (V,)");
}

at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? at::addmm(*bias, h, weight.t()) : at::mm(h, weight.t());
}

std::optional<at::Tensor> rows_of(const std::optional<at::Tensor>& t, int64_t s, int64_t e) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->slice(0, s, e).view({1, e - s});
}

at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_policy_loss_fwd_cpu(
    const at::Tensor& hidden_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels_, const at::Tensor& advantages, const at::Tensor& weights,
    const std::optional<at::Tensor>& old_logprobs, const std::optional<at::Tensor>& ref_logprobs,
    double temperature, int64_t ignore_index, double eps_low, double eps_high, double dual_clip, double beta,
    int64_t kl_type, int64_t chunk_size, bool compute_grad) {
  check_args(hidden_, weight_, bias, labels_);
  const at::Tensor hidden = hidden_.contiguous(), weight = weight_.contiguous(), labels = labels_.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto acc = acc_dtype(hidden);
  const auto opts = hidden.options().dtype(acc);
  const at::Tensor adv = advantages.to(acc).contiguous(), w = weights.to(acc).contiguous();
  std::optional<at::Tensor> old, ref;
  if (old_logprobs.has_value() && old_logprobs->defined()) old = old_logprobs->to(acc).contiguous();
  if (ref_logprobs.has_value() && ref_logprobs->defined()) ref = ref_logprobs->to(acc).contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor logp = at::empty({N}, opts), entropy = at::empty({N}, opts), loss = at::zeros({}, opts);
  at::Tensor grad_h = compute_grad ? at::empty_like(hidden) : hidden.new_empty({0});
  at::Tensor grad_w = compute_grad ? at::zeros_like(weight) : hidden.new_empty({0});
  at::Tensor grad_b = compute_grad && has_bias ? at::zeros({V}, opts) : at::Tensor();
  const auto params = make_params(eps_low, eps_high, dual_clip, beta, kl_type, !old.has_value(), false, compute_grad);
  const int64_t C = chunk_rows(N, V, hidden.element_size(), chunk_size);
  for (int64_t s = 0; s < N; s += C) {
    const int64_t e = std::min(N, s + C);
    const at::Tensor h = hidden.slice(0, s, e);
    at::Tensor z = chunk_logits(h, weight, bias);  // (n, V): becomes d loss / d logits in place
    at::Tensor z3 = z.view({1, e - s, V});
    auto [loss_c, lp, ent] = policy_rows(z3, z3, labels.slice(0, s, e).view({1, e - s}), rows_of(adv, s, e),
                                         w.slice(0, s, e).view({1, e - s}), rows_of(old, s, e), rows_of(ref, s, e),
                                         temperature, ignore_index, params);
    loss.add_(loss_c);
    logp.slice(0, s, e).copy_(lp.view({-1}));
    entropy.slice(0, s, e).copy_(ent.view({-1}));
    if (compute_grad) {
      auto gh = grad_h.slice(0, s, e);
      at::mm_out(gh, z, weight);
      grad_w.addmm_(z.t(), h);
      if (has_bias) grad_b.add_(z.sum(0, false, acc));
    }
  }
  grad_b = grad_b.defined() ? grad_b.to(bias->scalar_type()) : hidden.new_empty({0});
  return {loss, logp, entropy, grad_h, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor> fused_linear_logprobs_fwd_cpu(const at::Tensor& hidden_, const at::Tensor& weight_,
                                                                 const std::optional<at::Tensor>& bias,
                                                                 const at::Tensor& labels_, double temperature,
                                                                 int64_t ignore_index, int64_t chunk_size) {
  check_args(hidden_, weight_, bias, labels_);
  const at::Tensor hidden = hidden_.contiguous(), weight = weight_.contiguous(), labels = labels_.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto opts = hidden.options().dtype(acc_dtype(hidden));
  at::Tensor logp = at::empty({N}, opts), entropy = at::empty({N}, opts);
  const auto params = make_params(0, 0, 0, 0, 0, true, true, false);
  const int64_t C = chunk_rows(N, V, hidden.element_size(), chunk_size);
  for (int64_t s = 0; s < N; s += C) {
    const int64_t e = std::min(N, s + C);
    at::Tensor z3 = chunk_logits(hidden.slice(0, s, e), weight, bias).view({1, e - s, V});
    auto [_, lp, ent] = policy_rows(z3, z3, labels.slice(0, s, e).view({1, e - s}), std::nullopt,
                                    at::zeros({1, e - s}, opts), std::nullopt, std::nullopt, temperature,
                                    ignore_index, params);
    logp.slice(0, s, e).copy_(lp.view({-1}));
    entropy.slice(0, s, e).copy_(ent.view({-1}));
  }
  return {logp, entropy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_logprobs_bwd_cpu(
    const at::Tensor& grad_logprobs, const at::Tensor& hidden_, const at::Tensor& weight_,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels_, double temperature, int64_t ignore_index,
    int64_t chunk_size) {
  check_args(hidden_, weight_, bias, labels_);
  const at::Tensor hidden = hidden_.contiguous(), weight = weight_.contiguous(), labels = labels_.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto acc = acc_dtype(hidden);
  const at::Tensor g = grad_logprobs.to(acc).contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor grad_h = at::empty_like(hidden), grad_w = at::zeros_like(weight);
  at::Tensor grad_b = has_bias ? at::zeros({V}, hidden.options().dtype(acc)) : at::Tensor();
  const auto params = make_params(0, 0, 0, 0, 0, true, true, true);
  const int64_t C = chunk_rows(N, V, hidden.element_size(), chunk_size);
  for (int64_t s = 0; s < N; s += C) {
    const int64_t e = std::min(N, s + C);
    const at::Tensor h = hidden.slice(0, s, e);
    at::Tensor z = chunk_logits(h, weight, bias);
    at::Tensor z3 = z.view({1, e - s, V});
    policy_rows(z3, z3, labels.slice(0, s, e).view({1, e - s}), std::nullopt, g.slice(0, s, e).view({1, e - s}),
                std::nullopt, std::nullopt, temperature, ignore_index, params);
    auto gh = grad_h.slice(0, s, e);
    at::mm_out(gh, z, weight);
    grad_w.addmm_(z.t(), h);
    if (has_bias) grad_b.add_(z.sum(0, false, acc));
  }
  return {grad_h, grad_w, has_bias ? grad_b.to(bias->scalar_type()) : hidden.new_empty({0})};
}

}  // namespace

TORCH_LIBRARY_IMPL(credit, CPU, m) {
  m.impl("fused_linear_policy_loss_fwd", &fused_linear_policy_loss_fwd_cpu);
  m.impl("fused_linear_logprobs_fwd", &fused_linear_logprobs_fwd_cpu);
  m.impl("fused_linear_logprobs_bwd", &fused_linear_logprobs_bwd_cpu);
}

}  // namespace credit::cpu
