"""Host overhead of every public op on tiny CPU tensors: the public call against the bare torch.ops.credit.* kernel
call(s) it makes, on the same tensors with the arguments the wrapper would pass (so the difference is the wrapper:
argument checks, backend resolution, argument preparation, reshapes, statistics).

The data is tiny (a few hundred elements), so the kernel time is the dispatch cost and the difference is the
per-call price of the Python layer, which is paid again on a GPU, where it must hide behind the kernel. Ops
without a kernel of their own get as baseline the same computation written without the wrapper
(``segment_steps``, ``step_masks``, ``truncate_regions``, ``policy_loss_from_logprobs``: the loss math on
prepared inputs) or, for the pipeline ``credit_assign``, the same call with every check of ``credit_ops._checks``
switched off (the overhead is then the price of the checks alone).

    python -m pytest benchmarks/bench_overhead.py --benchmark-json out.json && python benchmarks/summarize.py out.json
    python -m benchmarks.bench_overhead         # just the table: op, public, kernel, overhead, checks (us)

Timing: ``host_us`` takes the median over many calls and the minimum over repeats, the public and the kernel call
interleaved per repeat, so a noisy neighbour on a shared machine inflates neither side alone. Used by
tests/test_overhead.py (the < 50 us bound of benchmarks/results/README.md).
"""

import contextlib
import time

import pytest
import torch

import credit_ops
from benchmarks.conftest import measure
from credit_ops import _checks
from credit_ops.ops import policy_loss as _pl

OPS = [
    "token_logprobs",
    "policy_loss",
    "policy_loss_from_logprobs",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "align_edits",
    "segment_steps",
    "step_masks",
    "truncate_regions",
    "group_advantages",
    "ibpo_shaping",
    "token_advantages",
    "credit_assign",
]


@contextlib.contextmanager
def checks_off():
    """Every check of credit_ops._checks a no-op (ids_in_range, values, tensor, shape, ...), for the baseline of a
    composite op: the call then costs its computation alone."""
    names = ["check", "tensor", "same_device", "shape", "values", "values_each", "ids_in_range", "finite"]
    names += ["within_range", "finite_each"]
    saved = {n: getattr(_checks, n) for n in names if hasattr(_checks, n)}
    try:
        for n in saved:
            setattr(_checks, n, lambda *args, **kwargs: None)
        yield
    finally:
        for n, f in saved.items():
            setattr(_checks, n, f)


def cases() -> dict:
    """op name -> (public call, baseline call), both closures over the same tiny CPU tensors."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 8, 16
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, -1] = -100  # padding, as in a real batch
    adv = torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    leaf = logits.clone().requires_grad_(True)
    logp = torch.randn(B, T, generator=g).clamp(max=0)
    H = 8
    hidden = torch.randn(B * T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    flat_labels = labels.reshape(-1)

    # The losses' kernel arguments as the wrappers build them (dapo: token_mean over the valid tokens; on the CPU
    # policy_loss and the fused head are one C++ op each, policy_loss_from_logprobs the loss math after prepare).
    # old, ref, mask, gates, weights, temperature, ignore_index, eps_low, eps_high, dual_clip, beta, kl_type (k3),
    # agg (token_mean), max_length, skip_empty_rows, active_only:
    loss_args = (None, None, mask, None, None, 1.0, -100, 0.2, 0.28, 0.0, 0.0, 3, 0, 0, False, False)
    lp_options, lp_inputs = _pl.prepare(
        None, None, adv, old_logprobs=None, ref_logprobs=None, mask=mask, gates=None, weights=None,
        loss_type="dapo", eps_low=None, eps_high=None, dual_clip=None, beta=0.0, kl_type="k3", agg=None,
        max_length=None, empty_rows="count", temperature=1.0, ignore_index=-100, acc=torch.float32, shape=(B, T),
    )  # fmt: skip

    P, L = 4, 12
    a_ids = torch.randint(0, 5, (P, L), generator=g)
    b_ids = torch.randint(0, 5, (P, L), generator=g)
    lengths = torch.full((P,), L, dtype=torch.int64)
    delims = torch.tensor([3])
    steps = credit_ops.segment_steps(a_ids, lengths, delims)
    edits = credit_ops.align_edits(a_ids, lengths, b_ids, lengths)

    def steps_bare():
        valid = torch.arange(L) < lengths.unsqueeze(1)
        ends = torch.isin(a_ids, delims) & valid
        s = ends.to(torch.int32).cumsum(1, dtype=torch.int32) - ends.to(torch.int32)
        return s.masked_fill(~valid, -1)

    def step_masks_bare():
        idx = (steps.to(torch.int64) + 1).clamp_(min=0)
        hit = torch.zeros(P, L + 1, dtype=torch.int32).scatter_reduce_(1, idx, edits.mask_a.to(torch.int32), "amax")
        return (hit.gather(1, idx) > 0) & (idx > 0)

    N, R = 8, 3
    rewards = torch.rand(N, generator=g)
    group_ids = torch.arange(N // 2).repeat_interleave(2)
    rev_ok = torch.rand(N, R, generator=g) < 0.5
    rev_valid = torch.ones(N, R, dtype=torch.bool)
    n_valid, n_correct = rev_valid.sum(1), (rev_ok & rev_valid).sum(1)
    seq_adv = torch.randn(N, generator=g)
    tok_mask = torch.rand(N, L, generator=g) < 0.3
    wrong, has_repair = rewards < 0.5, torch.rand(N, generator=g) < 0.5

    tokens = torch.randint(0, 5, (N, L), generator=g)
    tok_len = torch.full((N,), L, dtype=torch.int64)
    repair = torch.where(torch.rand(N, L, generator=g) < 0.2, torch.randint(0, 5, (N, L), generator=g), tokens)
    repair_of = torch.where(wrong, torch.arange(N), -1)
    repair_ok = torch.ones(N, dtype=torch.bool)
    repairs = (repair, tok_len, repair_of, repair_ok)
    assign = lambda: credit_ops.credit_assign(tokens, tok_len, group_ids, rewards, *repairs)

    def assign_unchecked():
        with checks_off():
            return assign()

    ops = torch.ops.credit
    return {
        "token_logprobs": (
            lambda: credit_ops.token_logprobs(logits, labels),
            lambda: ops.token_logprobs_fwd(logits, labels, 1.0, -100, False),
        ),
        "policy_loss": (  # on the CPU one C++ op: inputs, row kernel, statistics (ops/policy_loss.py ONE_CALL)
            lambda: credit_ops.policy_loss(leaf, labels, adv, mask=mask),
            lambda: ops.policy_loss_cpu(leaf, labels, adv, *loss_args, True),
        ),
        "policy_loss_from_logprobs": (
            lambda: credit_ops.policy_loss_from_logprobs(logp, adv, mask=mask),
            lambda: _pl.loss_from_logprobs(logp, None, lp_inputs, lp_options),
        ),
        "fused_linear_logprobs": (
            lambda: credit_ops.fused_linear_logprobs(hidden, weight, flat_labels),
            lambda: ops.fused_linear_logprobs_fwd(hidden, weight, None, flat_labels, 1.0, -100, 0),
        ),
        "fused_linear_policy_loss": (  # on the CPU one C++ op: inputs, the chunk loop, statistics
            lambda: credit_ops.fused_linear_policy_loss(hidden.view(B, T, H), weight, labels, adv, mask=mask),
            lambda: ops.fused_linear_policy_loss_cpu(hidden, weight, None, labels, adv, *loss_args, B * T, False),
        ),
        "align_edits": (
            lambda: credit_ops.align_edits(a_ids, lengths, b_ids, lengths),
            lambda: ops.align_edits(a_ids, lengths, b_ids, lengths, 0),
        ),
        "segment_steps": (lambda: credit_ops.segment_steps(a_ids, lengths, delims), steps_bare),
        "step_masks": (lambda: credit_ops.step_masks(edits.mask_a, steps), step_masks_bare),
        "truncate_regions": (
            lambda: credit_ops.truncate_regions(edits.mask_a, edits.region_a, 2),
            lambda: (edits.mask_a != 0) & (edits.region_a >= 0) & (edits.region_a < 2),
        ),
        "group_advantages": (
            lambda: credit_ops.group_advantages(rewards, group_ids),
            lambda: ops.group_advantages(rewards, group_ids, N, 0, 1e-6),
        ),
        "ibpo_shaping": (
            lambda: credit_ops.ibpo_shaping(rewards, group_ids, rev_ok, rev_valid),
            lambda: ops.ibpo_shaping(rewards, n_correct, n_valid, 0.5, 0.6, 0.5),
        ),
        "token_advantages": (
            lambda: credit_ops.token_advantages(seq_adv, tok_mask, wrong=wrong, has_repair=has_repair),
            lambda: ops.token_advantages(seq_adv, tok_mask, wrong, has_repair, None, None, True, 0.0, True),
        ),
        "credit_assign": (assign, assign_unchecked),
    }


def host_us(fns, *, calls: int = 200, repeats: int = 7, warmup: int = 20) -> list[float]:
    """Per-call host time in us of each function of ``fns``: median over ``calls`` calls, minimum over ``repeats``
    (the functions interleaved within each repeat)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [float("inf")] * len(fns)
    clock = time.perf_counter
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            times = []
            for _ in range(calls):
                t0 = clock()
                fn()
                times.append(clock() - t0)
            times.sort()
            best[i] = min(best[i], times[len(times) // 2])
    return [t * 1e6 for t in best]


def overhead_us(name: str, **kwargs) -> tuple[float, float, float, float]:
    """(public us, baseline us, overhead us, of which the checks us) of one op of OPS on tiny CPU tensors, one
    thread; the checks' share is the public call against itself with checks_off()."""
    public, bare = cases()[name]

    def unchecked():
        with checks_off():
            return public()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: no intra-op pool wake-ups in any call
    try:
        p, k, u = host_us([public, bare, unchecked], **kwargs)
    finally:
        torch.set_num_threads(threads)
    return p, k, p - k, p - u


@pytest.mark.parametrize("op", OPS)
def test_host_overhead(benchmark, op):
    public, _ = cases()[op]
    loop = 100
    benchmark.group = f"host overhead, tiny CPU tensors, {loop} calls"

    def run():
        for _ in range(loop):
            public()

    measure(benchmark, run, impl=op, x_calls_per_round=loop)
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    p, k, over, checks = overhead_us(op)
    benchmark.extra_info.update(
        x_public_us=round(p, 1), x_kernel_us=round(k, 1), x_overhead_us=round(over, 1), x_checks_us=round(checks, 1)
    )


_BAD_ID = """
import torch, credit_ops
x = torch.randn(2, 4, 16, device="cuda")
y = torch.randint(0, 16, (2, 4), device="cuda")
credit_ops.token_logprobs(x, y)  # warm-up: the kernel's compilation may synchronise
torch.cuda.synchronize()
y[1, 2] = 16  # one id out of range
torch.cuda.set_sync_debug_mode("error")  # the call must not synchronise
credit_ops.token_logprobs(x, y)
torch.cuda.set_sync_debug_mode("default")
print("call returned", flush=True)
try:
    torch.cuda.synchronize()
except RuntimeError as e:
    print("raised at the next synchronisation:", type(e).__name__, str(e).splitlines()[0], flush=True)
    raise SystemExit(0)
print("no error at the next synchronisation", flush=True)
raise SystemExit(1)
"""


def cuda_checks(B: int = 8, T: int = 2048, V: int = 151936) -> bool:
    """On a CUDA machine (scripts/gpu_check.sh, stage "checks"): (1) the public token_logprobs call, default
    "async" value checks, within 3% of its bare Triton kernel on the bf16 [:, :-1] view of (B, T + 1, V) logits
    (each timed as 20 back-to-back calls with CUDA events, median of 7; "sync" checks shown for comparison);
    (2) a label out of range does not raise or synchronise at the call and raises at the next synchronisation
    with the check's message on stderr (in a subprocess: a device-side assert ends the CUDA context). Prints one
    PASS / FAIL line per check; returns whether both passed."""
    import subprocess
    import sys

    full = torch.randn(B, T + 1, V, device="cuda", dtype=torch.bfloat16)
    logits = full[:, :-1]
    labels = torch.randint(0, V, (B, T), device="cuda")
    kernel = torch.ops.credit.token_logprobs_fwd_triton

    def timed(fn, calls=20, repeats=7):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / calls)
        return sorted(times)[repeats // 2]

    with torch.no_grad():
        k = timed(lambda: kernel(logits, labels, 1.0, -100, False))
        previous = credit_ops.set_value_checks("async")
        p = timed(lambda: credit_ops.token_logprobs(logits, labels))
        credit_ops.set_value_checks("sync")
        ps = timed(lambda: credit_ops.token_logprobs(logits, labels))
        credit_ops.set_value_checks(previous)
    ok_time = p <= 1.03 * k
    print(f"token_logprobs bf16 {tuple(logits.shape)}: kernel {k:.3f} ms, public call {p:.3f} ms "
          f"({(p / k - 1) * 100:+.1f}%), with 'sync' checks {ps:.3f} ms ({(ps / k - 1) * 100:+.1f}%)")  # fmt: skip
    print(f"{'PASS' if ok_time else 'FAIL'} public token_logprobs call within 3% of its kernel")
    run = subprocess.run([sys.executable, "-c", _BAD_ID], capture_output=True, text=True, timeout=300)
    message = "labels must lie in [0, 16)" in run.stderr + run.stdout
    print(run.stdout.strip())
    print("\n".join(line for line in run.stderr.splitlines() if "labels must lie" in line)[:500])
    ok_id = run.returncode == 0 and "call returned" in run.stdout and message
    print(f"{'PASS' if ok_id else 'FAIL'} a bad label on CUDA raises at the next synchronisation, not at the call, "
          f"with the check's message (rc={run.returncode}, message seen: {message})")  # fmt: skip
    # For the record, no verdict: the losses' host time per call on tiny CUDA tensors (the launch side, queue drained
    # between repeats). On CUDA their bookkeeping is tensor ops and the Triton ops' autograd is Python; on the CPU
    # each is one C++ op (the CPU table above).
    x = torch.randn(2, 8, 16, device="cuda", requires_grad=True)
    y, a = torch.randint(0, 16, (2, 8), device="cuda"), torch.randn(2, 8, device="cuda")
    h, w = torch.randn(16, 8, device="cuda", requires_grad=True), torch.randn(16, 8, device="cuda")
    for name, fn in [
        ("policy_loss", lambda: credit_ops.policy_loss(x, y, a)),
        ("policy_loss_from_logprobs", lambda: credit_ops.policy_loss_from_logprobs(-x[..., 0].detach().abs(), a)),
        ("fused_linear_policy_loss", lambda: credit_ops.fused_linear_policy_loss(h, w, y, a)),
    ]:
        fn()
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            best = min(best, (time.perf_counter() - t0) / 20 * 1e6)
        print(f"{name} host time per call, tiny CUDA tensors: {best:.1f} us")
    return ok_time and ok_id


if __name__ == "__main__":
    import sys

    if "--cuda" in sys.argv:
        sys.exit(0 if cuda_checks() else 1)
    print(f"{'op':28s} {'public us':>10s} {'kernel us':>10s} {'overhead us':>12s} {'checks us':>10s}")
    for op in OPS:
        p, k, over, checks = overhead_us(op)
        print(f"{op:28s} {p:10.1f} {k:10.1f} {over:12.1f} {checks:10.1f}")
