"""fastcon.eval and examples/evaluate.py on miniature EuroSAT / BigEarthNet copies read by torchgeo's own classes.

The fixtures (tests/eo_fixtures.py) encode each image's labels in its pixels, so a probe on the
features of a small random encoder reaches a high score only if every label reaches its own
image through torchgeo's readers, our band mapping and the feature cache.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eo_fixtures import BEN_LABELS, EUROSAT_BANDS, EUROSAT_CLASSES, make_bigearthnet, make_bigearthnet_v2, make_eurosat
from test_pretrain import evaluate  # examples/evaluate.py, loaded once for every test module

from fastcon.eval import Normalisation, band_indices, knn, linear, open_split, published
from fastcon.eval.data import EvalDataset, fraction_subset
from fastcon.eval.protocols import micro_average_precision
from fastcon.train.probe import fit_linear_probe, top1_accuracy

TINY_VIT = ["--model", "vit_small_patch14_dinov2", "--timm-kwargs", '{"depth": 1, "embed_dim": 48, "num_heads": 2}']
TINY_VIT += ["--img-size", "28", "--no-progress"]
TINY_RESNET = ["--model", "resnet50", "--timm-kwargs", '{"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}']
TINY_RESNET += ["--img-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def eurosat(tmp_path_factory):
    root = tmp_path_factory.mktemp("eurosat")
    make_eurosat(str(root))
    return str(root)


@pytest.fixture(scope="module")
def bigearthnet(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigearthnet")
    labels = make_bigearthnet(str(root))
    return str(root), labels


def _report(path):
    with open(path) as f:
        r = json.load(f)
    return r, {row["metric"]: row for row in r["results"]}


# ---------------------------------------------------------------------------------------------
# band mapping and the torchgeo readers


def test_band_mapping_follows_each_dataset_band_order():
    s2 = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
    # torchgeo's EuroSAT files hold B8A last
    assert band_indices(EUROSAT_BANDS, s2) == [0, 1, 2, 3, 4, 5, 6, 7, 12, 8, 9, 10, 11]
    # BigEarthNet L2A: no B10 -> a zero band; B8A after B08
    ben = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
    assert band_indices(ben, s2) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, None, 10, 11]
    assert band_indices(("VH", "VV"), ("VV", "VH")) == [1, 0]
    with pytest.raises(ValueError, match="'B2' is not in the dataset"):
        band_indices(("VH", "VV"), ("B2",))


def test_torchgeo_eurosat_items_carry_the_fixture_bands_and_classes(eurosat):
    src = open_split("eurosat", eurosat, "test")
    assert src.classes == EUROSAT_CLASSES
    assert src.task == "multiclass"
    assert len(src) == 20
    item = src.item(0)
    k = int(item["label"])
    assert item["image"].shape == (13, 32, 32)
    # the fixture brightens file band k for class k: B8A is file band 12
    assert int(item["image"].mean((1, 2)).argmax()) == k
    ds = EvalDataset(src, ("B8A", "B1"), Normalisation((0.0, 0.0), (1.0, 1.0), "none"), 16)
    x, y = ds[0]
    assert x.shape == (2, 16, 16)
    assert y.shape == (10,)
    assert int(y.argmax()) == k
    assert x[0].mean() == pytest.approx(float(item["image"][12].mean()), rel=0.05)


def test_torchgeo_bigearthnet_items_and_zero_b10(bigearthnet):
    root, labels = bigearthnet
    src = open_split("bigearthnet", root, "train")
    assert len(src) == 24
    assert len(src.classes) == 19
    assert src.task == "multilabel"
    norm = Normalisation.ssl4eo(("B2", "B10"))
    x, y = EvalDataset(src, ("B2", "B10"), norm, 24)[0]
    first = next(iter(labels))  # the first patch of the train CSV
    assert set(torch.nonzero(y).flatten().tolist()) == {BEN_LABELS[c] for c in labels[first]}
    # B10 is a zero band in source units, normalised like every other band
    assert torch.allclose(x[1], torch.full_like(x[1], (0.0 - 22.0) / 47.5))
    s1 = open_split("bigearthnet", root, "val", "s1")
    assert s1.bands == ("VH", "VV")
    assert s1.item(0)["image"].shape == (2, 120, 120)


def test_fraction_subset_is_the_ssl4eo_benchmark_draw():
    n = 1000
    assert np.array_equal(fraction_subset(n, 0.1), np.random.default_rng(42).choice(n, 100, replace=False))
    assert len(fraction_subset(n, 1.0)) == n
    with pytest.raises(ValueError, match="train fraction"):
        fraction_subset(n, 0.0)


# ---------------------------------------------------------------------------------------------
# probes and metrics


def test_multiclass_probe_selects_on_validation_and_scores_top1():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 3
    labels = torch.arange(200) % 4
    x = centers[labels] + torch.randn(200, 8, generator=g)
    y = torch.nn.functional.one_hot(labels, 4).float()
    clf = fit_linear_probe(x[:120], y[:120], weight_decays=(1e-3, 10.0), val=(x[120:160], y[120:160]), multiclass=True)
    assert clf.selected_on == "val"
    assert set(clf.cv_map) == {1e-3, 10.0}
    assert clf.weight_decay == 1e-3  # a weight decay of 10 flattens the softmax
    assert top1_accuracy(clf.scores(x[160:].double()), labels[160:]) > 0.95


def test_micro_average_precision_pools_every_pair():
    scores = torch.tensor([[0.9, 0.2], [0.1, 0.8], [0.4, 0.3]])
    targets = torch.tensor([[1, 0], [0, 1], [0, 0]])
    # pooled ranking 0.9(+) 0.8(+) 0.4 0.3 0.2 0.1: both positives first
    assert micro_average_precision(scores, targets) == pytest.approx(1.0)
    targets = torch.tensor([[0, 0], [0, 1], [1, 0]])  # positives at ranks 2 and 3
    assert micro_average_precision(scores, targets) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_linear_and_knn_protocols_on_separable_features():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(90, 6, generator=g)
    y = torch.stack([x[:, 0] > 0, x[:, 1] > 0.3], dim=1).float()
    out = linear((x[:50], y[:50]), (x[50:70], y[50:70]), (x[70:], y[70:]), "multilabel", ("a", "b"))
    assert out["metrics"]["map_macro"] > 0.95
    assert out["selected_on"] == "val"
    out = knn((x[:70], y[:70]), (x[70:], y[70:]), "multilabel", ("a", "b"), k=5)
    assert out["metrics"]["map_macro"] > 0.8
    assert out["k"] == 5


def test_published_table_has_the_softcon_numbers():
    assert published("vit_small_patch14_dinov2", "s2", "bigearthnet", "map_micro")["value"] == 85.0
    assert published("resnet50", "s1", "bigearthnet", "map_micro")["value"] == 78.9
    assert published("vit_base_patch14_dinov2", "s2", "eurosat", "top1")["value"] == 98.0
    assert published("vit_small_patch14_dinov2", "s2", "sample", "map_micro") is None


# ---------------------------------------------------------------------------------------------
# examples/evaluate.py end to end


def test_evaluate_eurosat_reads_each_label_from_its_image(eurosat, tmp_path):
    out = tmp_path / "eurosat.json"
    assert (
        evaluate.main(["--dataset", "eurosat", "--root", eurosat, "--random-init", *TINY_VIT, "--out", str(out)]) == 0
    )
    r, rows = _report(out)
    row = rows["top1"]
    assert row["value"] >= 0.9
    assert (row["n_train"], row["n_val"], row["n_test"]) == (30, 10, 20)
    assert row["published"] == pytest.approx(0.971)  # ViT-S/14 Sentinel-2 EuroSAT, SoftCon README
    assert r["details"]["selected_on"] == "val"
    assert r["encoder"]["normalisation"] == "SSL4EO-S12 statistics"
    assert len(list((tmp_path / "eurosat.features").glob("eurosat_*.pt"))) == 3


def test_evaluate_bigearthnet_s2_and_s1_linear_and_knn(bigearthnet, tmp_path):
    root = bigearthnet[0]
    src_classes = open_split("bigearthnet", root, "test").classes
    for modality, model in (("s2", TINY_VIT), ("s1", TINY_RESNET)):
        for protocol in ("linear", "knn"):
            out = tmp_path / f"{modality}_{protocol}.json"
            argv = ["--dataset", "bigearthnet", "--root", root, "--modality", modality, "--random-init", *model]
            argv += ["--protocol", protocol, "--pool", "avg", "--k", "5", "--out", str(out)]
            assert evaluate.main(argv) == 0
            r, rows = _report(out)
            assert set(rows) == {"map_micro", "map_macro"}
            ap = r["details"]["per_class_ap"]
            present = {c for c, a in ap.items() if a is not None}
            assert present == {src_classes[i] for i in BEN_LABELS.values()}  # only the fixture's classes
            if modality == "s2":
                assert rows["map_macro"]["value"] >= 0.9, (protocol, rows)
                assert rows["map_micro"]["value"] >= 0.9, (protocol, rows)
            else:  # the two labels the SAR pixels carry
                assert r["encoder"]["bands"] == ["VV", "VH"]
                assert min(ap[src_classes[2]], ap[src_classes[4]]) >= 0.9, (protocol, ap)


def test_evaluate_bigearthnet_v2_through_metadata_parquet(tmp_path):
    root = tmp_path / "reben"
    labels = make_bigearthnet_v2(str(root))
    src = open_split("bigearthnet-v2", str(root), "val")
    assert len(src) == 8
    first = src.dataset.metadata_df["patch_id"][0]
    assert [src.classes[i] for i in torch.nonzero(src.item(0)["label"]).flatten()] == sorted(
        labels[first], key=src.classes.index
    )
    out = tmp_path / "v2.json"
    argv = ["--dataset", "bigearthnet-v2", "--root", str(root), "--random-init", *TINY_VIT, "--pool", "avg"]
    assert evaluate.main([*argv, "--out", str(out)]) == 0
    _, rows = _report(out)
    assert (rows["map_micro"]["n_train"], rows["map_micro"]["n_val"], rows["map_micro"]["n_test"]) == (24, 8, 12)
    assert rows["map_macro"]["value"] >= 0.9
    assert rows["map_micro"]["value"] >= 0.9


@pytest.mark.slow
def test_evaluate_ssl4eo_protocol_trains_a_head_above_chance(eurosat, tmp_path):
    # SGD on augmented views re-reads every image each epoch: the one-file-per-image EuroSAT keeps it short
    out = tmp_path / "ssl4eo.json"
    argv = ["--dataset", "eurosat", "--root", eurosat, "--random-init", *TINY_VIT, "--pool", "avg"]
    argv += ["--protocol", "ssl4eo", "--epochs", "10", "--lr", "2.0", "--batch-size", "10"]
    assert evaluate.main([*argv, "--out", str(out)]) == 0
    r, rows = _report(out)
    assert rows["top1"]["protocol"] == "ssl4eo"
    assert rows["top1"]["n_train"] == 30
    assert rows["top1"]["value"] >= 0.3  # chance: 0.1 (ten classes); measured 0.6
    assert r["details"]["epochs"] == 10


def test_evaluate_errors_are_clear(eurosat, tmp_path, capsys):
    assert evaluate.main(["--dataset", "eurosat", "--root", str(tmp_path / "none"), "--random-init", *TINY_VIT]) == 1
    assert "EuroSAT" in capsys.readouterr().err
    assert evaluate.main(["--dataset", "eurosat", "--root", eurosat]) == 2
    assert "--run, --weights or --random-init" in capsys.readouterr().err
    argv = ["--dataset", "eurosat", "--root", eurosat, "--weights", "ViTSmall14_DINOv2_Weights.SENTINEL2_ALL_SOFTCON"]
    os.environ["TORCH_HOME"] = str(tmp_path / "hub")  # an empty cache: nothing is downloaded without --download
    try:
        assert evaluate.main([*argv, "--model", "vit_small_patch14_dinov2"]) == 1
    finally:
        del os.environ["TORCH_HOME"]
    err = capsys.readouterr().err
    assert "are not on this machine" in err
    assert "B13_vits14_softcon_enc.pth" in err
    assert "--download" in err


# ---------------------------------------------------------------------------------------------
# weights sources and the torchgeo export

TINY_KW = {"depth": 1, "embed_dim": 48, "num_heads": 2}


def _features(enc, x):
    with torch.no_grad():
        return enc.module.eval()(x) if hasattr(enc, "module") else enc.eval()(x)


def test_every_weights_source_loads_the_same_encoder(tmp_path):
    from fastcon.eval import load_encoder
    from fastcon.models import create_encoder, save_encoder
    from fastcon.models.weights import timm_backbone

    torch.manual_seed(3)
    ref = create_encoder("vit_small_patch14_dinov2", in_chans=13, img_size=28, **TINY_KW).eval()
    x = torch.randn(2, 13, 28, 28)
    want = _features(ref, x)
    sd = timm_backbone(ref).state_dict()
    # our encoder.safetensors (architecture and bands from its metadata), the SoftCon release
    # layout (DINOv2 key names with mask_token), torchgeo's *_softcon_enc.pth (timm keys), our torchgeo export
    save_encoder(ref, tmp_path / "encoder.safetensors")
    torch.save({**sd, "mask_token": torch.zeros(1, 48)}, tmp_path / "B13_vits14_softcon.pth")
    torch.save(dict(sd), tmp_path / "B13_vits14_softcon_enc.pth")
    save_encoder(ref, tmp_path / "export.ckpt", format="torchgeo")
    for name in ("encoder.safetensors", "B13_vits14_softcon.pth", "B13_vits14_softcon_enc.pth", "export.ckpt"):
        model = None if name.endswith(".safetensors") else "vit_small_patch14_dinov2"
        enc = load_encoder(weights=str(tmp_path / name), model=model, img_size=28, timm_kwargs=TINY_KW)
        assert enc.bands == ref.bands, name
        assert enc.norm.source == "SSL4EO-S12 statistics"
        torch.testing.assert_close(_features(enc, x), want, msg=name)
    # a Sentinel-1 release file: two channels -> VV, VH
    s1 = create_encoder("resnet50", in_chans=2, layers=[1, 1, 1, 1], channels=[8, 16, 32, 64])
    torch.save(timm_backbone(s1).state_dict(), tmp_path / "B2_rn50_softcon.pth")
    kw = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}
    enc = load_encoder(weights=str(tmp_path / "B2_rn50_softcon.pth"), model="resnet50", timm_kwargs=kw)
    assert enc.bands == ("VV", "VH")
    assert enc.modality == "s1"


@pytest.mark.parametrize("name", ["resnet50", pytest.param("vit_small_patch14_dinov2", marks=pytest.mark.slow)])
def test_torchgeo_trainer_loads_the_export_and_gives_our_features(tmp_path, name):
    import warnings

    from torchgeo.trainers import ClassificationTask, MultiLabelClassificationTask

    from fastcon.models import create_encoder, save_encoder

    torch.manual_seed(0)
    # the ViT at the architecture's default size (518 px): torchgeo builds it there, so the
    # features compare without resampling; the resampling itself is checked below at 224 px
    size = 518 if name.startswith("vit") else 64
    ours = create_encoder(name, in_chans=13, **({"img_size": 518} if name.startswith("vit") else {})).eval()
    path = tmp_path / "encoder_torchgeo.ckpt"
    save_encoder(ours, path, format="torchgeo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # MultiLabelClassificationTask is deprecated in 0.8
        task = MultiLabelClassificationTask(
            model=name, weights=str(path), in_channels=13, num_classes=19, freeze_backbone=True
        )
    x = torch.randn(1, 13, size, size)
    with torch.no_grad():
        theirs = task.model.eval().forward_head(task.model.forward_features(x), pre_logits=True)
        want = ours(x) if not name.startswith("vit") else ours.backbone.forward_features(x)[:, 0]
    torch.testing.assert_close(theirs, want, rtol=1e-4, atol=1e-4)
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert trainable
    assert all(n.startswith(("fc.", "head.")) for n in trainable)
    assert task.model.get_classifier().out_features == 19
    if name.startswith("vit"):  # a 224 px encoder: pos_embed resampled to torchgeo's 37 x 37 grid
        small = create_encoder(name, in_chans=13, img_size=224)
        save_encoder(small, tmp_path / "small.pth", format="torchgeo")
        task = ClassificationTask(model=name, weights=str(tmp_path / "small.pth"), in_channels=13, num_classes=10)
        assert task.model.pos_embed.shape == (1, 1 + 37 * 37, 384)


def test_a_run_is_evaluated_on_eurosat_with_its_own_statistics(eurosat, tmp_path):
    """--run on a public dataset: the run's architecture, crop size, bands and stats.json."""
    from fastcon.models import S2_L1C_BANDS, create_encoder, save_encoder
    from fastcon.train import load_config, save_config

    data = tmp_path / "prepared"
    data.mkdir()
    (data / "dataset.json").write_text(
        json.dumps({"bands": list(S2_L1C_BANDS), "encoding": {"offset": 0.0, "scale": 1.0}})
    )
    stats = {"bands": list(S2_L1C_BANDS), "mean": [1000.0] * 13, "std": [800.0] * 13}
    (data / "stats.json").write_text(json.dumps(stats))
    run = tmp_path / "run"
    run.mkdir()
    kw = {"depth": 1, "embed_dim": 48, "num_heads": 2}
    overrides = [f"data.root={data}", f"run.out_dir={run}", "data.crop_size=28", f"model.timm_kwargs={json.dumps(kw)}"]
    save_config(load_config(None, overrides, defaults=evaluate.DEFAULTS), run / "config.yaml")
    torch.manual_seed(0)
    save_encoder(
        create_encoder("vit_small_patch14_dinov2", in_chans=13, img_size=28, **kw), run / "encoder.safetensors"
    )
    out = tmp_path / "run_eurosat.json"
    argv = ["--dataset", "eurosat", "--root", eurosat, "--run", str(run), "--pool", "avg", "--no-progress"]
    assert evaluate.main([*argv, "--out", str(out)]) == 0
    r, rows = _report(out)
    assert r["encoder"]["normalisation"] == str(data / "stats.json")
    assert r["encoder"]["img_size"] == 28
    assert r["encoder"]["weights"] == str(run / "encoder.safetensors")
    assert rows["top1"]["value"] >= 0.9
