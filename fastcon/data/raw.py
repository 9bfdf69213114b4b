"""``--store raw``: a prepared folder without tile files; tiles are cut from the band files on use.

``prepare(..., store="raw")`` does everything ``--store npy`` does (reads each scene once for
the statistics, nodata fractions and land-cover labels) but writes no ``tiles/*.npy``. Instead
each manifest row names its sources:

- ``band_files``: JSON list, one path per band in band-set order (a multi-band file repeats);
- ``band_channels``: JSON list of the 1-based band index inside each file;
- ``band_windows``: JSON list of ``[col_off, row_off, width, height]`` per band: the tile's
  extent in that band's own pixel grid (fractional for a 60 m band under a 10 m tile;
  ``null`` for a band in another CRS, which only rasterio can warp).

``raw_scenes.json`` keeps, per input scene, its files and each band's size and nodata value.

Two readers produce the tile that ``--store npy`` would have written:

- ``RawTiles.read(i)`` (``TileDataset[i]``, the torch loader): ``raster.SceneReader`` windowed
  reads and ``rasterio.warp.reproject``, the very code ``prepare`` runs: bit-identical.
- the DALI loader (``fastcon.data.dali``): ``fn.decoders.image_slice`` of the window plus a
  one-pixel margin, then GDAL's bilinear rule rebuilt from ``fn.resize``: the resampled values
  over the valid source pixels divided by the resampled validity (weights renormalised), and
  nodata where the source pixel under the output pixel centre is nodata; rounded half to even
  as ``np.rint``. Equal to rasterio's result except where GDAL's double-precision weights and
  DALI's float32 weights land on opposite sides of a .5 rounding tie: at most 1 stored unit
  (``DALI_TOLERANCE``), and only in resampled bands (10 m bands are copied: bit-identical).
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict

import numpy as np

RAW_SCENES_FILE = "raw_scenes.json"
STORES = ("npy", "raw")
# the largest difference (stored uint16 units) between a resampled band decoded by DALI and
# the same band resampled by rasterio; 10 m (unresampled) bands are bit-identical
DALI_TOLERANCE = 1


def band_sources(reader) -> dict:
    """What a raw dataset needs to know about one scene's band files (a journal field)."""
    bands = []
    for ds, channel in reader._sources():
        t = ds.transform
        nodata = reader._nodata(ds, channel)
        bands.append(
            {
                "file": os.path.abspath(ds.name),
                "channel": int(channel),
                "crs": ds.crs.to_string(),
                "shape": [int(ds.height), int(ds.width)],
                "transform": [t.a, t.b, t.c, t.d, t.e, t.f],
                "nodata": None if nodata is None else float(nodata),
            }
        )
    return {"multiband": bool(reader.scene.multiband), "bands": bands}


def band_window(band: dict, grid_crs: str, bounds, tile_size: int):
    """The tile (bounds left, bottom, right, top) in the band's pixel grid, or None (other CRS)."""
    if band["crs"] != grid_crs:
        return None
    a, _, c, _, e, f = band["transform"]
    left, bottom, right, top = bounds
    return [(left - c) / a + 0.0, (top - f) / e + 0.0, (right - left) / a, (bottom - top) / e]  # + 0.0: no -0.0


def manifest_columns(records: list[dict], tile_size: int) -> dict[str, list[str]]:
    """The raw manifest columns for the tiles of ``records`` (in manifest order)."""
    files, channels, windows = [], [], []
    for rec in records:
        bands = rec["raw"]["bands"]
        f = json.dumps([b["file"] for b in bands])
        ch = json.dumps([b["channel"] for b in bands])
        for t in rec["tiles"]:
            bounds = (t[3], t[4], t[5], t[6])
            files.append(f)
            channels.append(ch)
            windows.append(json.dumps([band_window(b, rec["crs"], bounds, tile_size) for b in bands]))
    return {"band_files": files, "band_channels": channels, "band_windows": windows}


def write_scenes(out_dir: str, records: list[dict]) -> None:
    scenes = {rec["key"]: {"location": rec["location"], "crs": rec["crs"], **rec["raw"]} for rec in records}
    path = os.path.join(out_dir, RAW_SCENES_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(scenes, f)
    os.replace(path + ".tmp", path)


class RawTiles:
    """The sources of a raw dataset's tiles, and rasterio reads of them (``TileDataset`` uses it).

    Opening checks that every band file exists, so a missing file is reported (with a tile id
    that needs it) before any epoch starts. ``files`` (N, B) object array of paths, ``windows``
    (N, B, 4) float64 (NaN for a band in another CRS), ``band_shapes`` (N, B, 2) (height,
    width), ``nodata`` (N, B) float64 (NaN: none), ``channels`` (N, B) int64.
    """

    def __init__(self, root: str, info: dict, manifest):
        self.root, self.info = root, info
        path = os.path.join(root, RAW_SCENES_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{root} is a --store raw dataset but has no {RAW_SCENES_FILE}; rerun prepare")
        with open(path) as f:
            self.scenes = json.load(f)
        n, nb = len(manifest), len(info["bands"])
        self.sources = manifest["source"].tolist()
        self.ids = manifest["id"].tolist()
        self.files = np.empty((n, nb), dtype=object)
        self.channels = np.empty((n, nb), dtype=np.int64)
        self.windows = np.full((n, nb, 4), np.nan)
        self.band_shapes = np.empty((n, nb, 2), dtype=np.int64)
        self.nodata = np.full((n, nb), np.nan)
        parsed = {}
        for i, (files, channels, windows) in enumerate(
            zip(manifest["band_files"], manifest["band_channels"], manifest["band_windows"])
        ):
            self.files[i] = parsed.setdefault(files, json.loads(files))
            self.channels[i] = parsed.setdefault(channels, json.loads(channels))
            self.windows[i] = [[math.nan] * 4 if w is None else w for w in json.loads(windows)]
            scene = self.scenes[self.sources[i]]["bands"]
            self.band_shapes[i] = [b["shape"] for b in scene]
            self.nodata[i] = [math.nan if b["nodata"] is None else b["nodata"] for b in scene]
        first_use = {}
        for i in range(n):
            for f in self.files[i]:
                first_use.setdefault(f, i)
        missing = [(f, i) for f, i in first_use.items() if not os.path.isfile(f)]
        if missing:
            shown = "; ".join(f"{f} (band file of tile {self.ids[i]})" for f, i in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FileNotFoundError(
                f"{root} is a --store raw dataset whose band files are read at load time, but "
                f"{len(missing)} are missing: {shown}{more}"
            )
        self._readers: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self):  # open rasterio datasets stay in the process that opened them
        state = dict(self.__dict__)
        state["_readers"] = OrderedDict()
        return state

    def _reader(self, source: str):
        from fastcon.data.bands import get_band_set
        from fastcon.data.inputs import SceneInput
        from fastcon.data.raster import SceneReader

        if self._pid != os.getpid():
            # a forked worker (DataLoader) must not share the parent's open files (and their offsets)
            self._readers, self._pid = OrderedDict(), os.getpid()
        reader = self._readers.get(source)
        if reader is None:
            scene = self.scenes[source]
            files = tuple(dict.fromkeys(b["file"] for b in scene["bands"]))
            reader = SceneReader(
                SceneInput(source, scene["location"], files, multiband=scene["multiband"]),
                get_band_set(self.info["band_set"]),
                resolution=self.info["resolution"],
                resampling=self.info["resampling"],
            )
            self._readers[source] = reader
            while len(self._readers) > 8:  # a few scenes open at a time
                self._readers.popitem(last=False)[1].close()
        else:
            self._readers.move_to_end(source)
        return reader

    def read(self, index: int, row: int, col: int) -> np.ndarray:
        """Tile ``index`` (grid offsets ``row``, ``col`` in tiles of ``stride``) as stored uint16."""
        from fastcon.data.inputs import InputError

        reader = self._reader(self.sources[index])
        size, stride = self.info["tile_size"], self.info["stride"]
        try:
            data, _ = reader.read(reader.grid.window(row * stride, col * stride, size, size))
        except InputError as e:
            raise InputError(f"tile {self.ids[index]}: {e}") from e
        return data
