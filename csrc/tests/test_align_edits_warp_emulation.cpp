// Runs the CUDA kernel of align_edits (csrc/cuda/align_edits_kernel.cuh) on the CPU: 32 std::threads play the
// lanes of a warp, the warp intrinsics are emulated with a barrier. Checks the kernel's logic (pipelined
// strips, strip carries, checkpointed row blocks, traceback with match skipping, region flip) against the
// CPU core on machines without a GPU. Slow by design: keep the cases small.
#include <barrier>
#include <cassert>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

// ---- CUDA shims
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
struct ulonglong2 {
  unsigned long long x, y;
};
inline ulonglong2 make_ulonglong2(unsigned long long x, unsigned long long y) { return {x, y}; }
struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx, blockIdx;
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

struct WarpState {
  std::barrier<> bar{32};
  unsigned long long slot[32];
};
thread_local WarpState* g_warp = nullptr;
inline int lane_id() { return static_cast<int>(threadIdx.x & 31); }
inline void __syncwarp() { g_warp->bar.arrive_and_wait(); }
template <typename V>
V exchange(V v, int src) {
  static_assert(sizeof(V) <= 8);
  unsigned long long raw = 0;
  std::memcpy(&raw, &v, sizeof(V));
  g_warp->slot[lane_id()] = raw;
  g_warp->bar.arrive_and_wait();
  const unsigned long long got = g_warp->slot[src];
  g_warp->bar.arrive_and_wait();
  V out;
  std::memcpy(&out, &got, sizeof(V));
  return out;
}
template <typename V>
V __shfl_up_sync(unsigned, V v, int d) {
  const int l = lane_id();
  const V r = exchange(v, l >= d ? l - d : l);
  return r;
}
template <typename V>
V __shfl_xor_sync(unsigned, V v, int o) {
  return exchange(v, lane_id() ^ o);
}
template <typename V>
V __shfl_sync(unsigned, V v, int src) {
  return exchange(v, src);
}
inline unsigned __ballot_sync(unsigned, bool pred) {
  g_warp->slot[lane_id()] = pred;
  g_warp->bar.arrive_and_wait();
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) m |= static_cast<unsigned>(g_warp->slot[l] != 0) << l;
  g_warp->bar.arrive_and_wait();
  return m;
}
using std::abs;
using std::max;
using std::min;

#include "core/align_edits.h"
#include "cuda/align_edits_kernel.cuh"
#include "tests/align_edits_testing.h"

namespace ck = credit::cuda_kernels;
namespace core = credit::core;
using credit::testing::mutate;

namespace {

struct Batch {
  int64_t P = 0, La = 0, Lb = 0;
  std::vector<int64_t> a, b, la, lb;
};

Batch pack(const std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>>& pairs, int64_t pad) {
  Batch x;
  x.P = pairs.size();
  for (auto& [a, b] : pairs) x.La = std::max<int64_t>(x.La, a.size()), x.Lb = std::max<int64_t>(x.Lb, b.size());
  x.La += 3, x.Lb += 1;  // padding that also holds real ids
  x.a.assign(x.P * x.La, pad), x.b.assign(x.P * x.Lb, pad);
  for (int64_t r = 0; r < x.P; ++r) {
    std::copy(pairs[r].first.begin(), pairs[r].first.end(), x.a.begin() + r * x.La);
    std::copy(pairs[r].second.begin(), pairs[r].second.end(), x.b.begin() + r * x.Lb);
    x.la.push_back(pairs[r].first.size()), x.lb.push_back(pairs[r].second.size());
  }
  return x;
}

int failures = 0;

void run_and_compare(const Batch& x, int anchor, int64_t warp_budget, int64_t num_warps, const char* what) {
  const ck::Scratch plan = ck::plan_scratch(x.La, x.Lb, warp_budget);
  std::vector<uint8_t> scratch(plan.per_warp * num_warps + 256);
  ck::Scratch scr = plan;
  scr.base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(scratch.data()) + 255) / 256 * 256);
  std::unique_ptr<bool[]> ma(new bool[x.P * x.La]), mb(new bool[x.P * x.Lb]);
  std::vector<int32_t> ra(x.P * x.La), rb(x.P * x.Lb), dist(x.P);
  for (int64_t w = 0; w < num_warps; ++w) {
    WarpState ws;
    std::vector<std::thread> lanes;
    for (int l = 0; l < 32; ++l)
      lanes.emplace_back([&, l] {
        g_warp = &ws;
        blockIdx.x = static_cast<unsigned>(w / ck::kWarps);
        threadIdx.x = static_cast<unsigned>((w % ck::kWarps) * 32 + l);
        ck::align_edits_kernel<int64_t>(x.a.data(), x.la.data(), x.b.data(), x.lb.data(), x.P,
                                        static_cast<int>(x.La), static_cast<int>(x.Lb), anchor, ma.get(), mb.get(),
                                        ra.data(), rb.data(), dist.data(), scr, num_warps);
      });
    for (auto& t : lanes) t.join();
  }
  core::AlignWorkspace cws;
  for (int64_t r = 0; r < x.P; ++r) {
    const int64_t n = x.la[r], m = x.lb[r];
    std::unique_ptr<bool[]> ema(new bool[n + 1]), emb(new bool[m + 1]);
    std::vector<int32_t> era(n + 1), erb(m + 1);
    const core::EditOutputs out{ema.get(), emb.get(), era.data(), erb.data()};
    const int64_t d = core::align_pair(x.a.data() + r * x.La, n, x.b.data() + r * x.Lb, m,
                                       static_cast<core::InsertAnchor>(anchor), out, cws);
    bool ok = d == dist[r];
    for (int64_t t = 0; t < x.La; ++t) {
      const bool fm = t < n && ema[t];
      const int32_t fr = t < n ? era[t] : -1;
      ok = ok && ma[r * x.La + t] == fm && ra[r * x.La + t] == fr;
    }
    for (int64_t t = 0; t < x.Lb; ++t) {
      const bool fm = t < m && emb[t];
      const int32_t fr = t < m ? erb[t] : -1;
      ok = ok && mb[r * x.Lb + t] == fm && rb[r * x.Lb + t] == fr;
    }
    if (!ok && ++failures <= 5)
      std::fprintf(stderr, "MISMATCH (%s) pair %ld: n=%ld m=%ld anchor=%d dist %d vs %ld\n", what,
                   static_cast<long>(r), static_cast<long>(n), static_cast<long>(m), anchor, dist[r],
                   static_cast<long>(d));
  }
}

std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> random_pairs(std::mt19937_64& g, int count,
                                                                                 int64_t max_len) {
  const int64_t vocabs[] = {2, 3, 7, 1000, 150000};
  const double rates[] = {0.0, 0.02, 0.1, 0.4, 1.0};
  std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> pairs;
  for (int c = 0; c < count; ++c) {
    const int64_t vocab = vocabs[g() % 5];
    std::vector<int64_t> a(g() % (max_len + 1));
    for (auto& v : a) v = static_cast<int64_t>(g() % vocab);
    pairs.emplace_back(a, mutate(g, a, rates[g() % 5], vocab));
  }
  return pairs;
}

}  // namespace

int main() {
  std::mt19937_64 g(7);
  // Small pairs, the hand-made edge cases, two warps looping over the pairs.
  auto pairs = random_pairs(g, 40, 90);
  pairs.push_back({{}, {}});
  pairs.push_back({{}, {1, 2, 3}});
  pairs.push_back({{4, 5}, {}});
  pairs.push_back({{1, 2, 3, 4}, {1, 8, 9, 3, 4}});
  pairs.push_back({{4}, {1, 4, 2}});
  pairs.push_back({{1, 1}, {1}});
  for (int anchor = 0; anchor < 3; ++anchor) run_and_compare(pack(pairs, 1), anchor, int64_t(8) << 20, 2, "small");
  // Several strips (b longer than 2048 tokens), bits in one block.
  std::vector<int64_t> a(2300);
  for (auto& v : a) v = static_cast<int64_t>(g() % 5);
  std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> long_pairs{{a, mutate(g, a, 0.05, 5)},
                                                                                {a, mutate(g, a, 0.3, 5)}};
  run_and_compare(pack(long_pairs, 0), 0, int64_t(8) << 20, 1, "two strips");
  // The same with a tiny per-warp budget: 32-row blocks recomputed from checkpoints.
  run_and_compare(pack(long_pairs, 0), 1, 1, 1, "two strips, checkpointed blocks");
  // Three strips: a narrow band skips rows of the outer strips (1% edits); 30% edits need the second band.
  std::vector<int64_t> c(4300);
  for (auto& v : c) v = static_cast<int64_t>(g() % 1000);
  std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> banded{{c, mutate(g, c, 0.01, 1000)},
                                                                            {c, mutate(g, c, 0.3, 1000)}};
  banded.push_back({c, std::vector<int64_t>(c.begin() + 700, c.end())});  // |n - m| beyond the first band
  run_and_compare(pack(banded, 0), 0, int64_t(8) << 20, 1, "three strips, banded");
  run_and_compare(pack(banded, 0), 2, 1, 1, "three strips, banded, checkpointed blocks");
  auto mid = random_pairs(g, 6, 300);
  run_and_compare(pack(mid, 2), 0, 1, 2, "one strip, checkpointed blocks");
  if (failures) {
    std::fprintf(stderr, "%d mismatches\n", failures);
    return 1;
  }
  std::printf("align_edits CUDA kernel (warp emulation): all tests passed\n");
  return 0;
}
