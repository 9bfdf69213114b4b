"""The loader interface both backends implement: position, resume, metadata and the common batch.

``make_loader`` (``fastcon.data.loader``) picks a backend; the backends (``TorchLoader`` in
``fastcon.data.loader``, ``DALILoader`` in ``fastcon.data.dali``) subclass ``TwoViewLoader``
and implement ``_batches``. This module imports neither, so the import graph has no cycle.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fastcon import _checks
from fastcon.data.dataset import TileDataset
from fastcon.data.views import EpochPlan


class TwoViewLoader:
    """An iterable of two-view batches, one epoch per ``iter()``; see ``fastcon.data.make_loader``.

    Position: ``epoch`` and ``step`` (the next batch to yield). Iterating yields the batches of
    ``epoch`` from ``step`` on, and afterwards moves to the next epoch at step 0.
    ``set_epoch(epoch, step)`` / ``load_state_dict(state)`` jump anywhere, deterministically.
    """

    backend = "base"

    def __init__(self, dataset: TileDataset, plan: EpochPlan, *, crop_size: int, label_kind: str, num_workers: int):
        self.dataset, self.plan, self.crop_size = dataset, plan, crop_size
        self.label_kind, self.num_workers = label_kind, num_workers
        if plan.steps_per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} tiles make no batch of {plan.batch_size} on each of {plan.num_shards} shard(s) "
                "with drop_last=True; lower batch_size or pass drop_last=False"
            )
        self._labels = torch.from_numpy(
            dataset.labels if label_kind == "fractions" else dataset.multihot.astype(np.float32)
        )
        self._scene_ids = torch.from_numpy(dataset.scene_ids)
        self.epoch, self.step = 0, 0

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    @property
    def seed(self) -> int:
        return self.plan.seed

    # the dataset's metadata, for building the model and logging
    @property
    def band_names(self) -> tuple[str, ...]:
        return self.dataset.band_names

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.dataset.class_names

    @property
    def mean(self) -> np.ndarray:
        return self.dataset.mean

    @property
    def std(self) -> np.ndarray:
        return self.dataset.std

    @property
    def num_tiles(self) -> int:
        """Tiles this loader draws from (all shards together)."""
        return len(self.dataset)

    # ---------------------------------------------------------------- position

    def __len__(self) -> int:
        """Batches per epoch on this shard (the same on every shard)."""
        return self.plan.steps_per_epoch

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        self.epoch = _checks.integer("epoch", epoch, low=0)
        self.step = _checks.integer("step", step, low=0, high=len(self))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the state was saved with seed {state['seed']}, this loader uses seed {self.seed}")
        self.set_epoch(state["epoch"], state["step"])

    # ---------------------------------------------------------------- iteration

    def _finish(self, view1, view2, indices: np.ndarray) -> dict:
        """The common batch: views plus labels, scene ids and tile ids looked up by tile index."""
        idx = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
        labels, scene_ids = self._labels[idx], self._scene_ids[idx]
        if view1.is_cuda:
            labels = labels.to(view1.device, non_blocking=True)
            scene_ids = scene_ids.to(view1.device, non_blocking=True)
        return {
            "view1": view1,
            "view2": view2,
            "labels": labels,
            "scene_ids": scene_ids,
            "tile_ids": [self.dataset.ids[i] for i in idx.tolist()],
            "indices": idx,
        }

    def __iter__(self) -> Iterator[dict]:
        epoch, start = self.epoch, self.step
        for step, batch in enumerate(self._batches(epoch, start), start):
            self.step = step + 1  # a checkpoint taken after this batch resumes with the next one
            yield batch
        self.epoch, self.step = epoch + 1, 0

    def _batches(self, epoch: int, start: int) -> Iterator[dict]:
        raise NotImplementedError

    def __repr__(self) -> str:
        p = self.plan
        return (
            f"{type(self).__name__}({len(self.dataset)} tiles, batch {p.batch_size}, crop {self.crop_size}, "
            f"{len(self)} steps/epoch, shard {p.shard_id}/{p.num_shards}, epoch {self.epoch} step {self.step})"
        )
