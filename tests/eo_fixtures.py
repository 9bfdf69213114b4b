"""Miniature copies of the public EO benchmarks in their documented on-disk layouts, written by rasterio.

Each image's labels can be read from its pixels: a label switches on a bright offset in its own
bands (Sentinel-1, with two bands, carries only the first two BigEarthNet labels), so a probe on frozen features that reaches a high score shows that every label travels
with its own image through torchgeo's readers and our band mapping.

- EuroSAT (torchgeo ``EuroSAT``): ``ROOT/ds/images/remote_sensing/otherDatasets/sentinel_2/tif/
  {Class}/{Class}_{n}.tif``, 13-band uint16 GeoTIFFs in torchgeo's band order (B01..B12, B8A
  last), and ``ROOT/eurosat-{train,val,test}.txt`` listing ``{Class}_{n}.jpg``.
- BigEarthNet v1 (torchgeo ``BigEarthNet``): ``ROOT/BigEarthNet-v1.0/{S2 patch}/{patch}_B01.tif``
  .. ``_B12.tif`` (12 bands, no B10, at 120 / 60 / 20 px for 10 / 20 / 60 m) with
  ``{patch}_labels_metadata.json``; ``ROOT/BigEarthNet-S1-v1.0/{S1 patch}/{patch}_VV.tif`` and
  ``_VH.tif`` (float32 dB) with their metadata JSON naming the corresponding S2 patch; and the
  split files ``ROOT/bigearthnet-{train,val,test}.csv`` of ``s2_patch,s1_patch`` lines.
"""

from __future__ import annotations

import json
import os

import numpy as np
import rasterio
from rasterio.transform import from_origin

EUROSAT_BASE = os.path.join("ds", "images", "remote_sensing", "otherDatasets", "sentinel_2", "tif")
EUROSAT_CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip
# torchgeo's EuroSAT.all_band_names: the order of the bands inside the files
EUROSAT_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")

BEN_S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
BEN_S2_SIZE = {"B02": 120, "B03": 120, "B04": 120, "B08": 120, "B01": 20, "B09": 20}  # others 60 (20 m)
# 43-class CLC names used by the fixture and their 19-class indices (torchgeo's label_converter)
BEN_LABELS = {
    "Non-irrigated arable land": 2,
    "Pastures": 4,
    "Coniferous forest": 9,
    "Water bodies": 17,
}


def _write(path, array: np.ndarray, *, x0=500000.0, y0=5800000.0, pixel=10.0) -> None:
    count, h, w = array.shape
    with rasterio.open(
        path, "w", driver="GTiff", width=w, height=h, count=count, dtype=array.dtype.name,
        crs="EPSG:32633", transform=from_origin(x0, y0, pixel, pixel),
    ) as dst:  # fmt: skip
        dst.write(array)


def make_eurosat(root, per_split=(3, 1, 2), size: int = 32, seed: int = 0) -> dict:
    """A EuroSAT folder with ``per_split`` images per class in train / val / test; returns {file: class}."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, EUROSAT_BASE)
    labels, lists = {}, {"train": [], "val": [], "test": []}
    for k, cls in enumerate(EUROSAT_CLASSES):
        os.makedirs(os.path.join(base, cls), exist_ok=True)
        n = 0
        for split, count in zip(("train", "val", "test"), per_split):
            for _ in range(count):
                n += 1
                name = f"{cls}_{n}"
                image = rng.integers(900, 1100, size=(13, size, size)).astype(np.uint16)
                image[k] += 3000  # the class's own band (file order) is bright
                image[(k + 3) % 13] += 1500
                _write(os.path.join(base, cls, name + ".tif"), image)
                lists[split].append(name + ".jpg")  # the split lists name the original JPEGs
                labels[name] = k
    for split, names in lists.items():
        with open(os.path.join(root, f"eurosat-{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    return labels


def _ben_patch(rng, names, present, d2, s2, d1, s1, x0, y0) -> None:
    """One BigEarthNet patch: 12 S2 band files at native size and the S1 VV / VH files (dB)."""
    os.makedirs(d2, exist_ok=True)
    os.makedirs(d1, exist_ok=True)
    for b, band in enumerate(BEN_S2_BANDS):
        size = BEN_S2_SIZE.get(band, 60)
        a = rng.integers(900, 1100, size=(1, size, size)).astype(np.uint16)
        for j, c in enumerate(names):  # label j brightens bands 3j and 3j+1 (file order)
            if c in present and b in (3 * j, 3 * j + 1):
                a += 2500
        _write(os.path.join(d2, f"{s2}_{band}.tif"), a, x0=x0, y0=y0, pixel=1200.0 / size)
    vv = rng.normal(-12.0, 0.5, size=(1, 120, 120)).astype(np.float32)
    vh = rng.normal(-20.0, 0.5, size=(1, 120, 120)).astype(np.float32)
    # SAR has two bands: the first label raises VV, the second VH (the others are not in the pixels)
    vv += 6.0 * (names[0] in present)
    vh += 6.0 * (names[1] in present)
    _write(os.path.join(d1, f"{s1}_VV.tif"), vv, x0=x0, y0=y0)
    _write(os.path.join(d1, f"{s1}_VH.tif"), vh, x0=x0, y0=y0)


def _draw(rng, names, n):
    return [c for c in names if rng.random() < 0.5] or [names[n % len(names)]]


def make_bigearthnet(root, per_split=(24, 8, 12), seed: int = 0) -> dict:
    """A BigEarthNet v1 folder (S2 and S1); returns {s2 patch: [43-class label names]}."""
    rng = np.random.default_rng(seed)
    names = list(BEN_LABELS)
    out, n = {}, 0
    for split, count in zip(("train", "val", "test"), per_split):
        lines = []
        for _ in range(count):
            n += 1
            present = _draw(rng, names, n)
            s2 = f"S2A_MSIL2A_20170613T101031_{n}_{n % 7}"
            s1 = f"S1A_IW_GRDH_1SDV_20170613T165043_33UUP_{n}_{n % 7}"
            d2 = os.path.join(root, "BigEarthNet-v1.0", s2)
            d1 = os.path.join(root, "BigEarthNet-S1-v1.0", s1)
            x0, y0 = 500000.0 + 1200.0 * n, 5800000.0
            _ben_patch(rng, names, present, d2, s2, d1, s1, x0, y0)
            coords = {"ulx": x0, "uly": y0, "lrx": x0 + 1200.0, "lry": y0 - 1200.0}
            meta2 = {
                "labels": present, "coordinates": coords, "projection": "EPSG:32633",
                "tile_source": "S2A_MSIL1C_20170613T101031_N0205_R022_T33UUP_20170613T101608",
                "acquisition_date": "2017-06-13 10:10:31",
            }  # fmt: skip
            meta1 = {
                "labels": present, "coordinates": coords, "projection": "EPSG:32633",
                "corresponding_s2_patch": s2, "scene_source": "S1A_IW_GRDH_1SDV_20170613T165043",
                "acquisition_time": "2017-06-13 16:50:43",
            }  # fmt: skip
            with open(os.path.join(d2, f"{s2}_labels_metadata.json"), "w") as f:
                json.dump(meta2, f)
            with open(os.path.join(d1, f"{s1}_labels_metadata.json"), "w") as f:
                json.dump(meta1, f)
            lines.append(f"{s2},{s1}")
            out[s2] = present
        with open(os.path.join(root, f"bigearthnet-{split}.csv"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return out


# BigEarthNetV2 (reBEN) uses the 19-class names directly; CLC codes of its reference maps
BEN_V2_LABELS = {"Arable land": 211, "Pastures": 231, "Coniferous forest": 312, "Inland waters": 512}


def make_bigearthnet_v2(root, per_split=(24, 8, 12), seed: int = 0) -> dict:
    """A BigEarthNetV2 folder: ``metadata.parquet`` (patch_id, labels, split, s1_name),
    ``BigEarthNet-S2/{tile}/{patch}/{patch}_B01.tif``.., ``BigEarthNet-S1/{scene}/{patch}/{patch}_VV.tif``
    and ``Reference_Maps/{tile}/{patch}/{patch}_reference_map.tif``; returns {patch_id: label names}."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    names = list(BEN_V2_LABELS)
    rows, n = [], 0
    for split, count in zip(("train", "validation", "test"), per_split):
        for _ in range(count):
            n += 1
            present = _draw(rng, names, n)
            tile, scene = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP", "S1A_IW_GRDH_1SDV_20170613T165043"
            s2, s1 = f"{tile}_{n}_{n % 7}", f"{scene}_33UUP_{n}_{n % 7}"
            d2 = os.path.join(root, "BigEarthNet-S2", tile, s2)
            d1 = os.path.join(root, "BigEarthNet-S1", scene, s1)
            x0, y0 = 500000.0 + 1200.0 * n, 5800000.0
            _ben_patch(rng, names, present, d2, s2, d1, s1, x0, y0)
            dm = os.path.join(root, "Reference_Maps", tile, s2)
            os.makedirs(dm, exist_ok=True)
            codes = np.array([BEN_V2_LABELS[c] for c in present], dtype=np.uint16)
            _write(
                os.path.join(dm, f"{s2}_reference_map.tif"),
                codes[np.arange(120 * 120) % len(codes)].reshape(1, 120, 120),
                x0=x0,
                y0=y0,
            )
            rows.append({"patch_id": s2, "labels": present, "split": split, "country": "Austria", "s1_name": s1})
    pd.DataFrame(rows).to_parquet(os.path.join(root, "metadata.parquet"))
    return {r["patch_id"]: r["labels"] for r in rows}


# SSL4EO-S12 v1: ROOT/s2c/{location}/{season}/{band}.tif, 264 x 264 px at 10 m (132 at 20 m, 44 at 60 m)
SSL4EO_S2C = {"B1": 44, "B2": 264, "B3": 264, "B4": 264, "B5": 132, "B6": 132, "B7": 132, "B8": 264,
              "B8A": 132, "B9": 44, "B10": 44, "B11": 132, "B12": 132}  # fmt: skip
SSL4EO_SEASONS = (
    "20200315T101021_20200315T101311_T32TQM", "20200614T101031_20200614T101338_T32TQM",
    "20200912T100749_20200912T101424_T32TQM", "20201211T101421_20201211T101413_T32TQM",
)  # fmt: skip


def make_ssl4eo_v1(root, locations=("0000000", "0000001", "0000002"), seed: int = 0) -> None:
    """SSL4EO-S12 v1 s2c folders: every location with four seasons, uint16 band GeoTIFFs."""
    rng = np.random.default_rng(seed)
    for i, loc in enumerate(locations):
        for season in SSL4EO_SEASONS:
            d = os.path.join(root, "s2c", loc, season)
            os.makedirs(d, exist_ok=True)
            for band, size in SSL4EO_S2C.items():
                a = rng.integers(500, 3000, size=(1, size, size)).astype(np.uint16)
                _write(os.path.join(d, f"{band}.tif"), a, x0=600000.0 + 5000.0 * i, pixel=2640.0 / size)


# SSL4EO-S12 v1.1: a zarr.zip whose variable ``bands`` is (sample, time, band, y, x), with the
# sample ids and band names as coordinate arrays; here the bands are stored with B8A last
SSL4EO_V11_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")


def ssl4eo_v11_value(sample: int, time: int, band: str) -> int:
    """The constant value of one band of one (sample, time) patch of the v1.1 fixture."""
    return 1000 + 100 * SSL4EO_V11_BANDS.index(band) + 10 * sample + time + 1


def make_ssl4eo_v11(path, samples=("0000001", "0000002", "0000003"), times: int = 4, size: int = 64) -> None:
    import zarr

    data = np.zeros((len(samples), times, len(SSL4EO_V11_BANDS), size, size), dtype=np.uint16)
    for s in range(len(samples)):
        for t in range(times):
            for b, band in enumerate(SSL4EO_V11_BANDS):
                data[s, t, b] = ssl4eo_v11_value(s, t, band)
    store = zarr.storage.ZipStore(os.fspath(path), mode="w")
    group = zarr.open_group(store, mode="w", zarr_format=2)
    group.create_array("bands", shape=data.shape, dtype="uint16", chunks=(1, times, len(SSL4EO_V11_BANDS), size, size))
    group["bands"][:] = data
    group.create_array("sample", data=np.array(samples))
    group.create_array("band", data=np.array(SSL4EO_V11_BANDS))
    store.close()
