"""The frozen encoder to evaluate, from any of the places weights come from.

``load_encoder(...)`` returns an ``Encoder``: the module, its band list, input size, the
normalisation its inputs need and a description for reports. Sources:

- a pretraining run folder (``run_cfg``, its config.yaml resolved): the run's architecture,
  crop size and data statistics; weights ``RUN/encoder.safetensors`` (or ``weights``: a
  pretraining ``.ckpt`` gives its student encoder), or the run's random initialisation.
- ``encoder.safetensors`` written by ``save_encoder``: architecture, channels and bands from
  its metadata.
- the SoftCon release files (``B13_vits14_softcon.pth``, ``B2_rn50_softcon.pth``, ...: DINOv2
  / torchvision key names) and torchgeo's ``*_softcon_enc.pth`` (timm key names): ``model``
  names the architecture, the channel count comes from the file.
- a torchgeo weights name (``ViTSmall14_DINOv2_Weights.SENTINEL2_ALL_SOFTCON``): the file in
  torch.hub's cache; downloaded only with ``download=True``, otherwise a clear error saying
  where to put it.
- ``random_init`` with ``model``: the untrained architecture.
Released weights and random encoders are normalised with the SSL4EO-S12 statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from fastcon.eval.data import Normalisation, default_bands, run_normalisation
from fastcon.models import create_encoder, load_pretrained, read_state_dict
from fastcon.models.weights import _first_conv_name, _unwrap, timm_backbone


@dataclass
class Encoder:
    module: nn.Module
    model: str  # timm architecture name
    bands: tuple[str, ...]
    img_size: int
    norm: Normalisation
    source: str
    info: dict = field(default_factory=dict)

    @property
    def modality(self) -> str:
        return "s1" if set(self.bands) <= {"VV", "VH"} else "s2"

    def describe(self) -> dict:
        return {
            "model": self.model,
            "weights": self.source,
            "bands": list(self.bands),
            "img_size": self.img_size,
            "normalisation": self.norm.source,
            **self.info,
        }


def _student_encoder(encoder: nn.Module, ckpt: str) -> None:
    from fastcon.train import load_checkpoint

    student = load_checkpoint(ckpt)["student"]
    prefix = "online.encoder."
    encoder.load_state_dict({k[len(prefix) :]: v for k, v in student.items() if k.startswith(prefix)})


def _in_chans(sd: dict) -> int:
    """Input channels of a ViT / ResNet state dict in Meta, timm or torchvision key names."""
    for key in ("patch_embed.proj.weight", "conv1.weight"):
        if key in sd and sd[key].dim() == 4:
            return int(sd[key].shape[1])
    raise ValueError(f"cannot tell the input channels: no patch_embed.proj.weight or conv1.weight in {list(sd)[:8]}")


def torchgeo_weights_file(name: str, *, download: bool = False) -> str:
    """The local file of a torchgeo weights enum member, e.g. ``ViTSmall14_DINOv2_Weights.SENTINEL2_ALL_SOFTCON``."""
    from torchgeo.models import get_weight

    try:
        w = get_weight(name)
    except (KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"weights {name!r} is neither a file nor a torchgeo weights name ({e})") from e
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url.split("?")[0]))
    if not os.path.isfile(path):
        if not download:
            raise FileNotFoundError(
                f"torchgeo weights {name} are not on this machine (looked for {path}); nothing is downloaded "
                f"without --download: fetch {w.url} to that path (or anywhere, and pass the file as --weights)"
            )
        torch.hub.download_url_to_file(w.url, path)
    return path


def load_encoder(
    *,
    run_cfg=None,
    weights: str | None = None,
    model: str | None = None,
    random_init: bool = False,
    img_size: int | None = None,
    seed: int = 0,
    download: bool = False,
    timm_kwargs: dict | None = None,
    bands=None,
) -> Encoder:
    """Build and load the encoder to evaluate (see the module docstring); in eval mode, frozen.

    ``bands``: the band list of a random encoder without a run (default Sentinel-2 L1C, 13 bands).
    """
    from fastcon.train import seed_everything

    if random_init and weights is not None:
        raise ValueError("give weights or random_init, not both")
    if run_cfg is not None:
        m, d = run_cfg.model, run_cfg.data
        tiles_bands = _run_bands(d.root)
        seed_everything(seed)  # pretrain.py seeds the same way before it builds the encoder
        enc = create_encoder(m.name, bands=list(tiles_bands), img_size=d.crop_size, **m.timm_kwargs)
        if random_init:
            source = f"random init (seed {seed})"
        else:
            source = weights or os.path.join(run_cfg.run.out_dir, "encoder.safetensors")
            if source.endswith(".ckpt"):
                _student_encoder(enc, source)
            else:
                load_pretrained(enc, source)
        norm = run_normalisation(d.root, tiles_bands)
        return _frozen(Encoder(enc, m.name, tuple(tiles_bands), d.crop_size, norm, source))

    if weights is None and not random_init:
        raise ValueError("give a run folder, a weights file / torchgeo weights name, or random_init with a model")
    kwargs = dict(timm_kwargs or {})
    if weights is not None:
        bands = None
    if weights is not None and not os.path.exists(weights):
        weights = torchgeo_weights_file(weights, download=download)
    if weights is not None and weights.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(weights, "pt") as f:
            meta = f.metadata() or {}
        model = model or meta.get("architecture") or None
        if meta.get("bands"):
            bands = tuple(b if not _is_number(b) else float(b) for b in meta["bands"].split(","))
        elif meta.get("in_chans"):
            bands = default_bands(int(meta["in_chans"]))
    elif weights is not None:
        bands = default_bands(_in_chans(_unwrap(read_state_dict(weights), weights)))
    if model is None:
        raise ValueError("--model is needed to build this encoder (e.g. vit_small_patch14_dinov2, resnet50)")
    if bands is None:
        bands = default_bands(13)
    size = img_size or 224
    torch.manual_seed(seed)
    enc = create_encoder(model, bands=list(bands), img_size=size, **kwargs)
    if weights is not None:
        load_pretrained(enc, weights)
        source = weights
    else:
        source = f"random init (seed {seed})"
    norm = Normalisation.ssl4eo(bands)
    return _frozen(Encoder(enc, model, tuple(bands), size, norm, source))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _run_bands(root: str) -> tuple[str, ...]:
    import json

    with open(os.path.join(root, "dataset.json")) as f:
        return tuple(json.load(f)["bands"])


def _frozen(e: Encoder) -> Encoder:
    e.module.eval()
    for p in e.module.parameters():
        p.requires_grad_(False)
    backbone = timm_backbone(e.module)
    e.info.setdefault("input_layer", _first_conv_name(backbone))
    return e
