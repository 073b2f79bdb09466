// Runs the Hopper cluster kernel of the policy loss (csrc/cuda/policy_loss_cluster.cuh) on the CPU: std::threads
// play the threads of each CTA of a row's cluster; warp shuffles, the cluster barrier and distributed shared memory
// are emulated.
// Checks the kernel's logic (slices, a short last slice, the partial exchange, the label held
// by one CTA, ignored rows, -inf logits, strided rows, in-place gradient, coefficient-given and no-gradient modes)
// against a float64 evaluation of docs/method.md §4 on machines without a GPU. Timing and memory ordering on the
// hardware are the GPU tests' job (tests/test_policy_loss.py::test_cluster_kernel_cuda).
#include <array>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <thread>
#include <vector>

// ---- CUDA shims
#define __device__
#define __forceinline__ inline
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline void __stcs(uint4* p, uint4 v) { *p = v; }
struct Dim3 {
  unsigned x = 0;
};
thread_local Dim3 threadIdx, blockIdx;
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {0x7FC0};
  return {static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}
struct __half {
  _Float16 v;
};
inline float __half2float(__half x) { return static_cast<float>(x.v); }
inline __half __float2half_rn(float f) { return {static_cast<_Float16>(f)}; }

struct Warp {
  std::barrier<> bar{32};
  float slot[32];
};
struct Cta {
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  explicit Cta(int n) : bar(n) {
    for (int w = 0; w < n / 32; ++w) warps.push_back(std::make_unique<Warp>());
  }
};
thread_local Cta* g_cta = nullptr;
inline void __syncthreads() { g_cta->bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  Warp& w = *g_cta->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  w.slot[lane] = v;
  w.bar.arrive_and_wait();
  const float got = w.slot[lane ^ static_cast<unsigned>(lane_mask)];
  w.bar.arrive_and_wait();
  return got;
}

#include "cuda/policy_loss_cluster.cuh"

namespace ck = credit::cuda_kernels;

struct ClusterState {
  std::barrier<> bar;
  std::vector<ck::RowPartial*> parts;
  ClusterState(int threads, int size) : bar(threads), parts(size) {}
};
thread_local ClusterState* g_cluster = nullptr;
thread_local int g_rank = 0;
thread_local std::optional<std::barrier<>::arrival_token> g_token;

struct EmuHw {
  static int rank() { return g_rank; }
  static int size() { return static_cast<int>(g_cluster->parts.size()); }
  static void sync() { g_cluster->bar.arrive_and_wait(); }
  static void arrive() { g_token.emplace(g_cluster->bar.arrive()); }
  static void wait() {
    g_cluster->bar.wait(std::move(*g_token));
    g_token.reset();
  }
  static ck::RowPartial* map(ck::RowPartial*, int rank) { return g_cluster->parts[rank]; }
  static void load(void* dst, const void* src, uint32_t bytes, uint64_t*) {
    if (threadIdx.x == 0) std::memcpy(dst, src, bytes);
    __syncthreads();
  }
};

constexpr int kThreads = 64;  // per emulated CTA: two warps (the GPU runs 256)

// Launches rows * C emulated CTAs, one row's cluster at a time.
template <typename S>
void run(const ck::RowArgs& a, int64_t rows, int C) {
  const int64_t slice_bytes = a.slice * static_cast<int64_t>(sizeof(S));
  for (int64_t row = 0; row < rows; ++row) {
    ClusterState cl(C * kThreads, C);
    std::vector<std::vector<uint4>> smem(C, std::vector<uint4>((slice_bytes + 15) / 16 + 1));
    std::vector<std::vector<ck::RowPartial>> red(C, std::vector<ck::RowPartial>(32));
    std::vector<ck::RowPartial> part(C);
    std::vector<std::array<float, 2>> bcast(C);
    std::vector<std::unique_ptr<Cta>> ctas;
    for (int r = 0; r < C; ++r) ctas.push_back(std::make_unique<Cta>(kThreads)), cl.parts[r] = &part[r];
    std::vector<std::thread> threads;
    for (int r = 0; r < C; ++r) {
      for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, r, t] {
          threadIdx.x = t;
          blockIdx.x = static_cast<unsigned>(row * C + r);
          g_cta = ctas[r].get();
          g_cluster = &cl;
          g_rank = r;
          uint64_t mbar = 0;
          ck::policy_rows_cluster_cta<S, EmuHw, kThreads>(a, reinterpret_cast<S*>(smem[r].data()), red[r].data(),
                                                          &part[r], bcast[r].data(), &mbar);
        });
      }
    }
    for (auto& th : threads) th.join();
  }
}

float to_f(float x) { return x; }
float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename S>
S from_f(float x);
template <>
float from_f<float>(float x) { return x; }
template <>
__nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

struct Case {
  int64_t rows, V, row_stride;  // row_stride >= V: padded rows read in place
  int C;
  double temperature;
  bool coef_given, write_grad, in_place, on_policy;
  int64_t kl_type;
};

template <typename S>
void check(const Case& k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  constexpr int64_t vec = 16 / sizeof(S);
  const int64_t N = k.rows, V = k.V;
  std::vector<S> logits(N * k.row_stride + vec);
  for (auto& x : logits) x = from_f<S>(3.f * normal(rng));
  const int64_t slice = ((V + k.C - 1) / k.C + vec - 1) / vec * vec;
  std::vector<int64_t> labels(N);
  for (int64_t i = 0; i < N; ++i) labels[i] = static_cast<int64_t>(rng() % V);
  labels[1] = -100;      // an ignored row
  labels[2] = V - 1;     // the last logit of the last slice
  labels[3] = slice;     // the first logit of the second CTA's slice
  labels[4] = slice - 1;  // the last of the first CTA's
  for (int64_t j = 0; j < V; j += 3) logits[j] = from_f<S>(-INFINITY);  // -inf logits in row 0
  if (labels[0] % 3 == 0) labels[0] += 1;
  std::vector<float> adv(N), w(N), old(N), ref(N);
  for (int64_t i = 0; i < N; ++i) {
    adv[i] = normal(rng), w[i] = 0.1f + std::abs(normal(rng)), ref[i] = -10.f + 0.5f * normal(rng);
  }
  std::vector<double> z_row(V);
  auto row_ref = [&](int64_t i, double* lse, double* logp, double* ent) {
    double m = -INFINITY;
    for (int64_t j = 0; j < V; ++j) {
      z_row[j] = to_f(logits[i * k.row_stride + j]) / k.temperature;
      m = std::max(m, z_row[j]);
    }
    double s = 0, t = 0;
    for (int64_t j = 0; j < V; ++j) {
      const double e = std::exp(z_row[j] - m);
      s += e, t += e > 0 ? e * (z_row[j] - m) : 0.0;
    }
    *lse = m + std::log(s);
    *logp = z_row[labels[i]] - *lse;
    *ent = std::log(s) - t / s;
  };
  for (int64_t i = 0; i < N; ++i) {  // old log-probs near the current ones: ratios on both sides of the clip range
    if (labels[i] < 0) continue;
    double lse, lp, ent;
    row_ref(i, &lse, &lp, &ent);
    old[i] = static_cast<float>(lp + 0.3 * normal(rng));
  }

  std::vector<S> grad_buf(k.in_place ? 0 : N * V + vec);
  std::vector<float> loss(N, 7.f), logp(N, 7.f), entropy(N, 7.f);
  credit::core::LossParams params{0.8, 1.28, 3.0, 0.05, k.kl_type, k.on_policy, k.coef_given, k.write_grad};
  ck::RowArgs a{};
  a.logits = logits.data();
  a.grad = k.in_place ? static_cast<void*>(logits.data()) : static_cast<void*>(grad_buf.data());
  a.labels = labels.data();
  a.labels64 = true;
  a.adv = adv.data(), a.weights = w.data(), a.old = k.on_policy ? nullptr : old.data();
  a.ref = k.kl_type ? ref.data() : nullptr;
  a.loss = loss.data(), a.logp = logp.data(), a.entropy = entropy.data();
  a.T = 5, a.V = V, a.stride_b = 5 * k.row_stride, a.stride_t = k.row_stride;
  a.slice = slice;
  a.ignore_index = -100;
  a.scale = static_cast<float>(ck::kLog2e / k.temperature), a.inv_t = static_cast<float>(1.0 / k.temperature);
  a.params = params;
  const std::vector<S> before = logits;
  run<S>(a, N, k.C);

  const double tol = sizeof(S) == 4 ? 2e-5 : 2e-2;  // bf16: the gradient is stored in bf16
  for (int64_t i = 0; i < N; ++i) {
    const S* g = k.in_place ? logits.data() + i * V : grad_buf.data() + i * V;
    if (labels[i] < 0) {
      assert(logp[i] == 0.f && entropy[i] == 0.f);
      if (!k.coef_given) assert(loss[i] == 0.f);
      if (k.write_grad)
        for (int64_t j = 0; j < V; ++j) assert(to_f(g[j]) == 0.f);
      continue;
    }
    // the reference reads the logits as they were (the in-place mode overwrote them)
    std::vector<S> saved(before.begin() + i * k.row_stride, before.begin() + i * k.row_stride + V);
    std::vector<S> cur(logits.begin() + i * k.row_stride, logits.begin() + i * k.row_stride + V);
    std::copy(saved.begin(), saved.end(), logits.begin() + i * k.row_stride);
    double lse, lp, ent;
    row_ref(i, &lse, &lp, &ent);
    std::copy(cur.begin(), cur.end(), logits.begin() + i * k.row_stride);
    assert(std::abs(logp[i] - lp) < 1e-4 * (1 + std::abs(lp)));
    assert(std::abs(entropy[i] - ent) < 1e-4 * (1 + std::abs(ent)));
    double c = w[i];
    if (!k.coef_given) {
      double l, dl;
      credit::core::token_loss<double>(lp, old[i], ref[i], adv[i], params, &l, &dl);
      assert(std::abs(loss[i] - w[i] * l) < 1e-4 * (1 + std::abs(w[i] * l)));
      c *= dl;
    }
    if (!k.write_grad) continue;
    c /= k.temperature;
    const double gmax = std::abs(c);
    for (int64_t j = 0; j < V; ++j) {
      const double p = std::exp(z_row[j] - lse);
      const double want = (j == labels[i] ? c : 0.0) - c * p;
      if (std::abs(to_f(g[j]) - want) > tol * gmax + 1e-7) {
        std::fprintf(stderr, "row %ld col %ld: got %g want %g\n", static_cast<long>(i), static_cast<long>(j),
                     to_f(g[j]), want);
        assert(false);
      }
    }
  }
  // padding between strided rows untouched, and the rows themselves when the gradient went elsewhere
  if (!k.in_place) assert(std::memcmp(before.data(), logits.data(), before.size() * sizeof(S)) == 0);
}

// One NaN or +inf logit (anywhere, also behind a run of -inf logits that fills whole slices) must make the row's
// log-prob, entropy, loss and gradient NaN, never a finite number. Returns 1 on failure.
template <typename S>
int nonfinite_case(int64_t V, int C, int64_t pos, float bad, bool on_policy, int64_t neginf_prefix, bool coef) {
  constexpr int64_t vec = 16 / sizeof(S);
  std::vector<S> logits(V + vec);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (int64_t j = 0; j < V; ++j) logits[j] = from_f<S>(j < neginf_prefix ? -INFINITY : 2.f * normal(rng));
  logits[pos] = from_f<S>(bad);
  const int64_t slice = ((V + C - 1) / C + vec - 1) / vec * vec;
  std::vector<int64_t> labels{V - 1};
  std::vector<float> adv{0.7f}, w{0.5f}, old{-3.f}, ref{-4.f}, loss{7.f}, logp{7.f}, ent{7.f};
  std::vector<S> grad(V + vec);
  ck::RowArgs a{};
  a.logits = logits.data();
  a.grad = grad.data();
  a.labels = labels.data();
  a.labels64 = true;
  a.adv = adv.data();
  a.weights = w.data();
  a.old = on_policy ? nullptr : old.data();
  a.ref = ref.data();
  a.loss = loss.data();
  a.logp = logp.data();
  a.entropy = ent.data();
  a.T = 1;
  a.V = V;
  a.stride_b = V;
  a.stride_t = V;
  a.slice = slice;
  a.ignore_index = -100;
  a.scale = ck::kLog2e;
  a.inv_t = 1.f;
  a.params = credit::core::LossParams{0.8, 1.28, 3.0, 0.05, 3, on_policy, coef, true};
  run<S>(a, 1, C);
  int bad_out = 0;
  if (!std::isnan(logp[0])) ++bad_out;
  if (!std::isnan(ent[0])) ++bad_out;
  if (!coef && !std::isnan(loss[0])) ++bad_out;
  for (int64_t j = 0; j < V; ++j) {
    if (!std::isnan(to_f(grad[j]))) {
      ++bad_out;
      break;
    }
  }
  if (bad_out)
    std::printf("FAIL non-finite V=%ld C=%d pos=%ld bad=%g on_policy=%d prefix=%ld coef=%d: logp %g ent %g loss %g\n",
                (long)V, C, (long)pos, bad, on_policy, (long)neginf_prefix, coef, logp[0], ent[0], loss[0]);
  return bad_out != 0;
}

int main() {
  //        rows  V     stride C  temp coef   grad   inplace on_pol kl
  check<float>({7, 1000, 1000, 4, 1.0, false, true, false, false, 3}, 1);
  check<float>({6, 1000, 1008, 4, 0.7, false, true, false, true, 1}, 2);   // strided rows, on-policy, k1
  check<float>({5, 1004, 1004, 2, 1.0, false, true, true, false, 2}, 3);   // in place
  check<float>({5, 64, 64, 8, 1.0, true, true, false, false, 0}, 4);       // coefficient given (log-prob backward)
  check<float>({5, 332, 332, 4, 1.3, false, false, false, false, 3}, 5);   // no gradient: log-probs + loss only
  check<__nv_bfloat16>({6, 776, 784, 4, 1.0, false, true, false, false, 3}, 6);  // short last slice
  check<__nv_bfloat16>({5, 4096, 4096, 8, 1.0, false, true, true, false, 3}, 7);  // in place, bf16
  int fails = 0;
  for (float bad : {NAN, INFINITY})
    for (int64_t pos : {0L, 1L, 3L, 4L, 5L, 63L, 64L, 200L, 255L, 256L, 511L, 999L})
      for (int64_t prefix : {0L, 4L, 256L, 600L})
        for (bool on_policy : {false, true})
          for (bool coef : {false, true}) {
            fails += nonfinite_case<float>(1000, 4, pos, bad, on_policy, prefix, coef);
            fails += nonfinite_case<__nv_bfloat16>(1024, 2, pos, bad, on_policy, prefix, coef);
          }
  if (fails) return 1;
  std::printf("policy_loss cluster kernel emulation: ok\n");
  return 0;
}
