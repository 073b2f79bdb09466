// CUDA kernel for credit::align_edits: one warp per pair (warps loop over pairs), the same canonical script as
// the CPU core (csrc/core/align_edits.h) and the reference DP.
//
// Per pair: trim the common prefix/suffix with ballots; Hyyro's block-based bit-parallel DP over the core,
// b's bits split into strips of 32 words (one word per lane) and a's rows pipelined across the lanes (lane l
// works on row t - l at step t, the horizontal carry moves one lane per step through a shuffle; strips run
// one after the other, the column between strips goes through global scratch). A strip only runs the rows
// where it meets the diagonal band that can hold a path of cost <= k (k: |n - m| + 512 first; when the banded
// distance exceeds k, once more with k = that distance, which is then exact). Per cell the DP keeps two
// bits (D0 and HP) for the traceback. Scratch per warp is bounded: when a pair's bits exceed it, the forward
// pass only keeps checkpoints every R rows and the traceback recomputes one block of R rows at a time.
// Scratch is sized from the padded widths on the host, so nothing waits on the device.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "align_edits_args.h"
#include "cuda/align_edits_kernel.cuh"

namespace credit::cuda {
namespace {

using namespace credit::cuda_kernels;

int64_t env_bytes(const char* name, int64_t fallback_mib) {
  const char* v = std::getenv(name);
  const int64_t mib = v ? std::atoll(v) : fallback_mib;
  return std::max<int64_t>(mib, 1) << 20;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> align_edits_cuda(
    const at::Tensor& a, const at::Tensor& a_lengths, const at::Tensor& b, const at::Tensor& b_lengths,
    int64_t insert_anchor) {
  align::check_args(a, a_lengths, b, b_lengths, insert_anchor);
  TORCH_CHECK(a.size(1) < (int64_t(1) << 30) && b.size(1) < (int64_t(1) << 30), "align_edits: sequences too long");
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor A = a.contiguous(), B = b.contiguous();
  const at::Tensor la = a_lengths.to(at::kLong).contiguous(), lb = b_lengths.to(at::kLong).contiguous();
  const int64_t P = A.size(0), La = A.size(1), Lb = B.size(1);
  // Named tensors, not structured bindings: the kernels' lambdas capture them (C++17 builds for torch 2.11).
  at::Tensor mask_a, mask_b, region_a, region_b, distance;
  std::tie(mask_a, mask_b, region_a, region_b, distance) = align::empty_outputs(A, B);
  if (P == 0) return {mask_a, mask_b, region_a, region_b, distance};

  Scratch scr = plan_scratch(La, Lb, env_bytes("CREDIT_OPS_ALIGN_WARP_SCRATCH_MB", 8));
  const int64_t total_budget = env_bytes("CREDIT_OPS_ALIGN_SCRATCH_MB", 1024);
  // Warps loop over pairs, so more warps than fit on the device at once only add scratch.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.get_device()));
  const int64_t resident = std::max<int64_t>(1, static_cast<int64_t>(sms) * 2 * kWarps);  // 2 blocks/SM at ~190 regs
  const int64_t num_warps = std::clamp<int64_t>(std::min(total_budget / scr.per_warp, resident), 1, P);
  at::Tensor scratch = at::empty({num_warps * scr.per_warp}, A.options().dtype(at::kByte));
  scr.base = scratch.mutable_data_ptr<uint8_t>();

  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t grid = (num_warps + kWarps - 1) / kWarps;
  AT_DISPATCH_INDEX_TYPES(A.scalar_type(), "align_edits_cuda", [&] {
    align_edits_kernel<index_t><<<static_cast<unsigned>(grid), kWarps * 32, 0, stream>>>(
        A.const_data_ptr<index_t>(), la.const_data_ptr<int64_t>(), B.const_data_ptr<index_t>(),
        lb.const_data_ptr<int64_t>(), P, static_cast<int>(La), static_cast<int>(Lb), static_cast<int>(insert_anchor),
        mask_a.mutable_data_ptr<bool>(), mask_b.mutable_data_ptr<bool>(), region_a.mutable_data_ptr<int32_t>(),
        region_b.mutable_data_ptr<int32_t>(), distance.mutable_data_ptr<int32_t>(), scr, num_warps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mask_a, mask_b, region_a, region_b, distance};
}

}  // namespace

TORCH_LIBRARY_IMPL(credit, CUDA, m) { m.impl("align_edits", &align_edits_cuda); }

}  // namespace credit::cuda
