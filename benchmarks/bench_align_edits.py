"""align_edits: credit_ops vs rapidfuzz ``Levenshtein.editops`` (the best CPU edit scripts on int sequences)
and the reference DP.

CPU grid (runs where DEVICE is cpu, or with CREDIT_OPS_BENCH_ALIGN_CPU=1): 512 / 2048 / 8192 tokens with 1%,
5% and 30% random edits (a third each insertions, deletions, substitutions; vocabulary 150k):
- ``ours_1core`` / ``ours_allcores``: one credit_ops call on the batch, 1 thread / all threads;
- ``rapidfuzz_1core``: editops per pair in a loop; ``rapidfuzz_pool``: the same over a process pool of all
  cores (the usual way to parallelise it); ``reference``: the Python DP, only at 512 tokens.
extra_info ``ms_per_pair`` is comparable across rows of one case.

GPU: batches of 1024 pairs at 2048 tokens (1%, 5%, 30% edits) and 256 pairs at 8192; extra_info
``pairs_per_s`` and ``x_rapidfuzz_1core`` (against rapidfuzz on one core of the same machine, measured in the
same run on a sample of the pairs). Target: >= 100x at 2048 tokens / 5% edits.
"""

import multiprocessing as mp
import os
import random
import time

import pytest
import torch

import credit_ops
from benchmarks.conftest import DEVICE, measure
from credit_ops import reference

try:
    from rapidfuzz.distance import Levenshtein
except ImportError:  # the GPU image lacks it unless brought along as a wheel: GPU figures then lack the ratio
    Levenshtein = None

VOCAB = 150_000
CPU_GRID = DEVICE == "cpu" or os.environ.get("CREDIT_OPS_BENCH_ALIGN_CPU") == "1"
PAIRS_CPU = {512: 64, 2048: 16, 8192: 4}
RATES = {"1pct": 0.01, "5pct": 0.05, "30pct": 0.3}


def make_pairs(n, rate, count, seed=0):
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        a = [rng.randrange(VOCAB) for _ in range(n)]
        b = list(a)
        for _ in range(round(n * rate)):
            op, pos = rng.random(), rng.randrange(len(b))
            if op < 1 / 3:
                b.pop(pos)
            elif op < 2 / 3:
                b.insert(pos, rng.randrange(VOCAB))
            else:
                b[pos] = rng.randrange(VOCAB)
        pairs.append((a, b))
    return pairs


def to_tensors(pairs, device="cpu"):
    La, Lb = max(len(a) for a, _ in pairs), max(len(b) for _, b in pairs)
    a = torch.zeros(len(pairs), La, dtype=torch.int64)
    b = torch.zeros(len(pairs), Lb, dtype=torch.int64)
    for r, (x, y) in enumerate(pairs):
        a[r, : len(x)] = torch.tensor(x)
        b[r, : len(y)] = torch.tensor(y)
    la = torch.tensor([len(x) for x, _ in pairs])
    lb = torch.tensor([len(y) for _, y in pairs])
    return tuple(t.to(device) for t in (a, la, b, lb))


def _editops_count(pair):
    return len(Levenshtein.editops(*pair))


@pytest.fixture(scope="module")
def pool():
    with mp.get_context("fork").Pool(os.cpu_count()) as p:
        yield p


def _threads(n):
    class _Ctx:
        def __enter__(self):
            self.prev = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.prev)

    return _Ctx()


CASES = [pytest.param(n, r, id=f"n{n}-{r}") for n in (512, 2048, 8192) for r in RATES]


@pytest.mark.skipif(not CPU_GRID, reason="CPU grid: DEVICE is cuda (set CREDIT_OPS_BENCH_ALIGN_CPU=1)")
@pytest.mark.parametrize("impl", ["ours_1core", "ours_allcores", "rapidfuzz_1core", "rapidfuzz_pool", "reference"])
@pytest.mark.parametrize("n,rate", CASES)
def test_align_edits_cpu(benchmark, pool, impl, n, rate):
    if impl == "reference" and n > 512:
        pytest.skip("the Python reference DP is O(n*m): only at 512 tokens")
    if impl.startswith("rapidfuzz") and Levenshtein is None:
        pytest.skip("rapidfuzz is not installed")
    count = 4 if impl == "reference" else PAIRS_CPU[n]
    pairs = make_pairs(n, RATES[rate], count)
    args = to_tensors(pairs)
    threads = 1 if impl == "ours_1core" else os.cpu_count()
    if impl.startswith("ours"):

        def fn():
            credit_ops.align_edits(*args)
    elif impl == "rapidfuzz_1core":

        def fn():
            for x, y in pairs:
                Levenshtein.editops(x, y)
    elif impl == "rapidfuzz_pool":

        def fn():
            pool.map(_editops_count, pairs, chunksize=max(1, len(pairs) // (4 * os.cpu_count())))
    else:

        def fn():
            reference.align_edits(*args)

    with _threads(threads):  # outside the timed call: resizing the thread pool is not free
        measure(benchmark, fn, rounds=3 if impl == "reference" else 5, pairs=count, tokens=n, edits=rate, impl=impl)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["ms_per_pair"] = round(benchmark.stats.stats.median / count * 1e3, 4)


GPU_CASES = [pytest.param(2048, r, 1024, id=f"n2048-{r}-P1024") for r in RATES] + [
    pytest.param(8192, "5pct", 256, id="n8192-5pct-P256")
]


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("n,rate,count", GPU_CASES)
def test_align_edits_gpu(benchmark, n, rate, count):
    pairs = make_pairs(n, RATES[rate], count)
    args = to_tensors(pairs, "cuda")
    previous = credit_ops.set_value_checks("async")
    try:
        measure(benchmark, lambda: credit_ops.align_edits(*args), rounds=10, pairs=count, tokens=n, edits=rate)
    finally:
        credit_ops.set_value_checks(previous)
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["pairs_per_s"] = round(count / median)
    if Levenshtein is not None:
        sample = pairs[:16]
        t0 = time.perf_counter()
        for x, y in sample:
            Levenshtein.editops(x, y)
        rf_per_pair = (time.perf_counter() - t0) / len(sample)
        benchmark.extra_info["rapidfuzz_1core_ms_per_pair"] = round(rf_per_pair * 1e3, 3)
        benchmark.extra_info["x_rapidfuzz_1core"] = round(rf_per_pair * count / median, 1)
    # The GPU result must be the CPU result.
    out = credit_ops.align_edits(*args)
    cpu = credit_ops.align_edits(*to_tensors(pairs[:32]))
    assert torch.equal(out.distance[:32].cpu(), cpu.distance)
