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


def pytest_configure(config):
    if config.getoption("benchmark_disable", default=False):
        raise pytest.UsageError(
            "benchmarks/ report measured times (and compare them with the reference's): run them with "
            "--benchmark-only, not --benchmark-disable"
        )


@pytest.fixture
def record(benchmark):
    """record(key=value, ...) adds to the benchmark's extra_info."""

    def _record(**kw):
        benchmark.extra_info.update(kw)

    return _record


# --------------------------------------------------------------------------------------------
# every run leaves its rows in a CSV and a plot (benchmarks/results/), one row per benchmark


def pytest_sessionfinish(session, exitstatus):
    bench = getattr(session.config, "_benchmarksession", None)
    rows = []
    for b in getattr(bench, "benchmarks", []):
        r = b.as_dict(include_data=False, flat=True)
        r.update({f"extra_info.{k}": v for k, v in (r.pop("extra_info", None) or {}).items()})
        if r.get("mean") is not None:
            rows.append(r)
    if not rows:
        return
    import csv
    import os

    out = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    keys = ["group", "name", "mean", "min", "stddev", "rounds"]
    extra = sorted({k for r in rows for k in r if k.startswith("extra_info.")})
    with open(os.path.join(out, "latest.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys + [k.removeprefix("extra_info.") for k in extra])
        for r in rows:
            w.writerow([r.get(k, "") for k in keys + extra])
    _plot(rows, os.path.join(out, "latest.png"))


def _plot(rows, path):
    """Writes ``_figure(rows)`` to ``path`` (nothing without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig = _figure(rows)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _figure(rows):
    """Best time per call of every benchmark, one panel per group, on a linear axis from zero in
    ms: fused backends beside the dense reference of their group, each bar labelled with its time
    and, next to a reference, the speed-up over it (a log axis with data-driven limits made a
    6 % difference look like a factor of 20)."""
    import matplotlib.pyplot as plt

    groups = {}
    for r in rows:
        groups.setdefault(r.get("group") or "ungrouped", []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 1.2 + 0.32 * len(rows) + 0.75 * len(groups)), squeeze=False)
    for ax, (group, rs) in zip(axes[:, 0], sorted(groups.items())):
        names = [r["name"].split("[", 1)[-1].rstrip("]") for r in rs]
        ms = [(r.get("min") if r.get("min") is not None else r["mean"]) * 1e3 for r in rs]
        ref = next((t for n, t in zip(names, ms) if "reference" in n), None)
        ax.barh(names, ms, color=["tab:gray" if "reference" in n else "tab:blue" for n in names])
        for y, (n, t) in enumerate(zip(names, ms)):
            label = f" {t / 1e3:.3g} s" if t >= 1000 else f" {t:.3g} ms"
            if ref is not None and "reference" not in n and t > 0:
                label += f" ({ref / t:.2f}x the reference's speed)"
            ax.text(t, y, label, va="center", fontsize=7)
        ax.set_xlim(0, max(ms) * 1.45 if max(ms) > 0 else 1)  # room for the labels
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.set_xlabel("time per call (ms)", fontsize=7)
        ax.set_title(group, fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    fig.suptitle("best of the rounds per call, linear axis from 0; grey = dense reference", fontsize=9)
    fig.tight_layout()
    return fig
