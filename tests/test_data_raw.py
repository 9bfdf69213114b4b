"""``--store raw`` datasets: tiles cut from the band files at load time, by rasterio or by DALI.

The reference is always the ``--store npy`` dataset prepared from the same inputs: a raw
dataset must give the tiles that ``prepare`` wrote, on the bundled real Sentinel-2 scene (JPEG
2000 bands at 10 / 20 / 60 m) and on a miniature SSL4EO-S12 v1 copy (per-band GeoTIFFs of
264 / 132 / 44 px, random values with a few nodata pixels, deflate / LZW / uncompressed) and
on miniature BigEarthNet v1 Sentinel-2 patches (per-band GeoTIFFs of 120 / 60 / 20 px, one
folder and one grid per patch, read with ``layout="bands"``, ``band_set="s2a"``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from fastcon.data import BAND_SETS, TileDataset, make_loader, prepare, prepare_sample
from fastcon.data.miniature import SSL4EO_SEASON, write_bigearthnet_s2, write_ssl4eo_s12
from fastcon.data.raw import DALI_TOLERANCE

pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")
S2 = BAND_SETS["s2c"]


@pytest.fixture(scope="module")
def ssl4eo(tmp_path_factory):
    base = tmp_path_factory.mktemp("ssl4eo")
    src = write_ssl4eo_s12(str(base / "data"))
    return src, _prepare_both(src, base, tile_size=128, stride=68, max_nodata=0.2)


def _prepare_both(src, base, **kw) -> dict:
    """{store: folder}: ``src`` prepared into ``base/npy`` and ``base/raw``."""
    out = {}
    for store in ("npy", "raw"):
        out[store] = str(base / store)
        prepare(src, out[store], workers=0, progress=False, store=store, **kw)
    return out


@pytest.fixture(scope="module")
def bigearthnet(tmp_path_factory):
    # three BigEarthNet v1 S2 patches (three scenes, each its own grid), 2 x 2 tiles of 64 px each
    base = tmp_path_factory.mktemp("bigearthnet")
    src = write_bigearthnet_s2(str(base / "data"))
    return src, _prepare_both(src, base, layout="bands", band_set="s2a", tile_size=64, stride=56, max_nodata=0.2)


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


def test_rasterio_reads_of_a_raw_bigearthnet_folder_equal_the_npy_tiles(bigearthnet):
    _, out = bigearthnet
    _same_folder(out["npy"], out["raw"])
    a, b = TileDataset(out["npy"]), TileDataset(out["raw"])
    assert a.band_names == BAND_SETS["s2a"].bands
    assert a.num_tiles == 3 * 2 * 2
    assert len(set(a.scene_ids.tolist())) == 3
    files = json.loads(b.manifest.band_files[0])
    assert [os.path.basename(f)[-7:-4] for f in files] == [
        "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"
    ]  # fmt: skip
    for i in range(a.num_tiles):
        np.testing.assert_array_equal(b.read_tile(i), a.read_tile(i), err_msg=f"tile {a.ids[i]}")


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_loader_on_raw_equals_npy(ssl4eo, workers):
    _, out = ssl4eo
    raw = TileDataset(out["raw"])
    raw.read_tile(0)  # files opened here must not be shared with forked workers
    kw = dict(crop_size=64, seed=1, num_workers=workers, drop_last=False)
    for x, y in zip(make_loader(out["npy"], 5, backend="torch", **kw), make_loader(raw, 5, backend="torch", **kw)):
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
    sample = str(tmp_path / "sample")
    assert main(["sample", sample, "--stride", "128", "--store", "raw"]) == 0
    ds = TileDataset(sample)
    assert ds.store == "raw"
    assert ds.num_tiles == 6 * 12  # 768 x 1536 px in 128 px tiles
    assert not os.path.exists(os.path.join(sample, "tiles"))


def test_a_missing_band_file_is_caught_when_the_dataset_is_opened(tmp_path):
    src = write_ssl4eo_s12(str(tmp_path / "data"), locations=("0000007",))
    out = str(tmp_path / "raw")
    prepare(src, out, tile_size=128, workers=0, progress=False, store="raw")
    band = os.path.join(src, "0000007", SSL4EO_SEASON, "B11.tif")
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


# --------------------------------------------------------------------------------------------
# DALI decoding (CPU here: device "cpu" decoders; the GPU path is the same graph with "mixed")


def _dali_tiles(ds: TileDataset, batch: int, device: str = "cpu") -> dict:
    """Unaugmented DALI views of every tile of ``ds``, de-normalised: {tile id: (view, stored values)}."""
    kw = dict(augment=False, shuffle=False, drop_last=False, num_workers=2, dali_device=device)
    loader = make_loader(ds, batch, backend="dali", **kw)
    mean, std = torch.as_tensor(ds.mean).view(-1, 1, 1), torch.as_tensor(ds.std).view(-1, 1, 1)
    out = {}
    for b in loader:
        assert b["view1"] is b["view2"] or b["view1"].equal(b["view2"])
        assert b["view1"].is_cuda == (device == "gpu")
        for tid, v in zip(b["tile_ids"], b["view1"].cpu()):
            out[tid] = (v, (v * std + mean).round().to(torch.int64).numpy())
    return out


def _check_dali_raw(npy: str, raw: str, indices=None, batch: int = 4, device: str = "cpu") -> dict:
    """DALI on the raw folder vs the npy tiles: per band the largest difference in stored units."""
    a, b = TileDataset(npy), TileDataset(raw)
    if indices is not None:
        a, b = a.subset(indices), b.subset(indices)
    from_raw, from_npy = _dali_tiles(b, batch, device), _dali_tiles(a, batch, device)
    assert sorted(from_raw) == sorted(from_npy) == sorted(a.ids[i] for i in a.indices)
    worst = np.zeros(a.num_bands, dtype=np.int64)
    for tid, (view, values) in from_raw.items():
        tile = a.read_tile(a.index_of(tid)).astype(np.int64)
        np.testing.assert_array_equal(from_npy[tid][1], tile)  # the npy path is exact
        worst = np.maximum(worst, np.abs(values - tile).max(axis=(1, 2)))
        exact = torch.from_numpy(np.abs(values - tile).max(axis=(1, 2)) == 0)
        assert view[exact].equal(from_npy[tid][0][exact])  # equal tiles give bit-identical views
    return dict(zip(a.band_names, worst.tolist()))


def test_dali_decodes_the_raw_sample_into_the_npy_tiles(sample_both):
    ds = TileDataset(sample_both["npy"])
    m = ds.manifest
    at = {(r, c): i for i, (r, c) in enumerate(zip(m.row, m.col))}
    # corners, the middle, and tile (5, 14): its B8A window holds the scene's one nodata pixel
    picks = [at[0, 0], at[5, 14], at[3, 7], at[m.row.max(), m.col.max()]]
    worst = _check_dali_raw(sample_both["npy"], sample_both["raw"], picks)
    for band, res in zip(S2.bands, S2.resolution_m):
        assert worst[band] <= (DALI_TOLERANCE if res == 60 else 0), (band, worst)  # 10 m, 20 m: bit-identical


def test_dali_decodes_a_raw_ssl4eo_folder_into_the_npy_tiles(ssl4eo):
    _, out = ssl4eo
    worst = _check_dali_raw(out["npy"], out["raw"], batch=5)
    for band, res in zip(S2.bands, S2.resolution_m):
        assert worst[band] <= (DALI_TOLERANCE if res == 60 else 0), (band, worst)
    assert max(worst.values()) == DALI_TOLERANCE  # random values do hit rounding ties at 60 m


def test_dali_decodes_a_raw_bigearthnet_folder_into_the_npy_tiles(tmp_path, bigearthnet):
    src, out = bigearthnet
    # and one 120 px tile per patch: the patch itself
    whole = _prepare_both(src, tmp_path, layout="bands", band_set="s2a", tile_size=120, max_nodata=0.2)
    assert TileDataset(whole["raw"]).num_tiles == 3
    s2a = BAND_SETS["s2a"]
    for npy, raw in ((out["npy"], out["raw"]), (whole["npy"], whole["raw"])):
        worst = _check_dali_raw(npy, raw, batch=5)
        for band, res in zip(s2a.bands, s2a.resolution_m):
            assert worst[band] <= (DALI_TOLERANCE if res == 60 else 0), (band, worst)  # 10 m, 20 m: bit-identical


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the mixed (GPU) decoders cannot run")
def test_dali_gpu_decodes_the_raw_folders_into_the_npy_tiles(sample_both, ssl4eo):
    # the same graph with decoders.image_slice(device="mixed"): nvJPEG2000 (sample), nvImageCodec (TIFF)
    _, out = ssl4eo
    for npy, raw, picks in ((sample_both["npy"], sample_both["raw"], [0, 100, 252]), (out["npy"], out["raw"], None)):
        worst = _check_dali_raw(npy, raw, picks, device="gpu")
        for band, res in zip(S2.bands, S2.resolution_m):
            assert worst[band] <= (DALI_TOLERANCE if res == 60 else 0), (band, worst)


def test_dali_raw_follows_the_same_plan_as_the_other_backends(ssl4eo):
    _, out = ssl4eo
    kw = dict(crop_size=48, seed=5, num_workers=2, drop_last=False, epoch=1)
    ds = TileDataset(out["npy"])
    tol = torch.as_tensor(DALI_TOLERANCE / ds.std).view(1, -1, 1, 1) + 1e-5
    runs = [
        list(make_loader(out[s], 4, backend=b, **kw)) for s, b in (("raw", "dali"), ("npy", "dali"), ("raw", "torch"))
    ]
    assert len(runs[0]) == len(runs[1]) == len(runs[2]) == 5
    for x, y, z in zip(*runs):
        assert x["tile_ids"] == y["tile_ids"] == z["tile_ids"]
        assert x["labels"].equal(y["labels"])
        assert x["scene_ids"].equal(z["scene_ids"])
        for v in ("view1", "view2"):
            assert ((x[v] - y[v]).abs() <= tol).all()
            assert ((x[v] - z[v]).abs() <= tol + 1e-4).all()


def test_dali_decodes_a_multiband_geotiff(tmp_path):
    rng = np.random.default_rng(2)
    path = str(tmp_path / "scene.tif")
    a = rng.integers(1, 9000, size=(S2.num_bands, 64, 96)).astype(np.uint16)
    profile = dict(driver="GTiff", width=96, height=64, count=S2.num_bands, dtype="uint16", crs="EPSG:32632")
    with rasterio.open(path, "w", transform=from_origin(500_000.0, 5_600_000.0, 10.0, 10.0), **profile) as f:
        f.write(a)
    out = {}
    for store in ("npy", "raw"):
        out[store] = str(tmp_path / store)
        prepare(path, out[store], layout="multiband", tile_size=32, workers=0, progress=False, store=store)
    worst = _check_dali_raw(out["npy"], out["raw"])
    assert set(worst.values()) == {0}


@pytest.mark.parametrize("damage", ["truncated GeoTIFF", "garbage GeoTIFF", "truncated JPEG 2000"])
def test_an_undecodable_band_file_is_named_with_its_tiles(tmp_path, damage):
    import shutil

    from fastcon.data.sample import sample_dir

    if "JPEG 2000" in damage:  # a copy of the real sample's bands
        src = shutil.copytree(os.path.join(sample_dir(), "IMG_DATA"), str(tmp_path / "IMG_DATA"))
        kw, prefix = dict(layout="bands", stride=128), "T33UUU_20170216T102101_"
    else:
        src = write_ssl4eo_s12(str(tmp_path / "data"), locations=("0000003",))
        kw, prefix = dict(max_nodata=0.2), "s2c-0000003-"
    out = str(tmp_path / "raw")
    prepare(src, out, tile_size=128, workers=0, progress=False, store="raw", **kw)
    ds = TileDataset(out)
    band = json.loads(ds.manifest.band_files[0])[S2.bands.index("B5")]
    with open(band, "rb") as f:
        data = f.read()
    with open(band, "wb") as f:
        f.write(bytes(len(data)) if "garbage" in damage else data[: len(data) * 2 // 3])
    loader = make_loader(ds.subset([0, 1, 2, 3]), 2, backend="dali", shuffle=False, num_workers=1)
    with pytest.raises(RuntimeError, match=rf"DALI could not decode {band} \(used by tile\(s\) {prefix}.*000_000"):
        next(iter(loader))


def test_dali_refuses_what_only_rasterio_does(tmp_path):
    # Sentinel-1 dB values are encoded ((dB + 50) * 1000): the torch loader handles them
    d = tmp_path / "s1" / "0000000" / "20200101T000000_20200101T000000_T32UXX"
    d.mkdir(parents=True)
    for band in ("VV", "VH"):
        profile = dict(driver="GTiff", width=64, height=64, count=1, dtype="float32", crs="EPSG:32632")
        with rasterio.open(str(d / f"{band}.tif"), "w", transform=from_origin(5e5, 6e6, 10, 10), **profile) as f:
            f.write(np.full((1, 64, 64), -12.5, np.float32))
    out = str(tmp_path / "raw")
    prepare(str(tmp_path), out, band_set="s1", tile_size=32, workers=0, progress=False, store="raw")
    with pytest.raises(ValueError, match=r"band set 's1' encodes them .*use backend='torch'"):
        make_loader(out, 2, backend="dali")
    batch = next(iter(make_loader(out, 2, backend="torch", augment=False, num_workers=0)))
    assert batch["view1"].shape == (2, 2, 32, 32)


def test_the_data_modules_import_each_other_without_a_cycle():
    # every `import fastcon.data.x` / `from fastcon.data.x import`, at module level or inside a function
    import ast

    import fastcon.data

    folder = os.path.dirname(fastcon.data.__file__)
    graph = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") and name != "__init__.py":
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            deps = set()
            for node in ast.walk(tree):
                mods = [node.module] if isinstance(node, ast.ImportFrom) else []
                mods += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                deps |= {m.split(".")[2] for m in mods if m and m.startswith("fastcon.data.")}
            graph[name[:-3]] = deps
    assert {"dali", "twoview"} <= graph["loader"]
    assert "loader" not in graph["dali"]

    def visit(node, path):
        assert node not in path, f"import cycle: {' -> '.join([*path, node])}"
        for dep in graph.get(node, ()):
            visit(dep, [*path, node])

    for node in graph:
        visit(node, [])
