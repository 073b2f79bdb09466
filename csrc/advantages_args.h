// Argument checks of the advantage ops, shared by the CPU (csrc/cpu/advantages.cpp) and CUDA
// (csrc/cuda/advantages.cu) kernels. The Python wrappers validate first with friendlier errors; these guard direct
// torch.ops.credit.* calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "core/advantages.h"

namespace credit::adv {

inline at::ScalarType out_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_rows(const char* op, const char* name, const at::Tensor& x, int64_t n) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, op, ": ", name, " must be (", n, "), got ", x.sizes());
}

inline void check_optional_rows(const char* op, const char* name, const std::optional<at::Tensor>& x, int64_t n) {
  if (!x.has_value()) return;
  check_rows(op, name, *x, n);
  TORCH_CHECK(x->scalar_type() == at::kLong, op, ": ", name, " must be int64");
}

inline void check_group_advantages(const at::Tensor& rewards, const at::Tensor& group_ids, int64_t num_groups,
                                   int64_t mode) {
  TORCH_CHECK(rewards.dim() == 1, "group_advantages: rewards must be (N,), got ", rewards.sizes());
  check_rows("group_advantages", "group_ids", group_ids, rewards.size(0));
  TORCH_CHECK(mode >= kGrpo && mode <= kBatch, "group_advantages: unknown mode ", mode);
  TORCH_CHECK(num_groups >= 0, "group_advantages: num_groups must be >= 0");
}

inline void check_ibpo_shaping(const at::Tensor& rewards, const at::Tensor& n_correct, const at::Tensor& n_valid) {
  TORCH_CHECK(rewards.dim() == 1, "ibpo_shaping: rewards must be (N,), got ", rewards.sizes());
  check_rows("ibpo_shaping", "n_correct", n_correct, rewards.size(0));
  check_rows("ibpo_shaping", "n_valid", n_valid, rewards.size(0));
  TORCH_CHECK(n_correct.scalar_type() == at::kLong && n_valid.scalar_type() == at::kLong,
              "ibpo_shaping: n_correct and n_valid must be int64");
}

inline void check_token_advantages(const at::Tensor& seq_adv, const at::Tensor& mask, const at::Tensor& wrong,
                                   const at::Tensor& has_repair, const std::optional<at::Tensor>& lengths,
                                   const std::optional<at::Tensor>& starts) {
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kBool, "token_advantages: mask must be bool (B, T)");
  const int64_t B = mask.size(0);
  check_rows("token_advantages", "seq_adv", seq_adv, B);
  check_rows("token_advantages", "wrong", wrong, B);
  check_rows("token_advantages", "has_repair", has_repair, B);
  TORCH_CHECK(wrong.scalar_type() == at::kBool && has_repair.scalar_type() == at::kBool,
              "token_advantages: wrong and has_repair must be bool");
  check_optional_rows("token_advantages", "lengths", lengths, B);
  check_optional_rows("token_advantages", "starts", starts, B);
}

inline void check_repair_advantages(const at::Tensor& seq_adv, const at::Tensor& mask, const at::Tensor& repair_of,
                                    const at::Tensor& selected, const std::optional<at::Tensor>& lengths,
                                    const std::optional<at::Tensor>& starts) {
  TORCH_CHECK(seq_adv.dim() == 1, "repair_advantages: seq_adv must be (N,)");
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kBool, "repair_advantages: mask must be bool (M, T)");
  const int64_t M = mask.size(0);
  check_rows("repair_advantages", "repair_of", repair_of, M);
  check_rows("repair_advantages", "selected", selected, M);
  TORCH_CHECK(repair_of.scalar_type() == at::kLong, "repair_advantages: repair_of must be int64");
  TORCH_CHECK(selected.scalar_type() == at::kBool, "repair_advantages: selected must be bool");
  check_optional_rows("repair_advantages", "lengths", lengths, M);
  check_optional_rows("repair_advantages", "starts", starts, M);
}

}  // namespace credit::adv
