// The CPU kernels of credit_ops/_checks.py's value checks: within_range (credit::values_within) and finite_each
// (credit::values_finite), one pass over the values instead of the tensor-op checks' 3-4 small ops and scalar reads
// (~8 us on a tiny tensor, and a call makes several: ids, lengths, group ids, repair indices, rewards). Integer
// values are compared exactly in int64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

namespace credit::cpu {
namespace {

// `where` of a check of x, contiguous (undefined when every element counts).
at::Tensor counted(const std::optional<at::Tensor>& where, const at::Tensor& x) {
  if (!where.has_value()) return at::Tensor();
  TORCH_CHECK(where->scalar_type() == at::kBool && where->sizes() == x.sizes(),
              "value checks: where must be a bool tensor of x's shape");
  return where->contiguous();
}

// Every counted element of x in [low, high] (a bound absent: unbounded) or equal to allow; NaN fails. where
// (bool, x's shape), when given, says which elements count.
bool values_within_cpu(const at::Tensor& x, std::optional<double> low, std::optional<double> high,
                       std::optional<double> allow, const std::optional<at::Tensor>& where) {
  const at::Tensor c = x.contiguous(), w = counted(where, x);
  const bool* m = w.defined() ? w.const_data_ptr<bool>() : nullptr;
  const int64_t n = c.numel();
  bool ok = true;
  if (at::isIntegralType(c.scalar_type(), /*includeBool=*/true)) {
    // Exact integer bounds: ceil(low) <= v <= floor(high), clamped to int64.
    const auto clamp = [](double v) {
      constexpr double big = 9.2e18;
      return static_cast<int64_t>(std::max(-big, std::min(big, v)));
    };
    const int64_t lo = low ? clamp(std::ceil(*low)) : std::numeric_limits<int64_t>::min();
    const int64_t hi = high ? clamp(std::floor(*high)) : std::numeric_limits<int64_t>::max();
    const bool has_allow = allow.has_value() && std::floor(*allow) == *allow;
    const int64_t allowed = has_allow ? clamp(*allow) : 0;
    AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, c.scalar_type(), "values_within", [&] {
      const scalar_t* p = c.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n && ok; ++i) {
        if (m && !m[i]) continue;
        const int64_t v = static_cast<int64_t>(p[i]);
        if (has_allow && v == allowed) continue;
        ok = v >= lo && v <= hi;
      }
    });
    return ok;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "values_within", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n && ok; ++i) {
      if (m && !m[i]) continue;
      const double v = static_cast<double>(p[i]);
      if (allow && v == *allow) continue;
      ok = (!low || v >= *low) && (!high || v <= *high);  // false for NaN against any bound
    }
  });
  return ok;
}

// Every counted element of the float tensor x finite (where, when given: bool, x's shape, the counted elements).
bool values_finite_cpu(const at::Tensor& x, const std::optional<at::Tensor>& where) {
  const at::Tensor c = x.contiguous(), w = counted(where, x);
  const bool* m = w.defined() ? w.const_data_ptr<bool>() : nullptr;
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "values_finite", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < c.numel() && ok; ++i) ok = (m && !m[i]) || std::isfinite(static_cast<double>(p[i]));
  });
  return ok;
}

}  // namespace

TORCH_LIBRARY_IMPL(credit, CPU, m) {
  m.impl("values_within", &values_within_cpu);
  m.impl("values_finite", &values_finite_cpu);
}

}  // namespace credit::cpu
