// Framework-free core of credit::align_edits (docs/method.md §2): the canonical Levenshtein edit script of one pair
// of token sequences, turned into masks and regions. Plain C++ on pointers and lengths: used by the CPU op
// (csrc/cpu/align_edits.cpp) and by the CMake unit tests (csrc/tests/test_align_edits_core.cpp).
//
// Algorithm, per pair:
//   1. trim the common prefix and suffix (part of the canonical rule, and free speed);
//   2. Hyyro's block-based bit-parallel DP (a rows, b bits), restricted to the diagonal band that can hold
//      an optimal path of cost <= k; k doubles until the banded distance is <= k, which proves it exact;
//   3. per cell the DP keeps two bits, D0 (D[i][j] == D[i-1][j-1]) and HP (D[i][j] == D[i-1][j] + 1): all the
//      canonical traceback needs. Rows are stored in blocks under a memory budget; past it the forward pass
//      keeps checkpoints and each block is recomputed once during the traceback.
// Cells outside the band get values of real (suboptimal) paths, so every stored value is an upper bound and
// exact on optimal paths: the traceback's tests are then the same as on the full matrix.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace credit::core {

enum class InsertAnchor : int64_t { kPrev = 0, kNext = 1, kNone = 2 };

// Per-pair outputs: mask_a/region_a hold n entries, mask_b/region_b m entries (all written).
struct EditOutputs {
  bool* mask_a;
  bool* mask_b;
  int32_t* region_a;
  int32_t* region_b;
};

// Scratch reused across the pairs one thread aligns.
struct AlignWorkspace {
  int64_t store_budget_words = int64_t(1) << 22;  // 32 MiB of D0/HP bits per pair before checkpointing
  int64_t dense_pm_words = int64_t(1) << 18;      // 2 MiB pattern table: every token gets a dense row
  std::vector<int64_t> hkeys;
  std::vector<int32_t> hvals, b_id, a_id, count, tally, dense_row, csr_start, csr_fill, csr_pos;
  std::vector<uint64_t> pm, eq, vp, vn, ckpt;
  std::unique_ptr<uint64_t[]> d0, hp;  // grown, never cleared: every word read was written first
  int64_t bits_cap = 0;
  void reserve_bits(int64_t words) {
    if (words <= bits_cap) return;
    bits_cap = std::max(words, 2 * bits_cap);
    d0.reset(new uint64_t[bits_cap]);
    hp.reset(new uint64_t[bits_cap]);
  }
  // Drops the traceback bits when they hold more than max_words (a rare long pair).
  void trim(int64_t max_words) {
    if (bits_cap <= max_words) return;
    d0.reset(), hp.reset(), bits_cap = 0;
    std::vector<uint64_t>().swap(ckpt);
  }
  std::vector<int64_t> row_off, block_start, ckpt_off, ckpt_w0, ckpt_w1;
};

namespace detail {

inline int popc(uint64_t x) { return __builtin_popcountll(x); }

// Columns j (1-based in b's core) of row i that can lie on a path of cost <= k: j - i in [lo, hi].
struct Band {
  int64_t lo, hi, mm;
  int64_t w0(int64_t i) const { return (std::max<int64_t>(1, i + lo) - 1) >> 6; }
  int64_t w1(int64_t i) const { return (std::min(mm, i + hi) - 1) >> 6; }
};

// One row of the block-based DP over words [w0, w1]; D0/HP of the row go to d0/hp when given.
// The carry into word w0 is HP = 1, HN = 0: the true boundary D[i][0] = i for w0 = 0, and a real path
// (a deletion) otherwise.
template <bool kStore>
inline void row_step(const uint64_t* __restrict pm, uint64_t* __restrict vp, uint64_t* __restrict vn, int64_t w0,
                     int64_t w1, uint64_t* __restrict d0, uint64_t* __restrict hp) {
  uint64_t hp_c = 1, hn_c = 0;
  for (int64_t w = w0; w <= w1; ++w) {
    const uint64_t X = pm[w] | hn_c;
    const uint64_t VP = vp[w], VN = vn[w];
    const uint64_t D0 = (((X & VP) + VP) ^ VP) | X | VN;
    uint64_t HP = VN | ~(D0 | VP);
    uint64_t HN = D0 & VP;
    if constexpr (kStore) {
      d0[w - w0] = D0;
      hp[w - w0] = HP;
    }
    const uint64_t hp_n = HP >> 63, hn_n = HN >> 63;
    HP = (HP << 1) | hp_c;
    HN = (HN << 1) | hn_c;
    hp_c = hp_n;
    hn_c = hn_n;
    vp[w] = HN | ~(D0 | HP);
    vn[w] = HP & D0;
  }
}

inline uint64_t mix(int64_t key) { return static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull; }

// Traceback bookkeeping: runs are numbered backwards while walking from (n, m), then flipped.
struct Emitter {
  const EditOutputs& out;
  int64_t n;
  InsertAnchor anchor;
  int32_t runs = 0;
  bool in_run = false;
  int32_t edit() {
    if (!in_run) ++runs, in_run = true;
    return runs - 1;
  }
  void match() { in_run = false; }
  void flag_a(int64_t t, int32_t r) { out.mask_a[t] = true, out.region_a[t] = r; }
  void flag_b(int64_t t, int32_t r) { out.mask_b[t] = true, out.region_b[t] = r; }
  void sub(int64_t ta, int64_t tb) {
    const int32_t r = edit();
    flag_a(ta, r), flag_b(tb, r);
  }
  void del(int64_t ta) { flag_a(ta, edit()); }
  // b[tb] inserted at gap g of a (before a[g]). A match token anchored by two runs keeps the later-walked
  // one, i.e. the first along the sequences; an edited anchor token always belongs to the same run already.
  void ins(int64_t tb, int64_t g) {
    const int32_t r = edit();
    flag_b(tb, r);
    if (n == 0 || anchor == InsertAnchor::kNone) return;
    const int64_t t = anchor == InsertAnchor::kPrev ? (g > 0 ? g - 1 : 0) : (g < n ? g : n - 1);
    flag_a(t, r);
  }
  void finish(int64_t a_lo, int64_t a_hi, int64_t b_lo, int64_t b_hi) {
    for (int64_t t = a_lo; t < a_hi; ++t)
      if (out.region_a[t] >= 0) out.region_a[t] = runs - 1 - out.region_a[t];
    for (int64_t t = b_lo; t < b_hi; ++t)
      if (out.region_b[t] >= 0) out.region_b[t] = runs - 1 - out.region_b[t];
  }
};

}  // namespace detail

// Aligns a[0:n] with b[0:m]; writes all n + m output entries and returns the Levenshtein distance.
template <typename T>
int64_t align_pair(const T* a, int64_t n, const T* b, int64_t m, InsertAnchor anchor, const EditOutputs& out,
                   AlignWorkspace& ws) {
  using namespace detail;
  std::fill(out.mask_a, out.mask_a + n, false);
  std::fill(out.mask_b, out.mask_b + m, false);
  std::fill(out.region_a, out.region_a + n, -1);
  std::fill(out.region_b, out.region_b + m, -1);

  int64_t p = 0;
  const int64_t mn = std::min(n, m);
  while (p < mn && a[p] == b[p]) ++p;
  int64_t s = 0;
  while (s < mn - p && a[n - 1 - s] == b[m - 1 - s]) ++s;
  const T* A = a + p;
  const T* B = b + p;
  const int64_t nn = n - p - s, mm = m - p - s;

  Emitter em{out, n, anchor};
  auto done = [&](int64_t dist) {
    em.finish(std::max<int64_t>(0, p - 1), std::min(n, p + nn + 1), p, p + mm);
    return dist;
  };
  if (nn == 0 || mm == 0) {
    for (int64_t j = mm; j > 0; --j) em.ins(p + j - 1, p);
    for (int64_t i = nn; i > 0; --i) em.del(p + i - 1);
    return done(nn + mm);
  }

  // Dense ids for b's core tokens; a's tokens absent from b match nothing.
  int64_t cap = 16;
  while (cap < 2 * mm) cap <<= 1;
  const int shift = 64 - __builtin_ctzll(static_cast<uint64_t>(cap));
  ws.hkeys.resize(cap);
  ws.hvals.assign(cap, -1);
  ws.b_id.resize(mm);
  ws.count.clear();
  int32_t D = 0;
  auto find = [&](int64_t key, bool insert) -> int32_t {
    uint64_t h = mix(key) >> shift;
    while (true) {
      const int32_t v = ws.hvals[h];
      if (v < 0) {
        if (!insert) return -1;
        ws.hkeys[h] = key;
        ws.hvals[h] = D;
        ws.count.push_back(0);
        return D++;
      }
      if (ws.hkeys[h] == key) return v;
      h = (h + 1) & (cap - 1);
    }
  };
  for (int64_t j = 0; j < mm; ++j) {
    const int32_t d = find(static_cast<int64_t>(B[j]), true);
    ws.b_id[j] = d;
    ++ws.count[d];
  }
  ws.a_id.resize(nn);
  for (int64_t i = 0; i < nn; ++i) ws.a_id[i] = find(static_cast<int64_t>(A[i]), false);

  // Pattern bits: a dense row per token when the table is small, else only for frequent tokens (at most
  // 2W of them); rare tokens are scattered into a zeroed scratch row for their step.
  const int64_t W = (mm + 63) >> 6;
  const int32_t thr = static_cast<int64_t>(D) * W <= ws.dense_pm_words ? 1 : 32;
  ws.dense_row.assign(D, -1);
  int32_t ndense = 0;
  for (int32_t d = 0; d < D; ++d)
    if (ws.count[d] >= thr) ws.dense_row[d] = ndense++;
  ws.pm.assign(static_cast<size_t>(ndense) * W, 0);
  ws.eq.assign(W, 0);
  const bool sparse = ndense < D;
  if (sparse) {
    ws.csr_start.assign(D + 1, 0);
    for (int32_t d = 0; d < D; ++d) ws.csr_start[d + 1] = ws.csr_start[d] + (ws.dense_row[d] < 0 ? ws.count[d] : 0);
    ws.csr_fill.assign(ws.csr_start.begin(), ws.csr_start.end() - 1);
    ws.csr_pos.resize(ws.csr_start[D]);
  }
  for (int64_t j = 0; j < mm; ++j) {
    const int32_t d = ws.b_id[j], r = ws.dense_row[d];
    if (r >= 0)
      ws.pm[static_cast<size_t>(r) * W + (j >> 6)] |= uint64_t(1) << (j & 63);
    else
      ws.csr_pos[ws.csr_fill[d]++] = static_cast<int32_t>(j);
  }
  auto pm_row = [&](int64_t i) -> const uint64_t* {  // row i is 1-based
    const int32_t d = ws.a_id[i - 1];
    if (d < 0) return ws.eq.data();
    const int32_t r = ws.dense_row[d];
    if (r >= 0) return ws.pm.data() + static_cast<size_t>(r) * W;
    for (int32_t q = ws.csr_start[d]; q < ws.csr_start[d + 1]; ++q)
      ws.eq[ws.csr_pos[q] >> 6] |= uint64_t(1) << (ws.csr_pos[q] & 63);
    return ws.eq.data();
  };
  auto pm_done = [&](int64_t i) {
    const int32_t d = ws.a_id[i - 1];
    if (d < 0 || ws.dense_row[d] >= 0) return;
    for (int32_t q = ws.csr_start[d]; q < ws.csr_start[d + 1]; ++q) ws.eq[ws.csr_pos[q] >> 6] = 0;
  };

  ws.vp.resize(W);
  ws.vn.resize(W);
  const int64_t diff = mm - nn;
  const int64_t kmax = std::max(nn, mm);
  // Pass plan: a first narrow band, kept for the traceback in case it suffices; then bands that only
  // measure the distance (doubling, capped by the best upper bound seen) and one last pass, with the
  // tightest band known to hold every optimal path, that keeps its bits. A band wider than ~1/3 of the
  // matrix costs about as much as the last pass itself, so it goes straight there.
  // Start from the bag-of-tokens lower bound (surplus counts of either side), with slack for the
  // insertion/deletion mixes it underestimates: with a large vocabulary it is close to the distance.
  int64_t surplus_a = 0, surplus_b = 0;
  ws.tally.assign(ws.count.begin(), ws.count.end());
  for (int64_t i = 0; i < nn; ++i) {
    if (ws.a_id[i] < 0)
      ++surplus_a;
    else
      --ws.tally[ws.a_id[i]];
  }
  for (int32_t d = 0; d < D; ++d) (ws.tally[d] > 0 ? surplus_b : surplus_a) += std::abs(ws.tally[d]);
  const int64_t bag = std::max(surplus_a, surplus_b);
  int64_t k = std::min(kmax, std::max(std::abs(diff), bag + bag / 2) + 64), upper = kmax;
  bool first = true;
  while (true) {
    Band band{std::max(-k, diff - k), std::min(k, diff + k), mm};
    int64_t cells = 0;
    for (int64_t i = 1; i <= nn; ++i) cells += band.w1(i) - band.w0(i) + 1;
    if (!first && k < upper && 3 * cells > nn * W) {
      k = upper;
      band = Band{std::max(-k, diff - k), std::min(k, diff + k), mm};
    }
    const bool keep = first || k >= upper;
    first = false;
    // Rows are split into blocks whose D0/HP bits fit the budget.
    ws.block_start.assign(1, 0);
    ws.row_off.resize(nn + 1);
    int64_t acc = 0, total = 0;
    for (int64_t i = 1; i <= nn; ++i) {
      const int64_t width = band.w1(i) - band.w0(i) + 1;
      if (acc + width > ws.store_budget_words / 2 && acc > 0) {
        ws.block_start.push_back(i - 1);
        acc = 0;
      }
      ws.row_off[i] = acc;
      acc += width;
      total = std::max(total, acc);
    }
    const int64_t nblocks = static_cast<int64_t>(ws.block_start.size());
    ws.block_start.push_back(nn);
    const bool store_now = keep && nblocks == 1;
    const bool checkpoint = keep && nblocks > 1;
    if (store_now) ws.reserve_bits(total);
    ws.ckpt.clear();
    ws.ckpt_off.clear();
    ws.ckpt_w0.clear();
    ws.ckpt_w1.clear();

    int64_t cur_w0 = 0, cur_w1 = -1, left = 0, blk = 0;
    for (int64_t i = 1; i <= nn; ++i) {
      if (checkpoint && i - 1 == ws.block_start[blk]) {  // the state before row i
        ws.ckpt_off.push_back(static_cast<int64_t>(ws.ckpt.size()));
        ws.ckpt_w0.push_back(cur_w0);
        ws.ckpt_w1.push_back(cur_w1);
        for (int64_t w = cur_w0; w <= cur_w1; ++w) ws.ckpt.push_back(ws.vp[w]), ws.ckpt.push_back(ws.vn[w]);
        ++blk;
      }
      const int64_t w0 = band.w0(i), w1 = band.w1(i);
      for (int64_t w = cur_w0; w < w0; ++w) left += popc(ws.vp[w]) - popc(ws.vn[w]);
      left += 1;  // D[i][j0 - 1] = D[i - 1][j0 - 1] + 1 (see row_step)
      for (int64_t w = cur_w1 + 1; w <= w1; ++w) ws.vp[w] = ~uint64_t(0), ws.vn[w] = 0;
      cur_w0 = w0, cur_w1 = std::max(cur_w1, w1);
      const uint64_t* pm = pm_row(i);
      if (store_now)
        row_step<true>(pm, ws.vp.data(), ws.vn.data(), w0, w1, ws.d0.get() + ws.row_off[i],
                       ws.hp.get() + ws.row_off[i]);
      else
        row_step<false>(pm, ws.vp.data(), ws.vn.data(), w0, w1, nullptr, nullptr);
      pm_done(i);
    }
    int64_t dist = left;
    const uint64_t last_mask = (mm & 63) ? (uint64_t(1) << (mm & 63)) - 1 : ~uint64_t(0);
    for (int64_t w = cur_w0; w <= cur_w1; ++w) {
      const uint64_t msk = w == W - 1 ? last_mask : ~uint64_t(0);
      dist += popc(ws.vp[w] & msk) - popc(ws.vn[w] & msk);
    }
    // A banded value is the cost of a real path: an upper bound, and exact once it fits the band.
    upper = std::min(upper, dist);
    if (!keep) {
      k = dist <= k ? dist : std::min(2 * k, upper);
      continue;
    }
    if (dist > k) {
      k = std::min(2 * k, upper);
      continue;
    }

    int64_t i = nn, j = mm;
    for (int64_t bi = nblocks - 1; bi >= 0; --bi) {
      const int64_t r0 = ws.block_start[bi], r1 = ws.block_start[bi + 1];
      if (!store_now) {  // recompute rows r0+1..r1 from the checkpoint, this time keeping their bits
        const int64_t c0 = ws.ckpt_w0[bi], c1 = ws.ckpt_w1[bi];
        const uint64_t* c = ws.ckpt.data() + ws.ckpt_off[bi];
        for (int64_t w = c0; w <= c1; ++w) ws.vp[w] = c[2 * (w - c0)], ws.vn[w] = c[2 * (w - c0) + 1];
        int64_t w1c = c1, width = 0;
        for (int64_t r = r0 + 1; r <= r1; ++r) width += band.w1(r) - band.w0(r) + 1;
        ws.reserve_bits(width);
        for (int64_t r = r0 + 1; r <= r1; ++r) {
          const int64_t w0 = band.w0(r), w1 = band.w1(r);
          for (int64_t w = w1c + 1; w <= w1; ++w) ws.vp[w] = ~uint64_t(0), ws.vn[w] = 0;
          w1c = std::max(w1c, w1);
          row_step<true>(pm_row(r), ws.vp.data(), ws.vn.data(), w0, w1, ws.d0.get() + ws.row_off[r],
                   ws.hp.get() + ws.row_off[r]);
          pm_done(r);
        }
      }
      while (i > r0) {
        if (j == 0) {
          em.del(p + i - 1);
          --i;
          continue;
        }
        if (A[i - 1] == B[j - 1]) {
          em.match();
          --i, --j;
          continue;
        }
        const int64_t q = ws.row_off[i] + ((j - 1) >> 6) - band.w0(i);
        const int bit = static_cast<int>((j - 1) & 63);
        if (!((ws.d0[q] >> bit) & 1)) {
          em.sub(p + i - 1, p + j - 1);
          --i, --j;
        } else if ((ws.hp[q] >> bit) & 1) {
          em.del(p + i - 1);
          --i;
        } else {
          em.ins(p + j - 1, p + i);
          --j;
        }
      }
    }
    for (; j > 0; --j) em.ins(p + j - 1, p);
    return done(dist);
  }
}

}  // namespace credit::core
