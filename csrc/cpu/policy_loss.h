// The CPU row driver of policy_loss.cpp, behind both its ops: policy_loss_fwd and policy_loss_rows_ (the row kernel
// of the fused LM head's chunk loop, credit_ops/ops/fused_linear.py).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "policy_loss_args.h"

namespace credit::cpu {

using core::LossParams;
using pl::make_params;

// logits (B, T, V) with unit stride along V; grad (B, T, V) contiguous, or logits itself (overwritten with the
// gradient); per-token tensors (B, T). coef_given: weights are dL/dlogp. -> loss (), logprobs, entropy (B, T).
std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_rows(const at::Tensor& grad, const at::Tensor& logits,
                                                           const at::Tensor& labels,
                                                           const std::optional<at::Tensor>& advantages,
                                                           const at::Tensor& weights,
                                                           const std::optional<at::Tensor>& old_logprobs,
                                                           const std::optional<at::Tensor>& ref_logprobs,
                                                           double temperature, int64_t ignore_index,
                                                           const LossParams& params);

}  // namespace credit::cpu
