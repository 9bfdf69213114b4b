"""One full training step of the demo config, fastcon's fused ops versus the reference backend
(``pytest benchmarks/test_train_step.py --benchmark-only``).

The demo config (examples/configs/demo.yaml): SoftCon, a 4-block ViT-S/14 of width 192 on 56 px
crops of the 13-band Sentinel-2 sample, batch 64, Siamese masking keeping half the patch
tokens, EMA teacher, both directions (two loss calls of 64 x 64 per step), AdamW. A step is
what examples/pretrain.py runs: student forward (with ``fastcon.siamese_mask``), teacher
forward, ``fastcon.soft_contrastive_loss``, backward, gradient norm, AdamW, EMA update.

Rows, side by side in one run, per group:
- ``train step, data excluded``: the same batch every round;
- ``train step, data included``: the loader's next batch (torch loader, as the demo) + the step.
and per row the backend: ``fused`` (``ops.backend=auto``: the cpu kernels on a CPU, cuda / triton
on a GPU) or ``reference`` (dense PyTorch for every fastcon op).

extra_info: images/s, where the time goes (seconds per step in forward = student + teacher,
loss = the contrastive loss forward, backward = everything's backward including the loss's,
optimizer = gradient norm + AdamW + EMA; measured on separate instrumented steps), the loss
alone (forward + backward of both calls, on the step's embedding shapes), the data wait per
batch (data-included rows), peak memory of a step, and the speed-up over the reference row of
the same group measured just before.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import pytest
import torch
from conftest import peak_mib  # benchmarks/conftest.py

import fastcon
from fastcon.train import endless, init_distributed, ops_backend, setup, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("reference", "fused")
_best: dict[tuple, float] = {}


def _example(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


pretrain = _example("pretrain")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    pytest.importorskip("pyogrio")
    from fastcon.data import prepare_sample

    out = str(tmp_path_factory.mktemp("sample"))
    prepare_sample(out, progress=False)
    return out


def _config(sample, backend):
    from fastcon.train import load_config

    overrides = [f"data.root={sample}", f"ops.backend={'auto' if backend == 'fused' else 'reference'}"]
    return load_config(os.path.join(ROOT, "examples", "configs", "demo.yaml"), overrides, defaults=pretrain.DEFAULTS)


def _loss_alone(run, batch, rounds=5) -> float:
    """Seconds for the step's contrastive loss calls alone, forward + backward."""
    cfg = run.cfg
    n, d = batch["view1"].shape[0], cfg.model.proj_dim
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(n, d, generator=g, device=run.info.device, requires_grad=(i % 2 == 0)) for i in range(4)]
    labels = batch["labels"].to(run.info.device)
    s = cfg.softcon
    kw = dict(temperature=s.temperature, symmetric=s.symmetric, loss=s.loss, hard_weight=s.hard_weight)
    calls = 2 if s.both_directions else 1
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for c in range(calls):
            fastcon.soft_contrastive_loss(z[2 * c], z[2 * c + 1], labels, **kw).backward()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("data", ["excluded", "included"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step(benchmark, record, sample, backend, data):
    benchmark.group = f"train step (demo config: SoftCon ViT 4x192, 56 px, batch 64), data {data}"
    cfg = _config(sample, backend)
    info = init_distributed("auto")
    loader = pretrain.make_data(cfg)
    batches = endless(loader)
    fixed = next(batches)
    with ops_backend(cfg.ops.backend):
        if backend == "fused":
            name, _ = fastcon._backends.select("soft_contrastive", "auto", info.device)
            if name == "reference":
                pytest.skip("no fused soft_contrastive backend is available here")
        run = setup(cfg, info, loader.band_names)

        def step():
            train_step(run, iter([fixed]) if data == "excluded" else batches)

        for _ in range(3):  # warm-up: allocator, first-call dispatch, loader workers
            step()
        benchmark.pedantic(step, rounds=8, iterations=1)

        # where the time goes: instrumented steps (synchronising on GPUs)
        run.timings = {}
        steps = 4
        t0 = time.perf_counter()
        data_s = 0.0
        for _ in range(steps):
            t1 = time.perf_counter()
            batch = next(batches) if data == "included" else fixed
            data_s += time.perf_counter() - t1
            train_step(run, iter([batch]))
        total = (time.perf_counter() - t0) / steps
        phases = {k: v / steps for k, v in run.timings.items()}
        run.timings = None
        loss_alone = _loss_alone(run, fixed)
        mem = peak_mib(step, info.device.type)

    mean = benchmark.stats.stats.mean
    key = (data,)
    if backend == "reference":
        _best[key] = mean
    record(
        backend=backend,
        images_per_s=round(cfg.data.batch_size / mean, 1),
        step_s=round(mean, 4),
        forward_s=round(phases.get("forward", 0.0), 4),
        loss_forward_s=round(phases.get("loss", 0.0), 4),
        backward_s=round(phases.get("backward", 0.0), 4),
        optimizer_s=round(phases.get("optimizer", 0.0), 4),
        data_s=round(data_s / steps, 4),
        instrumented_step_s=round(total, 4),
        loss_fwd_bwd_alone_s=round(loss_alone, 4),
        peak_mem_mib=round(mem, 1),
        speedup_vs_reference=round(_best[key] / mean, 3) if backend != "reference" and key in _best else "",
        threads=torch.get_num_threads(),
    )
