// CPU kernels for the credit:: advantage ops: segmented group statistics (two passes, double accumulators,
// group ids unsorted), IBPO reward shaping, and per-token advantages/gates for sample and repair rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "advantages_args.h"

namespace credit::cpu {
namespace {

using namespace credit::adv;

at::Tensor group_advantages_cpu(const at::Tensor& rewards, const at::Tensor& group_ids, int64_t num_groups,
                                int64_t mode, double eps) {
  check_group_advantages(rewards, group_ids, num_groups, mode);
  const int64_t N = rewards.size(0);
  const int64_t G = mode == kBatch ? 1 : num_groups;
  const at::Tensor r = rewards.to(out_dtype(rewards)).contiguous();
  const at::Tensor ids = group_ids.contiguous();
  at::Tensor out = at::empty({N}, r.options());

  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "group_advantages_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "group_advantages_cpu", [&] {
      const scalar_t* rp = r.const_data_ptr<scalar_t>();
      const index_t* gp = ids.const_data_ptr<index_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      std::vector<double> cnt(G, 0.0), sum(G, 0.0), m2(G, 0.0);
      auto gid = [&](int64_t i) -> int64_t {
        if (mode == kBatch) return 0;
        const int64_t g = gp[i];
        TORCH_CHECK(g >= 0 && g < G, "group_advantages: group id ", g, " out of range [0, ", G, ")");
        return g;
      };
      for (int64_t i = 0; i < N; ++i) {
        const int64_t g = gid(i);
        cnt[g] += 1.0;
        sum[g] += static_cast<double>(rp[i]);
      }
      for (int64_t g = 0; g < G; ++g) sum[g] = cnt[g] > 0 ? sum[g] / cnt[g] : 0.0;  // now the mean
      // Second pass over deviations rather than sum of squares: no cancellation for rewards far from 0.
      for (int64_t i = 0; i < N; ++i) {
        const int64_t g = gid(i);
        const double d = static_cast<double>(rp[i]) - sum[g];
        m2[g] += d * d;
      }
      for (int64_t i = 0; i < N; ++i) {
        const int64_t g = gid(i);
        op[i] = group_advantage<scalar_t>(rp[i], cnt[g], sum[g], m2[g], mode, eps);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ibpo_shaping_cpu(const at::Tensor& rewards, const at::Tensor& n_correct,
                                                    const at::Tensor& n_valid, double rho, double lam,
                                                    double threshold) {
  check_ibpo_shaping(rewards, n_correct, n_valid);
  const int64_t N = rewards.size(0);
  const at::Tensor r = rewards.to(out_dtype(rewards)).contiguous();
  const at::Tensor nc = n_correct.contiguous(), nv = n_valid.contiguous();
  at::Tensor shaped = at::empty({N}, r.options()), phi = at::empty({N}, r.options());
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "ibpo_shaping_cpu", [&] {
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const int64_t* ncp = nc.const_data_ptr<int64_t>();
    const int64_t* nvp = nv.const_data_ptr<int64_t>();
    scalar_t* sp = shaped.mutable_data_ptr<scalar_t>();
    scalar_t* pp = phi.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < N; ++i) {
      const scalar_t p = ibpo_phi<scalar_t>(rp[i], ncp[i], nvp[i], rho, threshold);
      pp[i] = p;
      sp[i] = static_cast<scalar_t>(static_cast<double>(rp[i]) + lam * static_cast<double>(p));
    }
  });
  return {shaped, phi};
}

// Fills adv/gates (rows, T) from a per-row kind and value; [start, end) is the row's scored range.
template <typename scalar_t>
void fill_rows(int64_t rows, int64_t T, const bool* mask, const int* kind, const scalar_t* value,
               const int64_t* ends, const int64_t* starts, scalar_t unmasked, scalar_t* adv, scalar_t* gates) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(T, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      // Same result as token_gate() per token, with the row kind and range hoisted so the loops vectorise.
      const int64_t lo = std::clamp<int64_t>(starts ? starts[i] : 0, 0, T);
      const int64_t hi = std::clamp<int64_t>(ends ? ends[i] : T, lo, T);
      const bool* m = mask + i * T;
      scalar_t* a = adv + i * T;
      scalar_t* g = gates + i * T;
      const scalar_t v = value[i];
      std::fill(g, g + lo, scalar_t(0)), std::fill(a, a + lo, scalar_t(0));
      std::fill(g + hi, g + T, scalar_t(0)), std::fill(a + hi, a + T, scalar_t(0));
      if (kind[i] == kDropped) {
        std::fill(g + lo, g + hi, scalar_t(0)), std::fill(a + lo, a + hi, scalar_t(0));
      } else if (kind[i] == kSequence) {
        std::fill(g + lo, g + hi, scalar_t(1)), std::fill(a + lo, a + hi, v);
      } else {
        for (int64_t t = lo; t < hi; ++t) {
          const scalar_t f = static_cast<scalar_t>(m[t]);
          const scalar_t gate = f + (scalar_t(1) - f) * unmasked;  // exactly 1 or `unmasked`, branch-free
          g[t] = gate;
          a[t] = gate * v;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> token_advantages_cpu(const at::Tensor& seq_adv, const at::Tensor& mask,
                                                        const at::Tensor& wrong, const at::Tensor& has_repair,
                                                        const std::optional<at::Tensor>& lengths,
                                                        const std::optional<at::Tensor>& starts, bool sign_guard,
                                                        double unmasked_weight, bool correct_in_loss) {
  check_token_advantages(seq_adv, mask, wrong, has_repair, lengths, starts);
  const int64_t B = mask.size(0), T = mask.size(1);
  const at::Tensor a = seq_adv.to(out_dtype(seq_adv)).contiguous();
  const at::Tensor m = mask.contiguous(), w = wrong.contiguous(), h = has_repair.contiguous();
  const at::Tensor ends = lengths.has_value() ? lengths->contiguous() : at::Tensor();
  const at::Tensor begins = starts.has_value() ? starts->contiguous() : at::Tensor();
  at::Tensor adv = at::empty({B, T}, a.options()), gates = at::empty({B, T}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "token_advantages_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const bool* wp = w.const_data_ptr<bool>();
    const bool* hp = h.const_data_ptr<bool>();
    std::vector<int> kind(B);
    std::vector<scalar_t> value(B);
    for (int64_t i = 0; i < B; ++i)
      sample_row<scalar_t>(ap[i], wp[i], hp[i], sign_guard, correct_in_loss, &kind[i], &value[i]);
    fill_rows<scalar_t>(B, T, m.const_data_ptr<bool>(), kind.data(), value.data(),
                        ends.defined() ? ends.const_data_ptr<int64_t>() : nullptr,
                        begins.defined() ? begins.const_data_ptr<int64_t>() : nullptr,
                        static_cast<scalar_t>(unmasked_weight), adv.mutable_data_ptr<scalar_t>(),
                        gates.mutable_data_ptr<scalar_t>());
  });
  return {adv, gates};
}

std::tuple<at::Tensor, at::Tensor> repair_advantages_cpu(const at::Tensor& seq_adv, const at::Tensor& mask,
                                                         const at::Tensor& repair_of, const at::Tensor& selected,
                                                         const std::optional<at::Tensor>& lengths,
                                                         const std::optional<at::Tensor>& starts) {
  check_repair_advantages(seq_adv, mask, repair_of, selected, lengths, starts);
  const int64_t N = seq_adv.size(0), M = mask.size(0), T = mask.size(1);
  const at::Tensor a = seq_adv.to(out_dtype(seq_adv)).contiguous();
  const at::Tensor m = mask.contiguous(), src = repair_of.contiguous(), sel = selected.contiguous();
  const at::Tensor ends = lengths.has_value() ? lengths->contiguous() : at::Tensor();
  const at::Tensor begins = starts.has_value() ? starts->contiguous() : at::Tensor();
  at::Tensor adv = at::empty({M, T}, a.options()), gates = at::empty({M, T}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "repair_advantages_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const int64_t* sp = src.const_data_ptr<int64_t>();
    const bool* selp = sel.const_data_ptr<bool>();
    std::vector<int> kind(M);
    std::vector<scalar_t> value(M);
    for (int64_t r = 0; r < M; ++r) {
      const bool ok = selp[r] && sp[r] >= 0 && sp[r] < N;
      kind[r] = ok ? kMasked : kDropped;
      value[r] = ok ? std::abs(ap[sp[r]]) : scalar_t(0);  // the repair is reinforced: +|A| of its sample
    }
    fill_rows<scalar_t>(M, T, m.const_data_ptr<bool>(), kind.data(), value.data(),
                        ends.defined() ? ends.const_data_ptr<int64_t>() : nullptr,
                        begins.defined() ? begins.const_data_ptr<int64_t>() : nullptr, scalar_t(0),
                        adv.mutable_data_ptr<scalar_t>(), gates.mutable_data_ptr<scalar_t>());
  });
  return {adv, gates};
}

}  // namespace

TORCH_LIBRARY_IMPL(credit, CPU, m) {
  m.impl("group_advantages", &group_advantages_cpu);
  m.impl("ibpo_shaping", &ibpo_shaping_cpu);
  m.impl("token_advantages", &token_advantages_cpu);
  m.impl("repair_advantages", &repair_advantages_cpu);
}

}  // namespace credit::cpu
