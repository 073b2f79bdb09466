// The per-token policy loss of docs/method.md §4 from a token's log-prob (clipped surrogate, dual clip,
// beta * KL) and its derivative, shared by the CPU row kernel (csrc/cpu/policy_loss.cpp) and the Hopper cluster
// kernel (csrc/cuda/policy_loss_cluster.cuh) so both evaluate the same expressions. Framework-free: the CUDA kernel's
// CPU emulation test includes it without torch.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CREDIT_HD __host__ __device__
#else
#define CREDIT_HD
#endif

namespace credit::core {

struct LossParams {
  double lo, hi, dual_clip, beta;  // lo = 1 - eps_low, hi = 1 + eps_high; dual_clip 0 = off
  int64_t kl_type;                 // 0 none, 1 k1, 2 k2, 3 k3
  bool on_policy, coef_given, write_grad;
};

CREDIT_HD inline float exp_of(float x) { return expf(x); }
CREDIT_HD inline double exp_of(double x) { return exp(x); }

// loss_t and dloss_t / dlogp_t of one token; `old` is ignored on-policy (ratio 1), `ref` when kl_type == 0.
template <typename acc_t>
CREDIT_HD inline void token_loss(acc_t logp, acc_t old, acc_t ref, acc_t A, const LossParams& p, acc_t* loss,
                                 acc_t* dloss) {
  if (logp != logp) {  // a NaN log-prob (NaN / +inf logits) must not be clipped into a finite loss
    *loss = logp;
    *dloss = logp;
    return;
  }
  const acc_t r = p.on_policy ? acc_t(1) : exp_of(logp - old);
  const acc_t lo = static_cast<acc_t>(p.lo), hi = static_cast<acc_t>(p.hi);
  const acc_t u = r * A;
  const acc_t cl = (r < lo ? lo : r > hi ? hi : r) * A;
  acc_t pg = -(u < cl ? u : cl);
  acc_t dpg = u <= cl ? -u : acc_t(0);  // the clipped branch has no gradient
  if (p.dual_clip > 0 && A < 0) {
    const acc_t cap = -static_cast<acc_t>(p.dual_clip) * A;
    if (pg > cap) pg = cap, dpg = 0;
  }
  if (p.kl_type != 0) {
    const acc_t d = ref - logp, beta = static_cast<acc_t>(p.beta);
    acc_t kl, dkl;
    if (p.kl_type == 1) {
      kl = -d, dkl = 1;
    } else if (p.kl_type == 2) {
      kl = acc_t(0.5) * d * d, dkl = -d;
    } else {
      const acc_t e = exp_of(d);
      kl = e - d - 1, dkl = 1 - e;
    }
    pg += beta * kl;
    dpg += beta * dkl;
  }
  *loss = pg;
  *dloss = dpg;
}

}  // namespace credit::core
