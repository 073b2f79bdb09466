"""Shared benchmark plumbing: the device, a measured copy-bandwidth ceiling, and a timer that reports
GB/s, the fraction of that ceiling and peak extra memory in pytest-benchmark's extra_info
(printed as a table by ``python benchmarks/summarize.py <json>``)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import credit_ops  # noqa: E402,F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _copy_bandwidth() -> float:
    """Bytes read + written per second by a large device copy (the practical memory-bandwidth ceiling)."""
    import time

    n = (2 << 30) if DEVICE == "cuda" else (256 << 20)
    src = torch.empty(n // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n / sorted(times)[len(times) // 2]


@pytest.fixture(scope="session")
def copy_bandwidth():
    return _copy_bandwidth()


def measure(benchmark, fn, *, bytes_moved=None, ceiling=None, rounds=None, **info):
    """Time fn (synchronised) with pytest-benchmark and attach throughput and peak-memory figures."""
    fn()  # warm-up: compilation, autotuning, allocator
    sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    def run():
        fn()
        sync()

    benchmark.pedantic(run, rounds=rounds or (20 if DEVICE == "cuda" else 5), iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing was timed
        return
    median = benchmark.stats.stats.median
    info["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    info["torch"] = torch.__version__
    if DEVICE == "cuda":
        info["peak_extra_GB"] = round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)
    if bytes_moved:
        info["GB/s"] = round(bytes_moved / median / 1e9, 1)
        if ceiling:
            info["copy_GB/s"] = round(ceiling / 1e9, 1)
            info["frac_of_copy"] = round(bytes_moved / median / ceiling, 3)
    benchmark.extra_info.update(info)
