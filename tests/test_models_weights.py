"""fastcon.models weights: checkpoint layouts, first-layer strategies, errors, save/load round trip.

The "pretrained" checkpoints are small random models written to tmp files: a 2-block DINOv2
ViT-S/14 and a ResNet-50, with RGB input.
"""

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from fastcon.models import (
    S1_BANDS,
    S2_L1C_BANDS,
    S2_L2A_BANDS,
    CheckpointError,
    adapt_input_weight,
    create_encoder,
    load_pretrained,
    save_encoder,
)
from fastcon.models.bands import resolve_bands, rgb_positions

VIT = "vit_small_patch14_dinov2"
DEPTH = 2


def _rgb_vit(img_size=56, seed=0):
    torch.manual_seed(seed)
    m = timm.create_model(VIT, pretrained=False, num_classes=0, img_size=img_size, depth=DEPTH)
    # LayerScale init is 1e-5: make the blocks matter so feature comparisons mean something
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "gamma" in name or name.startswith("pos_embed") or name.startswith("cls_token"):
                p.normal_(0, 0.5)
    return m.eval()


def _rgb_resnet(seed=0):
    torch.manual_seed(seed)
    m = timm.create_model("resnet50", pretrained=False, num_classes=1000)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1, 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory):
    """A timm-layout .safetensors of an RGB ViT trained at 56 px (4x4 grid)."""
    m = _rgb_vit()
    path = tmp_path_factory.mktemp("ckpt") / "vit_rgb.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path, m.state_dict()


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory):
    """A torchvision-layout .pth of an RGB ResNet-50 (with its 1000-class fc)."""
    m = _rgb_resnet()
    path = tmp_path_factory.mktemp("ckpt") / "resnet50_rgb.pth"
    torch.save(m.state_dict(), str(path))
    return path, m.state_dict()


def _expected_adaptation(w, bands, strategy):
    """The strategies' definitions, written out per band."""
    c = len(bands)
    mean = w.mean(dim=1)
    out = torch.empty(w.shape[0], c, *w.shape[2:])
    for j, band in enumerate(bands):
        if strategy == "mean":
            out[:, j] = mean * 3 / c
        elif strategy == "timm":
            out[:, j] = w[:, j % 3] * 3 / c
        elif strategy == "rgb":
            rgb = {"B4": 0, "B3": 1, "B2": 2}
            out[:, j] = w[:, rgb[band]] if band in rgb else mean * 3 / c
    return out


# ---- bands ------------------------------------------------------------------------------------


def test_band_registry():
    assert resolve_bands(None, 13) == S2_L1C_BANDS
    assert resolve_bands(None, 2) == S1_BANDS
    assert resolve_bands(["b2", "B8a", 865.0]) == ("B2", "B8A", 865.0)
    assert resolve_bands("s2a") == S2_L2A_BANDS  # the data pipeline's band sets
    assert resolve_bands("s1", 2) == S1_BANDS
    assert rgb_positions(S2_L1C_BANDS) == (3, 2, 1)  # B4, B3, B2
    assert rgb_positions(("B8", 655.0, 482.0)) == (1, None, 2)  # Landsat-like wavelengths
    assert rgb_positions(S1_BANDS) == (None, None, None)
    with pytest.raises(ValueError, match="unknown band 'B13'"):
        resolve_bands(["B2", "B13"])
    with pytest.raises(ValueError, match="bands must be given for in_chans=5"):
        resolve_bands(None, 5)
    with pytest.raises(ValueError, match="in_chans is 4"):
        resolve_bands(["B2", "B3"], 4)


# ---- strategies -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["rgb", "mean", "timm", "random"])
def test_vit_strategy_weights_equal_definition(vit_ckpt, strategy):
    path, sd = vit_ckpt
    torch.manual_seed(1)
    enc = create_encoder(VIT, in_chans=13, img_size=28, depth=DEPTH)
    init = enc.backbone.patch_embed.proj.weight.detach().clone()
    report = load_pretrained(enc, path, strategy=strategy)
    got = enc.backbone.patch_embed.proj.weight.detach()
    if strategy == "random":
        torch.testing.assert_close(got, init, rtol=0, atol=0)
    else:
        torch.testing.assert_close(got, _expected_adaptation(sd["patch_embed.proj.weight"], S2_L1C_BANDS, strategy))
    # everything else is the checkpoint's (pos_embed resampled from the 4x4 to the 2x2 grid)
    own = enc.backbone.state_dict()
    for k, v in sd.items():
        if k == "pos_embed":
            torch.testing.assert_close(own[k], resample_abs_pos_embed(v, new_size=(2, 2), num_prefix_tokens=1))
        elif k != "patch_embed.proj.weight":
            torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    assert report.resampled
    assert report.strategy == strategy


@pytest.mark.parametrize("strategy", ["rgb", "mean", "timm"])
def test_resnet_strategy_weights_equal_definition(resnet_ckpt, strategy):
    path, sd = resnet_ckpt
    bands = ["B2", "B3", "B4", "B8", "B11"]
    enc = create_encoder("resnet50", bands=bands)
    report = load_pretrained(enc, path, strategy=strategy)
    want = _expected_adaptation(sd["conv1.weight"], tuple(bands), strategy)
    torch.testing.assert_close(enc.backbone.conv1.weight.detach(), want)
    torch.testing.assert_close(enc.backbone.layer4[2].conv3.weight, sd["layer4.2.conv3.weight"], rtol=0, atol=0)
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]


def test_adapt_input_weight_sentinel1_and_counts():
    w = torch.randn(8, 3, 3, 3)
    torch.testing.assert_close(adapt_input_weight(w, 2, "mean"), w.mean(1, keepdim=True).expand(-1, 2, -1, -1) * 1.5)
    torch.testing.assert_close(adapt_input_weight(w, S1_BANDS, "timm"), w[:, :2] * 1.5)
    with pytest.raises(ValueError, match="use strategy 'mean'"):
        adapt_input_weight(w, S1_BANDS, "rgb")
    with pytest.raises(ValueError, match="strategy must be one of"):
        adapt_input_weight(w, 13, "copy")


def test_mean_strategy_keeps_response_to_equal_bands(vit_ckpt):
    """3/C rescaling: an image whose 13 bands are equal gives the RGB model's response to its gray image."""
    path, _ = vit_ckpt
    enc13 = create_encoder(VIT, in_chans=13, img_size=28, depth=DEPTH, weights=path, strategy="mean").eval()
    enc3 = create_encoder(VIT, in_chans=3, img_size=28, depth=DEPTH, weights=path).eval()
    gray = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            enc13.forward_features(gray.expand(-1, 13, -1, -1)),
            enc3.forward_features(gray.expand(-1, 3, -1, -1)),
            rtol=1e-4,
            atol=1e-4,
        )


# ---- the rgb strategy reproduces the RGB model -------------------------------------------------


def _at_rgb_positions(x3, bands):
    x = torch.zeros(x3.shape[0], len(bands), *x3.shape[2:])
    r, g, b = rgb_positions(bands)
    x[:, r], x[:, g], x[:, b] = x3[:, 0], x3[:, 1], x3[:, 2]
    return x


def test_rgb_vit_reproduces_rgb_model(vit_ckpt):
    path, _ = vit_ckpt
    enc13 = create_encoder(VIT, in_chans=13, img_size=28, depth=DEPTH, weights=path, strategy="rgb").eval()
    enc3 = create_encoder(VIT, in_chans=3, img_size=28, depth=DEPTH, weights=path).eval()
    x3 = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        want = enc3.forward_features(x3)
        got = enc13.forward_features(_at_rgb_positions(x3, enc13.bands))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().mean() > 0.1  # the comparison is not between near-zero tensors


def test_rgb_resnet_reproduces_rgb_model(resnet_ckpt):
    path, sd = resnet_ckpt
    enc13 = create_encoder("resnet50", in_chans=13, weights=path, strategy="rgb").eval()
    rgb = _rgb_resnet().eval()  # the original model, its own head removed
    rgb.reset_classifier(0)
    x3 = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = rgb(x3)
        got = enc13(_at_rgb_positions(x3, enc13.bands))
        got_maps = enc13.forward_pyramid(_at_rgb_positions(x3, enc13.bands))[-1]
    # fp32: the 13-channel conv sums in another order; errors relative to the maps' scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    want_maps = rgb.forward_features(x3)
    torch.testing.assert_close(got_maps, want_maps, rtol=1e-5, atol=1e-5 * want_maps.abs().max().item())


# ---- key layouts ------------------------------------------------------------------------------


def _meta_layout(sd):
    """A DINOv2 checkpoint as Meta releases it: mask_token, pos_embed with the class position."""
    out = dict(sd)
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


@pytest.mark.parametrize("wrap", ["released", "teacher_chunked"])
def test_meta_dinov2_keys_load(tmp_path, vit_ckpt, wrap):
    _, sd = vit_ckpt
    meta = _meta_layout(sd)
    if wrap == "teacher_chunked":  # a training checkpoint: teacher backbone, FSDP block chunks
        chunked = {k.replace("blocks.", "blocks.0."): v for k, v in meta.items()}
        meta = {"teacher": {f"backbone.{k}": v for k, v in chunked.items()}, "iteration": 5}
        meta["teacher"]["dino_head.mlp.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(meta, str(path))
    enc = create_encoder(VIT, in_chans=3, img_size=56, depth=DEPTH, weights=path)
    own = enc.backbone.state_dict()
    for k, v in sd.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0)


def test_resnet_dino_checkpoint_loads(tmp_path, resnet_ckpt):
    _, sd = resnet_ckpt
    full = {
        "teacher": {
            **{f"module.backbone.{k}": v for k, v in sd.items()},
            "module.head.mlp.0.weight": torch.zeros(2, 2),
        },
        "student": {"module.backbone.conv1.weight": torch.zeros(1)},
        "epoch": 100,
    }
    path = tmp_path / "dino_resnet50_full_checkpoint.pth"
    torch.save(full, str(path))
    enc = create_encoder("resnet50", in_chans=3, weights=path)
    torch.testing.assert_close(enc.backbone.conv1.weight, sd["conv1.weight"], rtol=0, atol=0)


# ---- errors -----------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    enc = create_encoder(VIT, in_chans=13, img_size=28, depth=DEPTH)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_pretrained(enc, missing)


def test_unknown_suffix_and_corrupt_file(tmp_path):
    enc = create_encoder(VIT, in_chans=13, img_size=28, depth=DEPTH)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"weights.npz.*unknown suffix"):
        load_pretrained(enc, odd)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="broken.safetensors.*could not be read"):
        load_pretrained(enc, bad)


def test_missing_and_unexpected_keys_are_named(tmp_path, vit_ckpt):
    _, sd = vit_ckpt
    partial = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    partial["blocks.7.attn.qkv.weight"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in partial.items()}, str(path))
    enc = create_encoder(VIT, in_chans=13, img_size=28, depth=DEPTH)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(enc, path)
    msg = str(err.value)
    assert "partial.safetensors" in msg
    assert "missing from the file: blocks.1." in msg
    assert "unexpected in the file: blocks.7.attn.qkv.weight" in msg


def test_wrong_architecture_shapes_are_named(tmp_path, resnet_ckpt):
    """A ViT-S checkpoint into a ViT-B: every mismatched key is listed with both shapes."""
    m = timm.create_model(VIT, pretrained=False, num_classes=0, img_size=28, depth=DEPTH)
    path = tmp_path / "vits.pth"
    torch.save(m.state_dict(), str(path))
    enc = create_encoder("vit_base_patch14_dinov2", in_chans=13, img_size=28, depth=DEPTH)
    with pytest.raises(
        CheckpointError,
        match=r"vits.pth.*shapes do not match[\s\S]*cls_token: file \(1, 1, 384\) vs model \(1, 1, 768\)",
    ):
        load_pretrained(enc, path)
    # a ResNet checkpoint into a ViT: nothing fits
    with pytest.raises(CheckpointError, match=r"resnet50_rgb.pth.*does not fit VisionTransformer"):
        load_pretrained(enc, resnet_ckpt[0])


def test_first_layer_with_other_channel_count(tmp_path, vit_ckpt):
    _, sd = vit_ckpt
    five = dict(sd)
    five["patch_embed.proj.weight"] = torch.randn(384, 5, 14, 14)
    path = tmp_path / "five.safetensors"
    save_file({k: v.contiguous() for k, v in five.items()}, str(path))
    enc = create_encoder(VIT, in_chans=13, img_size=56, depth=DEPTH)
    with pytest.raises(
        CheckpointError, match=r"five.safetensors.*patch_embed.proj.weight has shape \(384, 5, 14, 14\)"
    ):
        load_pretrained(enc, path)


def test_rgb_strategy_on_sentinel1_and_bad_arguments(vit_ckpt):
    path, _ = vit_ckpt
    with pytest.raises(ValueError, match="bands .*'VV', 'VH'.* have none: use strategy 'mean'"):
        create_encoder(VIT, in_chans=2, img_size=28, depth=DEPTH, weights=path, strategy="rgb")
    enc = create_encoder(VIT, in_chans=2, img_size=28, depth=DEPTH, weights=path, strategy="mean")
    assert enc.backbone.patch_embed.proj.weight.shape[1] == 2
    with pytest.raises(ValueError, match="img_size must be a positive multiple of the patch size 14"):
        create_encoder(VIT, in_chans=13, img_size=30)
    with pytest.raises(ValueError, match="name must be one of"):
        create_encoder("vit_huge", in_chans=13)
    with pytest.raises(ValueError, match="either weights"):
        create_encoder(VIT, weights=path, pretrained=True)


# ---- nothing downloads; the hub only when asked ----------------------------------------------


def test_local_weights_never_touch_the_hub(monkeypatch, vit_ckpt):
    import timm.models._builder as builder

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub path was used")

    monkeypatch.setattr(builder, "load_pretrained", no_hub)
    create_encoder(VIT, in_chans=13, img_size=28, depth=DEPTH, weights=vit_ckpt[0])
    create_encoder(VIT, in_chans=13, img_size=28, depth=DEPTH)
    with pytest.raises(AssertionError, match="hub path"):
        create_encoder(VIT, in_chans=13, img_size=28, depth=DEPTH, pretrained=True)


def test_hub_weights_get_the_same_adaptation(monkeypatch, vit_ckpt):
    """pretrained=True: timm's RGB weights (here served from the tmp checkpoint), adapted by strategy."""
    import timm.models._builder as builder

    path, sd = vit_ckpt

    def fake_hub(model, pretrained_cfg=None, num_classes=0, in_chans=3, filter_fn=None, strict=True, **kw):
        assert in_chans == 3
        model.load_state_dict(filter_fn(dict(sd), model))

    monkeypatch.setattr(builder, "load_pretrained", fake_hub)
    enc = create_encoder(VIT, in_chans=13, img_size=28, depth=DEPTH, pretrained=True, strategy="rgb")
    ref = create_encoder(VIT, in_chans=13, img_size=28, depth=DEPTH, weights=path, strategy="rgb")
    for (k, a), b in zip(enc.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


# ---- saving -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [VIT, "resnet50"])
def test_save_encoder_loads_in_timm(tmp_path, vit_ckpt, resnet_ckpt, name):
    src = vit_ckpt[0] if name == VIT else resnet_ckpt[0]
    kw = dict(img_size=28, depth=DEPTH) if name == VIT else {}
    enc = create_encoder(name, in_chans=13, weights=src, **kw)
    out = tmp_path / "encoder.safetensors"
    save_encoder(enc, out)
    back = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), in_chans=13, num_classes=0, **kw
    )
    want = enc.backbone.state_dict()
    got = back.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    # and through our loader (13-band file into a 13-band model: loaded unchanged)
    again = create_encoder(name, in_chans=13, weights=out, **kw)
    torch.testing.assert_close(again.backbone.state_dict(), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_encoder(enc, tmp_path / "encoder.pth")
