"""Miniature copies of public datasets in their exact file layout, for tests and benchmarks.

The real datasets cannot be downloaded here (no internet at run time); these writers produce
the same folder structure, file names, formats, pixel sizes and grids, with random values.
"""

from __future__ import annotations

import os

import numpy as np

SSL4EO_SEASON = "20200401T101031_20200401T101027_T32UNU"


def write_ssl4eo_s12(root, *, locations=("0000000", "0000001"), seed: int = 0, nodata_fraction: float = 0.0005) -> str:
    """SSL4EO-S12 v1 Level-1C patches: ``root/s2c/{id}/{season}/{band}.tif``; returns ``root/s2c``.

    Each patch covers 2640 m: 264 / 132 / 44 px at 10 / 20 / 60 m (UTM 32N), one uint16
    GeoTIFF per band, named as in the dataset (B1.tif ... B12.tif, B8A.tif). Values are
    random in [1, 12000) with ``nodata_fraction`` of the pixels 0 (Sentinel-2's nodata);
    the bands cycle through deflate, LZW and no compression. Locations lie 5 km apart.
    """
    rng = np.random.default_rng(seed)
    for k, loc in enumerate(locations):
        folder = os.path.join(os.fspath(root), "s2c", loc, SSL4EO_SEASON)
        os.makedirs(folder)
        origin = (500_000.0 + 5_000 * k, 5_600_000.0)
        _write_bands(folder, "{band}.tif", "s2c", origin, 2640, "EPSG:32632", rng, nodata_fraction)
    return os.path.join(os.fspath(root), "s2c")


def _write_bands(folder, pattern, band_set, origin, extent_m, crs, rng, nodata_fraction) -> None:
    """One uint16 GeoTIFF per band of ``band_set``, ``extent_m`` square from ``origin`` (left, top)
    at each band's resolution; the file name is ``pattern`` formatted with ``band`` (and ``b02``,
    the zero-padded spelling). Random values in [1, 12000), ``nodata_fraction`` of them 0;
    the bands cycle through deflate, LZW and no compression."""
    import rasterio
    from rasterio.transform import from_origin

    from fastcon.data.bands import get_band_set

    s2 = get_band_set(band_set)
    compressions = ["deflate", "lzw", None]
    for j, (band, res) in enumerate(zip(s2.bands, s2.resolution_m)):
        n = int(extent_m // res)
        a = rng.integers(1, 12_000, size=(n, n)).astype(np.uint16)
        a[rng.random((n, n)) < nodata_fraction] = 0
        profile = dict(driver="GTiff", width=n, height=n, count=1, dtype="uint16", crs=crs)
        profile["transform"] = from_origin(*origin, res, res)
        if compressions[j % 3]:
            profile["compress"] = compressions[j % 3]
        b02 = f"B{int(band[1:]):02d}" if band[1:].isdigit() else band  # B1 -> B01, B8A stays
        with rasterio.open(os.path.join(folder, pattern.format(band=band, b02=b02)), "w", **profile) as f:
            f.write(a, 1)


BIGEARTHNET_DATE = "20170613T101031"


def write_bigearthnet_s2(root, *, patches: int = 3, seed: int = 0, nodata_fraction: float = 0.0005) -> str:
    """BigEarthNet v1 Sentinel-2 patches: ``root/BigEarthNet-v1.0/{patch}/{patch}_{band}.tif``.

    Returns ``root/BigEarthNet-v1.0``. Each patch (``S2A_MSIL2A_{date}_{row}_{col}``) covers
    1200 m: 120 / 60 / 20 px at 10 / 20 / 60 m (UTM 33N), one uint16 GeoTIFF per band of the
    12 Level-2A bands (B01 .. B09, B11, B12, B8A; no B10), beside
    ``{patch}_labels_metadata.json``. Values are random in [1, 12000) with ``nodata_fraction``
    of the pixels 0; the bands cycle through deflate, LZW and no compression. Each patch has
    its own grid; the patches lie side by side.
    """
    import json

    rng = np.random.default_rng(seed)
    base = os.path.join(os.fspath(root), "BigEarthNet-v1.0")
    for k in range(patches):
        name = f"S2A_MSIL2A_{BIGEARTHNET_DATE}_{k + 1}_{k % 7}"
        folder = os.path.join(base, name)
        os.makedirs(folder)
        left, top = 500_000.0 + 1200.0 * (k + 1), 5_800_000.0
        _write_bands(folder, name + "_{b02}.tif", "s2a", (left, top), 1200, "EPSG:32633", rng, nodata_fraction)
        meta = {
            "labels": ["Pastures"],
            "coordinates": {"ulx": left, "uly": top, "lrx": left + 1200.0, "lry": top - 1200.0},
            "projection": "EPSG:32633",
            "tile_source": f"S2A_MSIL1C_{BIGEARTHNET_DATE}_N0205_R022_T33UUP_20170613T101608",
            "acquisition_date": "2017-06-13 10:10:31",
        }
        with open(os.path.join(folder, f"{name}_labels_metadata.json"), "w") as f:
            json.dump(meta, f)
    return base
