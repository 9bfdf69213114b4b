"""A timm ResNet as a pretraining encoder: pooled features, multi-scale maps, input masking.

A CNN cannot drop tokens, so Siamese masking of a ResNet zeroes the pixels of the dropped cells of
a ``patch`` x ``patch`` grid with ``fastcon.mask_image`` before the stem.
"""

from __future__ import annotations

import torch
from torch import nn

from fastcon.masking import random_ids_keep, resolve_keep
from fastcon.models.bands import resolve_bands
from fastcon.models.weights import input_channels


class ResNetEncoder(nn.Module):
    """Encoder around a timm ``ResNet`` (kept as ``.backbone``, built with ``num_classes=0``).

    ``forward`` returns pooled features (B, 2048); ``forward_pyramid`` the stem and the four
    stages' maps (strides 2, 4, 8, 16, 32), for the diffusion decoder.
    """

    def __init__(self, backbone: nn.Module, bands=None, mask_patch: int = 32):
        super().__init__()
        from timm.models.resnet import ResNet

        if not isinstance(backbone, ResNet):
            raise TypeError(f"backbone must be a timm ResNet, got {type(backbone).__name__}")
        self.backbone = backbone
        self.bands = resolve_bands(bands, input_channels(backbone), required=False)
        self.mask_patch = mask_patch
        self.pyramid_channels = [backbone.feature_info[i]["num_chs"] for i in range(5)]
        self.pyramid_strides = [backbone.feature_info[i]["reduction"] for i in range(5)]

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def mask(self, x, keep=None, ids_keep=None, generator=None):
        """Zero the dropped ``mask_patch`` cells of ``x``; returns (masked x, ids_keep or None)."""
        import fastcon

        if keep is None and ids_keep is None:
            return x, None
        p = self.mask_patch
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"x's height and width must be multiples of mask_patch={p}, got {tuple(x.shape[-2:])}")
        if ids_keep is None:  # drawn as siamese_mask draws them, so both backbones mask alike
            num_patches = (x.shape[-2] // p) * (x.shape[-1] // p)
            k = resolve_keep(keep, num_patches)
            ids_keep = random_ids_keep(x.shape[0], num_patches, k, generator=generator, device=x.device)
        return fastcon.mask_image(x, p, ids_keep), ids_keep

    def forward_features(self, x, keep=None, ids_keep=None, generator=None, return_ids: bool = False):
        """(B, 2048, H/32, W/32) feature map of the (optionally masked) input."""
        x, ids_keep = self.mask(x, keep, ids_keep, generator)
        features = self.backbone.forward_features(x)
        return (features, ids_keep) if return_ids else features

    def forward(self, x, keep=None, ids_keep=None, generator=None) -> torch.Tensor:
        return self.backbone.forward_head(self.forward_features(x, keep, ids_keep, generator), pre_logits=True)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[stem (stride 2), layer1 (4), layer2 (8), layer3 (16), layer4 (32)] feature maps."""
        r = self.backbone
        x = r.act1(r.bn1(r.conv1(x)))
        out = [x]
        x = r.maxpool(x)
        for stage in (r.layer1, r.layer2, r.layer3, r.layer4):
            x = stage(x)
            out.append(x)
        return out
