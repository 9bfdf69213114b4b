"""Raw rasters -> a folder of training tiles: ``prepare(inputs, out_dir, ...)``.

Each input scene is read onto its 10 m grid (``raster.SceneReader``), cut into ``tile_size``
tiles every ``stride`` pixels, and each tile is written as ``tiles/{id}.npy`` (uint16, C x H x
W) with its land-cover class pixel counts and its contribution to the per-band statistics.
Scenes are processed in parallel by a process pool (one scene per task), with a tqdm bar.

Resumable: the parent process appends one JSON line per finished scene to
``progress.jsonl`` after the scene's tiles are on disk (each tile is written to a temporary
file and renamed, so a tile file that exists is complete). A rerun skips the scenes listed
there whose tiles all exist; settings that change tile content must match the first run's.

Failures of one scene (a corrupt or unreadable file, a missing band, no CRS, no overlap with
the land cover) are reported by name in the summary and the scene is skipped; the tiles it
had written are removed. A worker process that dies (a crash inside a raster driver) takes
only its scene down: the scenes it might have held are retried one by one.

The final step (``finalize``, cheap, rerun every time) assembles ``manifest.parquet``,
``labels.npy`` / ``multihot.npy``, ``stats.json`` and ``dataset.json`` from the journal, so
scene grouping (``scene_block``) and the multi-hot threshold can change without re-tiling.
A folder accumulates: a later run with more inputs (same settings) adds their tiles.
"""

from __future__ import annotations

import glob
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from fastcon import _checks
from fastcon.data.bands import BandSet, get_band_set
from fastcon.data.inputs import InputError, SceneInput, find_inputs
from fastcon.data.landcover import LandCover, class_pixel_counts, open_landcover
from fastcon.data.raw import STORES, band_sources, manifest_columns, write_scenes
from fastcon.data.stats import RunningStats, write_stats

FORMAT_VERSION = 1
SETTINGS_FILE = "prepare_settings.json"
JOURNAL_FILE = "progress.jsonl"
TILES_DIR = "tiles"
STATS_NOTE = "stored uint16 values over the valid pixels of all tiles (overlapping tiles count each time)"


@dataclass(frozen=True)
class _Job:
    """What a worker needs to tile one scene (picklable)."""

    band_set: BandSet
    tile_size: int
    stride: int
    resolution: float | None
    resampling: str
    max_nodata: float
    landcover: LandCover | None
    tiles_dir: str
    max_strip_bytes: int
    read_threads: int
    store: str = "npy"


@dataclass
class PrepareSummary:
    """What a ``prepare`` run did; ``str()`` is the report printed at the end."""

    out_dir: str
    num_inputs: int = 0
    processed: int = 0
    resumed: int = 0  # already done by an earlier run, skipped
    failed: list[tuple[str, str]] = field(default_factory=list)
    unlabelled: int = 0  # scenes without a label in labels_json, skipped
    new_tiles: int = 0
    num_tiles: int = 0
    num_scenes: int = 0
    class_names: tuple[str, ...] = ()
    tiles_with_class: dict[str, int] = field(default_factory=dict)
    mean_fraction: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"prepared {self.out_dir}: {self.num_tiles} tiles from {self.num_inputs - len(self.failed)} of "
            f"{self.num_inputs} inputs ({self.processed} processed now, {self.resumed} already done; "
            f"{self.new_tiles} tiles written) in {self.seconds:.1f} s; {self.num_scenes} scene ids",
        ]
        if self.class_names:
            lines.append(f"classes ({len(self.class_names)}): tiles with the class / mean fraction")
            for c in self.class_names:
                lines.append(f"  {c:24s} {self.tiles_with_class.get(c, 0):7d}  {self.mean_fraction.get(c, 0.0):.3f}")
        if self.unlabelled:
            lines.append(f"{self.unlabelled} scene(s) without a label in the labels JSON skipped")
        return "\n".join(lines + self.failure_lines())

    def failure_lines(self) -> list[str]:
        if not self.failed:
            return []
        return [f"{len(self.failed)} input(s) skipped:", *(f"  {name}: {msg}" for name, msg in self.failed)]

    def finish(self, info: dict, t0: float, progress: bool) -> PrepareSummary:
        """Fill in the totals of ``finalize``'s dataset.json; print the report if ``progress``."""
        self.num_tiles, self.num_scenes = info["num_tiles"], info["num_scenes"]
        self.class_names = tuple(info["classes"])
        self.tiles_with_class = info["class_stats"]["tiles_with_class"]
        self.mean_fraction = info["class_stats"]["mean_fraction"]
        self.seconds = time.perf_counter() - t0
        if progress:
            print(self)
        elif self.failed:  # failures are printed with or without progress output
            print("\n".join(self.failure_lines()), file=sys.stderr)
        return self


# --------------------------------------------------------------------------------------------
# one scene (runs in a worker process)


def _offsets(n: int, size: int, stride: int) -> list[int]:
    return list(range(0, n - size + 1, stride)) if n >= size else []


def _save_atomic(path: str, array: np.ndarray) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
    os.replace(tmp, path)


def process_scene(scene: SceneInput, job: _Job) -> dict:
    """Tile one scene; returns its journal record. Raises InputError (naming the input) on failure."""
    from fastcon.data.raster import SceneReader

    bs, size, stride = job.band_set, job.tile_size, job.stride
    num_classes = len(job.landcover.class_names) if job.landcover else 0
    written = []
    try:
        with SceneReader(
            scene, bs, resolution=job.resolution, resampling=job.resampling, threads=job.read_threads
        ) as reader:
            grid = reader.grid
            raw = {"raw": band_sources(reader)} if job.store == "raw" else {}
            if job.landcover is not None:
                job.landcover.check_overlap(grid, scene.key)
            rows, cols = _offsets(grid.height, size, stride), _offsets(grid.width, size, stride)
            stats = RunningStats(bs.num_bands)
            tiles, counts = [], []
            # as many tile rows per strip as fit the memory budget (float32 bands while warping)
            row_bytes = bs.num_bands * grid.width * 4
            per_strip = max(1, (job.max_strip_bytes // row_bytes - size) // stride + 1)
            for i in range(0, len(rows), per_strip):
                chunk = rows[i : i + per_strip]
                r0 = chunk[0]
                strip = grid.rows(r0, chunk[-1] + size - r0)
                data, valid = reader.read(strip)
                index = job.landcover.labels(strip) if job.landcover is not None else None
                for r in chunk:
                    y = r - r0
                    for c in cols:
                        ok = valid[y : y + size, c : c + size]
                        nodata = 1.0 - float(ok.mean())
                        if nodata > job.max_nodata:
                            continue
                        tile = data[:, y : y + size, c : c + size]
                        tile_id = f"{scene.tile_prefix}_{r // stride:03d}_{c // stride:03d}"
                        path = os.path.join(job.tiles_dir, tile_id + ".npy")
                        if job.store == "npy" and not os.path.exists(
                            path
                        ):  # a rerun of a half-done scene keeps finished tiles
                            _save_atomic(path, tile)
                            written.append(path)
                        stats.update(tile.reshape(bs.num_bands, -1) if nodata == 0.0 else tile[:, ok])
                        left, bottom, right, top = grid.window(r, c, size, size).bounds
                        tiles.append([tile_id, r // stride, c // stride, left, bottom, right, top, round(nodata, 6)])
                        if index is not None:
                            counts.append(class_pixel_counts(index[y : y + size, c : c + size], num_classes).tolist())
    except BaseException:
        for p in written:
            if os.path.exists(p):
                os.remove(p)
        raise
    return {
        "key": scene.key,
        "location": scene.location,
        "files": [os.path.abspath(f) for f in scene.files],
        "crs": grid.crs.to_string(),
        "grid": [grid.width, grid.height, *grid.transform[:6]],
        "tiles": tiles,
        "counts": counts,
        "stats": stats.to_dict(),
        "new_tiles": len(written),
        **raw,
    }


def _work(scene: SceneInput, job: _Job):
    """Worker entry: never raises for a bad input, so one scene cannot stop the pool."""
    try:
        return ("ok", process_scene(scene, job))
    except InputError as e:
        return ("error", scene.key, str(e))
    except Exception as e:  # anything a damaged file can make a driver raise
        return ("error", scene.key, f"input {scene.key}: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------------
# the run


def _pool_context():
    # forkserver: workers fork from a clean single-threaded server that has imported rasterio
    # once, never from a parent that may run DALI or torch threads
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["fastcon.data.preparation"])
        return ctx
    return mp.get_context("spawn")


def _run(todo: list[SceneInput], job: _Job, workers: int, on_result) -> None:
    """Process ``todo``, passing each result to ``on_result``; when that returns True (stop), no
    further scene starts and the scenes already running finish (their results passed on too)."""
    if workers <= 1 or len(todo) <= 1:
        for scene in todo:
            if on_result(_work(scene, job)):
                return
        return
    ctx = _pool_context()
    queue, suspects = deque(todo), deque()
    while queue or suspects:
        if suspects:  # after a worker died: rerun each scene it might have held on its own
            scene = suspects.popleft()
            with ProcessPoolExecutor(1, mp_context=ctx) as ex:
                try:
                    result = ex.submit(_work, scene, job).result()
                except BrokenProcessPool:
                    result = (
                        "error",
                        scene.key,
                        f"input {scene.key}: the worker process died while reading {', '.join(map(str, scene.files))}",
                    )
            if on_result(result):
                queue.clear()
                suspects.clear()
            continue
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            in_flight = {}
            try:
                while queue or in_flight:
                    while queue and len(in_flight) < 2 * workers:  # bounded: millions of inputs are fine
                        scene = queue.popleft()
                        in_flight[ex.submit(_work, scene, job)] = scene
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    broken = False
                    for f in done:
                        scene = in_flight.pop(f)
                        try:
                            result = f.result()
                        except BrokenProcessPool:
                            suspects.append(scene)
                            broken = True
                            continue
                        if on_result(result):
                            queue.clear()
                    if broken:
                        suspects.extend(in_flight.values())
                        break
            except BaseException:
                ex.shutdown(wait=True, cancel_futures=True)
                raise


def _read_journal(out_dir: str) -> dict[str, dict]:
    records = {}
    path = os.path.join(out_dir, JOURNAL_FILE)
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: that scene is simply not done
            records[rec["key"]] = rec
    return records


def _check_settings(out_dir: str, settings: dict) -> None:
    path = os.path.join(out_dir, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diff:
            changes = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(
                f"{out_dir} holds tiles prepared with other settings ({changes}); "
                "use a new output folder or delete this one"
            )
    else:
        with open(path + ".tmp", "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(path + ".tmp", path)


def prepare(
    inputs,
    out_dir,
    *,
    band_set: str | BandSet = "s2c",
    layout: str = "auto",
    tile_size: int = 128,
    stride: int | None = None,
    landcover=None,
    class_field: str | None = None,
    landcover_scheme: str | None = None,
    classes=None,
    landcover_layer: str | int | None = None,
    label_threshold: float = 0.01,
    scene_block: float | None = None,
    resolution: float | None = None,
    resampling: str = "bilinear",
    max_nodata: float = 0.01,
    workers: int | None = None,
    on_error: str = "skip",
    progress: bool = True,
    max_strip_mib: float = 1024,
    store: str = "npy",
    labels_json=None,
    label_scheme: str = "dynamicworld",
    keep_unlabelled: bool = False,
) -> PrepareSummary:
    """Tile raw rasters into ``out_dir``; see the module docstring and ``fastcon.data``.

    inputs: files, folders or glob patterns (``layout`` says how bands map to files).
    band_set: a registered band-set name (``"s2c"``, ``"s2a"``, ``"s1"``) or a BandSet.
    tile_size, stride: tile edge and step in grid pixels (stride defaults to tile_size).
    landcover: a class raster (with ``landcover_scheme`` = "worldcover" | "dynamicworld" or
        ``classes`` = {code: name}) or a vector layer (with ``class_field``; ``classes`` may fix
        the class list and order; ``landcover_layer`` picks a layer of a multi-layer file, by
        name or index, default the first); None for no labels.
    label_threshold: a class is present in the multi-hot vector when its fraction is above this.
    scene_block: scene ids group tiles whose centres fall in the same ``scene_block`` x
        ``scene_block`` block (CRS units, metres; blocks aligned to the CRS origin, so they
        agree across scenes and dates); None: one scene per input location.
    resolution: grid pixel size (default: the finest band's).
    max_nodata: tiles with a larger fraction of missing pixels are not written.
    workers: process-pool size (default: CPU count); 0 or 1 runs in this process.
    on_error: "skip" (report bad inputs and go on) or "raise" (stop at the first).
    max_strip_mib: memory budget of one strip of a scene being read (float32 bands).
    store: "npy" (write tiles/{id}.npy) or "raw" (no tile files: the manifest names each
        tile's band files and windows, read at load time; see ``fastcon.data.raw``).
    labels_json: scene-level labels of SSL4EO-S12 scenes (``fastcon.data.ssl4eo``), classes of
        ``label_scheme``; scenes without a label are skipped and counted unless ``keep_unlabelled``.
    """
    t0 = time.perf_counter()
    bs = get_band_set(band_set)
    tile_size = _checks.integer("tile_size", tile_size, low=1)
    stride = tile_size if stride is None else _checks.integer("stride", stride, low=1)
    label_threshold = _checks.real("label_threshold", label_threshold, low=0.0, high=1.0, high_open=True)
    max_nodata = _checks.real("max_nodata", max_nodata, low=0.0, high=1.0)
    if scene_block is not None:
        scene_block = _checks.real("scene_block", scene_block, low=0.0, low_open=True)
    if resolution is not None:
        resolution = _checks.real("resolution", resolution, low=0.0, low_open=True)
    _checks.choice("on_error", on_error, ("skip", "raise"))
    max_strip_mib = _checks.real("max_strip_mib", max_strip_mib, low=0.0, low_open=True)
    _checks.choice("store", store, STORES)
    from rasterio.enums import Resampling

    if resampling not in Resampling.__members__:
        raise ValueError(f"resampling must be a rasterio Resampling name (e.g. 'bilinear'), got {resampling!r}")
    workers = (os.cpu_count() or 1) if workers is None else _checks.integer("workers", workers, low=0)

    from fastcon.data.ssl4eo import is_zarr_zip

    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)  # a generator is read once
    paths = inputs
    if layout in ("auto", "ssl4eo") and paths and all(is_zarr_zip(p) for p in paths):  # SSL4EO-S12 v1.1
        from fastcon.data.ssl4eo import prepare_zarr

        if landcover is not None:
            raise ValueError("SSL4EO-S12 v1.1 zarr inputs take labels_json, not a landcover file")
        return prepare_zarr(
            paths, out_dir, band_set=bs, tile_size=tile_size, stride=stride, max_nodata=max_nodata,
            label_threshold=label_threshold, labels_json=labels_json, label_scheme=label_scheme,
            keep_unlabelled=keep_unlabelled, progress=progress,
        )  # fmt: skip

    lc = None
    if landcover is not None:
        lc = open_landcover(
            landcover,
            class_field=class_field,
            landcover_scheme=landcover_scheme,
            classes=classes,
            layer=landcover_layer,
        )
    elif any(x is not None for x in (class_field, landcover_scheme, classes, landcover_layer)):
        raise ValueError("class_field / landcover_scheme / classes / landcover_layer need a landcover file")

    scenes, problems = find_inputs(inputs, bs, layout)
    scene_classes, unlabelled = None, 0
    if labels_json is not None:
        from fastcon.data.ssl4eo import SceneLabels

        if lc is not None:
            raise ValueError("give either landcover or labels_json, not both")
        lc = SceneLabels(labels_json, label_scheme)
        scenes, scene_classes, unlabelled = lc.select(scenes, keep_unlabelled)
    out_dir = os.fspath(out_dir)
    tiles_dir = os.path.join(out_dir, TILES_DIR)
    os.makedirs(tiles_dir if store == "npy" else out_dir, exist_ok=True)
    settings = {
        "format_version": FORMAT_VERSION,
        "band_set": bs.name,
        "bands": list(bs.bands),
        "encoding": bs.encoding(),
        "tile_size": tile_size,
        "stride": stride,
        "resolution": resolution,
        "resampling": resampling,
        "max_nodata": max_nodata,
        "landcover": lc.describe() if lc else None,
        "classes": list(lc.class_names) if lc else [],
    }
    if store != "npy":  # npy folders keep the settings of earlier versions, so they still resume
        settings["store"] = store
    _check_settings(out_dir, settings)
    for stale in glob.glob(os.path.join(tiles_dir, ".*.tmp")):  # left by a run that was killed
        os.remove(stale)

    summary = PrepareSummary(out_dir=out_dir, num_inputs=len(scenes) + len(problems), unlabelled=unlabelled)
    if on_error == "raise" and problems:
        raise InputError(problems[0][1])
    summary.failed += problems

    journal = _read_journal(out_dir)
    todo = []
    for s in scenes:
        rec = journal.get(s.key)
        if rec is not None and (
            store == "raw" or all(os.path.exists(os.path.join(tiles_dir, t[0] + ".npy")) for t in rec["tiles"])
        ):
            summary.resumed += 1
        else:
            todo.append(s)

    workers = min(workers, len(todo))
    # band files of a scene decode in threads (GDAL releases the GIL); the pool's processes share the cores
    read_threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    job = _Job(
        bs,
        tile_size,
        stride,
        resolution,
        resampling,
        max_nodata,
        lc if scene_classes is None else None,
        tiles_dir,
        int(max_strip_mib * 2**20),
        read_threads,
        store,
    )
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="prepare", unit="scene")
    journal_path = os.path.join(out_dir, JOURNAL_FILE)
    with open(journal_path, "a") as jf:

        def on_result(result) -> bool:
            """Journal a finished scene; True (stop) at a failure with on_error="raise"."""
            if result[0] == "ok":
                rec = result[1]
                if scene_classes is not None:
                    from fastcon.data.ssl4eo import tile_counts

                    k, n = len(lc.class_names), len(rec["tiles"])
                    rec["counts"] = tile_counts(scene_classes[rec["key"]], k, n, tile_size)
                summary.processed += 1
                summary.new_tiles += rec.pop("new_tiles")
                jf.write(json.dumps(rec, separators=(",", ":")) + "\n")
                jf.flush()
            else:
                summary.failed.append(result[1:])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tiles=summary.new_tiles, failed=len(summary.failed))
            return on_error == "raise" and bool(summary.failed)

        try:
            _run(todo, job, workers, on_result)
        finally:
            if bar is not None:
                bar.close()

    # also after a strict stop: the manifest then lists every scene the journal holds
    info = finalize(out_dir, label_threshold=label_threshold, scene_block=scene_block, failed=summary.failed)
    summary.finish(info, t0, progress)
    if on_error == "raise" and summary.failed:
        raise InputError(summary.failed[0][1])
    return summary


# --------------------------------------------------------------------------------------------
# assembling the dataset files from the journal


def _scene_keys(records, scene_block):
    keys = []
    for rec in records:
        for t in rec["tiles"]:
            if scene_block is None:
                keys.append(rec["location"])
            else:
                cx, cy = (t[3] + t[5]) / 2, (t[4] + t[6]) / 2
                keys.append(f"{rec['crs']}/{math.floor(cx / scene_block)}/{math.floor(cy / scene_block)}")
    return keys


def _write_npy(path, array):
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def finalize(out_dir, *, label_threshold: float = 0.01, scene_block: float | None = None, failed=()) -> dict:
    """(Re)build manifest, labels, statistics and dataset.json from the journal; returns dataset.json."""
    import pandas as pd

    out_dir = os.fspath(out_dir)
    with open(os.path.join(out_dir, SETTINGS_FILE)) as f:
        settings = json.load(f)
    # an input that failed now may have an older record whose tiles are gone: leave it out
    failed_keys = {name for name, _ in failed}
    records = sorted(
        (r for r in _read_journal(out_dir).values() if r["key"] not in failed_keys), key=lambda r: r["key"]
    )
    bands, classes, size = settings["bands"], settings["classes"], settings["tile_size"]
    tiles = [t for rec in records for t in rec["tiles"]]
    raw = settings.get("store", "npy") == "raw"
    if raw:
        write_scenes(out_dir, records)
    n, k = len(tiles), len(classes)
    counts = np.array([c for rec in records for c in rec["counts"]], dtype=np.int64).reshape(n, k)
    fractions = (counts / float(size * size)).astype(np.float32)
    multihot = (fractions > label_threshold).astype(np.uint8)

    scene_keys = _scene_keys(records, scene_block)
    scene_index = {}
    scene_ids = np.array([scene_index.setdefault(s, len(scene_index)) for s in scene_keys], dtype=np.int64)
    source = [rec["key"] for rec in records for _ in rec["tiles"]]
    crs = [rec["crs"] for rec in records for _ in rec["tiles"]]
    t = list(zip(*tiles)) if tiles else [[]] * 8
    present = [",".join(classes[j] for j in np.flatnonzero(row)) for row in multihot]
    manifest = pd.DataFrame(
        {
            "id": pd.Series(t[0], dtype=str),
            "file": pd.Series([f"{TILES_DIR}/{i}.npy" if not raw else "" for i in t[0]], dtype=str),
            "scene_id": scene_ids,
            "scene": pd.Series(scene_keys, dtype=str),
            "source": pd.Series(source, dtype=str),
            "row": np.asarray(t[1], dtype=np.int64),
            "col": np.asarray(t[2], dtype=np.int64),
            "left": np.asarray(t[3], dtype=np.float64),
            "bottom": np.asarray(t[4], dtype=np.float64),
            "right": np.asarray(t[5], dtype=np.float64),
            "top": np.asarray(t[6], dtype=np.float64),
            "crs": pd.Series(crs, dtype=str),
            "nodata_fraction": np.asarray(t[7], dtype=np.float64),
            "bands": pd.Series([",".join(bands)] * n, dtype=str),
            "classes": pd.Series(present, dtype=str),
            **({k: pd.Series(v, dtype=str) for k, v in manifest_columns(records, size).items()} if raw else {}),
        }
    )
    manifest_file = _write_manifest(out_dir, manifest, bands, classes)
    _write_npy(os.path.join(out_dir, "labels.npy"), fractions)
    _write_npy(os.path.join(out_dir, "multihot.npy"), multihot)

    stats = RunningStats(len(bands))
    for rec in records:
        stats.merge(RunningStats.from_dict(rec["stats"]))
    write_stats(os.path.join(out_dir, "stats.json"), stats, bands, STATS_NOTE)

    info = {
        **settings,
        "store": settings.get("store", "npy"),
        "dtype": "uint16",
        "layout": "CHW",
        "num_tiles": n,
        "num_scenes": len(scene_index),
        "num_inputs": len(records),
        "label_threshold": label_threshold,
        "scene_block": scene_block,
        "manifest": manifest_file,
        "class_stats": {
            "tiles_with_class": {c: int(multihot[:, j].sum()) for j, c in enumerate(classes)},
            "mean_fraction": {c: float(fractions[:, j].mean()) if n else 0.0 for j, c in enumerate(classes)},
            "unlabelled_fraction": float(1.0 - fractions.sum(axis=1).mean()) if n and k else 1.0,
        },
        "failed_inputs": [list(f) for f in failed],
    }
    with open(os.path.join(out_dir, "dataset.json.tmp"), "w") as f:
        json.dump(info, f, indent=1)
    os.replace(os.path.join(out_dir, "dataset.json.tmp"), os.path.join(out_dir, "dataset.json"))
    return info


def _write_manifest(out_dir, manifest, bands, classes) -> str:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # no pyarrow: CSV keeps the same columns
        manifest.to_csv(os.path.join(out_dir, "manifest.csv.tmp"), index=False)
        os.replace(os.path.join(out_dir, "manifest.csv.tmp"), os.path.join(out_dir, "manifest.csv"))
        return "manifest.csv"
    table = pa.Table.from_pandas(manifest, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"fastcon"] = json.dumps({"bands": list(bands), "classes": list(classes)}).encode()
    pq.write_table(table.replace_schema_metadata(meta), os.path.join(out_dir, "manifest.parquet.tmp"))
    os.replace(os.path.join(out_dir, "manifest.parquet.tmp"), os.path.join(out_dir, "manifest.parquet"))
    return "manifest.parquet"
