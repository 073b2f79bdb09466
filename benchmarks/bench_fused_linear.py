"""Fused LM head + policy loss, forward+backward: credit_ops vs the three matmuls alone (the floor), eager PyTorch
(logits materialised), torch.compile and (GPU) Liger-Kernel's LigerFusedLinearGRPOLoss; time and peak extra memory.

GPU: the reference LM-head shape, N = 8192 tokens (4 x 2048), H = 3584, V = 152064, bf16. CPU: N = 512, H = 256,
V = 8192. credit_ops takes per-token advantages and gates; Liger per-sequence advantages (its defaults otherwise).
Targets: time <= 1.15x the matmuls, peak extra memory <= 1/8 of eager's. Shapes, targets and the peers' earlier
numbers: benchmarks/results/README.md, "Shapes and targets". The active-fraction sweep (active-token compaction,
f in {1, 0.5, 0.25, 0.1}): dense vs active_only; target at f = 0.1: <= 0.25x the dense time.
"""

import pytest
import torch

import credit_ops
from benchmarks.conftest import DEVICE, measure
from credit_ops import reference

if DEVICE == "cuda":
    B, T, H, V, DTYPE = 4, 2048, 3584, 152064, torch.bfloat16
else:
    B, T, H, V, DTYPE = 2, 256, 256, 8192, torch.float32

IMPLS = [
    "matmuls_only",
    "credit_ops",
    "credit_ops_chunk_1024",
    "credit_ops_chunk_4096",
    "credit_ops_gspo",
    "eager",
    "torch_compile",
    "liger",
]


def _liger():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    return LigerFusedLinearGRPOLoss


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    hidden = torch.randn(B, T, H, device=DEVICE, dtype=DTYPE)
    weight = (torch.randn(V, H, device=DEVICE) / H**0.5).to(DTYPE)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    with torch.no_grad():
        cur = credit_ops.fused_linear_logprobs(hidden, weight, labels)
    old = cur + 0.1 * torch.randn_like(cur)
    ref = cur + 0.1 * torch.randn_like(cur)
    mask = torch.rand(B, T, device=DEVICE) > 0.1
    gates = torch.rand(B, T, device=DEVICE)
    return hidden, weight, labels, old, ref, mask, gates


_compiled = {}


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_fwd_bwd(benchmark, inputs, impl):
    hidden, weight, labels, old, ref, mask, gates = inputs
    benchmark.group = f"fused LM head + loss fwd+bwd N={B * T} H={H} V={V} {DTYPE}"
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    adv_tok = torch.randn(B, T, device=DEVICE)
    adv_seq = torch.randn(B, device=DEVICE)
    kw = dict(old_logprobs=old, ref_logprobs=ref, mask=mask, gates=gates, beta=0.04)

    if impl == "matmuls_only":
        h2, w2 = hidden.reshape(-1, H), weight

        def fn():
            z = h2 @ w2.t()
            z @ w2
            z.t() @ h2

    elif impl.startswith("credit_ops"):
        loss_type = "gspo" if impl == "credit_ops_gspo" else "dapo"
        # the default chunk (~1 GiB of logits: 2048 tokens on GPU) against half and twice that, on GPU
        chunk = int(impl.rsplit("_", 1)[1]) if "_chunk_" in impl else None
        if chunk and DEVICE != "cuda":
            pytest.skip("chunk sizes: a GPU question")

        def fn():
            loss, _ = credit_ops.fused_linear_policy_loss(
                h, w, labels, adv_tok, loss_type=loss_type, chunk_size=chunk, **kw
            )
            torch.autograd.grad(loss, (h, w))

    elif impl in ("eager", "torch_compile"):
        if impl == "torch_compile":
            _compiled.setdefault("ref", torch.compile(reference.fused_linear_policy_loss))
        impl_fn = reference.fused_linear_policy_loss if impl == "eager" else _compiled["ref"]

        def fn():
            loss, _ = impl_fn(h, w, labels, adv_tok, loss_type="dapo", **kw)
            torch.autograd.grad(loss, (h, w))

    else:
        cls = _liger()
        if cls is None or DEVICE != "cuda":
            pytest.skip("Liger-Kernel not installed (or no CUDA)")
        mod = cls(beta=0.04, use_ref_model=True, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo")

        def fn():  # (B, T, H) input chunked over sequences; per-sequence advantages only
            out = mod(h, w, labels, mask.to(torch.int64), adv_seq, ref_per_token_logps=ref, old_per_token_logps=old)
            loss = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(loss, (h, w))

    rounds = (5 if impl in ("eager", "torch_compile", "liger") else None) if DEVICE == "cuda" else 3
    measure(benchmark, fn, impl=impl, rounds=rounds)


def cpu_peak_extra_gb(fn) -> float:
    """Peak extra CPU memory of one fn() call, in GB: the running sum of the allocations and frees the PyTorch
    profiler records (what the CPU allocator hands out; glibc's caching does not hide a buffer from it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch.autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return round(peak / 1e9, 4)


ACTIVE_IMPLS = ["dense", "active_only", "active_only_whole_entropy"]
_DENSE_MEDIAN = {}  # benchmark group -> the dense row's median (the dense rows run first)


def record_vs_dense(benchmark, impl):
    """extra_info x_vs_dense: this row's median over its group's dense median (summarize.py prints x_ columns)."""
    if benchmark.stats is None:  # --benchmark-disable
        return
    median = benchmark.stats.stats.median
    if impl == "dense":
        _DENSE_MEDIAN[benchmark.group] = median
    elif benchmark.group in _DENSE_MEDIAN:
        benchmark.extra_info["x_vs_dense"] = round(median / _DENSE_MEDIAN[benchmark.group], 3)


@pytest.mark.parametrize("active", [1.0, 0.5, 0.25, 0.1], ids=lambda f: f"active{f}")
@pytest.mark.parametrize("impl", ACTIVE_IMPLS)
def test_fused_linear_active_fraction(benchmark, inputs, impl, active):
    """IBPO / Difference Feedback / IOP batches: only a fraction f of the valid tokens carries a loss coefficient
    (gates 1 on them, 0 elsewhere; beta = 0). Dense, active_only and active_only with whole_batch_entropy (the
    inactive tokens' logits matmul for their entropy) side by side for each f (one group per f: pytest-benchmark's
    relative column is the ratio to the fastest); time and peak extra memory (CPU: the profiler's allocations).
    Target at f = 0.1: active_only <= 0.25x dense."""
    hidden, weight, labels, old, _, mask, _ = inputs
    benchmark.group = f"fused LM head + loss fwd+bwd, active fraction {active}, N={B * T} H={H} V={V} {DTYPE}"
    g = torch.Generator(device=DEVICE).manual_seed(1)
    gates = (torch.rand(B, T, device=DEVICE, generator=g) < active).float()
    adv = torch.randn(B, T, device=DEVICE)
    x = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    opts = dict(active_only=impl != "dense", whole_batch_entropy=impl == "active_only_whole_entropy")

    def run():
        loss, _ = credit_ops.fused_linear_policy_loss(
            x, w, labels, adv, old_logprobs=old, mask=mask, gates=gates, **opts
        )
        torch.autograd.grad(loss, (x, w))

    info = dict(impl=impl, active=active, active_tokens=int((mask & (gates > 0)).sum()), valid_tokens=int(mask.sum()))
    if DEVICE == "cpu" and not benchmark.disabled:
        info["peak_extra_GB"] = cpu_peak_extra_gb(run)
    measure(benchmark, run, rounds=10 if DEVICE == "cuda" else 5, **info)
    record_vs_dense(benchmark, impl)
