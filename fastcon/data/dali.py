"""The NVIDIA DALI backend: ``fn.readers.numpy`` + ``fn.resize`` per view, in a DALI pipeline.

One pipeline per epoch (building one takes milliseconds): its reader gets this shard's tile
files in the epoch's order (``EpochPlan.order``) and does no shuffling or sharding of its
own, and an ``external_source`` feeds each step's view ROIs (``EpochPlan.rois``), so the
batches are exactly those of the torch backend. On a GPU the reader loads the ``.npy`` tiles
straight into GPU memory (``device="gpu"``, GPUDirect Storage where available) and the views
are cut there; elsewhere everything runs on the CPU (``device_id=None``).

Graph per step: tiles (uint16, CHW) -> for each view: ``fn.resize`` with ``roi_start`` /
``roi_end`` (crop, flip and resize in one op, output float32: the uint16 never leaves DALI)
-> ``fn.crop_mirror_normalize`` with the dataset mean/std. The file name of every sample
(``fn.get_property(key="source_info")``) comes out too: labels and scene ids are looked up
from it, and it is checked against the planned order, so a view can never be paired with
another tile's labels.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from fastcon.data.loader import TwoViewLoader


class DALILoader(TwoViewLoader):
    """DALI backend of ``make_loader``; ``device`` is "gpu" (reader into GPU memory) or "cpu".

    DDP: each rank's pipeline reads only its own shard of the epoch (``EpochPlan.order``); on a
    GPU the pipeline runs on ``torch.cuda.current_device()`` (set it per rank first).
    """

    backend = "dali"

    def __init__(self, dataset, plan, *, device: str = "auto", prefetch_queue_depth: int = 2, **kwargs):
        super().__init__(dataset, plan, **kwargs)
        if device == "auto":
            device = "gpu" if torch.cuda.is_available() else "cpu"
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("dali_device='gpu' needs a CUDA device; use dali_device='cpu'")
        self.device = device
        self.prefetch_queue_depth = prefetch_queue_depth
        self._file_of = [os.path.relpath(f, dataset.root) for f in dataset.files]

    def _pipeline(self, epoch: int, start: int):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        plan, ds = self.plan, self.dataset
        order = plan.order(epoch)[start * plan.batch_size :]
        files = [self._file_of[i] for i in order]
        steps = plan.steps_per_epoch
        num_views = 2 if plan.augment else 1  # unaugmented views are the same whole tile

        def rois(info):
            # DALI may prefetch past the epoch's end; those batches are never read
            r = plan.rois(epoch, min(start + info.iteration, steps - 1))
            return [np.ascontiguousarray(r[v, :, a:b]) for v in range(num_views) for a, b in ((0, 2), (2, 4))]

        device_id = torch.cuda.current_device() if self.device == "gpu" else None
        mean, std = ds.mean.tolist(), ds.std.tolist()
        crop = self.crop_size

        @pipeline_def(
            batch_size=plan.batch_size,
            num_threads=max(1, self.num_workers),
            device_id=device_id,
            prefetch_queue_depth=self.prefetch_queue_depth,
        )
        def pipeline():
            tiles = fn.readers.numpy(
                device=self.device,
                file_root=ds.root,
                files=files,
                random_shuffle=False,
                name="reader",
            )
            source = fn.pad(fn.get_property(tiles, key="source_info"), fill_value=0)
            tiles = fn.reshape(tiles, layout="CHW")
            roi = fn.external_source(
                source=rois, num_outputs=2 * num_views, batch=True, batch_info=True, dtype=types.FLOAT
            )

            def view(roi_start, roi_end):
                x = fn.resize(
                    tiles,
                    roi_start=roi_start,
                    roi_end=roi_end,
                    size=[crop, crop],
                    interp_type=types.INTERP_LINEAR,
                    antialias=False,
                    dtype=types.FLOAT,
                )
                return fn.crop_mirror_normalize(x, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")

            view1 = view(roi[0], roi[1])
            view2 = view(roi[2], roi[3]) if num_views == 2 else view1
            return view1, view2, source

        pipe = pipeline()
        pipe.build()
        return pipe

    def _batches(self, epoch, start):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        plan = self.plan
        if start >= plan.steps_per_epoch:
            return
        pipe = self._pipeline(epoch, start)
        order = plan.order(epoch)
        it = DALIGenericIterator(
            [pipe],
            ["view1", "view2", "source"],
            reader_name="reader",
            last_batch_policy=LastBatchPolicy.DROP,  # the file list holds whole batches only
            auto_reset=False,
        )
        try:
            for step, out in enumerate(it, start):
                out = out[0]
                n = plan.batch_size_at(step)
                expected = order[step * plan.batch_size : step * plan.batch_size + n]
                indices = self._decode(out["source"][:n])
                if not np.array_equal(indices, expected):
                    raise RuntimeError(
                        f"DALI delivered tiles {indices[:4].tolist()}... where the plan has {expected[:4].tolist()}... "
                        f"(epoch {epoch}, step {step}): views and labels would not line up"
                    )
                yield self._finish(out["view1"][:n], out["view2"][:n], indices)
        finally:
            del it, pipe  # free the pipeline's threads and buffers before the next epoch

    def _decode(self, source: torch.Tensor) -> np.ndarray:
        """Tile indices from the padded file-name bytes that DALI returns per sample."""
        raw = source.cpu().numpy()
        ds = self.dataset
        out = np.empty(len(raw), dtype=np.int64)
        for k, row in enumerate(raw):
            name = bytes(row).rstrip(b"\0").decode()
            out[k] = ds.index_of(os.path.splitext(os.path.basename(name))[0])
        return out
