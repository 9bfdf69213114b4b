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
    import rasterio
    from rasterio.transform import from_origin

    from fastcon.data.bands import get_band_set

    s2 = get_band_set("s2c")
    rng = np.random.default_rng(seed)
    compressions = ["deflate", "lzw", None]
    for k, loc in enumerate(locations):
        folder = os.path.join(os.fspath(root), "s2c", loc, SSL4EO_SEASON)
        os.makedirs(folder)
        left, top = 500_000.0 + 5_000 * k, 5_600_000.0
        for j, (band, res) in enumerate(zip(s2.bands, s2.resolution_m)):
            n = int(2640 // res)
            a = rng.integers(1, 12_000, size=(n, n)).astype(np.uint16)
            a[rng.random((n, n)) < nodata_fraction] = 0
            profile = dict(driver="GTiff", width=n, height=n, count=1, dtype="uint16", crs="EPSG:32632")
            profile["transform"] = from_origin(left, top, res, res)
            if compressions[j % 3]:
                profile["compress"] = compressions[j % 3]
            with rasterio.open(os.path.join(folder, f"{band}.tif"), "w", **profile) as f:
                f.write(a, 1)
    return os.path.join(os.fspath(root), "s2c")
