// The policy losses' per-token bookkeeping on the CPU, and the one-call CPU losses built on it:
//   credit::policy_loss_inputs   what credit_ops/ops/policy_loss.py prepare() computes with ~20 tensor ops on other
//                                devices (valid mask, casts, aggregation weights, the value checks), one pass
//   credit::policy_loss_stats    loss_stats()'s seven statistics, one pass
//   credit::policy_loss_cpu, credit::fused_linear_policy_loss_cpu
//                                a token-level loss over logits / through the LM head in one call: the inputs, the
//                                row kernel (policy_loss.cpp policy_rows) or the fused head's chunk loop, the
//                                statistics, and autograd in C++
// so that a call's host cost is its kernels' and not ~45 dispatches plus PyTorch's Python autograd wrapper. The
// tensors are bitwise those of the tensor-op path (the same casts, the same multiplications and matmuls in the same
// order; tests/test_policy_loss_inputs.py compares them), the statistics up to summation order (double accumulators).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "cpu/policy_loss.h"

namespace credit::cpu {
namespace {

// The aggregation ids (credit_ops.reference.AGGREGATIONS, in order).
enum Agg : int64_t { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3 };

using pl::present;

// A new CPU tensor without a trip through the dispatcher (at::empty's ~0.5 us is a tenth of these ops' time on the
// tiny tensors where their cost matters).
at::Tensor new_cpu(at::IntArrayRef size, at::ScalarType dtype) { return at::detail::empty_cpu(size, dtype); }

// A (B, T) or (B,) tensor read at (b, t) through its strides, in the accumulation type (cast once if needed).
template <typename acc_t>
struct Strided {
  const acc_t* p = nullptr;
  int64_t sb = 0, st = 0;
  bool given = false;
  at::Tensor keep;  // the cast copy, when the input had another dtype
  Strided() = default;
  Strided(const at::Tensor& t, at::ScalarType acc) : given(true), keep(t.scalar_type() == acc ? t : t.to(acc)) {
    p = keep.const_data_ptr<acc_t>();
    sb = keep.stride(0);
    st = keep.dim() == 2 ? keep.stride(1) : 0;  // (B,) advantages: one value per row
  }
  explicit operator bool() const { return given; }
  acc_t operator()(int64_t b, int64_t t) const { return p[b * sb + t * st]; }
};

// The per-row failure flags of the value checks, in the order the Python checks run (and report) them.
enum Fail : int { kGates = 0, kLabels, kAdv, kOld, kRef, kWeights, kWeightsNeg, kLogprobs };

// mask (B, T) of any dtype, nonzero = valid, as a (B, T) byte tensor read through strides.
void valid_from_mask(const std::optional<at::Tensor>& mask, int64_t B, int64_t T, std::vector<uint8_t>& valid) {
  valid.assign(B * T, 1);
  if (!present(mask)) return;
  const at::Tensor& m = *mask;
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, m.scalar_type(), "policy_loss_inputs", [&] {
    const scalar_t* p = m.const_data_ptr<scalar_t>();
    const int64_t sb = m.stride(0), st = m.stride(1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) valid[b * T + t] = p[b * sb + t * st] != scalar_t(0);
  });
}

// prepare()'s tensors (credit_ops/ops/policy_loss.py TokenInputs); undefined: not given.
struct Inputs {
  at::Tensor labels, valid, adv, old, ref, gates, weights, w;
};

template <typename acc_t>
Inputs inputs_impl(const std::optional<at::Tensor>& labels, const at::Tensor& advantages,
                   const std::optional<at::Tensor>& old_logprobs, const std::optional<at::Tensor>& ref_logprobs,
                   const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gates,
                   const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& logprobs, int64_t B,
                   int64_t T, int64_t vocab, int64_t ignore_index, int64_t agg, int64_t max_length,
                   bool skip_empty_rows, bool pad_last, bool flat, at::ScalarType acc) {
  const int64_t Tp = T + (pad_last ? 1 : 0);
  const std::vector<int64_t> size = flat ? std::vector<int64_t>{B * Tp} : std::vector<int64_t>{B, Tp};
  std::vector<uint8_t> valid;
  valid_from_mask(mask, B, T, valid);
  at::Tensor labels_out;
  std::vector<uint16_t> fails(B, 0);  // per row, a bit for each failed check (rows run in parallel)
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1));
  if (present(labels)) {
    const at::Tensor& y = *labels;
    labels_out = new_cpu(size, y.scalar_type());
    AT_DISPATCH_INDEX_TYPES(y.scalar_type(), "policy_loss_inputs", [&] {
      const index_t* yp = y.const_data_ptr<index_t>();
      index_t* out = labels_out.mutable_data_ptr<index_t>();
      const int64_t sb = y.stride(0), st = y.stride(1);
      const index_t ignore = static_cast<index_t>(ignore_index);
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t t = 0; t < T; ++t) {
            const int64_t id = yp[b * sb + t * st];
            const bool ignored = id == ignore_index;
            if (!ignored && (id < 0 || id >= vocab)) fails[b] |= 1u << kLabels;
            uint8_t& v = valid[b * T + t];
            v = v && !ignored;
            out[b * Tp + t] = v ? static_cast<index_t>(id) : ignore;
          }
          if (pad_last) out[b * Tp + T] = ignore;
        }
      });
    });
  }

  const Strided<acc_t> adv(advantages, acc);
  const Strided<acc_t> old = present(old_logprobs) ? Strided<acc_t>(*old_logprobs, acc) : Strided<acc_t>();
  const Strided<acc_t> ref = present(ref_logprobs) ? Strided<acc_t>(*ref_logprobs, acc) : Strided<acc_t>();
  const Strided<acc_t> gate = present(gates) ? Strided<acc_t>(*gates, acc) : Strided<acc_t>();
  const Strided<acc_t> weight = present(weights) ? Strided<acc_t>(*weights, acc) : Strided<acc_t>();
  const Strided<acc_t> lp = present(logprobs) ? Strided<acc_t>(*logprobs, acc) : Strided<acc_t>();
  // The gates' range is checked on every element (the Python check's), before the casts below round them.
  if (gate) {
    const at::Tensor& g = *gates;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "policy_loss_inputs", [&] {
      const scalar_t* p = g.const_data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
          const double x = static_cast<double>(p[b * g.stride(0) + t * g.stride(1)]);
          if (!(x >= 0.0 && x <= 1.0)) fails[b] |= 1u << kGates;  // NaN fails
        }
    });
  }

  auto out = [&](bool given) { return given ? new_cpu(size, acc) : at::Tensor(); };
  at::Tensor valid_out = out(true), adv_out = out(true), old_out = out(bool(old)), ref_out = out(bool(ref)),
             gate_out = out(bool(gate)), weight_out = out(bool(weight)), w_out = out(true);
  auto ptr = [](at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<acc_t>() : nullptr; };
  acc_t *vo = ptr(valid_out), *ao = ptr(adv_out), *oo = ptr(old_out), *ro = ptr(ref_out), *go = ptr(gate_out),
        *uo = ptr(weight_out), *wo = ptr(w_out);
  std::vector<int64_t> row_count(B, 0);
  auto finite = [](acc_t x) { return std::isfinite(static_cast<double>(x)); };
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      uint16_t& fail = fails[b];
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * Tp + t;
        const bool v = valid[b * T + t];
        row_count[b] += v;
        // The tensors as the kernels read them: their values on valid tokens, 0 elsewhere (padding may hold NaN).
        const acc_t zero(0);
        const acc_t a = v ? adv(b, t) : zero;
        if (v && !finite(a)) fail |= 1u << kAdv;
        vo[i] = v ? acc_t(1) : zero;
        ao[i] = a;
        if (oo) {
          oo[i] = v ? old(b, t) : zero;
          if (!finite(oo[i])) fail |= 1u << kOld;
        }
        if (ro) {
          ro[i] = v ? ref(b, t) : zero;
          if (!finite(ro[i])) fail |= 1u << kRef;
        }
        if (go) go[i] = v ? gate(b, t) : zero;
        if (uo) {
          uo[i] = v ? weight(b, t) : zero;
          if (!finite(uo[i])) fail |= 1u << kWeights;
          if (uo[i] < zero) fail |= 1u << kWeightsNeg;
        }
        if (lp && v && !finite(lp(b, t))) fail |= 1u << kLogprobs;
      }
      if (pad_last) {
        const int64_t i = b * Tp + T;
        for (acc_t* p : {vo, ao, oo, ro, go, uo, wo})
          if (p) p[i] = acc_t(0);
      }
    }
  });
  uint16_t failed = 0;
  for (uint16_t f : fails) failed |= f;
  const auto ok = [failed](int check) { return !(failed >> check & 1u); };

  // The first failed check, in the order (and with the message) of the Python checks
  // (credit_ops/ops/policy_loss.py prepare, credit_ops._checks).
  TORCH_CHECK_VALUE(ok(kGates), "gates must lie in [0, 1]");
  TORCH_CHECK_VALUE(ok(kLabels), "labels must lie in [0, ", vocab, ") (or equal ignore_index=", ignore_index, ")");
  const char* finite_names[] = {"advantages", "old_logprobs", "ref_logprobs", "weights"};
  for (int k = kAdv; k <= kWeights; ++k)
    TORCH_CHECK_VALUE(ok(k), finite_names[k - kAdv], " must be finite on valid tokens (found NaN or inf)");
  TORCH_CHECK_VALUE(ok(kWeightsNeg), "weights must be >= 0");
  TORCH_CHECK_VALUE(ok(kLogprobs), "logprobs must be finite on valid tokens");

  // Aggregation weights x gate x weight, as aggregation_weights() * token_factors() compute them: w = (1 / d) *
  // ((1 * g) * u) with d the aggregation's denominator in the accumulation type.
  int64_t total = 0, rows = 0;
  for (int64_t b = 0; b < B; ++b) total += row_count[b], rows += row_count[b] > 0;
  const acc_t seqs = skip_empty_rows ? acc_t(std::max<int64_t>(rows, 1)) : acc_t(B);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t d;
      if (agg == kTokenMean)
        d = acc_t(std::max<int64_t>(total, 1));
      else if (agg == kSeqMeanTokenMean)
        d = acc_t(std::max<int64_t>(row_count[b], 1)) * seqs;
      else if (agg == kSeqMeanTokenSum)
        d = seqs;
      else  // kSeqMeanTokenSumNorm: B * max_length, an exact integer product when rows count
        d = skip_empty_rows ? seqs * acc_t(max_length) : acc_t(B * max_length);
      const acc_t inv = acc_t(1) / d;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * Tp + t;
        acc_t f = vo[i];
        if (go) f = f * go[i];
        if (uo) f = f * uo[i];
        wo[i] = (vo[i] * inv) * f;
      }
    }
  });
  return {labels_out, valid_out, adv_out, old_out, ref_out, gate_out, weight_out, w_out};
}

void check_inputs(const std::optional<at::Tensor>& labels, const at::Tensor& advantages,
                  std::initializer_list<const std::optional<at::Tensor>*> per_token, int64_t B, int64_t T, int64_t agg,
                  int64_t max_length) {
  TORCH_CHECK(agg >= kTokenMean && agg <= kSeqMeanTokenSumNorm, "policy_loss_inputs: agg must be 0..3");
  TORCH_CHECK(agg != kSeqMeanTokenSumNorm || max_length > 0, "policy_loss_inputs: agg 3 needs max_length > 0");
  const auto bt = [&](const std::optional<at::Tensor>& t) {
    return !present(t) || (t->dim() == 2 && t->size(0) == B && t->size(1) == T);
  };
  bool ok = bt(labels);
  for (const auto* t : per_token) ok = ok && bt(*t);
  TORCH_CHECK(ok, "policy_loss_inputs: the per-token tensors must be (B, T)");
  TORCH_CHECK((advantages.dim() == 1 && advantages.size(0) == B) || bt(advantages),
              "policy_loss_inputs: advantages must be (B,) or (B, T)");
}

std::vector<at::Tensor> policy_loss_inputs_cpu(const std::optional<at::Tensor>& labels, const at::Tensor& advantages,
                                               const std::optional<at::Tensor>& old_logprobs,
                                               const std::optional<at::Tensor>& ref_logprobs,
                                               const std::optional<at::Tensor>& mask,
                                               const std::optional<at::Tensor>& gates,
                                               const std::optional<at::Tensor>& weights,
                                               const std::optional<at::Tensor>& logprobs, int64_t B, int64_t T,
                                               int64_t vocab, int64_t ignore_index, int64_t agg, int64_t max_length,
                                               bool skip_empty_rows, bool pad_last, bool flat, bool float64) {
  check_inputs(labels, advantages, {&old_logprobs, &ref_logprobs, &mask, &gates, &weights, &logprobs}, B, T, agg,
               max_length);
  const auto run = [&](auto acc_zero, at::ScalarType acc) {
    return inputs_impl<decltype(acc_zero)>(labels, advantages, old_logprobs, ref_logprobs, mask, gates, weights,
                                           logprobs, B, T, vocab, ignore_index, agg, max_length, skip_empty_rows,
                                           pad_last, flat, acc);
  };
  const Inputs in = float64 ? run(0.0, at::kDouble) : run(0.0f, at::kFloat);
  std::vector<at::Tensor> result;  // the given ones (a list of tensors cannot hold an undefined one)
  for (const at::Tensor& t : {in.labels, in.valid, in.adv, in.old, in.ref, in.gates, in.weights, in.w})
    if (t.defined()) result.push_back(t);
  return result;
}

// Schulman's KL estimators of x = logp - ref (credit_ops/ops/policy_loss.py kl_penalty): 1 k1, 2 k2, 3 k3.
template <typename acc_t>
acc_t kl_penalty(acc_t x, int64_t kl_type) {
  if (kl_type == 1) return x;
  if (kl_type == 2) return x * x * acc_t(0.5);
  return std::expm1(-x) + x;
}

template <typename acc_t>
std::vector<at::Tensor> stats_impl(const at::Tensor& logp, const std::optional<at::Tensor>& entropy,
                                   const at::Tensor& valid, const at::Tensor& advantages,
                                   const std::optional<at::Tensor>& ratio, const std::optional<at::Tensor>& old,
                                   const std::optional<at::Tensor>& ref, double eps_low, double eps_high,
                                   int64_t kl_type, at::ScalarType acc) {
  const int64_t N = logp.numel();
  const auto flat = [&](const at::Tensor& t) { return (t.scalar_type() == acc ? t : t.to(acc)).contiguous(); };
  const auto flat_opt = [&](const std::optional<at::Tensor>& t) { return present(t) ? flat(*t) : at::Tensor(); };
  const at::Tensor lp = flat(logp), v = flat(valid), a = flat(advantages), e = flat_opt(entropy), r = flat_opt(ratio),
                   o = flat_opt(old), rf = flat_opt(ref);
  const auto data = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
  const acc_t *lpp = data(lp), *vp = data(v), *ap = data(a), *ep = data(e), *rp = data(r), *op = data(o),
              *refp = data(rf);
  // The clip thresholds as the tensor comparisons see them: the Python float rounded to the tensors' dtype.
  const acc_t lo = static_cast<acc_t>(1.0 - eps_low), hi = static_cast<acc_t>(1.0 + eps_high);
  double sum[6] = {}, count = 0;
  for (int64_t i = 0; i < N; ++i) {
    const acc_t w = vp[i];
    if (w == acc_t(0)) continue;  // not a valid token: its values may be anything
    const acc_t ratio_i = rp ? rp[i] : op ? std::exp(lpp[i] - op[i]) : acc_t(1);
    const bool below = ratio_i < lo && ap[i]<acc_t(0), above = ratio_i> hi && ap[i] > acc_t(0);
    const double wd = static_cast<double>(w);
    sum[0] += wd * below;
    sum[1] += wd * above;
    sum[2] += wd * (below || above);
    sum[3] += wd * static_cast<double>(ratio_i);
    if (refp) sum[4] += wd * static_cast<double>(kl_penalty<acc_t>(lpp[i] - refp[i], kl_type));
    if (ep) sum[5] += wd * static_cast<double>(ep[i]);
    count += wd;
  }
  std::vector<at::Tensor> out;
  out.reserve(7);
  const auto scalar = [&](double value) {
    out.push_back(new_cpu({}, acc));
    *out.back().mutable_data_ptr<acc_t>() = static_cast<acc_t>(value);
  };
  for (double s : sum) scalar(s / std::max(count, 1.0));
  scalar(count);
  return out;
}

std::vector<at::Tensor> policy_loss_stats_cpu(const at::Tensor& logp, const std::optional<at::Tensor>& entropy,
                                              const at::Tensor& valid, const at::Tensor& advantages,
                                              const std::optional<at::Tensor>& ratio,
                                              const std::optional<at::Tensor>& old_logprobs,
                                              const std::optional<at::Tensor>& ref_logprobs, double eps_low,
                                              double eps_high, int64_t kl_type) {
  const int64_t N = logp.numel();
  const auto same = [N](const std::optional<at::Tensor>& t) { return !present(t) || t->numel() == N; };
  TORCH_CHECK(valid.numel() == N && advantages.numel() == N && same(entropy) && same(ratio) && same(old_logprobs) &&
                  same(ref_logprobs),
              "policy_loss_stats: every per-token tensor must have logp's number of elements");
  TORCH_CHECK(kl_type >= 1 && kl_type <= 3, "policy_loss_stats: kl_type must be 1..3");
  if (logp.scalar_type() == at::kDouble)
    return stats_impl<double>(logp, entropy, valid, advantages, ratio, old_logprobs, ref_logprobs, eps_low, eps_high,
                              kl_type, at::kDouble);
  return stats_impl<float>(logp, entropy, valid, advantages, ratio, old_logprobs, ref_logprobs, eps_low, eps_high,
                           kl_type, at::kFloat);
}

// ---- credit::policy_loss_cpu: a token-level policy loss on the CPU in one call (inputs, row kernel, statistics),
// with its autograd here: the Python wrapper's per-call work is then its argument checks alone.
#define CREDIT_LOSS_CPU_ARGS                                                                                          \
  const at::Tensor &logits, const at::Tensor &labels, const at::Tensor &advantages,                                   \
      const std::optional<at::Tensor>&old, const std::optional<at::Tensor>&ref, const std::optional<at::Tensor>&mask, \
      const std::optional<at::Tensor>&gates, const std::optional<at::Tensor>&weights, double temperature,             \
      int64_t ignore_index, double eps_low, double eps_high, double dual_clip, double beta, int64_t kl_type,          \
      int64_t agg, int64_t max_length, bool skip_empty_rows, bool active_only, bool write_grad
#define CREDIT_LOSS_CPU_NAMES                                                                                          \
  logits, labels, advantages, old, ref, mask, gates, weights, temperature, ignore_index, eps_low, eps_high, dual_clip, \
      beta, kl_type, agg, max_length, skip_empty_rows, active_only, write_grad

// The tokens whose loss coefficient can be nonzero (ops/policy_loss.py active_tokens, the one rule of active_only):
// token weight != 0 and, with beta = 0, advantage != 0.
at::Tensor carries(const at::Tensor& w, const at::Tensor& adv, double beta) {
  return beta != 0.0 ? w.ne(0) : w.ne(0).logical_and_(adv.ne(0));
}

const auto defined_or_none = [](const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
};

template <typename acc_t>
std::vector<at::Tensor> loss_impl(CREDIT_LOSS_CPU_ARGS, at::ScalarType acc) {
  const int64_t B = labels.size(0), T = labels.size(1), V = logits.size(2);
  Inputs in = inputs_impl<acc_t>(labels, advantages, old, ref, mask, gates, weights, std::nullopt, B, T, V,
                                 ignore_index, agg, max_length, skip_empty_rows, logits.size(1) == T + 1, false, acc);
  if (active_only) {  // the rows whose coefficient is 0 become ignored rows
    const at::Tensor skipped = carries(in.w, in.adv, beta).logical_not_();
    in.labels.masked_fill_(skipped, ignore_index);
    in.valid.masked_fill_(skipped, 0);
  }
  const at::Tensor x = logits.stride(-1) == 1 ? logits : logits.contiguous();
  at::Tensor grad = write_grad ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  const auto params = make_params(eps_low, eps_high, dual_clip, beta, kl_type, !in.old.defined(), false, write_grad);
  const auto o = defined_or_none(in.old), r = defined_or_none(in.ref);
  auto [loss, logp, entropy] = policy_rows(grad, x, in.labels, in.adv, in.w, o, r, temperature, ignore_index, params);
  std::vector<at::Tensor> out =
      stats_impl<acc_t>(logp, entropy, in.valid, in.adv, std::nullopt, o, r, eps_low, eps_high, kl_type, acc);
  out.insert(out.begin(), loss);
  out.push_back(grad);
  return out;
}

// The CPU kernel: [loss, the 7 statistics, grad (the logits' shape; (0,) without write_grad)].
std::vector<at::Tensor> policy_loss_cpu_kernel(CREDIT_LOSS_CPU_ARGS) {
  TORCH_CHECK(logits.dim() == 3 && labels.dim() == 2 && logits.size(0) == labels.size(0) &&
                  (logits.size(1) == labels.size(1) || logits.size(1) == labels.size(1) + 1),
              "policy_loss_cpu: logits must be (B, T, V) or (B, T + 1, V), labels (B, T)");
  check_inputs(labels, advantages, {&old, &ref, &mask, &gates, &weights}, labels.size(0), labels.size(1), agg,
               max_length);
  TORCH_CHECK(kl_type >= 1 && kl_type <= 3, "policy_loss_cpu: kl_type must be 1..3");
  if (logits.scalar_type() == at::kDouble) return loss_impl<double>(CREDIT_LOSS_CPU_NAMES, at::kDouble);
  return loss_impl<float>(CREDIT_LOSS_CPU_NAMES, at::kFloat);
}

// The op below autograd (the CPU kernel, or a fake kernel under FakeTensorMode).
std::vector<at::Tensor> redispatch(CREDIT_LOSS_CPU_ARGS) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("credit::policy_loss_cpu", "")
                             .typed<std::vector<at::Tensor>(CREDIT_LOSS_CPU_ARGS)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(CREDIT_LOSS_CPU_NAMES);
}

// grad * g, skipping the pass when g is a plain 1 (as credit_ops/_autograd.py scale_grad does); the host read only
// for a plain tensor: a traced one (fake, functional) has no value to read.
at::Tensor scale_grad(const at::Tensor& grad, const at::Tensor& g) {
  const bool plain =
      !g.unsafeGetTensorImpl()->is_python_dispatch() && !at::functionalization::impl::isFunctionalTensor(g);
  if (plain && g.item<double>() == 1.0) return grad;
  return grad * g.to(grad.scalar_type());
}

// The forward writes d loss / d logits; backward scales it by the incoming gradient (skipped when that is 1, as
// credit_ops/_autograd.py scale_grad does).
struct PolicyLossCpuFunction : public torch::autograd::Function<PolicyLossCpuFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                                                const std::function<std::vector<at::Tensor>()>& run) {
    std::vector<at::Tensor> out = run();
    ctx->saved_data["grad"] = out.back();
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable(torch::autograd::variable_list(out.begin() + 1, out.end()));
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    at::Tensor grad = ctx->saved_data["grad"].toTensor();
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor()};
    return {scale_grad(grad, g), at::Tensor()};
  }
};

std::vector<at::Tensor> policy_loss_cpu_autograd(CREDIT_LOSS_CPU_ARGS) {
  if (!(write_grad && logits.requires_grad() && at::GradMode::is_enabled())) return redispatch(CREDIT_LOSS_CPU_NAMES);
  return PolicyLossCpuFunction::apply(
      logits, std::function<std::vector<at::Tensor>()>([&] { return redispatch(CREDIT_LOSS_CPU_NAMES); }));
}

// ---- credit::fused_linear_policy_loss_cpu: the fused LM head's token-level loss on the CPU in one call, the chunk
// loop of credit_ops/ops/fused_linear.py policy_loss_forward (the same matmuls in the same order: the same bits)
// between the inputs and the statistics.
#define CREDIT_HEAD_CPU_ARGS                                                                                          \
  const at::Tensor &hidden, const at::Tensor &weight, const std::optional<at::Tensor>&bias, const at::Tensor &labels, \
      const at::Tensor &advantages, const std::optional<at::Tensor>&old, const std::optional<at::Tensor>&ref,         \
      const std::optional<at::Tensor>&mask, const std::optional<at::Tensor>&gates,                                    \
      const std::optional<at::Tensor>&weights, double temperature, int64_t ignore_index, double eps_low,              \
      double eps_high, double dual_clip, double beta, int64_t kl_type, int64_t agg, int64_t max_length,               \
      bool skip_empty_rows, bool active_only, int64_t chunk_rows, bool compute_grad
#define CREDIT_HEAD_CPU_NAMES                                                                                   \
  hidden, weight, bias, labels, advantages, old, ref, mask, gates, weights, temperature, ignore_index, eps_low, \
      eps_high, dual_clip, beta, kl_type, agg, max_length, skip_empty_rows, active_only, chunk_rows, compute_grad

template <typename acc_t>
std::vector<at::Tensor> head_impl(CREDIT_HEAD_CPU_ARGS, at::ScalarType acc) {
  const int64_t B = labels.size(0), T = labels.size(1), V = weight.size(0);
  Inputs in = inputs_impl<acc_t>(labels, advantages, old, ref, mask, gates, weights, std::nullopt, B, T, V,
                                 ignore_index, agg, max_length, skip_empty_rows, false, true, acc);
  at::Tensor h = hidden.contiguous(), W = weight.contiguous(), b = present(bias) ? bias->contiguous() : at::Tensor();
  at::Tensor lab = in.labels, valid = in.valid, adv = in.adv, w = in.w, o = in.old, r = in.ref, index;
  if (active_only) {  // the rows whose coefficient is 0 leave all three matmuls (ops/policy_loss.py active_tokens)
    index = carries(w, adv, beta).nonzero().squeeze(1);
    if (index.numel() < w.numel()) {
      for (at::Tensor* t : {&h, &lab, &valid, &adv, &w, &o, &r})
        if (t->defined()) *t = t->index_select(0, index);
    } else {
      index = at::Tensor();
    }
  }
  const int64_t n = h.size(0), rows = std::max<int64_t>(1, chunk_rows);
  const at::Tensor logp = at::empty({n}, h.options().dtype(acc)), entropy = at::empty({n}, h.options().dtype(acc));
  at::Tensor loss = at::zeros({}, h.options().dtype(acc));
  at::Tensor gh = compute_grad ? at::empty_like(h) : at::Tensor(), gw,
             gb = compute_grad && b.defined() ? at::zeros({V}, h.options().dtype(acc)) : at::Tensor();
  const auto params = make_params(eps_low, eps_high, dual_clip, beta, kl_type, !o.defined(), false, compute_grad);
  const auto part = [](const at::Tensor& t, int64_t s, int64_t e) {
    return t.defined() ? std::optional<at::Tensor>(t.slice(0, s, e).view({1, -1})) : std::nullopt;
  };
  for (int64_t s = 0; s < n; s += rows) {
    const int64_t e = std::min(n, s + rows);
    const at::Tensor hc = h.slice(0, s, e);
    at::Tensor z = b.defined() ? at::addmm(b, hc, W.t()) : at::mm(hc, W.t());
    at::Tensor z3 = z.unsqueeze(0);  // (1, rows, V): becomes d loss / d logits in place
    auto [loss_c, lp, ent] = policy_rows(z3, z3, lab.slice(0, s, e).view({1, -1}), part(adv, s, e), *part(w, s, e),
                                         part(o, s, e), part(r, s, e), temperature, ignore_index, params);
    loss.add_(loss_c);
    logp.slice(0, s, e).copy_(lp.view(-1));
    entropy.slice(0, s, e).copy_(ent.view(-1));
    if (compute_grad) {
      at::Tensor gh_c = gh.slice(0, s, e);
      at::mm_out(gh_c, z, W);
      gw = gw.defined() ? gw.addmm_(z.t(), hc) : at::mm(z.t(), hc);
      if (gb.defined()) gb.add_(z.sum(0, false, acc));
    }
  }
  std::vector<at::Tensor> out = stats_impl<acc_t>(logp, entropy, valid, adv, std::nullopt, defined_or_none(o),
                                                  defined_or_none(r), eps_low, eps_high, kl_type, acc);
  out.insert(out.begin(), loss);
  if (!compute_grad) {
    for (int k = 0; k < 3; ++k) out.push_back(at::empty({0}, hidden.options()));
    return out;
  }
  if (index.defined()) gh = at::zeros_like(hidden).index_copy_(0, index, gh);  // the skipped rows' gradient is 0
  out.push_back(gh);
  out.push_back(gw.defined() ? gw : at::zeros_like(weight));
  out.push_back(gb.defined() ? gb.to(b.scalar_type()) : at::empty({0}, hidden.options()));
  return out;
}

// The CPU kernel: [loss, the 7 statistics, grad_hidden (N, H), grad_weight (V, H), grad_bias (V,)] ((0,) each
// without compute_grad; grad_bias (0,) without a bias).
std::vector<at::Tensor> fused_linear_policy_loss_cpu_kernel(CREDIT_HEAD_CPU_ARGS) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1) &&
                  hidden.size(0) == labels.numel() && labels.dim() == 2,
              "fused_linear_policy_loss_cpu: hidden (N, H), weight (V, H), labels (B, T) with N = B T");
  check_inputs(labels, advantages, {&old, &ref, &mask, &gates, &weights}, labels.size(0), labels.size(1), agg,
               max_length);
  TORCH_CHECK(kl_type >= 1 && kl_type <= 3, "fused_linear_policy_loss_cpu: kl_type must be 1..3");
  if (hidden.scalar_type() == at::kDouble) return head_impl<double>(CREDIT_HEAD_CPU_NAMES, at::kDouble);
  return head_impl<float>(CREDIT_HEAD_CPU_NAMES, at::kFloat);
}

std::vector<at::Tensor> head_redispatch(CREDIT_HEAD_CPU_ARGS) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("credit::fused_linear_policy_loss_cpu", "")
                             .typed<std::vector<at::Tensor>(CREDIT_HEAD_CPU_ARGS)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(CREDIT_HEAD_CPU_NAMES);
}

struct FusedHeadCpuFunction : public torch::autograd::Function<FusedHeadCpuFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& hidden,
                                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                const std::function<std::vector<at::Tensor>()>& run) {
    std::vector<at::Tensor> out = run();
    ctx->save_for_backward({out[8], out[9], out[10]});
    ctx->saved_data["has_bias"] = present(bias);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable(torch::autograd::variable_list(out.begin() + 1, out.end()));
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    return {scale_grad(saved[0], g), scale_grad(saved[1], g), has_bias ? scale_grad(saved[2], g) : at::Tensor(),
            at::Tensor()};
  }
};

std::vector<at::Tensor> fused_linear_policy_loss_cpu_autograd(CREDIT_HEAD_CPU_ARGS) {
  const bool wants = hidden.requires_grad() || weight.requires_grad() || (present(bias) && bias->requires_grad());
  if (!(compute_grad && wants && at::GradMode::is_enabled())) return head_redispatch(CREDIT_HEAD_CPU_NAMES);
  return FusedHeadCpuFunction::apply(hidden, weight, bias, std::function<std::vector<at::Tensor>()>([&] {
                                       return head_redispatch(CREDIT_HEAD_CPU_NAMES);
                                     }));
}

}  // namespace

TORCH_LIBRARY_IMPL(credit, CPU, m) {
  m.impl("policy_loss_inputs", &policy_loss_inputs_cpu);
  m.impl("policy_loss_stats", &policy_loss_stats_cpu);
  m.impl("policy_loss_cpu", &policy_loss_cpu_kernel);
  m.impl("fused_linear_policy_loss_cpu", &fused_linear_policy_loss_cpu_kernel);
}

TORCH_LIBRARY_IMPL(credit, AutogradCPU, m) {
  m.impl("policy_loss_cpu", &policy_loss_cpu_autograd);
  m.impl("fused_linear_policy_loss_cpu", &fused_linear_policy_loss_cpu_autograd);
}

// Neither op is differentiable (bookkeeping of detached values): autograd passes them by.
TORCH_LIBRARY_IMPL(credit, Autograd, m) {
  m.impl("policy_loss_inputs", torch::CppFunction::makeFallthrough());
  m.impl("policy_loss_stats", torch::CppFunction::makeFallthrough());
}

}  // namespace credit::cpu
