"""SSL4EO-S12 preparation with SoftCon's Dynamic World scene labels: ``prepare --layout ssl4eo --labels-json``."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eo_fixtures import SSL4EO_SEASONS, make_ssl4eo_v1

from fastcon.data import TileDataset
from fastcon.data.__main__ import main as data_main
from fastcon.data.ssl4eo import SceneLabels

S = SSL4EO_SEASONS


@pytest.fixture(scope="module")
def ssl4eo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl4eo")
    make_ssl4eo_v1(str(root))
    labels = {
        "0000000": {S[0]: ["0", "4"], S[1]: ["1"], S[2]: ["1", "2", "6"], S[3]: ["8"]},
        "0000001": {"0": [4], "1": [], "3": ["5", "5"]},  # by position; season 1 empty, season 2 absent
        # 0000002: absent -> its four seasons are unlabelled
        "9999999": {S[0]: ["3"]},  # a location that is not on disk
    }
    path = root / "ssl4eo_ml.json"
    path.write_text(json.dumps(labels))
    return str(root), str(path)


def test_prepare_ssl4eo_v1_with_dynamic_world_labels(ssl4eo_root, tmp_path, capsys):
    root, labels = ssl4eo_root
    out = tmp_path / "prepared"
    argv = ["prepare", root, "--out", str(out), "--layout", "ssl4eo", "--band-set", "s2c", "--tile-size", "132"]
    argv += ["--labels-json", labels, "--label-scheme", "dynamicworld", "--workers", "0"]
    assert data_main(argv) == 0
    ds = TileDataset(out)
    assert ds.class_names[:3] == ("water", "trees", "grass")
    assert len(ds.class_names) == 9
    # 4 + 2 labelled scenes of 2 x 2 tiles each (132 px tiles of 264 px scenes)
    assert len(ds) == 6 * 4
    by_scene = {}
    for i, src in enumerate(ds.manifest["source"]):
        by_scene.setdefault(src, set()).add(tuple(np.flatnonzero(ds.multihot[i]).tolist()))
    assert by_scene == {
        f"s2c/0000000/{S[0]}": {(0, 4)},
        f"s2c/0000000/{S[1]}": {(1,)},
        f"s2c/0000000/{S[2]}": {(1, 2, 6)},
        f"s2c/0000000/{S[3]}": {(8,)},
        f"s2c/0000001/{S[0]}": {(4,)},
        f"s2c/0000001/{S[3]}": {(5,)},
    }
    # fractions split evenly among a scene's classes; the seasons of a location share its scene id
    np.testing.assert_allclose(ds.labels.sum(axis=1), 1.0, atol=1e-6)
    scene_of = dict(zip(ds.manifest["source"], ds.scene_ids))
    assert scene_of[f"s2c/0000000/{S[0]}"] == scene_of[f"s2c/0000000/{S[3]}"]
    assert scene_of[f"s2c/0000000/{S[0]}"] != scene_of[f"s2c/0000001/{S[0]}"]
    assert "6 scene(s) without a label in the labels JSON skipped" in capsys.readouterr().out
    # a rerun finds the work done
    assert data_main(argv) == 0
    assert "0 processed now, 6 already done" in capsys.readouterr().out


def test_keep_unlabelled_keeps_every_season(ssl4eo_root, tmp_path):
    root, labels = ssl4eo_root
    out = tmp_path / "all"
    argv = ["prepare", root, "--out", str(out), "--layout", "ssl4eo", "--tile-size", "264", "--workers", "0"]
    assert data_main([*argv, "--labels-json", labels, "--keep-unlabelled", "--no-progress"]) == 0
    ds = TileDataset(out)
    assert len(ds) == 12
    assert int(ds.multihot.sum(axis=1).astype(bool).sum()) == 6


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ([1, 2], "expected"),
        ({"0000000": ["1"]}, "maps to a list"),
        ({"0000000": {"x": ["9"]}}, "outside 0..8"),
        ({"0000000": {"x": ["water"]}}, "not an index"),
    ],
)
def test_bad_labels_json_is_a_clear_error(tmp_path, doc, match):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match):
        SceneLabels(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SceneLabels(tmp_path / "missing.json")


def test_prepare_ssl4eo_v11_zarr_zip(tmp_path, capsys):
    from eo_fixtures import make_ssl4eo_v11, ssl4eo_v11_value

    path = tmp_path / "ssl4eos12_train_seasonal_data_000001.zarr.zip"
    make_ssl4eo_v11(path)
    labels = tmp_path / "labels.json"
    labels.write_text(
        json.dumps({"0000001": {"0": ["1"], "2": []}, "0000002": {"0": [0], "1": [0, 4], "2": [6], "3": [8]}})
    )
    out = tmp_path / "v11"
    argv = [
        "prepare",
        str(path),
        "--out",
        str(out),
        "--band-set",
        "s2c",
        "--tile-size",
        "32",
        "--labels-json",
        str(labels),
    ]
    assert data_main(argv) == 0
    assert "7 scene(s) without a label in the labels JSON skipped" in capsys.readouterr().out
    ds = TileDataset(out)
    assert len(ds) == 5 * 4  # five labelled (sample, time) patches of 2 x 2 tiles
    assert ds.band_names[8] == "B8A"
    for i, src in enumerate(ds.manifest["source"]):
        _, sample, t = src.split("/")
        s = ("0000001", "0000002", "0000003").index(sample)
        image = ds[i]["image"]
        # every band in the band set's order (B8A after B8), from the right sample and time
        want = [ssl4eo_v11_value(s, int(t), f"B{int(b[1:]):02d}" if b != "B8A" else "B8A") for b in ds.band_names]
        np.testing.assert_array_equal(image[:, 0, 0], want)
    by_src = {src: tuple(np.flatnonzero(ds.multihot[i])) for i, src in enumerate(ds.manifest["source"])}
    stem = "ssl4eos12_train_seasonal_data_000001"
    assert by_src[f"{stem}/0000001/0"] == (1,)
    assert by_src[f"{stem}/0000002/1"] == (0, 4)
    assert len(set(ds.scene_ids)) == 2  # scene id = sample id, shared by its times
    assert data_main(argv) == 0
    assert "0 processed now, 5 already done" in capsys.readouterr().out
