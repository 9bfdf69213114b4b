"""``create_encoder``: a timm backbone for Sentinel-2 / Sentinel-1 input, optionally initialised from a file."""

from __future__ import annotations

import os

from torch import nn

from fastcon.models.bands import resolve_bands
from fastcon.models.resnet import ResNetEncoder
from fastcon.models.vit import ViTEncoder
from fastcon.models.weights import STRATEGIES, load_pretrained, load_state_dict_adapted

VIT_MODELS = ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2")
RESNET_MODELS = ("resnet50",)
MODELS = VIT_MODELS + RESNET_MODELS


def create_encoder(
    name: str,
    *,
    in_chans: int | None = None,
    bands=None,
    img_size: int = 224,
    weights: str | os.PathLike | None = None,
    strategy: str = "rgb",
    pretrained: bool = False,
    **timm_kwargs,
) -> nn.Module:
    """A ``ViTEncoder`` or ``ResNetEncoder`` around ``timm.create_model(name, num_classes=0, ...)``.

    - ``in_chans`` / ``bands``: 13 (Sentinel-2 L1C, the default), 12 (L2A), 2 (Sentinel-1 VV, VH),
      or any band list (names ``B1``..``B12``, ``B8A``, ``VV``, ``VH`` or wavelengths in nm).
    - ``img_size`` (ViTs): any multiple of the patch size 14; positional embeddings of a loaded
      checkpoint are resampled to it. ``dynamic_img_size=True`` (a timm option) accepts any
      multiple at run time too.
    - ``weights``: a local ``.pth`` / ``.safetensors`` checkpoint, loaded with ``load_pretrained``
      and the first-layer ``strategy`` (``rgb``, ``mean``, ``timm``, ``random``).
    - ``pretrained=True`` fetches timm's hub weights (the only path that downloads; only when asked)
      and adapts them with the same ``strategy``.
    Extra keyword arguments go to ``timm.create_model`` (e.g. ``depth=2`` for tests, ``drop_path_rate``).
    """
    import timm

    if name not in MODELS:
        raise ValueError(f"name must be one of {', '.join(MODELS)}; got {name!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(repr(s) for s in STRATEGIES)}; got {strategy!r}")
    if weights is not None and pretrained:
        raise ValueError("give either weights (a local file) or pretrained=True (timm's hub weights), not both")
    if bands is None and in_chans is None:
        in_chans = 13
    bands = resolve_bands(bands, in_chans, required=False)
    in_chans = len(bands) if bands is not None else in_chans
    kwargs = dict(timm_kwargs, num_classes=0, in_chans=in_chans)
    if name in VIT_MODELS:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or img_size % 14:
            raise ValueError(f"img_size must be a positive multiple of the patch size 14, got {img_size!r}")
        kwargs["img_size"] = img_size
    backbone = timm.create_model(name, pretrained=False, **kwargs)
    encoder = ViTEncoder(backbone, bands) if name in VIT_MODELS else ResNetEncoder(backbone, bands)
    if weights is not None:
        encoder.load_report = load_pretrained(encoder, weights, strategy=strategy, bands=bands)
    elif pretrained:
        # hub weights for the RGB model, then the same adaptation as for a local file
        rgb = timm.create_model(name, pretrained=True, **dict(kwargs, in_chans=3))
        encoder.load_report = load_state_dict_adapted(
            encoder, rgb.state_dict(), source=f"timm hub weights of {name}", strategy=strategy, bands=bands
        )
    return encoder
