"""One diffusion training step's noise work: q_sample, then the epsilon loss forward and backward
(``pytest benchmarks/test_diffusion.py --benchmark-only``).

Rows, measured side by side in one run:
- ``reference``: what a training script writes in plain PyTorch: ``torch.randn_like`` noise,
  broadcast arithmetic for x_t, ``F.mse_loss`` and its autograd backward;
- ``cpu-seeded``: the fused cpu kernels with ``seed=`` (noise drawn in-register by Philox and
  regenerated in the loss backward, never stored);
- ``cpu-explicit``: ``torch.randn_like`` noise passed to the fused cpu kernels.
The network is left out: ``pred`` is x_t detached, a leaf that requires grad.

extra_info: peak memory of one step (MiB), elements per second, the bytes the step must move at
least (per element: reference 36 = write eps 4, q_sample 12, loss 8, backward 12; cpu-seeded 20
= q_sample 8, loss 4, backward 8; cpu-explicit 36) and that over the time (GB/s), and for the
fused rows the speed-up over the reference measured just before them (wall time; and CPU time,
which a machine shared with other jobs distorts less).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from conftest import peak_mib  # benchmarks/conftest.py (pytest puts its folder on sys.path)

import fastcon

SHAPES = [(64, 13, 128, 128), (16, 13, 64, 64)]  # Sentinel-2 batches: realistic, smaller
BACKENDS = ("reference", "cpu-seeded", "cpu-explicit")
BYTES_PER_ELEMENT = {"reference": 36, "cpu-seeded": 20, "cpu-explicit": 36}
ROUNDS = {(64, 13, 128, 128): 5, (16, 13, 64, 64): 20}

_best_time: dict[tuple, float] = {}
_best_cpu: dict[tuple, float] = {}


def _step(kind: str, sched, x0: torch.Tensor, t: torch.Tensor):
    if kind == "reference":
        noise = torch.randn_like(x0)
        a, s = sched.coefficients(t, torch.float32)
        x_t = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * noise
        pred = x_t.detach().requires_grad_(True)
        return torch.autograd.grad(F.mse_loss(pred, noise), pred)[0]
    if kind == "cpu-seeded":
        x_t, _ = sched.q_sample(x0, t, seed=1234, backend="cpu")
        pred = x_t.detach().requires_grad_(True)
        return torch.autograd.grad(sched.loss(pred, x0, t, seed=1234, backend="cpu"), pred)[0]
    noise = torch.randn_like(x0)
    x_t, _ = sched.q_sample(x0, t, noise, backend="cpu")
    pred = x_t.detach().requires_grad_(True)
    return torch.autograd.grad(sched.loss(pred, x0, t, noise=noise, backend="cpu"), pred)[0]


# Each shape with torch's thread count, and the realistic one on one thread too: on a machine
# shared with other jobs a one-thread comparison is the steadier one.
CASES = [(s, k, 0) for s in SHAPES for k in BACKENDS] + [(SHAPES[0], k, 1) for k in BACKENDS]


@pytest.fixture
def threads(request):
    n = request.param or torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield n
    torch.set_num_threads(before)


@pytest.mark.parametrize(("shape", "kind", "threads"), CASES, ids=lambda x: str(x), indirect=["threads"])
def test_diffusion_step(benchmark, record, shape, kind, threads):
    benchmark.group = f"diffusion q_sample + loss fwd/bwd, fp32 {'x'.join(map(str, shape))}, {threads} thread(s)"
    if kind != "reference" and not fastcon.backends()["cpu"].available:
        pytest.skip(f"cpu backend unavailable: {fastcon.backends()['cpu'].status}")
    sched = fastcon.NoiseSchedule("linear", 1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=gen)
    t = sched.sample_timesteps(shape[0], generator=gen)

    def step():
        _step(kind, sched, x0, t)

    step()  # warm-up: extension, thread pool, page faults
    times, cpu_times = [], []

    def timed():
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)

    benchmark.pedantic(timed, rounds=ROUNDS[shape], iterations=1)
    best = min(times)
    _best_time[(shape, kind, threads)] = best
    n = x0.numel()
    info = dict(
        backend=kind,
        threads=threads,
        simd=torch.ops.fastcon.cpu_capability() if kind != "reference" else "",
        peak_mib=round(peak_mib(step), 1),
        batch_mib=round(n * 4 / 2**20, 1),
        cpu_ms=round(min(cpu_times) * 1e3, 1),  # CPU time of all threads: steadier than wall time when shared
        melem_per_s=round(n / best / 1e6, 1),
        bytes_per_element=BYTES_PER_ELEMENT[kind],
        gb_per_s=round(BYTES_PER_ELEMENT[kind] * n / best / 1e9, 2),
    )
    ref = _best_time.get((shape, "reference", threads))
    if kind != "reference" and ref is not None:
        info["speedup_vs_reference"] = round(ref / best, 2)
        info["cpu_time_ratio_vs_reference"] = round(_best_cpu[(shape, "reference", threads)] / min(cpu_times), 2)
    _best_cpu[(shape, kind, threads)] = min(cpu_times)
    record(**info)
