"""Shared benchmark helpers: the machine's matmul rate and peak memory, recorded in extra_info.

Run with ``pytest benchmarks/ --benchmark-only``. Timings on shared 2-core machines are noisy:
compare a fused backend with the reference measured in the same run, as ratios.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from fastcon._memory import PeakMemory


@functools.cache
def matmul_gflops(n: int, d: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """The machine's torch.mm rate on an (n x d) @ (d x n) product, best of a few runs."""
    a = torch.randn(n, d, dtype=dtype, device=device)
    b = torch.randn(d, n, dtype=dtype, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n * n * d / best / 1e9


def peak_mib(fn, device: str = "cpu") -> float:
    """Peak memory (MiB) that one call of fn adds on top of what is allocated before it."""
    with PeakMemory(device) as m:
        fn()
    return m.peak_mib


@pytest.fixture
def record(benchmark):
    """record(key=value, ...) adds to the benchmark's extra_info."""

    def _record(**kw):
        benchmark.extra_info.update(kw)

    return _record
