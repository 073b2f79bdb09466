// Small numeric helpers for the CPU kernels, written so GCC auto-vectorises the loops that call them.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace credit::cpu {

// exp(x) for x <= 0 (softmax terms after max subtraction), Cephes-style range reduction + degree-6
// polynomial, ~1 ulp. Branch-free so it vectorises; inputs below -87 flush to ~0 instead of producing
// denormals or NaN (the callers clamp -inf there).
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  float fx = x * 1.44269504088896341f;
  // Round to nearest without std::round so the loop stays vectorisable on plain SSE2.
  float n = static_cast<float>(static_cast<int32_t>(fx + (fx >= 0.f ? 0.5f : -0.5f)));
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double fast_exp(double x) { return std::exp(x); }

}  // namespace credit::cpu
