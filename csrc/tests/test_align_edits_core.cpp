// Unit tests of the framework-free align_edits core (no Python, no torch): the bit-parallel banded DP with
// its checkpointed traceback against a plain O(n*m) implementation of the canonical rule (docs/method.md §2).
#include <cassert>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "core/align_edits.h"
#include "tests/align_edits_testing.h"

using credit::core::AlignWorkspace;
using credit::core::EditOutputs;
using credit::core::InsertAnchor;
using credit::testing::mutate;

namespace {

struct Result {
  std::vector<char> ma, mb;
  std::vector<int32_t> ra, rb;
  int64_t dist = 0;
  bool operator==(const Result& o) const {
    return ma == o.ma && mb == o.mb && ra == o.ra && rb == o.rb && dist == o.dist;
  }
};

// The reference DP of credit_ops/reference.py, transcribed: full matrix, walk back preferring diagonal,
// deletion, insertion; runs numbered forwards; a matched token anchored twice keeps the first run.
Result naive(const std::vector<int64_t>& a, const std::vector<int64_t>& b, InsertAnchor anchor) {
  const int64_t n = a.size(), m = b.size();
  Result r{std::vector<char>(n, 0), std::vector<char>(m, 0), std::vector<int32_t>(n, -1),
           std::vector<int32_t>(m, -1), 0};
  int64_t p = 0, s = 0;
  while (p < std::min(n, m) && a[p] == b[p]) ++p;
  while (s < std::min(n, m) - p && a[n - 1 - s] == b[m - 1 - s]) ++s;
  const int64_t nn = n - p - s, mm = m - p - s;
  std::vector<std::vector<int64_t>> D(nn + 1, std::vector<int64_t>(mm + 1));
  for (int64_t i = 0; i <= nn; ++i)
    for (int64_t j = 0; j <= mm; ++j)
      D[i][j] = i == 0 ? j
                : j == 0 ? i
                         : std::min({D[i - 1][j - 1] + (a[p + i - 1] != b[p + j - 1]), D[i - 1][j] + 1,
                                     D[i][j - 1] + 1});
  struct Op { int kind; int64_t x, y; };  // 0 match, 1 sub, 2 del, 3 ins (x = gap)
  std::vector<Op> ops;
  int64_t i = nn, j = mm;
  while (i > 0 || j > 0) {
    if (i > 0 && j > 0 && D[i][j] == D[i - 1][j - 1] + (a[p + i - 1] != b[p + j - 1])) {
      ops.push_back({a[p + i - 1] == b[p + j - 1] ? 0 : 1, p + i - 1, p + j - 1});
      --i, --j;
    } else if (i > 0 && D[i][j] == D[i - 1][j] + 1) {
      ops.push_back({2, p + i - 1, -1});
      --i;
    } else {
      ops.push_back({3, p + i, p + j - 1});
      --j;
    }
  }
  int32_t region = -1;
  bool in_run = false;
  for (auto it = ops.rbegin(); it != ops.rend(); ++it) {
    if (it->kind == 0) {
      in_run = false;
      continue;
    }
    if (!in_run) ++region, in_run = true;
    if (it->kind == 1 || it->kind == 2) r.ma[it->x] = 1, r.ra[it->x] = region;
    if (it->kind == 1 || it->kind == 3) r.mb[it->y] = 1, r.rb[it->y] = region;
    if (it->kind == 3 && anchor != InsertAnchor::kNone && n > 0) {
      const int64_t g = it->x;
      const int64_t t = anchor == InsertAnchor::kPrev ? (g > 0 ? g - 1 : 0) : (g < n ? g : n - 1);
      if (!r.ma[t]) r.ma[t] = 1, r.ra[t] = region;
    }
  }
  r.dist = D[nn][mm];
  return r;
}

Result fast(const std::vector<int64_t>& a, const std::vector<int64_t>& b, InsertAnchor anchor, AlignWorkspace& ws) {
  const int64_t n = a.size(), m = b.size();
  std::unique_ptr<bool[]> ma(new bool[n + 1]), mb(new bool[m + 1]);
  Result r{std::vector<char>(n), std::vector<char>(m), std::vector<int32_t>(n), std::vector<int32_t>(m), 0};
  EditOutputs out{ma.get(), mb.get(), r.ra.data(), r.rb.data()};
  r.dist = credit::core::align_pair(a.data(), n, b.data(), m, anchor, out, ws);
  for (int64_t t = 0; t < n; ++t) r.ma[t] = ma[t];
  for (int64_t t = 0; t < m; ++t) r.mb[t] = mb[t];
  return r;
}

int failures = 0;

void expect_same(const std::vector<int64_t>& a, const std::vector<int64_t>& b, InsertAnchor anchor,
                 AlignWorkspace& ws, const char* what) {
  const Result want = naive(a, b, anchor), got = fast(a, b, anchor, ws);
  if (!(want == got)) {
    if (++failures <= 5)
      std::fprintf(stderr, "MISMATCH (%s): n=%zu m=%zu anchor=%d dist %ld vs %ld\n", what, a.size(), b.size(),
                   static_cast<int>(anchor), static_cast<long>(got.dist), static_cast<long>(want.dist));
  }
}

void test_hand_worked() {
  AlignWorkspace ws;
  // insertion of 8 then substitution 2 -> 9 (diagonal taken first walking back); "prev" anchors a[0]
  const Result r = fast({1, 2, 3, 4}, {1, 8, 9, 3, 4}, InsertAnchor::kPrev, ws);
  assert(r.dist == 2);
  assert((r.ma == std::vector<char>{1, 1, 0, 0}));
  assert((r.ra == std::vector<int32_t>{0, 0, -1, -1}));
  assert((r.mb == std::vector<char>{0, 1, 1, 0, 0}));
  // trimming first: the second 1 is the deleted one
  const Result t = fast({1, 1}, {1}, InsertAnchor::kPrev, ws);
  assert(t.dist == 1 && (t.ma == std::vector<char>{0, 1}));
  // empty sides
  assert(fast({}, {}, InsertAnchor::kPrev, ws).dist == 0);
  assert(fast({}, {5, 6}, InsertAnchor::kPrev, ws).dist == 2);
  assert(fast({5, 6}, {}, InsertAnchor::kNext, ws).dist == 2);
}

void test_random(int64_t store_budget, int64_t dense_words, int iters, int64_t max_len, uint64_t seed,
                 const char* what) {
  std::mt19937_64 g(seed);
  AlignWorkspace ws;
  ws.store_budget_words = store_budget;
  ws.dense_pm_words = dense_words;
  const int64_t vocabs[] = {2, 3, 5, 20, 1000, 150000};
  const double rates[] = {0.0, 0.01, 0.05, 0.2, 0.5, 1.0};
  for (int it = 0; it < iters; ++it) {
    const int64_t vocab = vocabs[g() % 6];
    std::vector<int64_t> a(g() % (max_len + 1));
    for (auto& x : a) x = static_cast<int64_t>(g() % vocab);
    std::vector<int64_t> b;
    if (g() % 8) {
      b = mutate(g, a, rates[g() % 6], vocab);
    } else {  // an unrelated sequence
      b.resize(g() % (max_len + 1));
      for (auto& x : b) x = static_cast<int64_t>(g() % vocab);
    }
    expect_same(a, b, static_cast<InsertAnchor>(g() % 3), ws, what);
  }
}

}  // namespace

int main() {
  test_hand_worked();
  test_random(int64_t(1) << 22, int64_t(1) << 18, 3000, 70, 1, "small, stored bits");
  test_random(int64_t(1) << 22, int64_t(1) << 18, 300, 600, 2, "multi-word, stored bits");
  test_random(64, 16, 300, 600, 3, "checkpointed blocks, sparse pattern table");
  test_random(2, 1, 300, 200, 4, "one row per block");
  if (failures) {
    std::fprintf(stderr, "%d mismatches\n", failures);
    return 1;
  }
  std::printf("align_edits core: all tests passed\n");
  return 0;
}
