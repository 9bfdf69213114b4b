"""Two-view training batches from a prepared folder: ``make_loader`` (the one place that picks a
backend) and the torch backend.

Both backends (DALI in ``fastcon.data.dali``, torch here) take the tile order and the view
ROIs from ``fastcon.data.views``, so for the same settings they yield the same tiles in the
same order with the same crops and flips; they differ only in who does the work.
"""

from __future__ import annotations

import functools
import os
import signal

import numpy as np
import torch
import torch.nn.functional as F

from fastcon import _checks
from fastcon.data.dali import DALILoader
from fastcon.data.dataset import TileDataset
from fastcon.data.twoview import TwoViewLoader
from fastcon.data.views import EpochPlan

BACKENDS = ("auto", "dali", "torch")


def render_views(tiles: torch.Tensor, rois: torch.Tensor, crop_size: int, mean, std) -> torch.Tensor:
    """Resample ``rois`` (B, 4: y0, x0, y1, x1) of ``tiles`` (B, C, H, W) to crop_size, normalised.

    Bilinear at pixel centres with border pixels repeated and no antialiasing: the same
    samples as ``nvidia.dali.fn.resize(roi_start, roi_end, antialias=False)``.
    """
    b, _, h, w = tiles.shape
    steps = (torch.arange(crop_size, dtype=torch.float32) + 0.5) / crop_size  # (S,)
    y0, x0, y1, x1 = rois.unbind(-1)
    ys = y0[:, None] + steps[None] * (y1 - y0)[:, None]  # (B, S) tile pixel coordinates
    xs = x0[:, None] + steps[None] * (x1 - x0)[:, None]
    gy = (ys * (2.0 / h) - 1.0)[:, :, None].expand(b, crop_size, crop_size)
    gx = (xs * (2.0 / w) - 1.0)[:, None, :].expand(b, crop_size, crop_size)
    out = F.grid_sample(
        tiles, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="border", align_corners=False
    )
    return (out - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------
# torch backend


class _StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches, keyed by (epoch, step).

    ``read_tile``: the dataset's tile reader (``.npy`` files, or band-file windows on ``--store raw``).
    """

    def __init__(self, plan: EpochPlan, read_tile, crop_size: int, mean, std):
        self.plan, self.read_tile, self.crop_size = plan, read_tile, crop_size
        self.mean, self.std = torch.as_tensor(mean), torch.as_tensor(std)
        self._orders = {}

    def _order(self, epoch):
        if epoch not in self._orders:
            self._orders = {epoch: self.plan.order(epoch)}  # one epoch at a time: orders can be large
        return self._orders[epoch]

    def __getitem__(self, key):
        epoch, step = key
        p = self.plan
        n = p.batch_size_at(step)
        indices = self._order(epoch)[step * p.batch_size : step * p.batch_size + n]
        tiles = torch.from_numpy(np.stack([self.read_tile(i) for i in indices]).astype(np.float32))
        rois = torch.from_numpy(p.rois(epoch, step)[:, :n])
        view1 = render_views(tiles, rois[0], self.crop_size, self.mean, self.std)
        view2 = render_views(tiles, rois[1], self.crop_size, self.mean, self.std) if p.augment else view1
        return view1, view2, indices

    def __len__(self):
        return self.plan.steps_per_epoch


class _StepSampler(torch.utils.data.Sampler):
    """Yields the (epoch, step) keys of the epoch being iterated."""

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.epoch, self.start = 0, 0

    def __iter__(self):
        return iter([(self.epoch, s) for s in range(self.start, self.steps_per_epoch)])

    def __len__(self):
        return self.steps_per_epoch - self.start


class TorchLoader(TwoViewLoader):
    """The torch ``DataLoader`` backend: worker processes load whole batches and cut the views."""

    backend = "torch"

    def __init__(self, dataset, plan, *, pin_memory: bool | None = None, **kwargs):
        super().__init__(dataset, plan, **kwargs)
        batches = _StepBatches(plan, dataset.read_tile, self.crop_size, dataset.mean, dataset.std)
        self._sampler = _StepSampler(plan.steps_per_epoch)
        workers = self.num_workers
        self._dataloader = torch.utils.data.DataLoader(
            batches,
            batch_size=None,
            sampler=self._sampler,
            num_workers=workers,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            persistent_workers=workers > 0,  # the plan is a function of the key: no per-epoch restart
            prefetch_factor=2 if workers > 0 else None,
            worker_init_fn=functools.partial(_worker_init, _main_exiting_flag()) if workers > 0 else None,
        )

    def _batches(self, epoch, start):
        self._sampler.epoch, self._sampler.start = epoch, start
        for view1, view2, indices in self._dataloader:
            yield self._finish(view1, view2, indices)


def _worker_init(main_exiting, _):
    torch.set_num_threads(1)  # one batch per worker process; the processes share the cores
    # SLURM, torchrun, `timeout` and Ctrl-C signal the whole process group: a worker leaves
    # stopping to the main process, which checkpoints first (docs/faults.md). SIGTERM still ends
    # it once the main process exits: multiprocessing stops daemonic workers with it then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, functools.partial(_worker_sigterm, main_exiting))


def _worker_sigterm(main_exiting, signum, _frame):
    if main_exiting.value:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


_MAIN_EXITING = None


def _main_exiting_flag():
    """Shared with the worker processes; set by this process's exit (before multiprocessing's own
    exit hook, which was registered earlier and so runs later)."""
    global _MAIN_EXITING
    if _MAIN_EXITING is None:
        import atexit
        import multiprocessing

        _MAIN_EXITING = multiprocessing.RawValue("b", 0)
        atexit.register(setattr, _MAIN_EXITING, "value", 1)
    return _MAIN_EXITING


# --------------------------------------------------------------------------------------------
# the factory


def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return False, f"nvidia-dali is not installed ({e})"
    return True, ""


def _default_shard(shard_id, num_shards):
    if shard_id is not None and num_shards is not None:
        return shard_id, num_shards
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if shard_id is None else shard_id), (
            dist.get_world_size() if num_shards is None else num_shards
        )
    return (0 if shard_id is None else shard_id), (1 if num_shards is None else num_shards)


def make_loader(
    root,
    batch_size: int,
    *,
    backend: str = "auto",
    crop_size: int | None = None,
    scale=(0.2, 1.0),
    ratio=(3 / 4, 4 / 3),
    hflip: bool = True,
    vflip: bool = True,
    augment: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    shard_id: int | None = None,
    num_shards: int | None = None,
    drop_last: bool = True,
    indices=None,
    labels: str = "fractions",
    num_workers: int | None = None,
    dali_device: str = "auto",
    epoch: int = 0,
    step: int = 0,
) -> TwoViewLoader:
    """Two-view batches of a prepared folder; the full description is in ``fastcon.data``."""
    dataset = root if isinstance(root, TileDataset) else TileDataset(root)
    if indices is not None:
        dataset = dataset.subset(indices)
    batch_size = _checks.integer("batch_size", batch_size, low=1)
    _checks.choice("backend", backend, BACKENDS)
    crop_size = dataset.tile_size if crop_size is None else _checks.integer("crop_size", crop_size, low=1)
    scale = _pair("scale", scale, 0.0, 1.0)
    ratio = _pair("ratio", ratio, 0.0, None)
    for name, v in (("hflip", hflip), ("vflip", vflip), ("augment", augment), ("shuffle", shuffle)):
        _checks.boolean(name, v)
    _checks.boolean("drop_last", drop_last)
    seed = _checks.integer("seed", seed, low=0)
    shard_id, num_shards = _default_shard(shard_id, num_shards)
    num_shards = _checks.integer("num_shards", num_shards, low=1)
    shard_id = _checks.integer("shard_id", shard_id, low=0, high=num_shards - 1)
    _checks.choice("labels", labels, ("fractions", "multihot"))
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    num_workers = _checks.integer("num_workers", num_workers, low=0)
    _checks.choice("dali_device", dali_device, ("auto", "cpu", "gpu"))
    if len(dataset) == 0:
        raise ValueError(f"{dataset.root} holds no tiles to load (indices select {len(dataset)})")

    if backend == "auto":
        # DALI wins where it can read into GPU memory; on a CPU-only machine the two are about as
        # fast (benchmarks/test_data.py: either wins by up to 1.8x from run to run on 2 cores) and
        # the torch workers start quicker
        ok, _ = dali_available()
        backend = "dali" if ok and torch.cuda.is_available() else "torch"
    plan = EpochPlan(
        dataset.indices,
        batch_size=batch_size,
        tile_size=dataset.tile_size,
        seed=seed,
        shuffle=shuffle,
        shard_id=shard_id,
        num_shards=num_shards,
        drop_last=drop_last,
        augment=augment,
        scale=scale,
        ratio=ratio,
        hflip=hflip,
        vflip=vflip,
    )
    common = dict(crop_size=crop_size, label_kind=labels, num_workers=num_workers)
    if backend == "dali":
        ok, why = dali_available()
        if not ok:
            raise RuntimeError(f"backend='dali' needs NVIDIA DALI: {why}; use backend='torch'")
        loader = DALILoader(dataset, plan, device=dali_device, **common)
    else:
        loader = TorchLoader(dataset, plan, **common)
    loader.set_epoch(epoch, step)
    return loader


def _pair(name, value, low, high):
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise TypeError(f"{name} must be a (min, max) pair, got {value!r}")
    a = _checks.real(f"{name}[0]", value[0], low=low, high=high, low_open=True)
    b = _checks.real(f"{name}[1]", value[1], low=low, high=high, low_open=True)
    if a > b:
        raise ValueError(f"{name} must be (min, max) with min <= max, got {value!r}")
    return (a, b)
