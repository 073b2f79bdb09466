// CUDA kernels for the credit:: advantage ops. Group statistics: three launches of warp-aggregated float64
// atomics keyed by group id (ids unsorted, groups of any size, no sort, no host synchronisation); token
// advantages: a 2-D grid of rows x column chunks, one pass that reads the mask and writes both outputs.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "advantages_args.h"

namespace credit::cuda {
namespace {

using namespace credit::adv;

constexpr int kThreads = 256;
constexpr int kTokensPerThread = 4;
constexpr int64_t kMaxBlocks = 65535;


int64_t blocks_for(int64_t n, int64_t per_block) {
  return std::min<int64_t>(std::max<int64_t>((n + per_block - 1) / per_block, 1), kMaxBlocks);
}

// Adds v into acc[key] once per distinct key among the warp's lanes (key < 0: the lane adds nothing), and the
// number of lanes with that key into cnt[key] when cnt is given. Sorted or clustered ids (the usual layout of
// G samples per prompt) turn 32 atomics into one or two; arbitrary ids still work.
__device__ inline void warp_aggregated_add(int64_t key, double v, double* acc, double* cnt) {
  __shared__ double vals[kThreads];
  const int lane = threadIdx.x & 31;
  const int base = threadIdx.x - lane;
  vals[threadIdx.x] = v;
  __syncwarp();
  const unsigned peers = __match_any_sync(0xffffffffu, static_cast<unsigned long long>(key));
  if (key >= 0 && lane == __ffs(peers) - 1) {
    double s = 0.0;
    for (unsigned p = peers; p; p &= p - 1) s += vals[base + __ffs(p) - 1];
    atomicAdd(acc + key, s);
    if (cnt) atomicAdd(cnt + key, static_cast<double>(__popc(peers)));
  }
  __syncwarp();
}

template <typename index_t>
__device__ inline int64_t group_of(const index_t* ids, int64_t i, int64_t G, bool batch) {
  if (batch) return 0;
  const int64_t g = static_cast<int64_t>(ids[i]);
  return (g >= 0 && g < G) ? g : -1;
}

// Every thread of a block runs the same number of iterations: the warp-level intrinsics need all lanes.
template <typename scalar_t, typename index_t>
__global__ void group_sum_kernel(const scalar_t* __restrict__ r, const index_t* __restrict__ ids, int64_t N,
                                 int64_t G, bool batch, double* cnt, double* sum) {
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < N;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const int64_t g = i < N ? group_of(ids, i, G, batch) : -1;
    warp_aggregated_add(g, g >= 0 ? static_cast<double>(r[i]) : 0.0, sum, cnt);
  }
}

// Sum of squared deviations from the group mean: a second pass, so rewards far from 0 do not cancel.
template <typename scalar_t, typename index_t>
__global__ void group_m2_kernel(const scalar_t* __restrict__ r, const index_t* __restrict__ ids, int64_t N,
                                int64_t G, bool batch, const double* cnt, const double* sum, double* m2) {
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < N;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const int64_t g = i < N ? group_of(ids, i, G, batch) : -1;
    double d = 0.0;
    if (g >= 0) d = static_cast<double>(r[i]) - sum[g] / cnt[g];
    warp_aggregated_add(g, d * d, m2, nullptr);
  }
}

template <typename scalar_t, typename index_t>
__global__ void group_adv_kernel(const scalar_t* __restrict__ r, const index_t* __restrict__ ids, int64_t N,
                                 int64_t G, bool batch, const double* cnt, const double* sum, const double* m2,
                                 int64_t mode, double eps, scalar_t* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = group_of(ids, i, G, batch);
    // An id out of range (value checks off) gives NaN rather than a silent 0 or an out-of-bounds write.
    out[i] = g < 0 ? std::numeric_limits<scalar_t>::quiet_NaN()
                   : group_advantage<scalar_t>(r[i], cnt[g], sum[g] / cnt[g], m2[g], mode, eps);
  }
}

template <typename scalar_t>
__global__ void ibpo_shaping_kernel(const scalar_t* __restrict__ r, const int64_t* __restrict__ n_correct,
                                    const int64_t* __restrict__ n_valid, int64_t N, double rho, double lam,
                                    double threshold, scalar_t* __restrict__ shaped, scalar_t* __restrict__ phi) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const scalar_t p = ibpo_phi<scalar_t>(r[i], n_correct[i], n_valid[i], rho, threshold);
    phi[i] = p;
    shaped[i] = static_cast<scalar_t>(static_cast<double>(r[i]) + lam * static_cast<double>(p));
  }
}

// Row kind and value: sample rows from (wrong, has_repair), repair rows from (selected, repair_of).
struct SampleRows {
  const bool* wrong;
  const bool* has_repair;
  bool sign_guard, correct_in_loss;
  template <typename scalar_t>
  __device__ void operator()(const scalar_t* seq_adv, int64_t row, int* kind, scalar_t* value) const {
    sample_row<scalar_t>(seq_adv[row], wrong[row], has_repair[row], sign_guard, correct_in_loss, kind, value);
  }
};

struct RepairRows {
  const int64_t* repair_of;
  const bool* selected;
  int64_t n_samples;
  template <typename scalar_t>
  __device__ void operator()(const scalar_t* seq_adv, int64_t row, int* kind, scalar_t* value) const {
    const int64_t s = repair_of[row];
    const bool ok = selected[row] && s >= 0 && s < n_samples;
    *kind = ok ? kMasked : kDropped;
    *value = ok ? static_cast<scalar_t>(::fabs(static_cast<double>(seq_adv[s]))) : scalar_t(0);
  }
};

template <typename scalar_t, typename Rows>
__global__ void token_kernel(const bool* __restrict__ mask, const scalar_t* __restrict__ seq_adv, Rows rows,
                             const int64_t* __restrict__ ends, const int64_t* __restrict__ starts, int64_t T,
                             scalar_t unmasked, scalar_t* __restrict__ adv, scalar_t* __restrict__ gates) {
  const int64_t row = blockIdx.x;
  int kind;
  scalar_t value;
  rows(seq_adv, row, &kind, &value);
  const int64_t lo = starts ? starts[row] : 0, hi = ends ? ends[row] : T;
  const int64_t off = row * T;  // int64: rows * T exceeds 2^31 on large batches
  for (int64_t t = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; t < T;
       t += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const scalar_t g = token_gate<scalar_t>(kind, mask[off + t], t >= lo && t < hi, unmasked);
    gates[off + t] = g;
    adv[off + t] = g * value;
  }
}

// The data pointer of an optional (already checked) per-row int64 tensor, kept alive by holder.
const int64_t* optional_rows(const char* op, const char* name, const std::optional<at::Tensor>& x,
                             at::Tensor& holder) {
  if (!x.has_value()) return nullptr;
  TORCH_CHECK(x->is_cuda(), op, ": ", name, " must be on the GPU");
  holder = x->contiguous();
  return holder.const_data_ptr<int64_t>();
}

at::Tensor group_advantages_cuda(const at::Tensor& rewards, const at::Tensor& group_ids, int64_t num_groups,
                                 int64_t mode, double eps) {
  check_group_advantages(rewards, group_ids, num_groups, mode);
  TORCH_CHECK(group_ids.is_cuda(), "group_advantages: group_ids must be on the GPU of rewards");
  c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t N = rewards.size(0);
  const bool batch = mode == kBatch;
  const int64_t G = batch ? 1 : num_groups;
  const at::Tensor r = rewards.to(out_dtype(rewards)).contiguous();
  const at::Tensor ids = group_ids.contiguous();
  at::Tensor out = at::empty({N}, r.options());
  if (N == 0) return out;
  at::Tensor acc = at::zeros({3, std::max<int64_t>(G, 1)}, r.options().dtype(at::kDouble));
  double* cnt = acc.mutable_data_ptr<double>();
  double* sum = cnt + acc.size(1);
  double* m2 = sum + acc.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = blocks_for(N, kThreads);
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "group_advantages_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "group_advantages_cuda", [&] {
      const scalar_t* rp = r.const_data_ptr<scalar_t>();
      const index_t* gp = ids.const_data_ptr<index_t>();
      group_sum_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(rp, gp, N, G, batch, cnt, sum);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      group_m2_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(rp, gp, N, G, batch, cnt, sum, m2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      group_adv_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
          rp, gp, N, G, batch, cnt, sum, m2, mode, eps, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ibpo_shaping_cuda(const at::Tensor& rewards, const at::Tensor& n_correct,
                                                     const at::Tensor& n_valid, double rho, double lam,
                                                     double threshold) {
  check_ibpo_shaping(rewards, n_correct, n_valid);
  const int64_t N = rewards.size(0);
  TORCH_CHECK(n_correct.is_cuda() && n_valid.is_cuda(), "ibpo_shaping: all tensors must be on the GPU");
  c10::cuda::CUDAGuard guard(rewards.device());
  const at::Tensor r = rewards.to(out_dtype(rewards)).contiguous();
  const at::Tensor nc = n_correct.contiguous(), nv = n_valid.contiguous();
  at::Tensor shaped = at::empty({N}, r.options()), phi = at::empty({N}, r.options());
  if (N == 0) return {shaped, phi};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "ibpo_shaping_cuda", [&] {
    ibpo_shaping_kernel<scalar_t><<<blocks_for(N, kThreads), kThreads, 0, stream>>>(
        r.const_data_ptr<scalar_t>(), nc.const_data_ptr<int64_t>(), nv.const_data_ptr<int64_t>(), N, rho, lam,
        threshold, shaped.mutable_data_ptr<scalar_t>(), phi.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {shaped, phi};
}

template <typename scalar_t, typename Rows>
void launch_tokens(const at::Tensor& mask, const at::Tensor& seq_adv, Rows rows, const int64_t* ends,
                   const int64_t* starts, scalar_t unmasked, at::Tensor& adv, at::Tensor& gates) {
  const int64_t R = mask.size(0), T = mask.size(1);
  if (R == 0 || T == 0) return;
  TORCH_CHECK(R <= std::numeric_limits<int32_t>::max(), "too many rows for one launch: ", R);
  const dim3 grid(static_cast<unsigned>(R), static_cast<unsigned>(blocks_for(T, kThreads * kTokensPerThread)));
  token_kernel<scalar_t, Rows><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      mask.const_data_ptr<bool>(), seq_adv.const_data_ptr<scalar_t>(), rows, ends, starts, T, unmasked,
      adv.mutable_data_ptr<scalar_t>(), gates.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> token_advantages_cuda(const at::Tensor& seq_adv, const at::Tensor& mask,
                                                         const at::Tensor& wrong, const at::Tensor& has_repair,
                                                         const std::optional<at::Tensor>& lengths,
                                                         const std::optional<at::Tensor>& starts, bool sign_guard,
                                                         double unmasked_weight, bool correct_in_loss) {
  check_token_advantages(seq_adv, mask, wrong, has_repair, lengths, starts);
  const int64_t B = mask.size(0), T = mask.size(1);
  TORCH_CHECK(seq_adv.is_cuda() && wrong.is_cuda() && has_repair.is_cuda(),
              "token_advantages: all tensors must be on the GPU");
  c10::cuda::CUDAGuard guard(mask.device());
  at::Tensor ends_holder, starts_holder;
  const int64_t* ends = optional_rows("token_advantages", "lengths", lengths, ends_holder);
  const int64_t* begins = optional_rows("token_advantages", "starts", starts, starts_holder);
  const at::Tensor a = seq_adv.to(out_dtype(seq_adv)).contiguous();
  const at::Tensor m = mask.contiguous(), w = wrong.contiguous(), h = has_repair.contiguous();
  at::Tensor adv = at::empty({B, T}, a.options()), gates = at::empty({B, T}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "token_advantages_cuda", [&] {
    SampleRows rows{w.const_data_ptr<bool>(), h.const_data_ptr<bool>(), sign_guard, correct_in_loss};
    launch_tokens<scalar_t>(m, a, rows, ends, begins, static_cast<scalar_t>(unmasked_weight), adv, gates);
  });
  return {adv, gates};
}

std::tuple<at::Tensor, at::Tensor> repair_advantages_cuda(const at::Tensor& seq_adv, const at::Tensor& mask,
                                                          const at::Tensor& repair_of, const at::Tensor& selected,
                                                          const std::optional<at::Tensor>& lengths,
                                                          const std::optional<at::Tensor>& starts) {
  check_repair_advantages(seq_adv, mask, repair_of, selected, lengths, starts);
  const int64_t N = seq_adv.size(0), M = mask.size(0), T = mask.size(1);
  TORCH_CHECK(seq_adv.is_cuda() && repair_of.is_cuda() && selected.is_cuda(),
              "repair_advantages: all tensors must be on the GPU");
  c10::cuda::CUDAGuard guard(mask.device());
  at::Tensor ends_holder, starts_holder;
  const int64_t* ends = optional_rows("repair_advantages", "lengths", lengths, ends_holder);
  const int64_t* begins = optional_rows("repair_advantages", "starts", starts, starts_holder);
  const at::Tensor a = seq_adv.to(out_dtype(seq_adv)).contiguous();
  const at::Tensor m = mask.contiguous(), src = repair_of.contiguous(), sel = selected.contiguous();
  at::Tensor adv = at::empty({M, T}, a.options()), gates = at::empty({M, T}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "repair_advantages_cuda", [&] {
    RepairRows rows{src.const_data_ptr<int64_t>(), sel.const_data_ptr<bool>(), N};
    launch_tokens<scalar_t>(m, a, rows, ends, begins, scalar_t(0), adv, gates);
  });
  return {adv, gates};
}

}  // namespace

TORCH_LIBRARY_IMPL(credit, CUDA, m) {
  m.impl("group_advantages", &group_advantages_cuda);
  m.impl("ibpo_shaping", &ibpo_shaping_cuda);
  m.impl("token_advantages", &token_advantages_cuda);
  m.impl("repair_advantages", &repair_advantages_cuda);
}

}  // namespace credit::cuda
