// Device code of credit::align_edits (see csrc/cuda/align_edits.cu): one warp per pair. Plain CUDA with no
// torch dependency, so csrc/tests/test_align_edits_warp_emulation.cpp can run the very same kernel on the CPU
// (32 threads standing in for the lanes of a warp) against the CPU core.
#pragma once

#include <algorithm>
#include <cstdint>

namespace credit::cuda_kernels {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 4;  // warps per block

constexpr int kStrip = 2048;  // columns of b per strip: 32 lanes x 64 bits

struct Scratch {
  uint8_t* base;
  int64_t per_warp;  // bytes
  int64_t bits_off;  // ulonglong2 [S][R + 31][32]: D0, HP of a block of rows
  int64_t ckpt_off;  // ulonglong2 [blocks][S * 32]: VP, VN after rows R, 2R, ...
  int64_t bnd_off;   // int32 [S - 1][La + 1]: D[i][kStrip * (s + 1)], the column right of strip s, per row
  int R;             // rows per block
};

// Scratch layout per warp, from the padded widths (a pair's core lengths are only known on the device).
inline Scratch plan_scratch(int64_t La, int64_t Lb, int64_t warp_budget) {
  const int64_t S = std::max<int64_t>(1, ((Lb + 63) / 64 + 31) / 32);
  const int64_t row_bytes = S * 32 * 16;
  int64_t R = std::max<int64_t>(1, La);
  if ((R + 31) * row_bytes > warp_budget) R = std::max<int64_t>(32, warp_budget / row_bytes - 31);
  const int64_t nblocks = (std::max<int64_t>(La, 1) + R - 1) / R;
  auto round_up = [](int64_t x, int64_t a) { return (x + a - 1) / a * a; };
  Scratch scr{};
  scr.R = static_cast<int>(R);
  scr.bits_off = 0;
  scr.ckpt_off = round_up(S * (R + 31) * 32 * 16, 16);
  scr.bnd_off = scr.ckpt_off + (nblocks > 1 ? nblocks * S * 32 * 16 : 0);
  scr.per_warp = round_up(scr.bnd_off + (S > 1 ? (S - 1) * (La + 1) * 4 : 0), 256);
  return scr;
}

// The band j - i in [lo, hi] holds every path of cost <= k. Strip s only runs the rows that meet it.
struct Band {
  int lo, hi, nn, mm;
  __device__ int row0(int s) const { return max(1, s * kStrip + 1 - hi); }
  __device__ int row1(int s) const { return min(nn, min(mm, (s + 1) * kStrip) - lo); }
};

// D[x][kStrip * s], the column left of strip s, as the strips before it left it: exact on row 0 and for
// strip 0; below the rows strip s - 1 ran, a column of deletions (a real path, so an upper bound).
__device__ __forceinline__ int left_value(const int* __restrict__ bnd, int cstride, const Band& band, int s, int x) {
  if (s == 0) return x;
  if (x == 0) return s * kStrip;
  const int last = band.row1(s - 1);
  const int* col = bnd + static_cast<int64_t>(s - 1) * cstride;
  return x <= last ? col[x] : col[last] + (x - last);
}

// Rows r0+1..r1 of the banded DP, every strip. Optionally keeps the rows' bits, the checkpoints, the
// strip boundary columns. Returns D[nn][mm] of the band (the cost of a real path) when r1 == nn.
template <typename T>
__device__ int dp_rows(const T* __restrict__ A, const T* __restrict__ B, const Band& band, int W, int S, int r0,
                       int r1, int R, bool store, bool save_ckpt, bool write_bnd, ulonglong2* __restrict__ bits,
                       ulonglong2* __restrict__ ckpt, int* __restrict__ bnd, int cstride) {
  const int lane = threadIdx.x & 31;
  const int mm = band.mm;
  int dist = 0;
  for (int s = 0; s < S; ++s) {
    const int i0 = band.row0(s), i1 = band.row1(s);
    const int first = max(r0 + 1, i0), last = min(r1, i1);
    if (first > last) continue;
    const int w = s * 32 + lane;
    const bool word_on = w < W;
    // b's 64 tokens of this lane's word live in registers; bits past mm compare against a real token, which
    // is harmless: carries only move towards higher bits.
    T tok[64];
#pragma unroll
    for (int k = 0; k < 64; ++k) {
      const int jj = w * 64 + k;
      tok[k] = (word_on && jj < mm) ? B[jj] : B[0];
    }
    uint64_t vp = ~0ull, vn = 0;  // entering the band: a row of insertions from the column on its left
    if (first - 1 >= i0 && word_on) {
      const ulonglong2 c = ckpt[static_cast<int64_t>(r0 / R) * S * 32 + w];
      vp = c.x, vn = c.y;
    }
    int left = left_value(bnd, cstride, band, s, first - 1);  // lane 0: D[i - 1][left column]
    uint32_t hout_p = 0, hout_n = 0;
    int vout = 0;
    const int t_end = last - r0 - 1 + 31;
    for (int t = first - r0 - 1; t <= t_end; ++t) {
      uint32_t hin_p = __shfl_up_sync(kFull, hout_p, 1);
      uint32_t hin_n = __shfl_up_sync(kFull, hout_n, 1);
      int vin = __shfl_up_sync(kFull, vout, 1);  // D[i][64 w]
      const int i = r0 + 1 + t - lane;
      const bool on = word_on && i >= first && i <= last;
      if (lane == 0 && on) {
        vin = left_value(bnd, cstride, band, s, i);
        hin_p = vin - left == 1, hin_n = vin - left == -1;
        left = vin;
      }
      if (on) {
        const T c = A[i - 1];
        uint32_t lo = 0, hi = 0;
#pragma unroll
        for (int k = 0; k < 32; ++k) {
          lo |= static_cast<uint32_t>(tok[k] == c) << k;
          hi |= static_cast<uint32_t>(tok[k + 32] == c) << k;
        }
        const uint64_t X = ((static_cast<uint64_t>(hi) << 32) | lo) | hin_n;
        const uint64_t D0 = (((X & vp) + vp) ^ vp) | X | vn;
        uint64_t HP = vn | ~(D0 | vp);
        uint64_t HN = D0 & vp;
        if (store) bits[(static_cast<int64_t>(s) * (R + 31) + t) * 32 + lane] = make_ulonglong2(D0, HP);
        hout_p = static_cast<uint32_t>(HP >> 63), hout_n = static_cast<uint32_t>(HN >> 63);
        HP = (HP << 1) | hin_p;
        HN = (HN << 1) | hin_n;
        vp = HN | ~(D0 | HP);
        vn = HP & D0;
        vout = vin + __popcll(vp) - __popcll(vn);
        if (write_bnd && lane == 31 && s + 1 < S) bnd[static_cast<int64_t>(s) * cstride + i] = vout;
        if (save_ckpt && i % R == 0 && i < r1) ckpt[static_cast<int64_t>(i / R) * S * 32 + w] = make_ulonglong2(vp, vn);
        if (w == W - 1 && i == band.nn) {
          const int rem = mm - w * 64;
          const uint64_t msk = rem >= 64 ? ~0ull : ((1ull << rem) - 1);
          dist = vin + __popcll(vp & msk) - __popcll(vn & msk);
        }
      }
    }
    __syncwarp();  // lane 31's boundary column (and the checkpoints) are read by other lanes later
  }
  return __shfl_sync(kFull, dist, (W - 1) & 31);
}

struct Emit {
  bool* ma;
  bool* mb;
  int32_t* ra;
  int32_t* rb;
  int n, anchor, lane;
  int runs = 0;
  bool in_run = false;
  __device__ int edit() {
    if (!in_run) ++runs, in_run = true;
    return runs - 1;
  }
  __device__ void flag_a(int t, int r) {
    if (lane == 0) ma[t] = true, ra[t] = r;
  }
  __device__ void flag_b(int t, int r) {
    if (lane == 0) mb[t] = true, rb[t] = r;
  }
  __device__ void anchor_gap(int g, int r) {  // an insertion before a[g]; see csrc/core/align_edits.h
    if (n == 0 || anchor == 2) return;
    flag_a(anchor == 0 ? (g > 0 ? g - 1 : 0) : (g < n ? g : n - 1), r);
  }
};

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) align_edits_kernel(
    const T* __restrict__ a, const int64_t* __restrict__ a_len, const T* __restrict__ b,
    const int64_t* __restrict__ b_len, int64_t P, int La, int Lb, int anchor, bool* __restrict__ mask_a,
    bool* __restrict__ mask_b, int32_t* __restrict__ region_a, int32_t* __restrict__ region_b,
    int32_t* __restrict__ distance, Scratch scr, int64_t num_warps) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (warp >= num_warps) return;
  uint8_t* mine = scr.base + warp * scr.per_warp;
  ulonglong2* bits = reinterpret_cast<ulonglong2*>(mine + scr.bits_off);
  ulonglong2* ckpt = reinterpret_cast<ulonglong2*>(mine + scr.ckpt_off);
  int* bnd = reinterpret_cast<int*>(mine + scr.bnd_off);
  const int R = scr.R;

  for (int64_t pr = warp; pr < P; pr += num_warps) {
    // Lengths were validated by the wrapper (possibly asynchronously): clamp so a bad one cannot fault.
    const int64_t n64 = a_len[pr], m64 = b_len[pr];
    const int n = static_cast<int>(n64 < 0 ? 0 : (n64 > La ? La : n64));
    const int m = static_cast<int>(m64 < 0 ? 0 : (m64 > Lb ? Lb : m64));
    const T* ap = a + pr * La;
    const T* bp = b + pr * Lb;
    bool* ma = mask_a + pr * La;
    bool* mb = mask_b + pr * Lb;
    int32_t* ra = region_a + pr * La;
    int32_t* rb = region_b + pr * Lb;
    for (int t = lane; t < La; t += 32) ma[t] = false, ra[t] = -1;
    for (int t = lane; t < Lb; t += 32) mb[t] = false, rb[t] = -1;

    const int mn = min(n, m);
    int p = mn;
    for (int base = 0; base < mn; base += 32) {
      const int t = base + lane;
      const unsigned diff = __ballot_sync(kFull, t < mn && ap[t] != bp[t]);
      if (diff) {
        p = base + __ffs(diff) - 1;
        break;
      }
    }
    int s = mn - p;
    for (int base = 0; base < mn - p; base += 32) {
      const int t = base + lane;
      const unsigned diff = __ballot_sync(kFull, t < mn - p && ap[n - 1 - t] != bp[m - 1 - t]);
      if (diff) {
        s = base + __ffs(diff) - 1;
        break;
      }
    }
    const int nn = n - p - s, mm = m - p - s;
    const T* A = ap + p;
    const T* B = bp + p;
    __syncwarp();

    Emit em{ma, mb, ra, rb, n, anchor, lane};
    int dist = nn + mm;
    int i = nn, j = mm;
    if (nn > 0 && mm > 0) {
      const int W = (mm + 63) / 64, S = (W + 31) / 32;
      const int nblocks = (nn + R - 1) / R;
      const int cstride = La + 1;
      const bool single = nblocks == 1;
      // Forward pass over all rows: the distance, and the bits themselves when they fit in one block. A first
      // narrow band skips the strips far from the diagonal; its (upper bound) distance d, when above the
      // band's k, gives a second band that certainly holds every optimal path.
      const int diff = mm - nn, kmax = max(nn, mm);
      int k = min(kmax, abs(diff) + 512);
      Band band{};
      while (true) {
        band = Band{max(-k, diff - k), min(k, diff + k), nn, mm};
        dist = dp_rows(A, B, band, W, S, 0, nn, R, single, !single, true, bits, ckpt, bnd, cstride);
        if (dist <= k || k == kmax) break;
        k = min(kmax, dist);
      }
      for (int bi = nblocks - 1; bi >= 0 && i > 0; --bi) {
        const int r0 = bi * R, r1 = min(nn, r0 + R);
        if (i <= r0) continue;
        if (!single) dp_rows(A, B, band, W, S, r0, r1, R, true, false, false, bits, ckpt, bnd, cstride);
        __syncwarp();
        while (i > r0) {
          if (j == 0) {
            em.flag_a(p + i - 1, em.edit());
            --i;
            continue;
          }
          // Matches skip 32 diagonal cells at a time: they need no bits.
          const bool eq = lane < i && lane < j && A[i - 1 - lane] == B[j - 1 - lane];
          const unsigned run = __ballot_sync(kFull, eq);
          const int nm = ~run ? __ffs(~run) - 1 : 32;
          if (nm > 0) {
            em.in_run = false;
            i -= nm, j -= nm;
            continue;
          }
          const int wj = (j - 1) >> 6, bit = (j - 1) & 63;
          const int st = wj >> 5, l = wj & 31;
          const ulonglong2 e = bits[(static_cast<int64_t>(st) * (R + 31) + (i - r0 - 1) + l) * 32 + l];
          if (!((e.x >> bit) & 1)) {
            const int r = em.edit();
            em.flag_a(p + i - 1, r), em.flag_b(p + j - 1, r);
            --i, --j;
          } else if ((e.y >> bit) & 1) {
            em.flag_a(p + i - 1, em.edit());
            --i;
          } else {
            const int r = em.edit();
            em.flag_b(p + j - 1, r), em.anchor_gap(p + i, r);
            --j;
          }
        }
        __syncwarp();  // the next block's recompute overwrites the bits
      }
    } else if (nn > 0) {  // only deletions: one run, written by all lanes
      const int r = em.edit();
      for (int t = lane; t < nn; t += 32) ma[p + t] = true, ra[p + t] = r;
      i = 0;
    }
    if (j > 0) {  // insertions before the first core token of a: one run, written by all lanes
      const int r = em.edit();
      for (int t = lane; t < j; t += 32) mb[p + t] = true, rb[p + t] = r;
      em.anchor_gap(p, r);
    }
    __syncwarp();
    // Runs were numbered walking backwards: flip them so region 0 is the first along the sequences.
    const int runs = em.runs;
    for (int t = lane; t < n; t += 32)
      if (ra[t] >= 0) ra[t] = runs - 1 - ra[t];
    for (int t = lane; t < m; t += 32)
      if (rb[t] >= 0) rb[t] = runs - 1 - rb[t];
    if (lane == 0) distance[pr] = dist;
    __syncwarp();
  }
}

}  // namespace credit::cuda_kernels
