"""SSL4EO-S12 scene-level multi-labels (SoftCon's "SSL4EO-S12-ML"): a JSON of Dynamic World classes.

The file maps ``{location_id: {season_id: ["0", "4", ...]}}``: the class indices (strings or
integers) of each season of each location, in the order of the label scheme (Dynamic World:
water, trees, grass, flooded_vegetation, crops, shrub_and_scrub, built, bare, snow_and_ice).
An empty list means the season has no label.

``SceneLabels(path, scheme)`` matches it to the scenes ``find_inputs`` found in the v1 layout
``ROOT/{band_set}/{location}/{season}/{band}.tif`` (scene key ``{band_set}/{location}/{season}``):
a season is matched by its folder name, or else by its position (``"0"``..``"3"``) among the
location's season folders sorted by name. ``select`` drops the scenes without a label (absent
from the JSON, or an empty list) and counts them, unless asked to keep them unlabelled;
locations in the JSON but not on disk are ignored. Every tile of a scene gets the scene's
classes: its label fractions are split evenly among them (each ``1 / n``, so a tile's
fractions sum to 1 and each class is above any multi-hot threshold under ``1 / n``).

SSL4EO-S12 v1.1 ships ``*.zarr.zip`` files whose variable ``bands`` has the shape (sample,
time, band, y, x); ``prepare_zarr`` (what ``prepare`` calls for such inputs) tiles each
(sample, time) as a scene of location ``sample``, labels from the same JSON keyed by sample id.
"""

from __future__ import annotations

import json
import os

import numpy as np

from fastcon.data.landcover import LANDCOVER_SCHEMES


class SceneLabels:
    """Scene-level class lists from an SSL4EO-S12-ML JSON (picklable: plain dicts)."""

    def __init__(self, path, scheme: str = "dynamicworld"):
        path = os.fspath(path)
        if scheme not in LANDCOVER_SCHEMES:
            raise ValueError(f"label_scheme must be one of {', '.join(map(repr, LANDCOVER_SCHEMES))}; got {scheme!r}")
        codes = sorted(LANDCOVER_SCHEMES[scheme])
        self.path, self.scheme = path, scheme
        self.class_names = tuple(LANDCOVER_SCHEMES[scheme][c] for c in codes)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"labels_json {path} does not exist")
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"labels_json {path} is not readable JSON: {e}") from e
        if not isinstance(doc, dict):
            raise ValueError(
                f"labels_json {path}: expected {{location_id: {{season_id: [class, ...]}}}}, got a {type(doc).__name__}"
            )
        self.labels: dict[str, dict[str, list[int]]] = {}
        for loc, seasons in doc.items():
            if not isinstance(seasons, dict):
                raise ValueError(
                    f"labels_json {path}: location {loc!r} maps to a {type(seasons).__name__}, not {{season_id: [...]}}"
                )
            self.labels[str(loc)] = {}
            for season, classes in seasons.items():
                self.labels[str(loc)][str(season)] = self._indices(classes, f"{loc}/{season}", len(codes))

    def _indices(self, classes, where: str, k: int) -> list[int]:
        if not isinstance(classes, list):
            raise ValueError(f"labels_json {self.path}: {where} must be a list of class indices, got {classes!r}")
        out = []
        for c in classes:
            try:
                i = int(c)
            except (TypeError, ValueError):
                raise ValueError(f"labels_json {self.path}: {where} has class {c!r}, not an index 0..{k - 1}") from None
            if not 0 <= i < k:
                raise ValueError(f"labels_json {self.path}: {where} has class {i}, outside 0..{k - 1} ({self.scheme})")
            if i not in out:
                out.append(i)
        return sorted(out)

    def describe(self) -> dict:
        return {"labels_json": os.path.abspath(self.path), "scheme": self.scheme}

    def for_scene(self, key: str, seasons_of_location: list[str]) -> list[int]:
        """The class indices of scene ``{band_set}/{location}/{season}``; [] when it has none."""
        parts = key.split("/")
        loc, season = parts[-2], parts[-1]
        by_season = self.labels.get(loc)
        if by_season is None:
            return []
        if season in by_season:
            return by_season[season]
        position = str(seasons_of_location.index(season)) if season in seasons_of_location else None
        return by_season.get(position, [])

    def select(self, scenes, keep_unlabelled: bool = False):
        """(scenes to tile, {scene key: class indices}, number of unlabelled scenes skipped)."""
        seasons: dict[str, list[str]] = {}
        for s in scenes:
            seasons.setdefault(s.location, []).append(s.key.split("/")[-1])
        for v in seasons.values():
            v.sort()
        keep, classes, skipped = [], {}, 0
        for s in scenes:
            c = self.for_scene(s.key, seasons[s.location])
            if c or keep_unlabelled:
                keep.append(s)
                classes[s.key] = c
            else:
                skipped += 1
        return keep, classes, skipped


def tile_counts(classes: list[int], num_classes: int, num_tiles: int, tile_size: int) -> list[list[int]]:
    """Per-tile class pixel counts that give each of the scene's classes the fraction 1 / n."""
    row = [0] * num_classes
    for c in classes:
        row[c] = (tile_size * tile_size) // len(classes)
    return [list(row) for _ in range(num_tiles)]


# --------------------------------------------------------------------------------------------
# SSL4EO-S12 v1.1: *.zarr.zip files, variable ``bands`` (sample, time, band, y, x)


def is_zarr_zip(path) -> bool:
    return os.fspath(path).lower().endswith(".zarr.zip")


def _names(group, key: str, n: int, default):
    if key in group:
        values = group[key][:]
        return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1)]
    return [default(i) for i in range(n)]


def read_zarr_zip(path, band_set):
    """(bands array (sample, time, band, y, x) read lazily, sample ids, time names, band order)."""
    import zarr

    store = zarr.storage.ZipStore(os.fspath(path), mode="r")
    group = zarr.open_group(store, mode="r")
    if "bands" not in group:
        raise ValueError(f"{path}: no variable 'bands' (sample, time, band, y, x) in this zarr file")
    arr = group["bands"]
    if len(arr.shape) != 5:
        raise ValueError(f"{path}: 'bands' has shape {arr.shape}, expected (sample, time, band, y, x)")
    s, t, b = arr.shape[:3]
    stem = os.path.basename(os.fspath(path))[: -len(".zarr.zip")]
    samples = _names(group, "sample", s, lambda i: f"{stem}_{i:06d}")
    times = _names(group, "time", t, str)
    file_bands = _names(group, "band", b, lambda i: band_set.bands[i] if b == band_set.num_bands else f"band{i}")
    order = []
    for want in band_set.bands:
        found = [i for i, name in enumerate(file_bands) if band_set.match_token(name) == want]
        if not found:
            raise ValueError(f"{path}: band {want} of band set {band_set.name!r} not in the file's bands {file_bands}")
        order.append(found[0])
    return arr, samples, times, order


def prepare_zarr(
    inputs,
    out_dir,
    *,
    band_set,
    tile_size: int,
    stride: int,
    max_nodata: float,
    label_threshold: float,
    labels_json=None,
    label_scheme: str = "dynamicworld",
    keep_unlabelled: bool = False,
    progress: bool = True,
):
    """Tile SSL4EO-S12 v1.1 ``*.zarr.zip`` files into ``out_dir`` like ``prepare`` does.

    Each (sample, time) is a scene whose location (scene id) is the sample id; with
    ``labels_json`` the labels are keyed by sample id, then by time index ("0".."3") or time
    value. Resumable through the same journal; the files carry no map grid, so tile bounds are
    in pixels of their patch.
    """
    import json
    import time

    from fastcon.data import preparation as prep
    from fastcon.data.raster import encode
    from fastcon.data.stats import RunningStats

    t0 = time.perf_counter()
    bs = band_set
    files = [os.fspath(p) for p in inputs]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"inputs do not exist: {', '.join(missing)}")
    labels = SceneLabels(labels_json, label_scheme) if labels_json is not None else None
    tiles_dir = os.path.join(os.fspath(out_dir), prep.TILES_DIR)
    os.makedirs(tiles_dir, exist_ok=True)
    settings = {
        "format_version": prep.FORMAT_VERSION, "band_set": bs.name, "bands": list(bs.bands),
        "encoding": bs.encoding(), "tile_size": tile_size, "stride": stride, "resolution": None,
        "resampling": "none (SSL4EO-S12 v1.1 zarr)", "max_nodata": max_nodata,
        "landcover": labels.describe() if labels else None, "classes": list(labels.class_names) if labels else [],
    }  # fmt: skip
    prep._check_settings(os.fspath(out_dir), settings)
    journal = prep._read_journal(os.fspath(out_dir))
    summary = prep.PrepareSummary(out_dir=os.fspath(out_dir))
    k = len(settings["classes"])
    from tqdm.auto import tqdm

    with open(os.path.join(os.fspath(out_dir), prep.JOURNAL_FILE), "a") as jf:
        for path in files:
            arr, samples, times, order = read_zarr_zip(path, bs)
            stem = os.path.basename(path)[: -len(".zarr.zip")]
            bar = tqdm(total=len(samples) * len(times), desc=stem, unit="scene", disable=not progress)
            for si, sample in enumerate(samples):
                block = None
                for ti, tname in enumerate(times):
                    bar.update(1)
                    key = f"{stem}/{sample}/{ti}"
                    classes = []
                    if labels is not None:
                        by_time = labels.labels.get(str(sample), {})
                        classes = by_time.get(str(ti), by_time.get(tname, []))
                        if not classes and not keep_unlabelled:
                            summary.unlabelled += 1
                            continue
                    summary.num_inputs += 1
                    rec = journal.get(key)
                    if rec is not None and all(
                        os.path.exists(os.path.join(tiles_dir, t[0] + ".npy")) for t in rec["tiles"]
                    ):
                        summary.resumed += 1
                        continue
                    if block is None:
                        block = np.asarray(arr[si])  # (time, band, y, x) of this sample
                    values = block[ti][order].astype(np.float32)
                    valid = np.isfinite(values).all(axis=0)
                    if bs.source_nodata is not None:
                        valid &= (values != bs.source_nodata).all(axis=0)
                    data = encode(values, bs)
                    h, w = data.shape[1:]
                    stats, tiles = RunningStats(bs.num_bands), []
                    prefix = f"{stem}_{sample}_{ti}"
                    for r in prep._offsets(h, tile_size, stride):
                        for c in prep._offsets(w, tile_size, stride):
                            ok = valid[r : r + tile_size, c : c + tile_size]
                            nodata = 1.0 - float(ok.mean())
                            if nodata > max_nodata:
                                continue
                            tile = data[:, r : r + tile_size, c : c + tile_size]
                            tile_id = f"{prefix}_{r // stride:03d}_{c // stride:03d}"
                            out = os.path.join(tiles_dir, tile_id + ".npy")
                            if not os.path.exists(out):
                                prep._save_atomic(out, tile)
                                summary.new_tiles += 1
                            stats.update(tile[:, ok])
                            bounds = [float(c), float(h - r - tile_size), float(c + tile_size), float(h - r)]
                            tiles.append([tile_id, r // stride, c // stride, *bounds, round(nodata, 6)])
                    rec = {
                        "key": key, "location": str(sample), "files": [os.path.abspath(path)], "crs": "",
                        "grid": [w, h, 1.0, 0.0, 0.0, 0.0, -1.0, float(h)], "tiles": tiles,
                        "counts": tile_counts(classes, k, len(tiles), tile_size) if labels else [],
                        "stats": stats.to_dict(),
                    }  # fmt: skip
                    jf.write(json.dumps(rec, separators=(",", ":")) + "\n")
                    jf.flush()
                    summary.processed += 1
            bar.close()
    info = prep.finalize(os.fspath(out_dir), label_threshold=label_threshold)
    return summary.finish(info, t0, progress)
