"""Which tiles an epoch's steps hold, and where each view of each tile is cut: shared by both loaders.

Everything random is a pure function of ``(seed, epoch, ...)``: the tile order of an epoch
from ``(seed, epoch)``, each step's crops and flips from ``(seed, epoch, shard_id, step)``. So
the DALI and the torch loaders produce the same batches, and a run resumed at ``(epoch,
step)`` sees exactly the batches the uninterrupted run would have seen.

A view is a region of interest (ROI) in tile pixel coordinates, ``(y0, x0, y1, x1)``, resampled
bilinearly to ``crop_size`` x ``crop_size``; a flip swaps the ROI's ends (``y0 > y1`` for a
vertical flip), which is how ``nvidia.dali.fn.resize`` expresses it. Output pixel ``i`` samples
the tile at ``y0 + (i + 0.5) * (y1 - y0) / crop_size`` (pixel-centre convention, border pixels
repeated), without antialiasing: exactly what ``fn.resize(..., antialias=False)`` and
``torch.nn.functional.grid_sample(..., align_corners=False, padding_mode="border")`` compute.
"""

from __future__ import annotations

import math

import numpy as np


def shard_order(
    tile_indices: np.ndarray,
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    shard_id: int,
    num_shards: int,
    drop_last: bool,
) -> np.ndarray:
    """This shard's tile indices for one epoch, in order.

    One permutation of all tiles per epoch (the same on every rank), dealt out round-robin
    like ``torch.utils.data.DistributedSampler``: every shard gets the same count, by dropping
    the tail (``drop_last``) or by repeating tiles from the start.
    """
    n = len(tile_indices)
    order = tile_indices[np.random.default_rng([seed, epoch]).permutation(n)] if shuffle else tile_indices
    per_shard = n // num_shards if drop_last else math.ceil(n / num_shards)
    total = per_shard * num_shards
    if total > n:
        order = np.concatenate([order, np.resize(order, total - n)])
    return order[:total][shard_id::num_shards]


def num_steps(per_shard: int, batch_size: int, drop_last: bool) -> int:
    return per_shard // batch_size if drop_last else math.ceil(per_shard / batch_size)


def random_resized_crop(rng, n: int, height: int, width: int, scale, ratio, attempts: int = 10):
    """torchvision's RandomResizedCrop box sampling, for n tiles at once: (y0, x0, h, w) int arrays."""
    area = height * width
    target = area * rng.uniform(scale[0], scale[1], size=(n, attempts))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, attempts)))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    h, w = h[rows, first], w[rows, first]
    # no attempt fitted: the largest box of an allowed aspect ratio, centred (as torchvision)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    fallback = ~ok.any(axis=1)
    h, w = np.where(fallback, fh, h), np.where(fallback, fw, w)
    y0 = np.floor(rng.random(n) * (height - h + 1)).astype(np.int64)
    x0 = np.floor(rng.random(n) * (width - w + 1)).astype(np.int64)
    y0 = np.where(fallback, (height - h) // 2, y0)
    x0 = np.where(fallback, (width - w) // 2, x0)
    return y0, x0, h, w


def view_rois(
    *,
    seed: int,
    epoch: int,
    shard_id: int,
    step: int,
    n: int,
    tile_size: int,
    augment: bool,
    scale=(0.2, 1.0),
    ratio=(3 / 4, 4 / 3),
    hflip: bool = True,
    vflip: bool = True,
) -> np.ndarray:
    """ROIs of both views of the n tiles of one step: float32 (2, n, 4) rows ``(y0, x0, y1, x1)``."""
    rois = np.empty((2, n, 4), dtype=np.float32)
    if not augment:
        rois[:] = (0, 0, tile_size, tile_size)
        return rois
    rng = np.random.default_rng([seed, epoch, shard_id, step])
    for v in range(2):
        y0, x0, h, w = random_resized_crop(rng, n, tile_size, tile_size, scale, ratio)
        flip_x = (rng.random(n) < 0.5) & hflip
        flip_y = (rng.random(n) < 0.5) & vflip
        rois[v, :, 0] = np.where(flip_y, y0 + h, y0)
        rois[v, :, 2] = np.where(flip_y, y0, y0 + h)
        rois[v, :, 1] = np.where(flip_x, x0 + w, x0)
        rois[v, :, 3] = np.where(flip_x, x0, x0 + w)
    return rois


class EpochPlan:
    """Which tiles and views each step of each epoch holds on one shard (small and picklable)."""

    def __init__(
        self,
        tile_indices: np.ndarray,
        *,
        batch_size: int,
        tile_size: int,
        seed: int,
        shuffle: bool,
        shard_id: int,
        num_shards: int,
        drop_last: bool,
        augment: bool,
        scale,
        ratio,
        hflip: bool,
        vflip: bool,
    ):
        self.tile_indices = np.asarray(tile_indices, dtype=np.int64)
        self.batch_size, self.tile_size, self.seed, self.shuffle = batch_size, tile_size, seed, shuffle
        self.shard_id, self.num_shards, self.drop_last = shard_id, num_shards, drop_last
        self.augment, self.scale, self.ratio, self.hflip, self.vflip = augment, scale, ratio, hflip, vflip
        n = len(self.tile_indices)
        self.samples_per_shard = n // num_shards if drop_last else math.ceil(n / num_shards)
        self.steps_per_epoch = num_steps(self.samples_per_shard, batch_size, drop_last)

    def order(self, epoch: int) -> np.ndarray:
        """This shard's tile indices of one epoch, padded (by repetition) to whole batches."""
        order = shard_order(
            self.tile_indices,
            epoch=epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            drop_last=self.drop_last,
        )
        full = self.steps_per_epoch * self.batch_size
        order = order[:full]
        return np.resize(order, full) if len(order) < full else order

    def batch_size_at(self, step: int) -> int:
        """The real size of a batch: the last one is short without drop_last."""
        return min(self.batch_size, self.samples_per_shard - step * self.batch_size)

    def rois(self, epoch: int, step: int) -> np.ndarray:
        """(2, batch_size, 4) view ROIs of one step (all rows, also the padding of a short batch)."""
        return view_rois(
            seed=self.seed,
            epoch=epoch,
            shard_id=self.shard_id,
            step=step,
            n=self.batch_size,
            tile_size=self.tile_size,
            augment=self.augment,
            scale=self.scale,
            ratio=self.ratio,
            hflip=self.hflip,
            vflip=self.vflip,
        )
