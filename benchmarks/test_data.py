"""Data pipeline throughput: DALI (CPU mode here) vs the torch loader, ``--store npy`` vs ``--store raw``.

Loader rounds: one epoch of two-view batches (random resized crops to 112 x 112, flips,
normalisation) with the loader built beforehand as a training run would; the DALI loader's
per-epoch pipeline build is inside the round. All loaders get the same number of worker
threads / processes. ``tiles_per_s`` (extra_info, and a side-by-side table printed at the end)
is the comparable number; each tile gives two views.

- the bundled real sample (13 JPEG 2000 bands, 768 x 1536 px at 10 m): npy loaders over the
  224 tiles of a full epoch; every loader also over the same 64 tiles (2 batches), because
  DALI-raw decodes 13 JP2 windows per tile and a full epoch would take minutes;
- an SSL4EO-S12 v1 miniature (``fastcon.data.miniature``: 16 patches, per-band GeoTIFFs of
  264 / 132 / 44 px, 4 tiles of 128 px each): a full epoch for every loader;
- storage of the two stores (the dataset folder; the raw one points at the source files);
- decoding one tile's window of each band of the sample: DALI ``decoders.image_slice`` (CPU)
  against rasterio's windowed read, ms per window.
Preparing the sample from the raw JP2 bands is timed too.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
import torch

from fastcon.data import TileDataset, dali_available, make_loader, prepare, prepare_sample
from fastcon.data.miniature import write_ssl4eo_s12

# rasterio 1.4 itself still multiplies Affine objects with `*`, which affine 3 flags
pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")
BATCH, CROP = 32, 112
WORKERS = min(4, os.cpu_count() or 1)
SUBSET = 64  # sample tiles every loader reads (DALI-raw decodes 13 JP2 windows per tile)
_rows: list[tuple[str, int, float, str]] = []
needs_dali = pytest.mark.skipif(not dali_available()[0], reason="nvidia-dali is not installed")


@pytest.fixture(scope="module", autouse=True)
def _side_by_side(request):
    yield
    if not _rows:
        return
    lines = [f"data pipeline ({WORKERS} workers, batch {BATCH}, crop {CROP}):"]
    lines.append(f"  {'what':52s} {'n':>6s} {'rate':>9s}")
    lines += [f"  {name:52s} {n:6d} {rate:9.1f} {unit}" for name, n, rate, unit in _rows]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown even though pytest captures output
        print("\n" + "\n".join(lines))


def _folder_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


@pytest.fixture(scope="module")
def sample_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("sample")
    roots = {store: str(base / store) for store in ("npy", "raw")}
    for store, root in roots.items():
        prepare_sample(root, progress=False, store=store)
    return roots


@pytest.fixture(scope="module")
def ssl4eo_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("ssl4eo")
    src = write_ssl4eo_s12(str(base / "data"), locations=[f"{k:07d}" for k in range(16)])
    roots = {store: str(base / store) for store in ("npy", "raw")}
    for store, root in roots.items():
        prepare(src, root, tile_size=128, max_nodata=0.2, workers=0, progress=False, store=store)
    roots["source"] = os.path.dirname(src)
    return roots


@pytest.mark.benchmark(group="data: prepare the sample")
def test_prepare_sample(benchmark, tmp_path, record):
    out = str(tmp_path / "sample")

    def run():
        shutil.rmtree(out, ignore_errors=True)
        return prepare_sample(out, progress=False)

    summary = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
    rate = summary.num_tiles / benchmark.stats.stats.mean
    record(tiles=summary.num_tiles, tiles_per_s=round(rate, 1))
    _rows.append(("prepare_sample (JP2 -> tiles)", summary.num_tiles, rate, "tiles/s"))


LOADERS = [("dali", "npy"), ("torch", "npy"), ("dali", "raw"), ("torch", "raw")]


def _loader_epoch(benchmark, record, root, backend, store, what, indices=None, rounds=3):
    if backend == "dali" and not dali_available()[0]:
        pytest.skip(dali_available()[1])
    loader = make_loader(root, BATCH, backend=backend, crop_size=CROP, num_workers=WORKERS, indices=indices)
    name = f"{what} {store}: " + (f"dali ({loader.device})" if backend == "dali" else "torch DataLoader")

    def epoch():
        n = 0
        for batch in loader:
            n += batch["view1"].shape[0]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return n

    n = benchmark.pedantic(epoch, rounds=rounds, iterations=1, warmup_rounds=0 if store == "raw" else 1)
    rate = n / benchmark.stats.stats.mean
    record(backend=name, store=store, tiles=n, batch=BATCH, crop=CROP, workers=WORKERS, tiles_per_s=round(rate, 1))
    _rows.append((f"loader epoch: {name}", n, rate, "tiles/s"))


@pytest.mark.benchmark(group="data: two-view loader epoch, real sample")
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loader_epoch(benchmark, sample_roots, record, backend):
    _loader_epoch(benchmark, record, sample_roots["npy"], backend, "npy", "sample (224)", rounds=5)


@pytest.mark.benchmark(group="data: two-view loader, 64 tiles of the real sample")
@pytest.mark.parametrize(("backend", "store"), LOADERS)
def test_loader_sample_subset(benchmark, sample_roots, record, backend, store):
    indices = np.arange(0, 253, 4)[:SUBSET]  # spread over the scene
    _loader_epoch(benchmark, record, sample_roots[store], backend, store, f"sample ({SUBSET})", indices, rounds=2)


@pytest.mark.benchmark(group="data: two-view loader epoch, SSL4EO-S12 miniature")
@pytest.mark.parametrize(("backend", "store"), LOADERS)
def test_loader_ssl4eo(benchmark, ssl4eo_roots, record, backend, store):
    _loader_epoch(benchmark, record, ssl4eo_roots[store], backend, store, "ssl4eo-s12 (64)")


@pytest.mark.benchmark(group="data: storage")
def test_storage(benchmark, sample_roots, ssl4eo_roots, record):
    from fastcon.data.sample import sample_dir

    sizes = benchmark.pedantic(
        lambda: {
            "sample npy": _folder_bytes(sample_roots["npy"]),
            "sample raw": _folder_bytes(sample_roots["raw"]),
            "sample source (JP2 bands + GeoPackages)": _folder_bytes(sample_dir()),
            "ssl4eo npy": _folder_bytes(ssl4eo_roots["npy"]),
            "ssl4eo raw": _folder_bytes(ssl4eo_roots["raw"]),
            "ssl4eo source (GeoTIFF bands)": _folder_bytes(ssl4eo_roots["source"]),
        },
        rounds=1,
        iterations=1,
    )
    record(**{k.replace(" ", "_"): v for k, v in sizes.items()})
    _rows.extend((f"storage: {k}", 0, v / 2**20, "MiB") for k, v in sizes.items())


def _slice_pipeline(path, start, shape):
    """A CPU pipeline decoding the windows (start, shape: HW) of one band file, one per sample."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=len(start), num_threads=WORKERS, device_id=None, prefetch_queue_depth=1)
    def pipe():
        data, _ = fn.readers.file(files=[path] * len(start))
        a = fn.external_source(source=[start], batch=True, cycle=True)
        s = fn.external_source(source=[shape], batch=True, cycle=True)
        return fn.decoders.image_slice(
            data, a, s, axis_names="HW", normalized_anchor=False, normalized_shape=False,
            device="cpu", output_type=types.ANY_DATA, dtype=types.UINT16,
        )  # fmt: skip

    return pipe()


@needs_dali
@pytest.mark.benchmark(group="data: decode one tile window per band")
def test_decode_per_band(benchmark, sample_roots, record):
    """ms per 128-px tile window (a 10 m tile's extent) of each band: DALI image_slice vs rasterio."""
    import rasterio
    from rasterio.windows import Window

    ds = TileDataset(sample_roots["raw"])
    picks = np.arange(0, ds.num_tiles, 32)[:8]
    n = len(picks)
    results = {}

    def measure():
        for b, band in enumerate(ds.band_names):
            path = ds.raw.files[0, b]
            win = ds.raw.windows[picks, b]
            start = [np.array([int(r), int(c)], np.int32) for c, r, _, _ in win]
            shape = [np.array([max(1, round(h)), max(1, round(w))], np.int32) for _, _, w, h in win]

            p = _slice_pipeline(path, start, shape)
            p.build()
            p.run()  # warm-up
            t = time.perf_counter()
            p.run()
            dali_ms = (time.perf_counter() - t) / n * 1e3
            del p
            t = time.perf_counter()
            with rasterio.open(path) as f:  # a fresh open: no block cache from an earlier read
                for (y, x), (h, w) in zip(start, shape):
                    f.read(1, window=Window(int(x), int(y), int(w), int(h)))
            rio_ms = (time.perf_counter() - t) / n * 1e3
            results[band] = (dali_ms, rio_ms)
        return results

    benchmark.pedantic(measure, rounds=1, iterations=1)
    record(**{f"{b}_dali_ms": round(d, 2) for b, (d, _) in results.items()})
    record(**{f"{b}_rasterio_ms": round(r, 2) for b, (_, r) in results.items()})
    for b, (d, r) in results.items():
        _rows.append((f"decode window {b}: dali cpu / rasterio (ms)", n, d, f"ms  rasterio {r:.1f} ms"))
