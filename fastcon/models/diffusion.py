"""SwiMDiff's diffusion branch: a light UNet-style decoder over the shared encoder's features.

The encoder sees the noised image ``x_t``; ``DiffusionDecoder`` takes its multi-scale maps
(``encoder.forward_pyramid(x_t)``), a sinusoidal embedding of the timestep ``t`` and ``x_t``
itself, and predicts the noise (or x0 / v) at input resolution for any band count:

- ViT encoders give maps of several blocks, all at the patch stride; a DPT-style neck turns them
  into strides p/4, p/2, p and 2p (transposed convs, identity, strided conv).
- Top-down path: from the coarsest map, upsample (bilinear), concatenate the next finer lateral
  map (1x1 conv), and apply a residual conv block whose GroupNorm is modulated by the timestep
  (FiLM: ``h * (1 + scale(t)) + shift(t)``, zero-initialised so every block starts as plain).
- Full resolution: the last map is upsampled to H x W and fused with a conv stem of ``x_t``
  (per-pixel noise cannot be recovered from stride >= 2 features alone), then a 3x3 conv gives
  ``in_chans`` outputs.

``diffusion_loss(encoder, decoder, schedule, x0, seed=...)`` draws timesteps, noises ``x0`` with
``schedule.q_sample`` (seeded, so the noise is regenerated, never stored) and returns
``schedule.loss`` of the decoder's prediction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B, dim) sinusoidal embedding: [cos(t w_k), sin(t w_k)], w_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class FiLMBlock(nn.Module):
    """Residual block: GN -> SiLU -> conv3x3 -> GN -> FiLM(t) -> SiLU -> conv3x3, plus a (1x1) skip."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.film = nn.Linear(time_dim, 2 * out_channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class DPTNeck(nn.Module):
    """Same-stride ViT maps -> a pyramid: the i-th of 4 maps rescaled by 4, 2, 1, 1/2 (DPT reassemble)."""

    def __init__(self, channels: list[int], out_channels: list[int]):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"the ViT neck takes 4 maps, got {len(channels)}")
        c = channels
        self.layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(c[0], out_channels[0], 2, stride=2),
                    nn.GELU(),
                    nn.ConvTranspose2d(out_channels[0], out_channels[0], 2, stride=2),
                ),
                nn.ConvTranspose2d(c[1], out_channels[1], 2, stride=2),
                nn.Conv2d(c[2], out_channels[2], 1),
                nn.Conv2d(c[3], out_channels[3], 3, stride=2, padding=1),
            ]
        )

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(m) for layer, m in zip(self.layers, maps)]


class DiffusionDecoder(nn.Module):
    """UNet-style decoder over multi-scale encoder maps, conditioned on the timestep.

    ``feature_channels`` / ``feature_strides``: the encoder's maps, fine to coarse (an encoder's
    ``pyramid_channels`` / ``pyramid_strides``; ``DiffusionDecoder.for_encoder`` reads them).
    Equal strides (a ViT) get the DPT neck. ``width``: channels at full resolution; level i uses
    ``min(width * 2**(i + 1), 8 * width)``.
    """

    def __init__(
        self,
        in_chans: int,
        feature_channels: list[int],
        feature_strides: list[int],
        *,
        width: int = 64,
        time_dim: int = 256,
    ):
        super().__init__()
        if len(feature_channels) != len(feature_strides) or not feature_channels:
            raise ValueError("feature_channels and feature_strides must be non-empty and of the same length")
        self.in_chans = in_chans
        self.time_dim = time_dim
        levels = len(feature_channels)
        dims = [min(width * 2 ** (i + 1), 8 * width) for i in range(levels)]
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        if len(set(feature_strides)) == 1 and levels > 1:  # ViT: all maps at the patch stride
            self.neck = DPTNeck(list(feature_channels), dims)
            self.lateral = nn.ModuleList([nn.Identity() for _ in dims])
        else:
            self.neck = None
            self.lateral = nn.ModuleList([nn.Conv2d(c, d, 1) for c, d in zip(feature_channels, dims)])
        self.top = FiLMBlock(dims[-1], dims[-1], time_dim)
        # up[i] fuses the upsampled level i+1 with lateral i
        self.up = nn.ModuleList([FiLMBlock(dims[i + 1] + dims[i], dims[i], time_dim) for i in range(levels - 1)])
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1)
        self.full = FiLMBlock(dims[0] + width, width, time_dim)
        self.out = nn.Sequential(
            nn.GroupNorm(_groups(width), width), nn.SiLU(), nn.Conv2d(width, in_chans, 3, padding=1)
        )

    @classmethod
    def for_encoder(cls, encoder: nn.Module, **kwargs) -> DiffusionDecoder:
        from fastcon.models.weights import input_channels, timm_backbone

        return cls(
            input_channels(timm_backbone(encoder)),
            list(encoder.pyramid_channels),
            list(encoder.pyramid_strides),
            **kwargs,
        )

    def forward(self, features: list[torch.Tensor], t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """Prediction (B, in_chans, H, W) from the encoder maps of ``x_t``, the timesteps ``t`` (B,) and ``x_t``."""
        temb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x_t.dtype))
        maps = self.neck(features) if self.neck is not None else features
        lat = [layer(m) for layer, m in zip(self.lateral, maps)]
        h = self.top(lat[-1], temb)
        for i in range(len(lat) - 2, -1, -1):
            h = F.interpolate(h, size=lat[i].shape[-2:], mode="bilinear", align_corners=False)
            h = self.up[i](torch.cat([h, lat[i]], dim=1), temb)
        h = F.interpolate(h, size=x_t.shape[-2:], mode="bilinear", align_corners=False)
        h = self.full(torch.cat([h, self.stem(x_t)], dim=1), temb)
        return self.out(h)


def diffusion_loss(
    encoder: nn.Module,
    decoder: DiffusionDecoder,
    schedule,
    x0: torch.Tensor,
    *,
    seed: int | None = None,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    target: str = "epsilon",
    reduction: str = "mean",
) -> torch.Tensor:
    """SwiMDiff's denoising loss through the shared encoder.

    ``t`` (B,) int64 timesteps, drawn with ``schedule.sample_timesteps(B, generator)`` when None.
    ``seed`` keys the counter-based noise: ``q_sample`` draws it and ``loss`` regenerates the
    same noise, so it is never stored; use a new seed every step (e.g. base seed + step). An
    explicit ``noise`` tensor (x0's shape) replaces the seed.
    """
    if (seed is None) == (noise is None):
        raise ValueError("give exactly one of seed (noise drawn in the kernels) or noise (a tensor)")
    if t is None:
        t = schedule.sample_timesteps(x0.shape[0], generator)
    t = t.to(x0.device)
    x_t, _ = schedule.q_sample(x0, t, noise, seed=seed)
    pred = decoder(encoder.forward_pyramid(x_t), t, x_t)
    return schedule.loss(pred, x0, t, noise=noise, seed=seed, target=target, reduction=reduction)
