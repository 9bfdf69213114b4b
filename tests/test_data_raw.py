"""``--store raw`` datasets: tiles cut from the band files at load time, by rasterio or by DALI.

The reference is always the ``--store npy`` dataset prepared from the same inputs: a raw
dataset must give the tiles that ``prepare`` wrote, on the bundled real Sentinel-2 scene (JPEG
2000 bands at 10 / 20 / 60 m) and on a miniature SSL4EO-S12 v1 copy (per-band GeoTIFFs of
264 / 132 / 44 px, random values with a few nodata pixels, deflate / LZW / uncompressed).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from fastcon.data import BAND_SETS, TileDataset, dali_available, make_loader, prepare, prepare_sample

pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")
S2 = BAND_SETS["s2c"]
needs_dali = pytest.mark.skipif(not dali_available()[0], reason="nvidia-dali is not installed")


def write_ssl4eo(root, *, locations=("0000000", "0000001"), seed=0) -> str:
    """root/s2c/{id}/{season}/{band}.tif as in SSL4EO-S12 v1: 264 / 132 / 44 px at 10 / 20 / 60 m."""
    rng = np.random.default_rng(seed)
    compressions = ["deflate", "lzw", None]
    for k, loc in enumerate(locations):
        season = "20200401T101031_20200401T101027_T32UNU"
        d = os.path.join(root, "s2c", loc, season)
        os.makedirs(d)
        left, top = 500_000.0 + 5_000 * k, 5_600_000.0
        for j, (band, res) in enumerate(zip(S2.bands, S2.resolution_m)):
            n = int(2640 // res)
            a = rng.integers(1, 12_000, size=(n, n)).astype(np.uint16)
            a[rng.random((n, n)) < 0.0005] = 0  # a few nodata pixels (Sentinel-2 marks them with 0)
            profile = dict(driver="GTiff", width=n, height=n, count=1, dtype="uint16", crs="EPSG:32632")
            profile["transform"] = from_origin(left, top, res, res)
            if compressions[j % 3]:
                profile["compress"] = compressions[j % 3]
            with rasterio.open(os.path.join(d, f"{band}.tif"), "w", **profile) as ds:
                ds.write(a, 1)
    return os.path.join(root, "s2c")


@pytest.fixture(scope="module")
def ssl4eo(tmp_path_factory):
    base = tmp_path_factory.mktemp("ssl4eo")
    src = write_ssl4eo(str(base / "data"))
    out = {}
    for store in ("npy", "raw"):
        out[store] = str(base / store)
        prepare(src, out[store], tile_size=128, stride=68, max_nodata=0.2, workers=0, progress=False, store=store)
    return src, out


@pytest.fixture(scope="module")
def sample_both(tmp_path_factory):
    base = tmp_path_factory.mktemp("sample")
    out = {}
    for store in ("npy", "raw"):
        out[store] = str(base / store)
        prepare_sample(out[store], progress=False, store=store)
    return out


# --------------------------------------------------------------------------------------------
# the raw folder and rasterio reads


def _same_folder(npy: str, raw: str) -> None:
    a, b = TileDataset(npy), TileDataset(raw)
    assert (a.store, b.store) == ("npy", "raw")
    assert not os.path.exists(os.path.join(raw, "tiles"))
    assert a.num_tiles == b.num_tiles > 0
    for col in a.manifest.columns:
        if col != "file":
            assert a.manifest[col].equals(b.manifest[col]), col
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.multihot, b.multihot)
    np.testing.assert_array_equal(a.scene_ids, b.scene_ids)
    with open(os.path.join(npy, "stats.json")) as f, open(os.path.join(raw, "stats.json")) as g:
        assert json.load(f) == json.load(g)


def test_raw_sample_folder_equals_the_npy_folder_without_tiles(sample_both):
    _same_folder(sample_both["npy"], sample_both["raw"])
    ds = TileDataset(sample_both["raw"])
    files = json.loads(ds.manifest.band_files[0])
    assert [os.path.basename(f)[-7:-4] for f in files] == [
        "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"
    ]  # fmt: skip
    # tile (row 1, col 2) at stride 64: its window in each band's own grid
    i = int(np.flatnonzero((ds.manifest.row == 1) & (ds.manifest.col == 2))[0])
    windows = json.loads(ds.manifest.band_windows[i])
    assert windows[1] == [128.0, 64.0, 128.0, 128.0]  # B2, 10 m
    assert windows[4] == [64.0, 32.0, 64.0, 64.0]  # B5, 20 m
    np.testing.assert_allclose(windows[0], [128 / 6, 64 / 6, 128 / 6, 128 / 6])  # B1, 60 m


def test_rasterio_reads_of_a_raw_sample_equal_the_npy_tiles(sample_both):
    a, b = TileDataset(sample_both["npy"]), TileDataset(sample_both["raw"])
    m = a.manifest
    edges = np.flatnonzero((m.row == 0) | (m.col == 0) | (m.row == m.row.max()) | (m.col == m.col.max()))
    for i in sorted(set(range(0, a.num_tiles, 17)) | set(edges[::4].tolist())):
        np.testing.assert_array_equal(b.read_tile(i), a.read_tile(i), err_msg=f"tile {a.ids[i]}")
    x, y = a[5], b[5]
    assert x["tile_id"] == y["tile_id"]
    assert x["image"].equal(y["image"])
    assert x["labels"].equal(y["labels"])


def test_rasterio_reads_of_a_raw_ssl4eo_folder_equal_the_npy_tiles(ssl4eo):
    _, out = ssl4eo
    _same_folder(out["npy"], out["raw"])
    a, b = TileDataset(out["npy"]), TileDataset(out["raw"])
    assert a.num_tiles == 2 * 3 * 3
    for i in range(a.num_tiles):
        np.testing.assert_array_equal(b.read_tile(i), a.read_tile(i), err_msg=f"tile {a.ids[i]}")


def test_torch_loader_on_raw_equals_npy(ssl4eo):
    _, out = ssl4eo
    kw = dict(crop_size=64, seed=1, num_workers=0, drop_last=False)
    for x, y in zip(
        make_loader(out["npy"], 5, backend="torch", **kw), make_loader(out["raw"], 5, backend="torch", **kw)
    ):
        assert x["tile_ids"] == y["tile_ids"]
        assert x["view1"].equal(y["view1"])
        assert x["view2"].equal(y["view2"])


def test_command_line_store_raw(tmp_path, ssl4eo):
    from fastcon.data.__main__ import main

    src, out = ssl4eo
    dst = str(tmp_path / "cli")
    assert main(["prepare", src, "--out", dst, "--tile-size", "128", "--stride", "68", "--max-nodata", "0.2", "--store", "raw", "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    _same_folder(out["npy"], dst)
    assert main(["info", dst]) == 0


def test_a_missing_band_file_is_caught_when_the_dataset_is_opened(tmp_path):
    src = write_ssl4eo(str(tmp_path / "data"), locations=("0000007",))
    out = str(tmp_path / "raw")
    prepare(src, out, tile_size=128, workers=0, progress=False, store="raw")
    band = os.path.join(src, "0000007", "20200401T101031_20200401T101027_T32UNU", "B11.tif")
    os.remove(band)
    with pytest.raises(FileNotFoundError, match=r"1 are missing: .*B11\.tif \(band file of tile s2c-0000007-"):
        TileDataset(out)


def test_store_is_checked_and_kept_by_a_rerun(tmp_path, ssl4eo):
    src, _ = ssl4eo
    out = str(tmp_path / "raw")
    with pytest.raises(ValueError, match="store must be one of"):
        prepare(src, out, store="zarr", workers=0, progress=False)
    prepare(src, out, tile_size=128, workers=0, progress=False, store="raw")
    s = prepare(src, out, tile_size=128, workers=0, progress=False, store="raw")
    assert s.resumed == 2
    assert s.processed == 0
    with pytest.raises(ValueError, match=r"store: 'raw' -> None"):
        prepare(src, out, tile_size=128, workers=0, progress=False)
