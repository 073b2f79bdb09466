// Loss parameters and argument checks of the policy-loss row ops, shared by the CPU (csrc/cpu/policy_loss.cpp,
// csrc/cpu/fused_linear.cpp) and CUDA (csrc/cuda/policy_loss.cu) kernels. The Python wrappers validate first with
// friendlier errors; these guard direct torch.ops.credit.* calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "core/policy_loss.h"

namespace credit::pl {

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline core::LossParams make_params(double eps_low, double eps_high, double dual_clip, double beta, int64_t kl_type,
                                    bool on_policy, bool coef_given, bool write_grad) {
  TORCH_CHECK(kl_type >= 0 && kl_type <= 3, "policy_loss: kl_type must be 0..3");
  return core::LossParams{1.0 - eps_low, 1.0 + eps_high, dual_clip, beta, beta != 0.0 ? kl_type : 0,
                          on_policy, coef_given, write_grad};
}

// logits (B, T, V) with unit stride along V; labels (B, T) int32 / int64; grad, when written, a contiguous tensor
// like logits (or logits itself); weights and the per-token tensors the parameters use (B, T).
inline void check_rows(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                       const std::optional<at::Tensor>& advantages, const at::Tensor& weights,
                       const std::optional<at::Tensor>& old_logprobs, const std::optional<at::Tensor>& ref_logprobs,
                       double temperature, const core::LossParams& p) {
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1, "policy_loss: logits must be (B, T, V), unit stride in V");
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1),
              "policy_loss: labels must be (B, T)");
  TORCH_CHECK(labels.scalar_type() == at::kInt || labels.scalar_type() == at::kLong,
              "policy_loss: labels must be int32 or int64");
  TORCH_CHECK(temperature > 0, "policy_loss: temperature must be > 0");
  if (p.write_grad)
    TORCH_CHECK(grad.sizes() == logits.sizes() && grad.is_contiguous() && grad.scalar_type() == logits.scalar_type() &&
                    grad.device() == logits.device(),
                "policy_loss: grad must be a contiguous tensor like logits");
  const int64_t N = logits.size(0) * logits.size(1);
  const auto rows = [N](const std::optional<at::Tensor>& t) { return present(t) && t->numel() == N; };
  TORCH_CHECK(weights.numel() == N, "policy_loss: weights must be (B, T)");
  TORCH_CHECK(p.coef_given || rows(advantages), "policy_loss: advantages must be (B, T)");
  TORCH_CHECK(p.on_policy || rows(old_logprobs), "policy_loss: old_logprobs must be (B, T)");
  TORCH_CHECK(p.kl_type == 0 || rows(ref_logprobs), "policy_loss: ref_logprobs must be (B, T) when beta != 0");
}

}  // namespace credit::pl
