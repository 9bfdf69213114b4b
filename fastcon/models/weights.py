"""Continual-pretraining initialisation from local weight files, and saving encoders for timm.

``load_pretrained(model, path, strategy=..., bands=...)`` reads a ``.pth`` / ``.pt`` / ``.bin`` or
``.safetensors`` checkpoint (DINOv2 for the ViTs, Meta or timm key layout; DINO or torchvision
layout for ResNet-50), resamples the ViT's positional embeddings to the model's grid, adapts the
3-channel first conv / patch embedding to the model's bands by a named strategy, and loads
everything strictly: a missing file, an unreadable file or keys that do not fit raise an error
naming the file and the offending keys. Nothing is ever downloaded here.

Input-layer strategies, for an RGB filter bank ``W`` (O, 3, k, k) with channels R, G, B, its mean
``m = (W_R + W_G + W_B) / 3`` and ``C`` target bands:

- ``rgb``: the bands that stand for R, G, B (Sentinel-2 B4, B3, B2) get ``W_R``, ``W_G``, ``W_B``
  unchanged; every other band gets ``(3 / C) * m``.
- ``mean``: every band gets ``(3 / C) * m``.
- ``timm``: timm's ``adapt_input_conv``: the RGB filters repeated cyclically (R, G, B, R, ...)
  and all scaled by ``3 / C`` (C == 1: the sum of the three filters).
- ``random``: the model's own fresh initialisation of that layer; all other weights are loaded.

Why ``rgb`` keeps the RGB filters unscaled: the model is linear in its first layer, so a 13-band
model fed a 3-channel image at B4/B3/B2 (other bands zero) reproduces the RGB model exactly iff
those three filters are the originals. ``3 / C`` is the rescaling that keeps the response to an
image whose bands are all equal unchanged (``sum_c W'_c = W_R + W_G + W_B``); ``mean``
satisfies it, and ``timm`` when 3 divides C (its cyclic repeat weights R, G and B unequally
otherwise: 5, 4 and 4 copies for 13 bands); ``rgb`` cannot as well (its exact RGB filters already sum to that), so its
other bands take the same per-band weight ``3 m / C`` as under ``mean``: for an all-equal image
the response is ``(2 - 3 / C)`` times the RGB model's (1.77 for 13 bands) instead of ``C / 3``
(4.3) with unscaled means.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastcon.models.bands import Band, resolve_bands, rgb_positions

STRATEGIES = ("rgb", "mean", "timm", "random")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_MAX_KEYS_SHOWN = 8


class CheckpointError(ValueError):
    """A weight file that cannot initialise the model: what is wrong, with the file and the keys."""


@dataclass
class LoadReport:
    """What ``load_pretrained`` did."""

    path: str
    strategy: str
    bands: tuple[Band, ...] | None
    first_conv: str
    rgb_positions: tuple[int | None, int | None, int | None] | None = None
    resampled: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# the model behind a wrapper


def timm_backbone(model: nn.Module) -> nn.Module:
    """The timm model inside one of our encoder wrappers (or the model itself if it is timm's)."""
    inner = getattr(model, "backbone", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "pretrained_cfg"):
        return inner
    if hasattr(model, "pretrained_cfg"):
        return model
    raise TypeError(f"model must be a timm model or a fastcon.models encoder, got {type(model).__name__}")


def _first_conv_name(backbone: nn.Module) -> str:
    name = backbone.pretrained_cfg.get("first_conv")
    if isinstance(name, (list, tuple)):
        name = name[0]
    if not name:
        raise TypeError(f"{type(backbone).__name__} has no first_conv in its pretrained_cfg")
    return name


def input_channels(backbone: nn.Module) -> int:
    """Input channels of a timm model's first conv / patch embedding."""
    return backbone.get_submodule(_first_conv_name(backbone)).weight.shape[1]


# --------------------------------------------------------------------------------------------
# reading a file and finding the model's keys in it


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch-pickle (``.pth``/``.pt``/``.bin``/``.ckpt``) file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {str(path)!r} does not exist (nothing is downloaded; give a local file)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix in _TORCH_SUFFIXES:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(
                f"weight file {str(path)!r}: unknown suffix {suffix!r}; expected .safetensors or "
                f"{', '.join(_TORCH_SUFFIXES)}"
            )
    except CheckpointError:
        raise
    except Exception as e:  # corrupt file, a pickle with arbitrary objects, ...
        raise CheckpointError(f"weight file {str(path)!r} could not be read: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"weight file {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _unwrap(obj: dict, path: str) -> dict[str, torch.Tensor]:
    """Find the backbone's tensors in a training checkpoint (DINO teacher, {'model': ...}, DDP prefixes)."""
    # a checkpoint dict around the state dict; DINO full checkpoints hold teacher and student:
    # the teacher is the network DINO evaluates, so it wins
    for key in ("teacher", "model", "state_dict", "model_ema", "student"):
        while isinstance(obj.get(key), dict):
            obj = obj[key]
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"weight file {path!r} holds no tensors (top-level keys: {_show(list(obj))})")
    for prefix in ("module.", "_orig_mod.", "model."):  # DDP / torch.compile / Lightning (torchgeo) wrappers
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    for prefix in ("backbone.", "encoder."):  # DINO: backbone.* next to the projection head.*
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    # DINOv2 training checkpoints chunk the blocks for FSDP: blocks.<chunk>.<i>.* -> blocks.<i>.*
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):
        sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    return sd


def _show(keys) -> str:
    keys = list(keys)
    shown = ", ".join(map(str, keys[:_MAX_KEYS_SHOWN]))
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_KEYS_SHOWN else "")


def _to_timm_layout(sd: dict[str, torch.Tensor], backbone: nn.Module, report: LoadReport) -> dict:
    """Meta DINOv2 keys -> timm keys and positional embeddings resampled to the model's grid (ViT)."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(backbone, VisionTransformer):
        pos = sd.get("pos_embed")
        # timm's own converter: drops mask_token, maps register_tokens / SwiGLU w12,w3 to timm
        # names, resamples pos_embed (bicubic) and a patch kernel of another size
        sd = checkpoint_filter_fn(dict(sd), backbone)
        if pos is not None and sd["pos_embed"].shape != pos.shape:
            report.resampled.append(f"pos_embed {tuple(pos.shape)} -> {tuple(sd['pos_embed'].shape)}")
    # a classifier the encoder does not have (num_classes=0): ImageNet fc / head weights
    own = backbone.state_dict()
    for k in list(sd):
        if k not in own and k.split(".")[0] in ("fc", "head", "head_dist", "pre_logits"):
            report.ignored.append(k)
            del sd[k]
    return sd


# --------------------------------------------------------------------------------------------
# first-layer adaptation


def adapt_input_weight(
    weight: torch.Tensor,
    bands,
    strategy: str,
    *,
    init_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """An RGB filter bank (O, 3, kh, kw) adapted to ``bands`` (see the module docstring for the definitions).

    ``bands``: the target band list, or just the channel count for strategies other than ``rgb``.
    ``init_weight`` is the model's own initialisation of the layer, used by ``random``.
    """
    from timm.models._manipulate import adapt_input_conv

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(repr(s) for s in STRATEGIES)}; got {strategy!r}")
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"weight must be an RGB filter bank (O, 3, kh, kw), got shape {tuple(weight.shape)}")
    if isinstance(bands, int) and not isinstance(bands, bool):
        if strategy == "rgb":
            raise ValueError("strategy 'rgb' needs the band list (names or wavelengths), not a channel count")
        c = bands
    else:
        bands = resolve_bands(bands)
        c = len(bands)
    if strategy == "random":
        if init_weight is None or init_weight.shape[1] != c:
            raise ValueError(f"strategy 'random' needs init_weight with {c} input channels")
        return init_weight.detach().clone()
    w = weight.float()
    mean = w.mean(dim=1, keepdim=True)
    if strategy == "timm":
        out = adapt_input_conv(c, w.clone())
    elif strategy == "mean":
        out = (3.0 / c) * mean.expand(-1, c, -1, -1).clone()
    else:  # rgb
        positions = rgb_positions(bands)
        if all(p is None for p in positions):
            raise ValueError(
                f"strategy 'rgb' needs a red, green or blue band (B4/B3/B2 or a wavelength within 30 nm of "
                f"665/560/490 nm); bands {list(bands)} have none: use strategy 'mean'"
            )
        out = (3.0 / c) * mean.expand(-1, c, -1, -1).clone()
        for rgb_channel, band_index in enumerate(positions):
            if band_index is not None:
                out[:, band_index] = w[:, rgb_channel]
    return out.to(weight.dtype)


# --------------------------------------------------------------------------------------------
# public entry points


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strategy: str = "rgb",
    bands=None,
) -> LoadReport:
    """Initialise ``model`` (a fastcon encoder or a timm model) from a local checkpoint; returns a report.

    ``bands`` names the model's input channels (default by channel count: 13 -> Sentinel-2 L1C,
    12 -> L2A, 2 -> Sentinel-1 VV/VH). A checkpoint whose first layer already has the model's
    channel count loads unchanged (resuming our own checkpoints); a 3-channel one is adapted.
    """
    path = str(path)
    sd = _unwrap(read_state_dict(path), path)
    return load_state_dict_adapted(model, sd, source=path, strategy=strategy, bands=bands)


def load_state_dict_adapted(model: nn.Module, state_dict: dict, *, source: str, strategy: str = "rgb", bands=None):
    """``load_pretrained`` for a state dict already in memory (``source`` names it in errors)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(repr(s) for s in STRATEGIES)}; got {strategy!r}")
    backbone = timm_backbone(model)
    first = _first_conv_name(backbone)
    in_chans = input_channels(backbone)
    if bands is None:
        bands = getattr(model, "bands", None)
    bands = resolve_bands(bands, in_chans, required=strategy == "rgb")
    report = LoadReport(path=source, strategy=strategy, bands=bands, first_conv=first)
    sd = _to_timm_layout(dict(state_dict), backbone, report)

    own = backbone.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"weight file {source!r} does not fit {type(backbone).__name__} "
            f"({backbone.pretrained_cfg.get('architecture', '?')}):"
            + (f"\n  missing from the file: {_show(missing)}" if missing else "")
            + (f"\n  unexpected in the file: {_show(unexpected)}" if unexpected else "")
        )
    conv_key = first + ".weight"
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k != conv_key and sd[k].shape != own[k].shape
    ]
    if mismatched:
        raise CheckpointError(f"weight file {source!r}: shapes do not match the model:\n  " + "\n  ".join(mismatched))

    w = sd[conv_key]
    want = own[conv_key]
    if strategy == "random":
        sd[conv_key] = want.clone()
    elif w.shape == want.shape:
        pass  # already has the model's bands
    elif w.dim() == 4 and w.shape[1] == 3 and w.shape[0] == want.shape[0] and w.shape[2:] == want.shape[2:]:
        if strategy == "rgb":
            report.rgb_positions = rgb_positions(bands)
        sd[conv_key] = adapt_input_weight(w, bands if bands is not None else in_chans, strategy)
    else:
        raise CheckpointError(
            f"weight file {source!r}: {conv_key} has shape {tuple(w.shape)}; the model needs "
            f"{tuple(want.shape)} and only a 3-channel (RGB) or {want.shape[1]}-channel input layer can be adapted"
        )
    sd = {k: v.to(own[k].dtype) for k, v in sd.items()}
    backbone.load_state_dict(sd, strict=True)
    return report


EXPORT_FORMATS = ("timm", "torchgeo")


def save_encoder(model: nn.Module, path: str | os.PathLike, format: str = "timm") -> None:
    """Write the encoder's weights to ``path``.

    - ``format="timm"`` (a ``.safetensors`` file): ``timm.create_model(name, pretrained=True,
      pretrained_cfg_overlay=dict(file=path), in_chans=C, num_classes=0)`` loads it back
      (positional embeddings resampled if img_size differs).
    - ``format="torchgeo"`` (a ``.ckpt`` / ``.pth`` torch file): a Lightning-style checkpoint
      ``{"hyper_parameters": {"model": name, "in_channels": C, ...}, "state_dict": {"model.<timm
      key>": ...}}`` that ``torchgeo.trainers.ClassificationTask(model=name, weights=path,
      in_channels=C, ...)`` (and ``MultiLabelClassificationTask``) load unchanged. torchgeo builds
      ``timm.create_model(name)`` at the architecture's default input size (518 px for the DINOv2
      ViTs), so a ViT's positional embeddings are resampled (bicubic) to that grid here.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}; got {format!r}")
    path = Path(path)
    backbone = timm_backbone(model)
    # safetensors wants contiguous tensors that share no storage
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone.state_dict().items()}
    meta = {
        "architecture": str(backbone.pretrained_cfg.get("architecture", "")),
        "in_chans": str(input_channels(backbone)),
    }
    bands = getattr(model, "bands", None)
    if bands:
        meta["bands"] = ",".join(map(str, bands))
    if format == "torchgeo":
        if path.suffix.lower() not in (".ckpt", ".pth", ".pt"):
            raise ValueError(f"path must end in .ckpt, .pth or .pt for format='torchgeo', got {str(path)!r}")
        sd = _at_default_grid(sd, backbone)
        hparams = {"model": meta["architecture"], "in_channels": int(meta["in_chans"]), "bands": meta.get("bands", "")}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"hyper_parameters": hparams, "state_dict": {f"model.{k}": v for k, v in sd.items()}}, str(path))
        return
    from safetensors.torch import save_file

    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)


def _at_default_grid(sd: dict, backbone: nn.Module) -> dict:
    """A ViT's pos_embed resampled to the patch grid of its architecture's default input size."""
    pos = sd.get("pos_embed")
    if pos is None or not hasattr(backbone, "patch_embed"):
        return sd
    from timm.layers import resample_abs_pos_embed

    size = backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
    patch = backbone.patch_embed.patch_size
    grid = [size[0] // patch[0], size[1] // patch[1]]
    prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
    if list(backbone.patch_embed.grid_size) != grid:
        sd = dict(sd, pos_embed=resample_abs_pos_embed(pos, grid, num_prefix_tokens=prefix).contiguous())
    return sd
