"""Pretrain an Earth-observation encoder with SoftCon or SwiMDiff, end to end.

    python examples/pretrain.py --config examples/configs/demo.yaml
    python examples/pretrain.py --config examples/configs/softcon_vits14_s2.yaml data.root=/data/ssl4eo optim.lr=3e-4
    torchrun --nproc-per-node 8 examples/pretrain.py --config examples/configs/softcon_vits14_s2.yaml
    python examples/pretrain.py --config ... --resume            # newest checkpoint in run.out_dir
    python examples/pretrain.py --config ... --resume PATH.ckpt

Every key is documented in examples/configs/defaults.yaml; a config file sets some, the command
line (`section.key=value`, or `--set section.key=value`) any. A run writes into `run.out_dir`:
config.yaml (resolved), metrics.csv, loss.png, summary.json, checkpoints/ and, at the end,
encoder.safetensors (timm layout: `timm.create_model(name, pretrained=True, num_classes=0,
in_chans=C, img_size=crop, **model.timm_kwargs, pretrained_cfg_overlay=dict(file=...))` loads
it; so does examples/evaluate.py).

The methods
- softcon: the online encoder sees a Siamese-masked view (only `mask.keep` of the patch tokens),
  then projector and predictor; an EMA teacher (encoder + projector) sees the other view whole.
  `fastcon.soft_contrastive_loss` pulls the prediction of tile i toward the teacher embedding of
  tile j in proportion to the cosine of their land-cover label vectors (not only j == i).
  `softcon.both_directions` also predicts view 1 from masked view 2.
- swimdiff: both views through encoder and projector (no teacher); crops of the same scene are
  positives (`scene_mode: positive`) or left out of the softmax (`ignore`); plus a diffusion
  branch: the shared encoder sees view 1 noised to a random timestep and a decoder predicts the
  noise. Total loss `lambda_c * L_C + lambda_d * L_D`.

Speed: bf16 autocast on GPUs, fused AdamW, channels_last for CNNs, DALI loading on GPUs, fastcon's
fused loss / masking / diffusion kernels, optional torch.compile and activation checkpointing,
gradient accumulation. Each metrics row logs images/s, the step time split into waiting for
data and computing, and peak memory.

Scale: under torchrun every rank trains on its shard of each batch (DDP); the contrastive loss
is the one of the global batch (`group=` of fastcon.soft_contrastive_loss, so negatives come from
every rank); only rank 0 logs and writes files.

Reliability: checkpoints hold model, teacher, optimiser, scheduler, step, every rank's RNG
states and the loader position, written atomically; `--resume` continues bit for bit on CPUs.
SIGTERM / SIGINT finish the current step, checkpoint and exit. A non-finite loss stops the run
naming the step (the last checkpoint stays as it was), or skips the step with
`train.skip_nonfinite: true`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import fastcon
from fastcon.data import TileDataset, make_loader, spatial_split
from fastcon.models import EMATeacher, create_encoder, predictor, projector, save_encoder
from fastcon.models.diffusion import DiffusionDecoder
from fastcon.train import (
    CheckpointDir,
    CheckpointError,
    Config,
    ConfigError,
    DistInfo,
    MetricsLog,
    StepTimer,
    StopRequest,
    all_ranks_any,
    collective_failure,
    derived_seed,
    init_distributed,
    load_config,
    peak_memory_mib,
    plot_metrics,
    rng_state,
    save_config,
    seed_everything,
    set_rng_state,
    shutdown_distributed,
    step_generator,
    warmup_cosine,
)

DEFAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "defaults.yaml")
METHODS = ("softcon", "swimdiff")
LOSS_TERMS = {"softcon": ("loss",), "swimdiff": ("loss", "loss_contrastive", "loss_diffusion")}


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN / inf (the message names the step)."""


# =============================================================================================
# 1. the networks


class Branch(nn.Module):
    """Encoder then projector: what the EMA teacher copies."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.projector = encoder, head

    def forward(self, x, keep=None, generator=None):
        return self.projector(self.encoder(x, keep=keep, generator=generator))


class SoftConStudent(nn.Module):
    """Online network: masked view(s) -> encoder -> projector -> predictor."""

    def __init__(self, online: Branch, head: nn.Module, keep, both_directions: bool):
        super().__init__()
        self.online, self.predictor = online, head
        self.keep, self.both_directions = keep, both_directions

    def forward(self, view1, view2, generator):
        # both directions in one encoder pass over the concatenated batch
        x = torch.cat([view1, view2]) if self.both_directions else view1
        return self.predictor(self.online(x, keep=self.keep, generator=generator))


class SwiMDiffStudent(nn.Module):
    """Both views -> encoder -> projector, plus the diffusion branch through the same encoder."""

    def __init__(self, online: Branch, decoder: DiffusionDecoder, schedule: fastcon.NoiseSchedule, keep, target: str):
        super().__init__()
        self.online, self.decoder, self.schedule = online, decoder, schedule
        self.keep, self.target = keep, target

    def forward(self, view1, view2, generator, t, noise_seed):
        z = self.online(torch.cat([view1, view2]), keep=self.keep, generator=generator)
        z1, z2 = z.chunk(2)
        # the noise is drawn inside the fused kernels from noise_seed and regenerated by the loss
        x_t, _ = self.schedule.q_sample(view1, t, seed=noise_seed)
        pred = self.decoder(self.online.encoder.forward_pyramid(x_t), t, x_t)
        loss_d = self.schedule.loss(pred.float(), view1, t, seed=noise_seed, target=self.target)
        return z1, z2, loss_d


def build_networks(cfg: Config, bands, device):
    """(student, teacher or None, encoder) on ``device``."""
    m = cfg.model
    encoder = create_encoder(
        m.name, bands=list(bands), img_size=cfg.data.crop_size, weights=m.weights, strategy=m.strategy, **m.timm_kwargs
    )
    if hasattr(encoder, "mask_patch"):  # CNNs mask image cells instead of tokens
        encoder.mask_patch = cfg.mask.patch
    if m.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    online = Branch(encoder, projector(encoder.num_features, m.proj_hidden, m.proj_dim, m.proj_layers))
    keep = None if cfg.mask.keep in (None, 1.0) else cfg.mask.keep  # None: the encoder sees every token
    if cfg.method == "softcon":
        student = SoftConStudent(
            online, predictor(m.proj_dim, m.pred_hidden, m.pred_layers), keep, cfg.softcon.both_directions
        )
        teacher = EMATeacher(online, base_momentum=cfg.softcon.teacher_momentum, total_steps=cfg.train.steps)
    else:
        s = cfg.swimdiff
        schedule = fastcon.NoiseSchedule(s.schedule, timesteps=s.timesteps)
        decoder = DiffusionDecoder.for_encoder(encoder, width=s.decoder_width)
        student, teacher = SwiMDiffStudent(online, decoder, schedule, keep, s.target), None
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    if channels_last(cfg, device):
        student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    return student, teacher, encoder


def is_cnn(cfg: Config) -> bool:
    return cfg.model.name.startswith("resnet")


def channels_last(cfg: Config, device: torch.device) -> bool:
    """NHWC for CNNs: tensor-core convolutions on GPUs; "auto" keeps NCHW on CPUs, where
    PyTorch's channels_last BatchNorm is several times slower."""
    if cfg.model.channels_last not in ("auto", True, False):
        raise ValueError(f"model.channels_last must be auto, true or false; got {cfg.model.channels_last!r}")
    want = device.type == "cuda" if cfg.model.channels_last == "auto" else cfg.model.channels_last
    return is_cnn(cfg) and want


def build_optimizer(cfg: Config, student: nn.Module, device):
    """AdamW without weight decay on biases, norms, tokens and positional embeddings."""
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "token" in name or "pos_embed" in name else decay).append(p)
    o = cfg.optim
    fused = device.type == "cuda" if o.fused == "auto" else bool(o.fused)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=tuple(o.betas),
        fused=fused or None,
    )
    scheduler = warmup_cosine(optimizer, cfg.train.steps, min(o.warmup_steps, cfg.train.steps), o.final_lr_ratio)
    return optimizer, scheduler


# =============================================================================================
# 2. one training step


@dataclass
class Run:
    """Everything a step needs."""

    cfg: Config
    info: DistInfo
    student: nn.Module  # the plain module (state dicts, EMA source)
    forward: nn.Module  # what is called: student, its DDP wrapper, or a compiled version of either
    ddp: nn.parallel.DistributedDataParallel | None
    teacher: EMATeacher | None
    teacher_forward: nn.Module | None
    encoder: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast_dtype: torch.dtype | None
    step: int = 0  # optimiser steps done
    timings: dict | None = None  # phase -> seconds, filled when a benchmark asks
    extra: dict = field(default_factory=dict)


def _phase(run: Run, name: str, start: float) -> float:
    """Adds the time since ``start`` to phase ``name`` when timing is on; returns now."""
    if run.timings is None:
        return start
    if run.info.device.type == "cuda":
        torch.cuda.synchronize(run.info.device)
    now = time.perf_counter()
    run.timings[name] = run.timings.get(name, 0.0) + now - start
    return now


def contrastive(run: Run, z1, z2, labels, **kw):
    """fastcon.soft_contrastive_loss on fp32 (or wider) embeddings, over the global batch under
    torchrun (negatives from every rank)."""
    if run.info.distributed:
        kw.update(group=dist.group.WORLD, distributed=run.cfg.ops.distributed)
    z1, z2 = (z.float() if z.dtype in (torch.float16, torch.bfloat16) else z for z in (z1, z2))
    with torch.autocast(run.info.device.type, enabled=False):
        return fastcon.soft_contrastive_loss(z1, z2, labels, **kw)


def compute_losses(run: Run, batch: dict, micro: int) -> dict:
    """The losses of one micro-batch: "loss" (the global total, for the log), its terms, and
    "objective", the tensor whose gradient, after DDP's average over ranks, is the gradient of
    the global loss (see ``ddp_objective``)."""
    cfg, info = run.cfg, run.info
    dev = info.device
    view1 = batch["view1"].to(dev, non_blocking=True)
    view2 = batch["view2"].to(dev, non_blocking=True)
    if channels_last(cfg, dev):
        view1 = view1.contiguous(memory_format=torch.channels_last)
        view2 = view2.contiguous(memory_format=torch.channels_last)
    # masks and noise: streams fixed by (seed, step, micro-batch, rank), the same after a resume
    key = (cfg.run.seed, run.step, micro, info.rank)
    mask_gen = step_generator(*key, "mask", device=dev)
    bf16 = run.autocast_dtype is not None
    autocast = torch.autocast(dev.type, dtype=run.autocast_dtype) if bf16 else contextlib.nullcontext()
    t0 = time.perf_counter()
    if cfg.method == "softcon":
        s = cfg.softcon
        with autocast:
            pred = run.forward(view1, view2, mask_gen)
            with torch.no_grad():
                target = run.teacher_forward(torch.cat([view2, view1]) if s.both_directions else view2)
        t0 = _phase(run, "forward", t0)
        labels = batch["labels"].to(dev, non_blocking=True) if s.use_labels else None
        kw = dict(temperature=s.temperature, symmetric=s.symmetric, loss=s.loss, hard_weight=s.hard_weight)
        if s.loss == "sigmoid":
            kw["bias"] = s.bias
        if s.both_directions:
            p1, p2 = pred.chunk(2)
            k2, k1 = target.chunk(2)
            loss_c = 0.5 * (contrastive(run, p1, k2, labels, **kw) + contrastive(run, p2, k1, labels, **kw))
        else:
            loss_c = contrastive(run, pred, target, labels, **kw)
        _phase(run, "loss", t0)
        out = {"loss": loss_c, "objective": ddp_objective(run, loss_c)}
    else:
        s = cfg.swimdiff
        t = run.student.schedule.sample_timesteps(view1.shape[0], step_generator(*key, "t")).to(dev)
        with autocast:
            z1, z2, loss_d = run.forward(view1, view2, mask_gen, t, derived_seed(*key, "noise"))
        t0 = _phase(run, "forward", t0)
        scene_ids = batch["scene_ids"].to(dev, non_blocking=True)
        loss_c = contrastive(
            run, z1, z2, scene_ids, temperature=s.temperature, symmetric=s.symmetric, scene_mode=s.scene_mode
        )
        _phase(run, "loss", t0)
        out = {
            "loss": s.lambda_c * loss_c + s.lambda_d * loss_d,
            "loss_contrastive": loss_c,
            "loss_diffusion": loss_d,
            "objective": ddp_objective(run, loss_c, loss_d),
        }
    if cfg.train.debug_nan_at_step is not None and run.step + 1 == cfg.train.debug_nan_at_step:
        # TEST ONLY (train.debug_nan_at_step): exercise the non-finite path
        out["loss"] = out["loss"] * float("nan")
        out["objective"] = out["objective"] * float("nan")
    return out


def ddp_objective(run: Run, loss_c: torch.Tensor, loss_d: torch.Tensor | None = None) -> torch.Tensor:
    """What to backpropagate so that DDP's average over W ranks yields the global loss's gradient.

    The distributed contrastive loss gives every rank the exact gradient rows of its own samples
    (the ranks' shares sum to the global gradient; see fastcon.distributed) and DDP divides the
    sum over ranks by W, so that term is scaled by W. The diffusion loss is a local mean, which
    DDP's average turns into the global mean as it is. Divided by the micro-batch count."""
    w, accum = run.info.world_size, run.cfg.train.accum_steps
    if loss_d is None:
        return loss_c * (w / accum)
    s = run.cfg.swimdiff
    return (s.lambda_c * w * loss_c + s.lambda_d * loss_d) / accum


def train_step(run: Run, batches) -> dict:
    """One optimiser step over ``accum_steps`` micro-batches drawn from the iterator ``batches``.

    Returns the step's loss terms (averaged over micro-batches and ranks) as floats, plus
    ``images`` and ``skipped`` (True when a non-finite step was skipped).
    """
    cfg, info = run.cfg, run.info
    accum = cfg.train.accum_steps
    run.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    images = 0
    for micro in range(accum):
        batch = next(batches)
        images += batch["view1"].shape[0] * info.world_size
        # DDP all-reduces gradients after the last micro-batch only
        sync = micro == accum - 1 or run.ddp is None
        with contextlib.nullcontext() if sync else run.ddp.no_sync():
            out = compute_losses(run, batch, micro)
            t0 = time.perf_counter()
            out.pop("objective").backward()
            _phase(run, "backward", t0)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() / accum

    t0 = time.perf_counter()
    params = [p for p in run.student.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    names = sorted(sums)
    terms = torch.stack([sums[k] for k in names] + [grad_norm.float()])
    local_loss = float(sums["loss"])  # this rank's own value (log.rank_losses)
    if info.distributed:  # every rank logs and decides on the same numbers (gloo has no AVG)
        dist.all_reduce(terms)
        terms /= info.world_size
    values = dict(zip(names + ["grad_norm"], terms.tolist()))
    finite = all(math.isfinite(v) for v in values.values())
    if not finite and not cfg.train.skip_nonfinite:
        raise NonFiniteLossError(
            f"non-finite loss at step {run.step + 1} (loss {values['loss']}, gradient norm {values['grad_norm']})"
        )
    if finite:
        if cfg.optim.clip_grad is not None:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.clip_grad, grad_norm)
        run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    if finite and run.teacher is not None:
        run.extra["momentum"] = run.teacher.update(run.student.online, step=run.step)
    _phase(run, "optimizer", t0)
    values.update(images=images, skipped=not finite, local_loss=local_loss)
    return values


# =============================================================================================
# 3. setting up a run


def setup(cfg: Config, info: DistInfo, loader_bands) -> Run:
    """Networks, optimiser and schedule for ``cfg`` on this rank (model weights from run.seed)."""
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {cfg.method!r}")
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)  # the same initial weights on every rank
    student, teacher, encoder = build_networks(cfg, loader_bands, info.device)
    if info.distributed and cfg.model.sync_bn and info.device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)  # BatchNorm statistics of the global batch
        if teacher is not None:
            teacher.module = nn.SyncBatchNorm.convert_sync_batchnorm(teacher.module)
    optimizer, scheduler = build_optimizer(cfg, student, info.device)
    forward, ddp = student, None
    if info.distributed:
        forward = ddp = nn.parallel.DistributedDataParallel(
            student,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=cfg.ddp.find_unused_parameters,
        )
    teacher_forward = teacher
    if cfg.model.compile:
        forward = torch.compile(forward)
        teacher_forward = torch.compile(teacher) if teacher is not None else None
    precision = cfg.train.precision
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32; got {precision!r}")
    gpu_bf16 = info.device.type == "cuda" and torch.cuda.is_bf16_supported()
    use_bf16 = precision == "bf16" or (precision == "auto" and gpu_bf16)
    # seed again per rank: dropout / drop path differ across ranks, masks and noise have own streams
    seed_everything(cfg.run.seed + 1000003 * info.rank)
    return Run(
        cfg, info, student, forward, ddp, teacher, teacher_forward, encoder, optimizer, scheduler,
        torch.bfloat16 if use_bf16 else None,
    )  # fmt: skip


@contextlib.contextmanager
def ops_backend(name: str):
    """Routes every fastcon op (the loss, and the masking / diffusion ops the models call) to
    backend ``name`` through FASTCON_BACKEND, which replaces their automatic choice; restored after."""
    old = os.environ.get("FASTCON_BACKEND")
    if name != "auto":
        os.environ["FASTCON_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTCON_BACKEND", None)
        else:
            os.environ["FASTCON_BACKEND"] = old


def make_data(cfg: Config):
    """The training loader over the tiles outside the spatial hold-out region (the probe's test set)."""
    dataset = TileDataset(cfg.data.root)
    indices = None
    if cfg.data.holdout_fraction is not None:
        indices, _ = spatial_split(dataset, cfg.data.holdout_fraction, axis=cfg.data.holdout_axis)
    loader = make_loader(
        dataset,
        cfg.data.batch_size,
        backend=cfg.data.backend,
        crop_size=cfg.data.crop_size,
        scale=tuple(cfg.data.scale),
        labels=cfg.data.labels,
        seed=cfg.run.seed,
        indices=indices,
        num_workers=cfg.data.num_workers,
    )
    return loader


def endless(loader):
    """Batches across epochs. Creating a DataLoader iterator draws a worker seed from torch's
    global RNG; fork_rng undoes that, so a resumed run (which starts an iterator mid-epoch) and an
    uninterrupted one see the same global RNG stream."""
    while True:
        it = iter(loader)
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(it, None)
            if batch is None:
                break
            yield batch


def checkpoint_state(run: Run, loader, log_state: dict) -> dict:
    rngs = [rng_state()]
    if run.info.distributed:  # every rank's RNG, so that each continues its own stream
        rngs = [None] * run.info.world_size
        dist.all_gather_object(rngs, rng_state())
    return {
        "step": run.step,
        "config": run.cfg.to_dict(),
        "world_size": run.info.world_size,
        "student": run.student.state_dict(),
        "teacher": run.teacher.state_dict() if run.teacher is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "loader": loader.state_dict(),
        "rng": rngs,
        "log": log_state,
    }


def restore(run: Run, loader, state: dict) -> dict:
    run.student.load_state_dict(state["student"])
    if run.teacher is not None:
        run.teacher.load_state_dict(state["teacher"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"])
    run.step = state["step"]
    if state["world_size"] == run.info.world_size:
        set_rng_state(state["rng"][run.info.rank])
    else:
        print(
            f"[rank {run.info.rank}] checkpoint of {state['world_size']} ranks resumed on {run.info.world_size}: "
            "RNG streams are re-seeded (the run continues, not bit-identically)",
            file=sys.stderr,
        )
        seed_everything(run.cfg.run.seed + 7919 * run.step + 1000003 * run.info.rank)
    return state["log"]


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# =============================================================================================
# 4. the loop


def timed(batches, timer: StepTimer):
    """Passes batches on, counting the wait for each as data time."""
    for batch in batches:
        timer.data_ready()
        yield batch


def train(cfg: Config, resume: str | None = None) -> dict:
    """Run (or continue) the pretraining of ``cfg``; returns the summary written to summary.json."""
    with ops_backend(cfg.ops.backend):
        return _train(cfg, resume)


def _train(cfg: Config, resume: str | None) -> dict:
    info = init_distributed(cfg.run.device, timeout=cfg.run.dist_timeout)
    main_rank = info.is_main
    out_dir = cfg.run.out_dir
    ckpts = CheckpointDir(os.path.join(out_dir, "checkpoints"), keep=cfg.checkpoint.keep)
    if cfg.train.accum_steps < 1:
        raise ValueError(f"train.accum_steps must be >= 1, got {cfg.train.accum_steps}")
    if main_rank and (stale := ckpts.remove_stale_temporaries()):  # left by writes killed midway
        mib = sum(size for _, size in stale) / 2**20
        print(
            f"removed {len(stale)} stale temporary checkpoint file(s) ({mib:.1f} MiB): {', '.join(p.name for p, _ in stale)}"
        )

    loader = make_data(cfg)
    run = setup(cfg, info, loader.band_names)
    # what the log needs across resumes (checkpointed): the first loss, the open log window, totals
    log_state = {"first_loss": None, "window": {}, "images": 0, "step_seconds": 0.0, "skipped_total": 0}
    if resume is not None:
        state, path = ckpts.load(None if resume == "auto" else resume)
        diffs = config_differences(state["config"], cfg.to_dict())
        if diffs and main_rank:
            print("resuming with a changed configuration:\n  " + "\n  ".join(diffs), file=sys.stderr)
        log_state = restore(run, loader, state)
        if main_rank:
            print(f"resumed from {path} at step {run.step}")
    os.makedirs(out_dir, exist_ok=True)
    if main_rank:
        save_config(cfg, os.path.join(out_dir, "config.yaml"))

    terms = LOSS_TERMS[cfg.method]
    fields = ["step", "epoch", *terms, "grad_norm", "lr", "momentum", "images_per_s"]
    fields += ["data_s_per_step", "compute_s_per_step", "peak_mem_mib", "skipped"]
    metrics = MetricsLog(os.path.join(out_dir, "metrics.csv"), fields, resume_step=run.step) if main_rank else None
    if main_rank:
        n_enc = sum(p.numel() for p in run.encoder.parameters()) / 1e6
        n_all = sum(p.numel() for p in run.student.parameters()) / 1e6
        print(
            f"{cfg.method}: {cfg.model.name} encoder {n_enc:.2f} M parameters (student {n_all:.2f} M); "
            f"{loader.num_tiles} training tiles, {len(loader)} steps/epoch of {cfg.data.batch_size} x "
            f"{info.world_size} rank(s) x {cfg.train.accum_steps} micro-batch(es); {loader.backend} loader; "
            f"{info.device}, {'bf16 autocast' if run.autocast_dtype else 'fp32'}, fastcon ops: {cfg.ops.backend}"
        )

    stop = StopRequest()
    timer = StepTimer(info.device)
    window = log_state["window"]  # sums over the open log window
    last_ckpt = ckpts.latest()
    end_step = cfg.train.steps if cfg.train.stop_at is None else min(cfg.train.stop_at, cfg.train.steps)
    started = time.perf_counter()
    batches = timed(endless(loader), timer)
    bar = tqdm(total=cfg.train.steps, initial=run.step, disable=not (main_rank and cfg.log.progress),
               desc=cfg.method, unit="step", dynamic_ncols=True)  # fmt: skip
    reason, consecutive_skips = "finished", 0
    try:
        while run.step < end_step:
            try:
                values = train_step(run, batches)
            except NonFiniteLossError as e:
                kept = (
                    f"the last checkpoint {last_ckpt} is kept unchanged" if last_ckpt else "no checkpoint was written"
                )
                raise NonFiniteLossError(
                    f"{e}: stopping ({kept}); set train.skip_nonfinite=true to skip such steps instead"
                ) from None
            timer.step_done(values["images"])
            skipped = values["skipped"]
            consecutive_skips = consecutive_skips + 1 if skipped else 0
            log_state["skipped_total"] += int(skipped)
            if skipped and main_rank:
                tqdm.write(f"step {run.step}: non-finite loss ({values['loss']}): step skipped")
            if consecutive_skips > cfg.train.max_skipped:
                raise NonFiniteLossError(
                    f"{consecutive_skips} non-finite steps in a row up to step {run.step}: stopping "
                    f"(the last checkpoint {last_ckpt} is kept unchanged)"
                )
            if cfg.log.rank_losses:  # every rank, to check that they agree
                with open(os.path.join(out_dir, f"rank{info.rank}_losses.csv"), "a") as f:
                    f.write(f"{run.step},{values['local_loss']!r},{values['loss']!r}\n")
            if log_state["first_loss"] is None and not skipped:
                log_state["first_loss"] = values["loss"]
            for k in (*terms, "grad_norm"):
                window[k] = window.get(k, 0.0) + (0.0 if skipped else values[k])
            window["n"] = window.get("n", 0) + (0 if skipped else 1)
            window["skipped"] = window.get("skipped", 0) + int(skipped)

            if run.step % cfg.log.every == 0 or run.step in (1, cfg.train.steps):  # step 1: the first loss
                n = window["n"]
                row = {k: window[k] / n if n else math.nan for k in (*terms, "grad_norm")}
                row.update(
                    step=run.step,
                    epoch=loader.epoch,
                    lr=run.scheduler.get_last_lr()[0],
                    momentum=run.extra.get("momentum", ""),
                    images_per_s=timer.images_per_s,
                    data_s_per_step=timer.data_s / timer.steps,
                    compute_s_per_step=timer.compute_s / timer.steps,
                    peak_mem_mib=peak_memory_mib(info.device),
                    skipped=window["skipped"],
                )
                log_state["last_row"] = row
                log_state["images"] += timer.images
                log_state["step_seconds"] += timer.data_s + timer.compute_s
                if main_rank:
                    metrics.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
                    if run.step % cfg.log.plot_every < cfg.log.every:
                        plot_metrics(metrics.path, os.path.join(out_dir, "loss.png"), loss_keys=terms)
                window.clear()
                timer.reset()
            bar.update(1)

            stop_now = all_ranks_any(bool(stop), info)
            limit = cfg.train.max_minutes
            over_time = all_ranks_any(limit is not None and time.perf_counter() - started > 60 * limit, info)
            if run.step % cfg.checkpoint.every == 0 or run.step == end_step or stop_now or over_time:
                state = checkpoint_state(run, loader, log_state)
                if main_rank:
                    last_ckpt = ckpts.save(state, run.step)
                timer.restart()  # checkpoint writing is neither data nor compute time
            if stop_now:
                reason = f"stopped by {stop.signal_name or 'a signal to another rank'} (resume with --resume)"
                break
            if over_time:
                reason = f"stopped: train.max_minutes={limit} reached (resume with --resume)"
                break
        else:
            if run.step < cfg.train.steps:
                reason = "stopped at train.stop_at (resume with --resume)"
    finally:
        bar.close()
        stop.restore()
        if metrics is not None:
            metrics.close()
    summary = finish(run, cfg, log_state, reason, last_ckpt, out_dir)
    shutdown_distributed()
    return summary


def finish(run: Run, cfg: Config, log_state: dict, reason: str, last_ckpt, out_dir: str) -> dict:
    """Encoder weights, loss plot and summary.json (rank 0); returns the summary."""
    info = run.info
    last = log_state.get("last_row", {})
    seconds = log_state["step_seconds"]
    summary = {
        "method": cfg.method,
        "model": cfg.model.name,
        "steps": run.step,
        "end": reason,
        "first_loss": log_state["first_loss"],
        "final_loss": last.get("loss"),
        "images_per_s": log_state["images"] / seconds if seconds > 0 else None,
        "last_images_per_s": last.get("images_per_s"),
        "data_s_per_step": last.get("data_s_per_step"),
        "compute_s_per_step": last.get("compute_s_per_step"),
        "peak_mem_mib": peak_memory_mib(info.device),
        "skipped_steps": log_state["skipped_total"],
        "step_seconds": seconds,
        "world_size": info.world_size,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "encoder": os.path.join(out_dir, "encoder.safetensors"),
        "metrics": os.path.join(out_dir, "metrics.csv"),
        "plot": os.path.join(out_dir, "loss.png"),
    }
    if info.is_main:
        save_encoder(run.encoder, summary["encoder"])
        if log_state.get("last_row"):
            title = f"{cfg.method}, {cfg.model.name}"
            plot_metrics(summary["metrics"], summary["plot"], loss_keys=LOSS_TERMS[cfg.method], title=title)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        first, final = summary["first_loss"], summary["final_loss"]
        line = f"{reason} at step {run.step}"
        if first is not None and final is not None:
            line += (
                f": loss {first:.4f} (step 1) -> {final:.4f} (mean of the last logged steps); "
                f"{summary['images_per_s']:.1f} images/s; peak memory {summary['peak_mem_mib']:.0f} MiB"
            )
        print(line)
        print(f"wrote {summary['encoder']}, {summary['metrics']}, {summary['plot']}")
    return summary


# =============================================================================================
# 5. command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (keys: examples/configs/defaults.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="section.key=value")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CKPT",
        help="continue a run (default: newest checkpoint)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, [*args.overrides, *args.set_overrides], defaults=DEFAULTS)
        train(cfg, resume=args.resume)
    except (ConfigError, NonFiniteLossError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        shutdown_distributed()
        return 1
    except RuntimeError as e:  # a collective that timed out or lost its peer: named (docs/faults.md)
        if (failure := collective_failure(e)) is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
