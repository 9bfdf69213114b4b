"""A prepared folder, opened: metadata, labels and per-tile access; and spatial train/test splits."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from fastcon.data.raw import RawTiles

REQUIRED_FILES = ("dataset.json", "labels.npy", "multihot.npy", "stats.json")


def read_manifest(root: str):
    """manifest.parquet (or manifest.csv) of a prepared folder, as a pandas DataFrame."""
    import pandas as pd

    for name, read in (("manifest.parquet", pd.read_parquet), ("manifest.csv", pd.read_csv)):
        path = os.path.join(root, name)
        if os.path.exists(path):
            m = read(path)
            for col in ("id", "file", "scene", "source", "crs", "bands", "classes", "band_files", "band_channels"):
                if col in m:
                    m[col] = m[col].fillna("").astype(str)
            return m
    raise FileNotFoundError(f"{root} has no manifest.parquet or manifest.csv")


class TileDataset(torch.utils.data.Dataset):
    """The tiles of a folder written by ``prepare`` (or a subset, ``indices``).

    Metadata: ``band_names``, ``class_names``, ``mean`` / ``std`` (per band, float32, of the
    stored values), ``tile_size``, ``num_tiles`` (of the whole folder), ``labels`` (N x K
    class fractions), ``multihot`` (N x K), ``scene_ids`` (N,), ``ids`` (N tile ids),
    ``manifest`` (DataFrame). Those arrays cover the whole folder and are indexed by tile
    index; ``indices`` says which tiles this dataset (and a loader over it) uses.

    ``store``: "npy" (tiles/{id}.npy) or "raw" (tiles cut from the band files on use, ``raw``:
    a ``fastcon.data.raw.RawTiles``).

    Items (``dataset[i]``, for linear probes and plots): ``{"image": float32 (C, H, W) stored
    values, not normalised; "labels"; "multihot"; "scene_id"; "tile_id"; "index"}``.
    """

    def __init__(self, root, indices=None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"prepared dataset {root} does not exist; run `python -m fastcon.data prepare`")
        missing = [f for f in REQUIRED_FILES if not os.path.exists(os.path.join(root, f))]
        if not missing:
            with open(os.path.join(root, "dataset.json")) as f:
                self.info = json.load(f)
        self.store = self.info.get("store", "npy") if not missing else "npy"
        if self.store == "npy" and not os.path.isdir(os.path.join(root, "tiles")):
            missing.append("tiles/")
        if missing:
            raise FileNotFoundError(
                f"{root} is not a complete prepared dataset: missing {', '.join(missing)} "
                "(run `python -m fastcon.data prepare ...` on it; a rerun finishes an interrupted one)"
            )
        self.root = root
        with open(os.path.join(root, "stats.json")) as f:
            stats = json.load(f)
        self.manifest = read_manifest(root)
        self.band_names = tuple(self.info["bands"])
        self.class_names = tuple(self.info["classes"])
        self.tile_size = int(self.info["tile_size"])
        self.labels = np.load(os.path.join(root, "labels.npy"))
        self.multihot = np.load(os.path.join(root, "multihot.npy"))
        n = len(self.manifest)
        if stats["bands"] != list(self.band_names):
            raise ValueError(
                f"{root}: stats.json is for bands {stats['bands']}, dataset.json for {list(self.band_names)}"
            )
        if self.labels.shape != (n, len(self.class_names)) or self.multihot.shape != self.labels.shape:
            raise ValueError(
                f"{root}: labels.npy {self.labels.shape} / multihot.npy {self.multihot.shape} do not match "
                f"{n} manifest rows x {len(self.class_names)} classes; rerun prepare to rebuild them"
            )
        self.mean = np.asarray(stats["mean"], dtype=np.float32)
        # a constant band (std 0) would divide by zero: normalise it by 1 instead
        self.std = np.maximum(np.asarray(stats["std"], dtype=np.float32), 1.0)
        self.ids = self.manifest["id"].tolist()
        self.scene_ids = self.manifest["scene_id"].to_numpy(dtype=np.int64, copy=True)
        self.files = [os.path.join(root, f) for f in self.manifest["file"]]
        # --store raw: tiles are cut from the band files (checked to exist here, not mid-epoch)
        self.raw = RawTiles(root, self.info, self.manifest) if self.store == "raw" else None
        self._rows, self._cols = self.manifest["row"].to_numpy(), self.manifest["col"].to_numpy()
        self._index_of = None
        self.indices = self._check_indices(indices)

    # ---------------------------------------------------------------- metadata

    @property
    def num_tiles(self) -> int:
        """Tiles in the folder (``len(dataset)`` counts the subset)."""
        return len(self.manifest)

    @property
    def num_bands(self) -> int:
        return len(self.band_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def index_of(self, tile_id: str) -> int:
        if self._index_of is None:
            self._index_of = {t: i for i, t in enumerate(self.ids)}
        return self._index_of[tile_id]

    def _check_indices(self, indices) -> np.ndarray:
        if indices is None:
            return np.arange(self.num_tiles, dtype=np.int64)
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise TypeError(f"indices must be a 1-D sequence of tile indices, got shape {idx.shape} {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_tiles):
            raise ValueError(f"indices must lie in [0, {self.num_tiles}), got [{idx.min()}, {idx.max()}]")
        return idx

    def subset(self, indices) -> TileDataset:
        """The same folder restricted to ``indices`` (tile indices of the folder)."""
        sub = object.__new__(TileDataset)
        sub.__dict__.update(self.__dict__)
        sub.indices = self._check_indices(indices)
        return sub

    # ---------------------------------------------------------------- tiles

    def read_tile(self, index: int) -> np.ndarray:
        """The stored uint16 (C, H, W) array of tile ``index`` (a folder index).

        A ``--store raw`` dataset reads the tile's windows of the band files with rasterio and
        resamples them exactly as ``prepare`` does: the array ``--store npy`` would have written.
        """
        if self.raw is not None:
            return self.raw.read(index, int(self._rows[index]), int(self._cols[index]))
        a = np.load(self.files[index])
        if a.dtype != np.uint16 or a.shape != (self.num_bands, self.tile_size, self.tile_size):
            raise ValueError(
                f"tile {self.files[index]} is {a.dtype} {a.shape}; expected uint16 "
                f"({self.num_bands}, {self.tile_size}, {self.tile_size})"
            )
        return a

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per band; x is (..., C, H, W)."""
        mean = torch.as_tensor(self.mean, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, device=x.device).view(-1, 1, 1)
        return (x - mean) / std

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[i])
        return {
            "image": torch.from_numpy(self.read_tile(j).astype(np.float32)),
            "labels": torch.from_numpy(self.labels[j]),
            "multihot": torch.from_numpy(self.multihot[j]),
            "scene_id": int(self.scene_ids[j]),
            "tile_id": self.ids[j],
            "index": j,
        }

    def __repr__(self) -> str:
        return (
            f"TileDataset({self.root!r}: {len(self)} of {self.num_tiles} tiles ({self.store}), {self.num_bands} bands "
            f"{','.join(self.band_names)}, {self.tile_size} px, {self.num_classes} classes)"
        )


def spatial_split(data, test_fraction: float = 0.25, *, axis: str = "x", by: str = "source"):
    """Train/test tile indices with a spatially held-out test region.

    Per group of tiles (``by``: a manifest column, default each input scene), the test region
    is the east (``axis="x"``) or north (``axis="y"``) part holding about ``test_fraction`` of
    the group's tiles. A tile belongs to the test set when it lies entirely in the region, to
    the training set when it lies entirely outside; tiles straddling the border (with
    overlapping tiles) are left out, so no pixel is in both sets.

    ``data``: a TileDataset (its subset is split) or a manifest DataFrame. Returns two int64
    arrays of tile indices (manifest rows), sorted.
    """
    from fastcon import _checks

    test_fraction = _checks.real("test_fraction", test_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    _checks.choice("axis", axis, ("x", "y"))
    if isinstance(data, TileDataset):
        manifest, rows = data.manifest, data.indices
    else:
        manifest, rows = data, np.arange(len(data), dtype=np.int64)
    if by not in manifest:
        raise ValueError(f"by must be a manifest column ({', '.join(manifest.columns)}), got {by!r}")
    lo_col, hi_col = ("left", "right") if axis == "x" else ("bottom", "top")
    lo, hi = manifest[lo_col].to_numpy()[rows], manifest[hi_col].to_numpy()[rows]
    groups = manifest[by].to_numpy()[rows]
    train, test = [], []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        # candidate borders: tile edges; pick the one whose test share is closest to the target
        best = None
        for cut in np.unique(lo[members]):
            n_test = int((lo[members] >= cut).sum())
            n_train = int((hi[members] <= cut).sum())
            if n_test == 0 or n_train == 0:
                continue
            score = abs(n_test / len(members) - test_fraction)
            if best is None or score < best[0]:
                best = (score, cut)
        if best is None:
            raise ValueError(f"tiles of {by}={g!r} cannot be split along {axis}: they do not span two tile positions")
        cut = best[1]
        test.append(rows[members[lo[members] >= cut]])
        train.append(rows[members[hi[members] <= cut]])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
