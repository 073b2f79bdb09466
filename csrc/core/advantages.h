// Per-sample and per-token credit formulas shared by the CPU (csrc/cpu/advantages.cpp) and CUDA
// (csrc/cuda/advantages.cu) kernels, so both backends evaluate the same expressions in the same order.
#pragma once
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace credit::adv {

enum Mode : int64_t { kGrpo = 0, kDrGrpo = 1, kRloo = 2, kBatch = 3 };

// Row kinds of the token kernel: the whole row dropped, sequence credit on every token, or credit on the
// flagged tokens only (weight `unmasked` elsewhere).
enum Row : int { kDropped = 0, kSequence = 1, kMasked = 2 };

// Advantage of one sample from its group's count n, mean and sum of squared deviations m2 (all in double).
template <typename T>
C10_HOST_DEVICE inline T group_advantage(T r, double n, double mean, double m2, int64_t mode, double eps) {
  if (!(n >= 2.0)) return T(0);  // a group of one has no baseline
  const double d = static_cast<double>(r) - mean;
  switch (mode) {
    case kDrGrpo:
      return static_cast<T>(d);
    case kRloo:
      return static_cast<T>(d * n / (n - 1.0));  // r - mean of the others
    default:
      return static_cast<T>(d / (::sqrt(m2 / (n - 1.0)) + eps));  // unbiased std, as TRL and verl
  }
}

// phi = rho * (share of this wrong sample's revisions that were correct); 0 for correct samples.
template <typename T>
C10_HOST_DEVICE inline T ibpo_phi(T r, int64_t n_correct, int64_t n_valid, double rho, double threshold) {
  if (!(static_cast<double>(r) < threshold) || n_valid <= 0) return T(0);
  return static_cast<T>(rho * static_cast<double>(n_correct) / static_cast<double>(n_valid));
}

// Gate of one token: 0 outside the row's [start, end) range, 1 on sequence-credit rows, the mask (or the
// unmasked weight) on masked rows.
template <typename T>
C10_HOST_DEVICE inline T token_gate(int kind, bool flagged, bool in_range, T unmasked) {
  if (!in_range || kind == kDropped) return T(0);
  if (kind == kSequence) return T(1);
  return flagged ? T(1) : unmasked;
}

// Kind and advantage value of a sample row.
template <typename T>
C10_HOST_DEVICE inline void sample_row(T a, bool wrong, bool has_repair, bool sign_guard, bool correct_in_loss,
                                       int* kind, T* value) {
  if (!wrong && !correct_in_loss) {
    *kind = kDropped, *value = T(0);
  } else if (wrong && has_repair) {
    *kind = kMasked, *value = (sign_guard && a > T(0)) ? T(0) : a;
  } else {
    *kind = kSequence, *value = a;
  }
}

}  // namespace credit::adv
