"""Data pipeline throughput on the bundled real sample: DALI (CPU mode here) vs the torch loader.

One benchmark round = one epoch of two-view batches (7 full batches of 32 = 224 of the 253
tiles of 13 x 128 x 128, random resized crops to 112 x 112, flips, normalisation), with the
loader built beforehand as a training run would; the DALI loader's per-epoch pipeline build is inside the round. Both
loaders get the same number of worker threads / processes. ``tiles_per_s`` (extra_info, and a
side-by-side table printed at the end) is the comparable number; each tile gives two views.
Preparing the sample from the raw JP2 bands is timed too.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from fastcon.data import dali_available, make_loader, prepare_sample

# rasterio 1.4 itself still multiplies Affine objects with `*`, which affine 3 flags
pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")
BATCH, CROP = 32, 112
WORKERS = min(4, os.cpu_count() or 1)
_rows: list[tuple[str, int, float]] = []


@pytest.fixture(scope="module", autouse=True)
def _side_by_side(request):
    yield
    if not _rows:
        return
    lines = [f"data pipeline on the real sample ({WORKERS} workers, batch {BATCH}, crop {CROP}):"]
    lines.append(f"  {'what':34s} {'tiles':>6s} {'tiles/s':>9s}")
    lines += [f"  {name:34s} {n:6d} {rate:9.1f}" for name, n, rate in _rows]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown even though pytest captures output
        print("\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sample"))
    prepare_sample(out, progress=False)
    return out


@pytest.mark.benchmark(group="data: prepare the sample")
def test_prepare_sample(benchmark, tmp_path, record):
    out = str(tmp_path / "sample")

    def run():
        shutil.rmtree(out, ignore_errors=True)
        return prepare_sample(out, progress=False)

    summary = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
    rate = summary.num_tiles / benchmark.stats.stats.mean
    record(tiles=summary.num_tiles, tiles_per_s=round(rate, 1))
    _rows.append(("prepare_sample (JP2 -> tiles)", summary.num_tiles, rate))


@pytest.mark.benchmark(group="data: two-view loader epoch")
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loader_epoch(benchmark, sample_root, record, backend):
    if backend == "dali" and not dali_available()[0]:
        pytest.skip(dali_available()[1])
    loader = make_loader(sample_root, BATCH, backend=backend, crop_size=CROP, num_workers=WORKERS)
    name = f"dali ({loader.device})" if backend == "dali" else "torch DataLoader"

    def epoch():
        n = 0
        for batch in loader:
            n += batch["view1"].shape[0]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return n

    n = benchmark.pedantic(epoch, rounds=5, iterations=1, warmup_rounds=1)
    rate = n / benchmark.stats.stats.mean
    record(backend=name, tiles=n, batch=BATCH, crop=CROP, workers=WORKERS, tiles_per_s=round(rate, 1))
    _rows.append((f"loader epoch: {name}", n, rate))
