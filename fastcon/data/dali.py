"""The NVIDIA DALI backend: tiles from ``.npy`` files or decoded from the band files, views by ``fn.resize``.

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

On a ``--store raw`` dataset the tiles are decoded from the band files instead (``RawBands``):
one ``fn.readers.file`` per band, all fed the epoch's tiles in plan order (so the bands of a
sample stay together); ``fn.decoders.image_slice`` (``device="mixed"`` on a GPU: nvJPEG2000 /
nvImageCodec; ``"cpu"`` elsewhere; ``output_type=ANY_DATA``, ``dtype=UINT16``) decodes the
tile's window (plus a one-pixel margin for a resampled band; the decoder skips the rest where
the format allows); 20 m and 60 m bands are resampled onto the tile grid with GDAL's bilinear
rule (``fastcon.data.raw``); ``fn.cat`` stacks the bands in band-set order (HWC), and the views
are cut as above. The first band's file names are checked against the plan. A file that does
not decode stops the epoch with an error naming the file and the tiles of that step that use it.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from fastcon.data.raw import RawTiles
from fastcon.data.twoview import TwoViewLoader

_RESAMPLINGS = ("bilinear", "nearest")


class RawBands:
    """What the DALI graph needs to decode a ``--store raw`` dataset, checked once.

    Per band (band-set order): whether it is resampled (its windows are not whole pixels of the
    tile's size), its channel in the file and its nodata value (one per band over the dataset);
    per step: the decode windows and resize ROIs. Raises ValueError, before any pipeline is
    built, for what only rasterio does: a band in another CRS (reprojection), a band finer than
    the tile grid (downsampling), a resampling other than bilinear / nearest, or a band set
    that encodes values (Sentinel-1 dB).
    """

    def __init__(self, raw: RawTiles, info: dict):
        self.raw, self.size = raw, int(info["tile_size"])
        enc, names = info["encoding"], info["bands"]
        if (enc["offset"], enc["scale"]) != (0.0, 1.0):
            raise ValueError(
                f"backend='dali' decodes stored values as they are, but band set {info['band_set']!r} "
                f"encodes them (offset {enc['offset']}, scale {enc['scale']}); use backend='torch'"
            )
        if info["resampling"] not in _RESAMPLINGS:
            raise ValueError(
                "backend='dali' resamples bands bilinearly or by nearest neighbour; the dataset was prepared "
                f"with resampling={info['resampling']!r}: use backend='torch' (rasterio) or prepare again"
            )
        self.stored_nodata = float(enc["nodata"])
        self.nearest = info["resampling"] == "nearest"
        w = raw.windows
        if np.isnan(w).any():
            i, b = (int(v) for v in np.argwhere(np.isnan(w[..., 0]))[0])
            raise ValueError(
                f"tile {raw.ids[i]}: band {names[b]} ({raw.files[i, b]}) is in another CRS than the tile grid; "
                "backend='dali' does not reproject: use backend='torch'"
            )
        if (w[..., 2:] > self.size + 1e-6).any():
            b = int(np.argwhere(w[..., 2] > self.size + 1e-6)[0, 1])
            raise ValueError(
                f"band {names[b]} is finer than the tile grid (downsampling); backend='dali' only upsamples: "
                "use backend='torch'"
            )
        whole = (np.abs(w[..., :2] - np.round(w[..., :2])) < 1e-9).all(-1)
        same = (np.abs(w[..., 2:] - self.size) < 1e-9).all(-1)
        self.resampled = [not bool((whole[:, b] & same[:, b]).all()) for b in range(w.shape[1])]
        self.multiband = any(s["multiband"] for s in raw.scenes.values())
        self.channels, self.nodata = [], []
        for b in range(w.shape[1]):
            ch, nd = np.unique(raw.channels[:, b]), np.unique(raw.nodata[:, b])
            if len(ch) > 1 or len(nd) > 1:
                raise ValueError(
                    f"band {names[b]} is channel {ch.tolist()} / has nodata {nd.tolist()} in different files; "
                    "backend='dali' needs one channel and one nodata value per band: use backend='torch'"
                )
            self.channels.append(int(ch[0]))
            self.nodata.append(None if np.isnan(nd[0]) else float(nd[0]))

    @property
    def num_bands(self) -> int:
        return len(self.resampled)

    @property
    def num_args(self) -> int:
        """external_source outputs per step: start and shape per band, and ROI start / end when resampled."""
        return sum(4 if r else 2 for r in self.resampled)

    def step_args(self, indices: np.ndarray) -> list[np.ndarray]:
        """Per band: decode start (y, x), decode shape (h, w) and, when resampled, ROI start / end."""
        out = []
        for b in range(self.num_bands):
            col, row, w, h = self.raw.windows[indices, b].T
            if not self.resampled[b]:
                start = np.stack([np.round(row), np.round(col)], 1).astype(np.int32)
                out += [start, np.full_like(start, self.size)]
                continue
            bh, bw = self.raw.band_shapes[indices, b].T
            # the window's pixels and one more on each side: bilinear reads the neighbours
            y0, x0 = np.maximum(np.floor(row) - 1, 0), np.maximum(np.floor(col) - 1, 0)
            y1, x1 = np.minimum(np.ceil(row + h) + 1, bh), np.minimum(np.ceil(col + w) + 1, bw)
            out += [
                np.stack([y0, x0], 1).astype(np.int32),
                np.stack([y1 - y0, x1 - x0], 1).astype(np.int32),
                np.stack([row - y0, col - x0], 1).astype(np.float32),
                np.stack([row - y0 + h, col - x0 + w], 1).astype(np.float32),
            ]
        return out

    def graph(self, order: np.ndarray, args, decoder_device: str):
        """DALI nodes: the stacked tiles (float32 HWC, stored uint16 values) and the first band's file names."""
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types

        size, bands, k, first_source = self.size, [], 0, None
        linear, nn = types.INTERP_LINEAR, types.INTERP_NN
        for b in range(self.num_bands):
            data, _ = fn.readers.file(files=self.raw.files[order, b].tolist(), random_shuffle=False, name=f"band{b}")
            if first_source is None:
                first_source = fn.pad(fn.get_property(data, key="source_info"), fill_value=0)
            img = fn.decoders.image_slice(
                data,
                args[k],
                args[k + 1],
                axis_names="HW",
                normalized_anchor=False,
                normalized_shape=False,
                device=decoder_device,
                output_type=types.ANY_DATA,
                dtype=types.UINT16,
            )
            if self.multiband:
                img = img[:, :, self.channels[b] - 1 : self.channels[b]]
            x = fn.cast(img, dtype=types.FLOAT)
            fill = self.stored_nodata
            valid = None if self.nodata[b] is None else fn.cast(img != self.nodata[b], dtype=types.FLOAT)
            if not self.resampled[b]:  # the band's pixels are the tile's: copied, nodata re-marked
                k += 2
                bands.append(x if valid is None else x * valid + (1.0 - valid) * fill)
                continue

            def resize(t, interp, roi_start=args[k + 2], roi_end=args[k + 3]):
                return fn.resize(
                    t, roi_start=roi_start, roi_end=roi_end, size=[size, size], interp_type=interp, antialias=False
                )

            k += 4
            if self.nearest:
                v = resize(x, nn)
                if valid is not None:
                    centre = resize(valid, nn)
                    v = v * centre + (1.0 - centre) * fill
            elif valid is None:
                v = _rint(resize(x, linear), dmath)
            else:
                # GDAL's bilinear with nodata: weights renormalised over the valid source pixels,
                # and nodata where the source pixel under the output pixel centre is nodata
                centre = resize(valid, nn)
                mean = resize(x * valid, linear) / dmath.max(resize(valid, linear), 1e-6)
                v = _rint(mean, dmath) * centre + (1.0 - centre) * fill
            bands.append(dmath.clamp(v, 0.0, 65535.0))
        tiles = fn.reshape(fn.cat(*bands, axis=2), layout="HWC")
        return tiles, first_source


def _rint(v, dmath):
    """Round half to even, as ``np.rint`` in ``prepare``: floor(v + 0.5), one less on an odd tie."""
    r = dmath.floor(v + 0.5)
    return r - (r - v == 0.5) * (r - 2.0 * dmath.floor(r * 0.5))


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
        self.raw = RawBands(dataset.raw, dataset.info) if dataset.store == "raw" else None
        self._file_of = [os.path.relpath(f, dataset.root) for f in dataset.files] if self.raw is None else None

    def _pipeline(self, epoch: int, start: int):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        plan, ds, raw = self.plan, self.dataset, self.raw
        order = plan.order(epoch)[start * plan.batch_size :]
        steps = plan.steps_per_epoch
        num_views = 2 if plan.augment else 1  # unaugmented views are the same whole tile
        num_raw = raw.num_args if raw is not None else 0

        def step_args(info):
            # DALI may prefetch past the epoch's end; those batches are never read
            step = min(start + info.iteration, steps - 1)
            r = plan.rois(epoch, step)
            out = [np.ascontiguousarray(r[v, :, a:b]) for v in range(num_views) for a, b in ((0, 2), (2, 4))]
            if raw is not None:
                out += raw.step_args(order[(step - start) * plan.batch_size :][: plan.batch_size])
            return out

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
            args = fn.external_source(
                source=step_args, num_outputs=2 * num_views + num_raw, batch=True, batch_info=True
            )
            roi = args[: 2 * num_views]
            if raw is None:
                tiles = fn.readers.numpy(
                    device=self.device,
                    file_root=ds.root,
                    files=[self._file_of[i] for i in order],
                    random_shuffle=False,
                    name="band0",
                )
                source = fn.pad(fn.get_property(tiles, key="source_info"), fill_value=0)
                tiles = fn.reshape(tiles, layout="CHW")
            else:
                decoder = "mixed" if self.device == "gpu" else "cpu"
                tiles, source = raw.graph(order, args[2 * num_views :], decoder)

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
        step = start
        try:  # the iterator runs the first batches as it is made
            it = DALIGenericIterator(
                [pipe],
                ["view1", "view2", "source"],
                reader_name="band0",
                last_batch_policy=LastBatchPolicy.DROP,  # the file list holds whole batches only
                auto_reset=False,
            )
        except RuntimeError as e:
            raise self._decode_error(e, order, epoch, step) from e
        try:
            while True:
                try:
                    out = next(it)[0]
                except StopIteration:
                    return
                except RuntimeError as e:  # a DALI operator failed: a file that does not decode
                    raise self._decode_error(e, order, epoch, step) from e
                n = plan.batch_size_at(step)
                expected = order[step * plan.batch_size : step * plan.batch_size + n]
                indices = self._indices(out["source"][:n], expected)
                if not np.array_equal(indices, expected):
                    raise RuntimeError(
                        f"DALI delivered tiles {indices[:4].tolist()}... where the plan has {expected[:4].tolist()}... "
                        f"(epoch {epoch}, step {step}): views and labels would not line up"
                    )
                yield self._finish(out["view1"][:n], out["view2"][:n], indices)
                step += 1
        finally:
            del it, pipe  # free the pipeline's threads and buffers before the next epoch

    def _indices(self, source: torch.Tensor, expected: np.ndarray) -> np.ndarray:
        """Tile indices from the padded file-name bytes that DALI returns per sample.

        npy: the file name is the tile id. raw: the first band's file names must be those of
        the planned tiles (many tiles share a file), so the planned indices are returned when
        they agree and -1 where they do not.
        """
        names = [bytes(row).rstrip(b"\0").decode() for row in source.cpu().numpy()]
        if self.raw is not None:
            files = self.raw.raw.files[expected, 0]
            return np.where([a == os.fspath(b) for a, b in zip(names, files)], expected, -1)
        ds = self.dataset
        return np.array([ds.index_of(os.path.splitext(os.path.basename(n))[0]) for n in names], dtype=np.int64)

    def _decode_error(self, error: Exception, order: np.ndarray, epoch: int, step: int) -> Exception:
        """The DALI error, with the file it names (or the step's files) and the tiles that read it."""
        ds, plan = self.dataset, self.plan
        msg = str(error)
        # DALI reads ahead: the failing batch may be any of the queued ones
        ahead = order[step * plan.batch_size : (step + self.prefetch_queue_depth + 1) * plan.batch_size]
        files = ds.raw.files[ahead] if self.raw is not None else np.array([[ds.files[i]] for i in ahead], dtype=object)
        named = sorted({f for f in files.ravel() if f in msg})
        if not named and self.raw is not None:  # DALI names no file when it cannot tell the format
            named = _unreadable_headers(sorted(set(files.ravel())))
        if named:
            tiles = [ds.ids[i] for i, row in zip(ahead, files) if set(row) & set(named)]
            where = f"{', '.join(named)} (used by tile(s) {', '.join(tiles[:8])}{' ...' if len(tiles) > 8 else ''})"
        else:
            where = "one of the files of tiles " + ", ".join(ds.ids[i] for i in ahead[: plan.batch_size])
        lines = [line.strip() for line in msg.split("encountered:")[-1].splitlines() if line.strip()]
        first = lines[0] if lines else msg
        return RuntimeError(
            f"DALI could not decode {where} at epoch {epoch}, step {step} or the steps it had read ahead: {first}"
        )


def _unreadable_headers(files: list[str]) -> list[str]:
    """The files whose image header DALI cannot parse (``fn.peek_image_shape``, no decoding)."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def peek(path):
        data, _ = fn.readers.file(files=[path])
        return fn.peek_image_shape(data)

    bad = []
    for f in files:
        try:
            p = peek(f)
            p.build()
            p.run()
        except Exception:  # any failure to read the header is what we are looking for
            bad.append(f)
    return bad
