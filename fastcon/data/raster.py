"""Reading a scene's bands onto one pixel grid (rasterio).

The grid is that of the finest band (10 m for Sentinel-2), or ``resolution`` metres over the
same extent. Every band is warped onto it with ``rasterio.warp.reproject``: bilinear by default,
because reflectance and backscatter vary smoothly and bilinear interpolation neither shifts
edges (as nearest does by up to half a coarse pixel) nor overshoots (as cubic does). A band in
another CRS is reprojected; a band without a CRS, or one that does not overlap the grid, is an
error naming its file, and so is a read that GDAL reports as failed where the call returns
(``fastcon.data.gdal_errors``: a truncated JPEG 2000 band). Reads go strip by strip, so a full
10980 x 10980 scene never has to fit in memory at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import array_bounds
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window, from_bounds

from fastcon.data import gdal_errors
from fastcon.data.bands import BandSet
from fastcon.data.inputs import InputError, SceneInput


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: CRS, affine transform and size."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top)"""
        w, s, e, n = array_bounds(self.height, self.width, self.transform)
        return (w, s, e, n)

    @property
    def resolution(self) -> tuple[float, float]:
        return (abs(self.transform.a), abs(self.transform.e))

    def rows(self, row0: int, height: int) -> Grid:
        """The strip of ``height`` rows starting at ``row0``."""
        return Grid(self.crs, self.transform @ Affine.translation(0, row0), self.width, height)

    def window(self, row0: int, col0: int, height: int, width: int) -> Grid:
        return Grid(self.crs, self.transform @ Affine.translation(col0, row0), width, height)


def bounds_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def gdal_message(e: BaseException) -> str:
    """An exception's text with the GDAL error rasterio chained to it ("Read failed. See previous
    exception for details." says little by itself)."""
    cause = e.__cause__
    return f"{e} ({cause})" if cause is not None and str(cause) not in str(e) else str(e)


def open_raster(path: str, what: str):
    """rasterio.open, with an error that names the file and what it was for; a file GDAL
    reports a failure for while opening it (though the open returns) is an error too."""
    start = gdal_errors.mark()
    try:
        ds = rasterio.open(path)
    except Exception as e:  # RasterioIOError, or a driver error on a damaged file
        raise InputError(f"{what} {path} cannot be opened: {gdal_message(e)}") from e
    failures = gdal_errors.since(start)
    if failures:
        ds.close()
        raise InputError(f"{what} {path} cannot be opened: {gdal_errors.describe(failures)}")
    return ds


class SceneReader:
    """Open files of one scene, checked against each other; ``read(grid)`` warps them onto a grid."""

    def __init__(
        self,
        scene: SceneInput,
        band_set: BandSet,
        *,
        resolution: float | None = None,
        resampling="bilinear",
        threads: int = 1,
    ):
        self.scene, self.band_set, self.threads = scene, band_set, threads
        self.resampling = Resampling[resampling] if isinstance(resampling, str) else Resampling(resampling)
        self._datasets = []
        try:
            for f in scene.files:
                self._datasets.append(open_raster(f, f"input {scene.key}:"))
            self._check()
            self.grid = self._grid(resolution)
        except BaseException:
            self.close()
            raise

    def close(self):
        for ds in self._datasets:
            ds.close()
        self._datasets = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check(self):
        bs, scene = self.band_set, self.scene
        if scene.multiband:
            ds = self._datasets[0]
            if ds.count != bs.num_bands:
                raise InputError(
                    f"input {scene.key}: {ds.name} has {ds.count} bands but band set {bs.name!r} has "
                    f"{bs.num_bands} ({', '.join(bs.bands)})"
                )
            names = [bs.match_token(d) if d else None for d in ds.descriptions]
            # band descriptions, when the file names its bands, must agree with the band set
            self.band_index = list(range(1, bs.num_bands + 1))
            if all(names):
                if sorted(names) != sorted(bs.bands):
                    raise InputError(
                        f"input {scene.key}: {ds.name} names its bands {list(ds.descriptions)}, "
                        f"not the bands of {bs.name!r} ({', '.join(bs.bands)})"
                    )
                self.band_index = [names.index(b) + 1 for b in bs.bands]
        for ds in self._datasets:
            if ds.crs is None:
                raise InputError(
                    f"input {scene.key}: {ds.name} has no coordinate reference system, so it cannot be "
                    "placed on the scene grid (reprojection needs a CRS)"
                )
            if ds.transform.b != 0 or ds.transform.d != 0:
                raise InputError(f"input {scene.key}: {ds.name} has a rotated geotransform; only north-up rasters")

    def _grid(self, resolution):
        # the finest band (first in band order among equals) defines the grid
        ref = min(self._datasets, key=lambda ds: (abs(ds.transform.a) * abs(ds.transform.e), 0))
        grid = Grid(ref.crs, ref.transform, ref.width, ref.height)
        if resolution is not None:
            left, bottom, right, top = grid.bounds
            width, height = math.floor((right - left) / resolution), math.floor((top - bottom) / resolution)
            grid = Grid(grid.crs, Affine(resolution, 0, left, 0, -resolution, top), width, height)
        for ds in self._datasets:
            b = transform_bounds(ds.crs, grid.crs, *ds.bounds) if ds.crs != grid.crs else tuple(ds.bounds)
            if not bounds_overlap(b, grid.bounds):
                raise InputError(
                    f"input {self.scene.key}: {ds.name} (bounds {tuple(round(v, 2) for v in ds.bounds)} in "
                    f"{ds.crs}) does not overlap the scene grid of {ref.name} ({grid.bounds} in {grid.crs})"
                )
        return grid

    def _sources(self):
        """(dataset, band index) per band of the band set, in band order."""
        if self.scene.multiband:
            return [(self._datasets[0], i) for i in self.band_index]
        return [(ds, 1) for ds in self._datasets]

    def read(self, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        """The bands on ``grid`` as stored uint16 (C, H, W), and the valid-pixel mask (H, W)."""
        out = np.full((self.band_set.num_bands, grid.height, grid.width), np.nan, dtype=np.float32)
        sources = self._sources()
        start = gdal_errors.mark()
        if self.threads > 1 and not self.scene.multiband:
            # decoding (the slow part) runs in threads, one dataset each: GDAL releases the GIL.
            # Warping stays in this thread: rasterio toggles process-wide warning filters
            # around it, which is not thread-safe.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(self.threads, len(sources))) as ex:
                raws = list(ex.map(lambda src: self._load(*src, grid), sources))
        else:
            raws = [self._load(ds, band, grid) for ds, band in sources]
        if gdal_errors.since(start):
            self._failed_read(sources, grid, start)
        for (ds, band), raw, dst in zip(sources, raws, out):
            self._place(ds, band, raw, grid, dst)
        valid = ~np.isnan(out).any(axis=0)
        return encode(out, self.band_set), valid

    def _failed_read(self, sources, grid: Grid, start: int):
        """GDAL reported a failure while the reads returned (a truncated JPEG 2000 decodes to
        zeros and garbage), perhaps from a decoding thread of its own: the files are read again
        one at a time to name the damaged one."""
        for ds, band in sources:
            again = gdal_errors.mark()
            self._load(ds, band, grid)
            if gdal_errors.since(again):
                raise InputError(
                    f"input {self.scene.key}: reading {ds.name} failed: {gdal_errors.describe(gdal_errors.since(again))}"
                )
        names = ", ".join(dict.fromkeys(ds.name for ds, _ in sources))
        raise InputError(
            f"input {self.scene.key}: reading {names} failed: {gdal_errors.describe(gdal_errors.since(start))}"
        )

    def _nodata(self, ds, band):
        nodata = ds.nodatavals[band - 1]
        return self.band_set.source_nodata if nodata is None else nodata

    def _load(self, ds, band: int, grid: Grid):
        """The source pixels ``grid`` needs: (array, its transform), or None when there are none."""
        try:
            if _same_pixels(ds, grid):
                t, g = ds.transform, grid.transform
                win = Window(round((g.c - t.c) / t.a), round((g.f - t.f) / t.e), grid.width, grid.height)
                inside = win.col_off >= 0 and win.row_off >= 0
                inside = inside and win.col_off + win.width <= ds.width and win.row_off + win.height <= ds.height
                nodata = self._nodata(ds, band)
                fill = 0 if nodata is None else nodata
                return ds.read(band, window=win, boundless=not inside, fill_value=fill), None
            bounds = grid.bounds if ds.crs == grid.crs else transform_bounds(grid.crs, ds.crs, *grid.bounds)
            win = from_bounds(*bounds, transform=ds.transform)
            # whole pixels, 2 more on each side so that interpolation at the edge sees its neighbours
            col0, row0 = math.floor(win.col_off) - 2, math.floor(win.row_off) - 2
            col1, row1 = math.ceil(win.col_off + win.width) + 2, math.ceil(win.row_off + win.height) + 2
            col0, row0, col1, row1 = max(col0, 0), max(row0, 0), min(col1, ds.width), min(row1, ds.height)
            if col1 <= col0 or row1 <= row0:
                return None
            win = Window(col0, row0, col1 - col0, row1 - row0)
            return ds.read(band, window=win), ds.window_transform(win)
        except Exception as e:  # a damaged block shows up only when it is decoded
            raise InputError(f"input {self.scene.key}: reading {ds.name} failed: {gdal_message(e)}") from e

    def _place(self, ds, band: int, raw, grid: Grid, out: np.ndarray) -> None:
        """Put loaded pixels onto the grid: copied when they are its pixels, warped otherwise."""
        if raw is None:
            return  # no source pixels here: stays NaN (missing)
        array, transform = raw
        nodata = self._nodata(ds, band)
        if transform is None:
            out[...] = array
            if nodata is not None:
                out[array == nodata] = np.nan
            return
        try:
            reproject(
                array,
                out,
                src_transform=transform,
                src_crs=ds.crs,
                src_nodata=nodata,
                dst_transform=grid.transform,
                dst_crs=grid.crs,
                dst_nodata=np.nan,
                resampling=self.resampling,
            )
        except Exception as e:
            raise InputError(f"input {self.scene.key}: warping {ds.name} onto the grid failed: {e}") from e


def _same_pixels(ds, grid: Grid) -> bool:
    """Whether the dataset's pixels are the grid's pixels (same CRS and size, aligned origin)."""
    t, g = ds.transform, grid.transform
    if ds.crs != grid.crs or not (math.isclose(t.a, g.a) and math.isclose(t.e, g.e)):
        return False
    col = (g.c - t.c) / t.a
    row = (g.f - t.f) / t.e
    return abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6


def encode(values: np.ndarray, band_set: BandSet) -> np.ndarray:
    """float values (NaN = missing) -> stored uint16: round((v - offset) * scale), clipped."""
    x = values
    if band_set.offset != 0.0 or band_set.scale != 1.0:
        x = (x - np.float32(band_set.offset)) * np.float32(band_set.scale)
    x = np.rint(x)
    x = np.clip(x, 0, 65535)
    x[np.isnan(x)] = band_set.nodata
    return x.astype(np.uint16)
