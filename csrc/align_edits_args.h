// Argument checks and outputs of credit::align_edits, shared by the CPU (csrc/cpu/align_edits.cpp) and CUDA
// (csrc/cuda/align_edits.cu) kernels. The Python wrapper validates first with friendlier errors; these guard direct
// torch.ops.credit.align_edits calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace credit::align {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline void check_args(const at::Tensor& a, const at::Tensor& a_lengths, const at::Tensor& b,
                       const at::Tensor& b_lengths, int64_t insert_anchor) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "align_edits: a, b must be (P, La), (P, Lb)");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "align_edits: a and b must share a dtype");
  TORCH_CHECK(a_lengths.numel() == a.size(0) && b_lengths.numel() == a.size(0), "align_edits: lengths must be (P,)");
  TORCH_CHECK(insert_anchor >= 0 && insert_anchor <= 2, "align_edits: insert_anchor code must be 0, 1 or 2");
}

// mask_a (P, La) bool, mask_b (P, Lb) bool, region_a (P, La) int32, region_b (P, Lb) int32, distance (P,) int32.
inline Outputs empty_outputs(const at::Tensor& a, const at::Tensor& b) {
  const int64_t P = a.size(0), La = a.size(1), Lb = b.size(1);
  const auto opts = a.options();
  return {at::empty({P, La}, opts.dtype(at::kBool)), at::empty({P, Lb}, opts.dtype(at::kBool)),
          at::empty({P, La}, opts.dtype(at::kInt)), at::empty({P, Lb}, opts.dtype(at::kInt)),
          at::empty({P}, opts.dtype(at::kInt))};
}

}  // namespace credit::align
