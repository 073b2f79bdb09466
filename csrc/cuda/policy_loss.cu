// CUDA implementation of credit::policy_loss_rows_ on Hopper (sm_90): the thread-block-cluster row kernel of
// policy_loss_cluster.cuh, one cluster of up to 8 CTAs per row, each logit read once and its gradient written
// once. Chosen at run time by the Python driver (credit_ops/ops/policy_loss.py) where
// credit::policy_loss_cluster_ok says it can run; the portable Triton kernels cover every other GPU.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "cuda/policy_loss_cluster.cuh"
#include "policy_loss_args.h"

namespace credit::cuda {
namespace {

namespace cg = cooperative_groups;
using cuda_kernels::kMaxCluster;
using cuda_kernels::kRowThreads;
using cuda_kernels::RowArgs;
using cuda_kernels::RowPartial;

// The hardware side of policy_loss_cluster.cuh's interface: cluster rank / size / barriers / distributed shared
// memory, and the bulk copy of a slice into shared memory. Cooperative groups and these instructions exist for
// sm_90 only: the sm_80 pass compiles the kernel as a trap.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define CREDIT_NO_CLUSTER 1
#endif
struct Hw {
#ifndef CREDIT_NO_CLUSTER
  __device__ static int rank() { return static_cast<int>(cg::this_cluster().block_rank()); }
  __device__ static int size() { return static_cast<int>(cg::this_cluster().num_blocks()); }
  __device__ static void sync() { cg::this_cluster().sync(); }
  // split barrier: arrive once done reading the siblings' shared memory, wait before exiting
  __device__ static void arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
  __device__ static void wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }
  template <typename X>
  __device__ static X* map(X* p, int rank) {
    return cg::this_cluster().map_shared_rank(p, rank);
  }
  // bytes (a multiple of 16, 16-byte aligned ends) from global to this CTA's shared memory with one bulk
  // asynchronous copy completing on a single-use mbarrier; every thread returns once the data has landed
  __device__ static void load(void* dst, const void* src, uint32_t bytes, uint64_t* mbar) {
    const auto bar = static_cast<uint32_t>(__cvta_generic_to_shared(mbar));
    if (threadIdx.x == 0) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar));
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
      if (bytes > 0)
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
            "l"(src), "r"(bytes), "r"(bar)
            : "memory");
    }
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], 0;\n"
        "@!done bra WAIT;\n"
        "}\n" ::"r"(bar)
        : "memory");
  }
#endif
};

template <typename S>
__global__ void __launch_bounds__(kRowThreads) policy_rows_cluster_kernel(RowArgs args) {
#ifndef CREDIT_NO_CLUSTER
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ RowPartial red[32];
  __shared__ RowPartial part;
  __shared__ float bcast[2];
  __shared__ uint64_t mbar;
  cuda_kernels::policy_rows_cluster_cta<S, Hw, kRowThreads>(args, reinterpret_cast<S*>(smem), red, &part, bcast,
                                                            &mbar);
#else
  __trap();  // host code launches it only on sm_90 devices
#endif
}

// Cluster size and per-CTA slice for V logits of `elem` bytes: the fewest CTAs (<= 8) whose slice fits the
// shared memory budget, at least 2 (one CTA per row is the Triton per-row kernel's job). 0 when V does not fit.
struct Layout {
  int cluster = 0;
  int64_t slice = 0, smem = 0;
};

Layout plan(int64_t V, int64_t elem, int64_t smem_budget) {
  const int64_t vec = 16 / elem;
  for (int c = 2; c <= kMaxCluster; c *= 2) {
    const int64_t slice = ((V + c - 1) / c + vec - 1) / vec * vec;
    // 48 KiB per CTA or less keeps ~4 CTAs per SM in flight (their loads overlap each other's barriers)
    if (slice * elem <= smem_budget && (slice * elem <= 48 * 1024 || c == kMaxCluster)) return {c, slice, slice * elem};
  }
  return {};
}

int64_t smem_budget(int device) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return optin - static_cast<int64_t>(sizeof(RowPartial)) * 33 - 64;  // minus the static arrays
}

template <typename S>
cudaLaunchConfig_t config(int64_t rows, const Layout& lay, cudaStream_t stream, cudaLaunchAttribute* attr) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(policy_rows_cluster_kernel<S>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(lay.smem)));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(rows * lay.cluster));
  cfg.blockDim = dim3(kRowThreads);
  cfg.dynamicSmemBytes = lay.smem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = lay.cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// How many clusters of this layout the device co-schedules (0: the launch would fail); cached per shape.
int max_active_clusters(int device, int64_t elem, const Layout& lay) {
  static std::mutex mu;
  static std::map<std::tuple<int, int64_t, int64_t>, int> cache;
  const auto key = std::make_tuple(device, elem, lay.slice);
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  cudaLaunchAttribute attr[1];
  int n = 0;
  cudaError_t err;
  if (elem == 2) {  // bf16 and fp16 kernels have the same resources
    auto cfg = config<__nv_bfloat16>(1, lay, nullptr, attr);
    err = cudaOccupancyMaxActiveClusters(&n, policy_rows_cluster_kernel<__nv_bfloat16>, &cfg);
  } else {
    auto cfg = config<float>(1, lay, nullptr, attr);
    err = cudaOccupancyMaxActiveClusters(&n, policy_rows_cluster_kernel<float>, &cfg);
  }
  if (err != cudaSuccess) (void)cudaGetLastError(), n = 0;
  return cache[key] = n;
}

bool supported_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

bool aligned16(const at::Tensor& t) {
  const int64_t e = t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * e) % 16 == 0 &&
         (t.stride(1) * e) % 16 == 0;
}

// Why the cluster kernel cannot take these logits ("" when it can); its layout in *lay when it can.
std::string unsupported(const at::Tensor& logits, Layout* lay = nullptr) {
  if (!logits.is_cuda()) return "logits are not on a CUDA device";
  const auto prop = at::cuda::getDeviceProperties(logits.get_device());
  if (prop->major != 9) return "the cluster kernel is built for Hopper (sm_90) only";
  if (logits.dim() != 3 || logits.stride(2) != 1) return "logits must be (B, T, V) with unit stride along V";
  if (!supported_dtype(logits)) return "logits must be float32, bfloat16 or float16";
  if (!aligned16(logits) || (logits.size(2) * logits.element_size()) % 16 != 0)
    return "logits rows (and so V * element size) must be 16-byte aligned";
  const Layout l = plan(logits.size(2), logits.element_size(), smem_budget(logits.get_device()));
  if (l.cluster == 0) return "the vocabulary does not fit 8 CTAs' shared memory";
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, policy_rows_cluster_kernel<float>) != cudaSuccess) {
    (void)cudaGetLastError();
    return "the extension was built without sm_90a (TORCH_CUDA_ARCH_LIST)";
  }
  if (max_active_clusters(logits.get_device(), logits.element_size(), l) < 1)
    return "no cluster of this size fits the device";
  if (lay) *lay = l;
  return "";
}

bool policy_loss_cluster_ok_cuda(const at::Tensor& logits) { return unsupported(logits).empty(); }

template <typename S>
void launch(const RowArgs& args, int64_t rows, const Layout& lay, cudaStream_t stream) {
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = config<S>(rows, lay, stream, attr);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, policy_rows_cluster_kernel<S>, args));
}

const float* f32_or_null(const std::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!pl::present(t)) return nullptr;
  keep = t->to(at::kFloat).contiguous();
  return keep.const_data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_rows_cuda(
    at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& advantages,
    const at::Tensor& weights, const std::optional<at::Tensor>& old_logprobs,
    const std::optional<at::Tensor>& ref_logprobs, double temperature, int64_t ignore_index, double eps_low,
    double eps_high, double dual_clip, double beta, int64_t kl_type, bool coef_given, bool write_grad) {
  Layout lay;
  const std::string why = unsupported(logits, &lay);
  TORCH_CHECK(why.empty(), "policy_loss_rows_ (CUDA cluster kernel): ", why,
              "; the Triton kernels (credit_ops.use_backend('triton')) run on every GPU");
  const bool on_policy = !pl::present(old_logprobs);
  const core::LossParams params =
      pl::make_params(eps_low, eps_high, dual_clip, beta, kl_type, on_policy, coef_given, write_grad);
  pl::check_rows(grad, logits, labels, advantages, weights, old_logprobs, ref_logprobs, temperature, params);
  TORCH_CHECK(!write_grad || reinterpret_cast<uintptr_t>(grad.data_ptr()) % 16 == 0,
              "policy_loss_rows_: grad must be 16-byte aligned");
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2), N = B * T;
  c10::cuda::CUDAGuard guard(logits.device());

  at::Tensor y = labels.contiguous(), w = weights.to(at::kFloat).contiguous(), adv, old, ref;
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss_tok = at::zeros({B, T}, opts), logp = at::empty({B, T}, opts), entropy = at::empty({B, T}, opts);
  RowArgs args{};
  args.logits = logits.const_data_ptr();
  args.grad = write_grad ? grad.data_ptr() : nullptr;
  args.labels = y.const_data_ptr();
  args.labels64 = y.scalar_type() == at::kLong;
  args.adv = coef_given ? nullptr : f32_or_null(advantages, adv);
  args.weights = w.const_data_ptr<float>();
  args.old = on_policy ? nullptr : f32_or_null(old_logprobs, old);
  args.ref = f32_or_null(ref_logprobs, ref);
  args.loss = loss_tok.mutable_data_ptr<float>();
  args.logp = logp.mutable_data_ptr<float>();
  args.entropy = entropy.mutable_data_ptr<float>();
  args.T = T, args.V = V, args.stride_b = logits.stride(0), args.stride_t = logits.stride(1);
  args.ignore_index = ignore_index;
  args.scale = static_cast<float>(cuda_kernels::kLog2e / temperature);
  args.inv_t = static_cast<float>(1.0 / temperature);
  args.params = params;
  args.slice = lay.slice;
  if (N > 0) {
    TORCH_CHECK(N <= (int64_t(1) << 28), "policy_loss_rows_: at most 2^28 rows per call");
    auto stream = c10::cuda::getCurrentCUDAStream();
    switch (logits.scalar_type()) {
      case at::kBFloat16:
        launch<__nv_bfloat16>(args, N, lay, stream);
        break;
      case at::kHalf:
        launch<__half>(args, N, lay, stream);
        break;
      default:
        launch<float>(args, N, lay, stream);
    }
  }
  return {loss_tok.sum(), logp, entropy};
}

}  // namespace

TORCH_LIBRARY_IMPL(credit, CUDA, m) {
  m.impl("policy_loss_rows_", &policy_loss_rows_cuda);
  m.impl("policy_loss_cluster_ok", &policy_loss_cluster_ok_cuda);
}

}  // namespace credit::cuda
