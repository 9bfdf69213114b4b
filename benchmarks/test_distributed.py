"""The soft contrastive loss over a process group: gather and ring at world size 4 (gloo, CPU,
N_local = 4096, D = 256, multi-label symmetric softmax) against one process computing the same
global batch (N = 16384) with the same fused CPU kernel; and at world size 2 (N = 8192), to
show how per-rank memory grows with the world size (gather) or does not (ring).

The pytest process is rank 0 (so that pytest-benchmark times the step there) and spawns
ranks 1..W-1; every rank runs one thread, so the ranks share the machine's cores as the
single process's threads do. Each step starts at a barrier (untimed). extra_info:
- ``peak_mib_max_rank`` / ``peak_mib_rank0``: the resident memory one forward + backward adds
  on a rank (``fastcon._memory.PeakMemory``), the largest over ranks and rank 0's;
- ``time_vs_single``: wall time of the step over the single process's, on the same cores (on W
  devices expect about 1 / W of the single-device time plus communication);
- ``cpu_time_vs_single``: CPU time summed over ranks over the single process's: the work
  distribution adds, independent of how busy the shared machine is.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcon
from fastcon._memory import PeakMemory

N_LOCAL, D, C = 4096, 256, 9
ROUNDS = 2
TIMEOUT_S = 900
BACKEND = "cpu"


def _global_batch(world):
    gen = torch.Generator().manual_seed(0)
    n = world * N_LOCAL
    z1 = torch.randn(n, D, generator=gen)
    z2 = z1 + 0.7 * torch.randn(n, D, generator=gen)
    labels = (torch.rand(n, C, generator=gen) < 0.3).float()
    return z1, z2, labels


def _step(z1, z2, labels, group=None, mode="gather"):
    def run():
        a, b = z1.detach().requires_grad_(True), z2.detach().requires_grad_(True)
        loss = fastcon.soft_contrastive_loss(
            a, b, labels, temperature=0.1, backend=BACKEND, group=group, distributed=mode
        )
        loss.backward()

    return run


def _measured(run, log):
    """run() with its CPU time and peak memory appended to log."""

    def target():
        cpu = time.process_time()
        with PeakMemory("cpu") as m:
            run()
        log.append((time.process_time() - cpu, m.peak_mib))

    return target


def _local_rows(rank, world):
    z1, z2, labels = _global_batch(world)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    return z1[rows].clone(), z2[rows].clone(), labels[rows].clone()


def _worker(index, world, store, out_dir, mode, steps):
    rank = index + 1
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        log = []
        target = _measured(_step(*_local_rows(rank, world), group=True, mode=mode), log)
        for _ in range(steps):
            dist.barrier()
            target()
        torch.save(log, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


_SINGLE: dict = {}


def _single_process(world, benchmark=None):
    """(mean wall s, mean CPU s, peak MiB) of one process on the global batch of `world` ranks."""
    if world not in _SINGLE:
        log = []
        target = _measured(_step(*_global_batch(world)), log)
        if benchmark is not None:
            benchmark.pedantic(target, rounds=ROUNDS, iterations=1, warmup_rounds=1)
            wall = benchmark.stats.stats.mean
        else:
            target()
            t = time.perf_counter()
            for _ in range(ROUNDS):
                target()
            wall = (time.perf_counter() - t) / ROUNDS
        log = log[-ROUNDS:]
        _SINGLE[world] = (wall, sum(c for c, _ in log) / ROUNDS, max(p for _, p in log))
    return _SINGLE[world]


@pytest.mark.parametrize("world", [4, 2], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("mode", ["single", "gather", "ring"])
def test_distributed_step(benchmark, record, tmp_path, world, mode):
    """One forward + backward; "single" is one process on the same global batch (world * N_LOCAL)."""
    benchmark.group = f"distributed soft contrastive W={world} N_local={N_LOCAL} D={D}"
    if mode == "single":
        wall, cpu, peak = _single_process(world, benchmark)
        record(world=1, n_global=world * N_LOCAL, d=D, peak_mib_max_rank=round(peak, 1), cpu_s=round(cpu, 2))
        return
    single_wall, single_cpu, single_peak = _single_process(world)

    steps = 1 + ROUNDS  # one warm-up step, then the timed rounds
    store = str(tmp_path / "store")
    ctx = mp.start_processes(
        _worker, args=(world, store, str(tmp_path), mode, steps), nprocs=world - 1, join=False, start_method="spawn"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=world)
    try:
        log = []
        target = _measured(_step(*_local_rows(0, world), group=True, mode=mode), log)
        dist.barrier()
        target()  # warm-up: connections, first-touch allocations
        benchmark.pedantic(target, setup=dist.barrier, rounds=ROUNDS, iterations=1, warmup_rounds=0)
        deadline = time.monotonic() + TIMEOUT_S
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"ranks 1..{world - 1} did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        dist.destroy_process_group()
        torch.set_num_threads(threads)

    logs = [log] + [torch.load(tmp_path / f"rank{r}.pt") for r in range(1, world)]
    timed = [rank_log[-ROUNDS:] for rank_log in logs]
    peaks = [max(p for _, p in rank_log) for rank_log in timed]
    cpu = sum(sum(c for c, _ in rank_log) / ROUNDS for rank_log in timed)
    record(
        world=world,
        n_global=world * N_LOCAL,
        d=D,
        peak_mib_max_rank=round(max(peaks), 1),
        peak_mib_rank0=round(peaks[0], 1),
        peak_mib_single=round(single_peak, 1),
        time_vs_single=round(benchmark.stats.stats.mean / single_wall, 2),
        cpu_s=round(cpu, 2),
        cpu_time_vs_single=round(cpu / single_cpu, 2),
    )
