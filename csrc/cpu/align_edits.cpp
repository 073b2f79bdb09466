// CPU kernel for credit::align_edits: pairs in parallel across cores (dynamically balanced), each aligned by the framework-free core
// (csrc/core/align_edits.h) with a per-thread workspace.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "align_edits_args.h"
#include "core/align_edits.h"

namespace credit::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> align_edits_cpu(
    const at::Tensor& a, const at::Tensor& a_lengths, const at::Tensor& b, const at::Tensor& b_lengths,
    int64_t insert_anchor) {
  align::check_args(a, a_lengths, b, b_lengths, insert_anchor);
  const at::Tensor A = a.contiguous(), B = b.contiguous();
  const at::Tensor la = a_lengths.to(at::kLong).contiguous(), lb = b_lengths.to(at::kLong).contiguous();
  const int64_t P = A.size(0), La = A.size(1), Lb = B.size(1);
  // Named tensors, not structured bindings: the kernels' lambdas capture them (C++17 builds for torch 2.11).
  at::Tensor mask_a, mask_b, region_a, region_b, distance;
  std::tie(mask_a, mask_b, region_a, region_b, distance) = align::empty_outputs(A, B);
  const int64_t* lap = la.const_data_ptr<int64_t>();
  const int64_t* lbp = lb.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < P; ++r)
    TORCH_CHECK(lap[r] >= 0 && lap[r] <= La && lbp[r] >= 0 && lbp[r] <= Lb, "align_edits: pair ", r,
                " has lengths (", lap[r], ", ", lbp[r], ") outside [0, ", La, "] x [0, ", Lb, "]");

  AT_DISPATCH_INDEX_TYPES(A.scalar_type(), "align_edits_cpu", [&] {
    const index_t* ap = A.const_data_ptr<index_t>();
    const index_t* bp = B.const_data_ptr<index_t>();
    bool* ma = mask_a.mutable_data_ptr<bool>();
    bool* mb = mask_b.mutable_data_ptr<bool>();
    int32_t* ra = region_a.mutable_data_ptr<int32_t>();
    int32_t* rb = region_b.mutable_data_ptr<int32_t>();
    int32_t* dist = distance.mutable_data_ptr<int32_t>();
    const auto anchor = static_cast<core::InsertAnchor>(insert_anchor);
    // Pairs differ wildly in cost (length x edits): workers take the next pair from a shared counter.
    std::atomic<int64_t> next{0};
    // Waking the pool costs more than a small batch's whole DP (a few us idle, far more on a busy machine).
    double words = 0;
    for (int64_t r = 0; r < P; ++r) words += static_cast<double>(lap[r]) * static_cast<double>(lbp[r] + 63) / 64;
    const int64_t workers = words < 65536 ? 1 : std::min<int64_t>(at::get_num_threads(), P);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      // Reused across calls: fresh multi-megabyte buffers would cost a page fault per 4 KiB every call.
      thread_local core::AlignWorkspace ws;
      for (int64_t r = next.fetch_add(1); r < P; r = next.fetch_add(1)) {
        const int64_t n = lap[r], m = lbp[r];
        const core::EditOutputs out{ma + r * La, mb + r * Lb, ra + r * La, rb + r * Lb};
        dist[r] = static_cast<int32_t>(core::align_pair(ap + r * La, n, bp + r * Lb, m, anchor, out, ws));
        std::fill(ma + r * La + n, ma + (r + 1) * La, false);
        std::fill(mb + r * Lb + m, mb + (r + 1) * Lb, false);
        std::fill(ra + r * La + n, ra + (r + 1) * La, -1);
        std::fill(rb + r * Lb + m, rb + (r + 1) * Lb, -1);
      }
      ws.trim(int64_t(1) << 20);
    });
  });
  return {mask_a, mask_b, region_a, region_b, distance};
}

}  // namespace

TORCH_LIBRARY_IMPL(credit, CPU, m) { m.impl("align_edits", &align_edits_cpu); }

}  // namespace credit::cpu
