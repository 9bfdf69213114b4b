"""Land cover on a tile grid: a class raster or class-named polygons -> class index per pixel.

Either source becomes an index raster on the scene grid: 0 = unlabelled, k + 1 = class k of
``class_names``. A tile's label is the fraction of its pixels in each class (fractions of the
whole tile, so they sum to at most 1) and, from it, a multi-hot vector.

- Class rasters (ESA WorldCover, Dynamic World, or any integer map with a code -> name table)
  are warped onto the grid with nearest-neighbour resampling: class codes must not be blended.
- Polygons (GeoPackage, Shapefile, ... read with pyogrio) are rasterised with
  ``rasterio.features.rasterize`` (a pixel belongs to a polygon when its centre does). Where
  polygons overlap, the smaller one wins: they are burnt largest first, so a lake inside a
  forest polygon stays a lake.

The objects are cheap to pickle (paths and class tables only) and open their files lazily in
the worker process that uses them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from fastcon.data.inputs import InputError

# class code -> class name
LANDCOVER_SCHEMES: dict[str, dict[int, str]] = {
    # ESA WorldCover 10 m v100/v200 (Map band); 0 = no data
    "worldcover": {
        10: "tree_cover",
        20: "shrubland",
        30: "grassland",
        40: "cropland",
        50: "built_up",
        60: "bare_sparse_vegetation",
        70: "snow_and_ice",
        80: "permanent_water_bodies",
        90: "herbaceous_wetland",
        95: "mangroves",
        100: "moss_and_lichen",
    },
    # Google Dynamic World V1 "label" band
    "dynamicworld": {
        0: "water",
        1: "trees",
        2: "grass",
        3: "flooded_vegetation",
        4: "crops",
        5: "shrub_and_scrub",
        6: "built",
        7: "bare",
        8: "snow_and_ice",
    },
}

VECTOR_EXTENSIONS = (".gpkg", ".shp", ".geojson", ".json", ".fgb", ".gml", ".kml", ".sqlite", ".parquet")


class LandCover:
    """Base: ``class_names`` and ``labels(grid)`` -> uint16 index raster (0 = unlabelled)."""

    path: str
    class_names: tuple[str, ...]

    def describe(self) -> dict:
        raise NotImplementedError

    def check_overlap(self, grid, scene_key: str) -> None:
        from rasterio.warp import transform_bounds

        from fastcon.data.raster import bounds_overlap

        b = transform_bounds(self.crs, grid.crs, *self.bounds) if self.crs != grid.crs else self.bounds
        if not bounds_overlap(b, grid.bounds):
            raise InputError(
                f"land cover {self.path} does not overlap input {scene_key}: land cover bounds "
                f"{tuple(round(v) for v in b)} vs. imagery bounds {tuple(round(v) for v in grid.bounds)} (in {grid.crs})"
            )

    def labels(self, grid) -> np.ndarray:
        raise NotImplementedError


class RasterLandCover(LandCover):
    """A single-band class raster with a code -> class name table (or a scheme's name)."""

    def __init__(self, path: str, classes: str | Mapping[int, str] = "worldcover"):
        import rasterio

        if isinstance(classes, str):
            if classes not in LANDCOVER_SCHEMES:
                raise ValueError(
                    f"landcover_scheme must be one of {', '.join(map(repr, LANDCOVER_SCHEMES))}, got {classes!r}"
                )
            self.scheme, table = classes, LANDCOVER_SCHEMES[classes]
        elif isinstance(classes, Mapping) and classes:
            self.scheme, table = None, {int(k): str(v) for k, v in classes.items()}
        else:
            raise TypeError("classes of a class raster must be a scheme name or a non-empty {code: name} mapping")
        self.path = os.path.abspath(path)
        try:
            with rasterio.open(self.path) as ds:
                if ds.crs is None:
                    raise ValueError(
                        f"land cover {self.path} has no coordinate reference system; it cannot be reprojected to the tiles"
                    )
                self.crs, self.bounds, self.nodata = ds.crs, tuple(ds.bounds), ds.nodata
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"land cover {self.path} cannot be opened as a raster: {e}") from e
        self.codes = np.array(sorted(table), dtype=np.int64)
        self.class_names = tuple(table[c] for c in self.codes)

    def describe(self) -> dict:
        return {"kind": "raster", "path": self.path, "scheme": self.scheme, "codes": self.codes.tolist()}

    def labels(self, grid) -> np.ndarray:
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.warp import reproject

        from fastcon.data import gdal_errors
        from fastcon.data.raster import gdal_message, open_raster

        missing = np.iinfo(np.int32).min
        codes = np.full((grid.height, grid.width), missing, dtype=np.int32)
        with open_raster(self.path, "land cover") as ds:
            start = gdal_errors.mark()
            try:
                reproject(
                    rasterio.band(ds, 1),
                    codes,
                    src_nodata=self.nodata,
                    dst_transform=grid.transform,
                    dst_crs=grid.crs,
                    dst_nodata=missing,
                    resampling=Resampling.nearest,
                )
            except Exception as e:  # a damaged block shows up only when it is decoded
                raise InputError(f"land cover {self.path}: reading it failed: {gdal_message(e)}") from e
            if gdal_errors.since(start):  # a read GDAL reports as failed, though it returned
                raise InputError(
                    f"land cover {self.path}: reading it failed: {gdal_errors.describe(gdal_errors.since(start))}"
                )
        pos = np.searchsorted(self.codes, codes)
        pos = np.minimum(pos, len(self.codes) - 1)
        known = self.codes[pos] == codes
        return np.where(known, pos + 1, 0).astype(np.uint16)


class VectorLandCover(LandCover):
    """Polygons with a class-name field; classes default to the field's distinct values, sorted."""

    def __init__(self, path: str, class_field: str, classes: Sequence[str] | None = None, layer=None):
        import pyogrio

        self.path, self.class_field, self.layer = os.path.abspath(path), class_field, layer
        try:
            info = pyogrio.read_info(self.path, layer=layer)
        except Exception as e:
            raise ValueError(f"land cover {self.path} cannot be opened as a vector layer: {e}") from e
        fields = list(info["fields"])
        if not isinstance(class_field, str) or class_field not in fields:
            raise ValueError(
                f"land cover {self.path}: class_field {class_field!r} is not a field of the layer; fields are {fields}"
            )
        if info["crs"] is None:
            raise ValueError(f"land cover {self.path} has no coordinate reference system")
        from rasterio.crs import CRS

        self.crs, self.bounds = CRS.from_user_input(info["crs"]), tuple(info["total_bounds"])
        if classes is None:
            _, _, _, values = pyogrio.raw.read(self.path, layer=layer, columns=[class_field], read_geometry=False)
            classes = sorted({str(v) for v in values[0] if v is not None})
            if not classes:
                raise ValueError(f"land cover {self.path}: field {class_field!r} holds no class names")
        elif isinstance(classes, str) or not all(isinstance(c, str) for c in classes) or not classes:
            raise TypeError("classes must be a non-empty list of class names")
        self.class_names = tuple(classes)

    def describe(self) -> dict:
        return {"kind": "vector", "path": self.path, "class_field": self.class_field, "layer": self.layer}

    def labels(self, grid) -> np.ndarray:
        import pyogrio
        import shapely
        from rasterio.features import rasterize
        from rasterio.warp import transform_bounds, transform_geom

        bbox = transform_bounds(grid.crs, self.crs, *grid.bounds) if grid.crs != self.crs else grid.bounds
        _, _, wkb, values = pyogrio.raw.read(self.path, layer=self.layer, columns=[self.class_field], bbox=bbox)
        out = np.zeros((grid.height, grid.width), dtype=np.uint16)
        index = {name: k + 1 for k, name in enumerate(self.class_names)}
        keep = [i for i, v in enumerate(values[0]) if v is not None and str(v) in index and wkb[i] is not None]
        if not keep:
            return out
        geoms = shapely.from_wkb(wkb[keep])
        if grid.crs != self.crs:
            moved = transform_geom(self.crs, grid.crs, [shapely.geometry.mapping(g) for g in geoms])
            geoms = np.array([shapely.geometry.shape(g) for g in moved])
        burn = np.array([index[str(values[0][i])] for i in keep])
        order = np.argsort(-shapely.area(geoms), kind="stable")  # largest first: smaller polygons end on top
        rasterize(
            zip(geoms[order], burn[order].tolist()),
            out=out,
            transform=grid.transform,
            all_touched=False,
        )
        return out


def open_landcover(path, *, class_field=None, landcover_scheme=None, classes=None, layer=None) -> LandCover:
    """A class raster (``landcover_scheme`` or ``classes`` = {code: name}) or polygons (``class_field``;
    ``layer``: a layer name or index of a multi-layer file such as a GeoPackage, default its first)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"land cover {path} does not exist")
    is_vector = path.lower().endswith(VECTOR_EXTENSIONS) or class_field is not None
    if is_vector:
        if class_field is None:
            raise ValueError(f"land cover {path} is a vector layer: pass class_field, the field holding class names")
        if landcover_scheme is not None:
            raise ValueError("landcover_scheme applies to class rasters; polygons are named by class_field")
        return VectorLandCover(path, class_field, classes, layer=layer)
    if layer is not None:
        raise ValueError(f"land cover {path}: layer applies to vector files; a class raster has none")
    if classes is not None and landcover_scheme is not None:
        raise ValueError("pass either landcover_scheme or classes ({code: name}) for a class raster, not both")
    return RasterLandCover(path, classes if classes is not None else (landcover_scheme or "worldcover"))


def class_pixel_counts(index: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class (int64, length num_classes) of an index raster (0 = unlabelled)."""
    return np.bincount(index.ravel(), minlength=num_classes + 1)[1 : num_classes + 1]
