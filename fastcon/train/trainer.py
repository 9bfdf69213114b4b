"""One pretraining run's machinery: set-up, the optimiser step, checkpoint state and resume.

- ``setup(cfg, info, bands)`` -> ``Run``: the method's networks (``fastcon.train.methods``),
  SyncBatchNorm / DDP / torch.compile as configured, AdamW and its warmup-cosine schedule.
- ``train_step(run, batches)``: one optimiser step over ``train.accum_steps`` micro-batches
  (losses, backward, gradient norm and clipping, AdamW, the method's after-step work), the
  logged numbers averaged over ranks; ``NonFiniteLossError`` names a NaN / inf step.
- ``checkpoint_state(run, loader, log_state)`` / ``restore(run, loader, state)``: everything a
  bit-exact resume needs (networks, method state, optimiser, scheduler, loader position, every
  rank's RNG states).
- ``run_summary`` (summary.json), ``endless(loader)``, ``ops_backend(name)``, ``config_differences``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from fastcon.train.config import Config
from fastcon.train.methods import Method, StepContext, build_method, channels_last
from fastcon.train.methods.base import add_phase
from fastcon.train.runtime import DistInfo, peak_memory_mib, rng_state, seed_everything, set_rng_state, step_generator
from fastcon.train.schedules import warmup_cosine


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN / inf (the message names the step)."""


@dataclass
class Run:
    """Everything a step needs."""

    cfg: Config
    info: DistInfo
    method: Method
    ddp: nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast_dtype: torch.dtype | None
    step: int = 0  # optimiser steps done
    timings: dict | None = None  # phase -> seconds, filled when a benchmark asks
    extra: dict = field(default_factory=dict)

    @property
    def student(self) -> nn.Module:
        return self.method.student

    @property
    def encoder(self) -> nn.Module:
        return self.method.encoder


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


def setup(cfg: Config, info: DistInfo, loader_bands) -> Run:
    """Networks, optimiser and schedule for ``cfg`` on this rank (model weights from run.seed)."""
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    if cfg.train.accum_steps < 1:
        raise ValueError(f"train.accum_steps must be >= 1, got {cfg.train.accum_steps}")
    precision = cfg.train.precision
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32; got {precision!r}")
    seed_everything(cfg.run.seed)  # the same initial weights on every rank
    method = build_method(cfg, info, loader_bands)
    if info.distributed and cfg.model.sync_bn and info.device.type == "cuda":
        # BatchNorm statistics of the global batch, in the student and in the teacher / key encoder
        method.student = nn.SyncBatchNorm.convert_sync_batchnorm(method.student)
        if method.teacher is not None:
            method.teacher.module = nn.SyncBatchNorm.convert_sync_batchnorm(method.teacher.module)
        method.forward, method.teacher_forward = method.student, method.teacher
    optimizer, scheduler = build_optimizer(cfg, method.student, info.device)
    ddp = None
    if info.distributed:
        method.forward = ddp = nn.parallel.DistributedDataParallel(
            method.student,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=cfg.ddp.find_unused_parameters,
        )
    if cfg.model.compile:
        method.forward = torch.compile(method.forward)
        if method.teacher is not None:
            method.teacher_forward = torch.compile(method.teacher)
    gpu_bf16 = info.device.type == "cuda" and torch.cuda.is_bf16_supported()
    use_bf16 = precision == "bf16" or (precision == "auto" and gpu_bf16)
    # seed again per rank: dropout / drop path differ across ranks, masks and noise have own streams
    seed_everything(cfg.run.seed + 1000003 * info.rank)
    return Run(cfg, info, method, ddp, optimizer, scheduler, torch.bfloat16 if use_bf16 else None)


def compute_losses(run: Run, batch: dict, micro: int) -> dict:
    """The losses of one micro-batch: "loss" (the global total, for the log), its terms, and
    "objective", the tensor whose gradient, after DDP's average over ranks, is the gradient of
    the global loss (see ``fastcon.train.methods.ddp_objective``)."""
    cfg, dev = run.cfg, run.info.device
    view1 = batch["view1"].to(dev, non_blocking=True)
    view2 = batch["view2"].to(dev, non_blocking=True)
    if channels_last(cfg, dev):
        view1 = view1.contiguous(memory_format=torch.channels_last)
        view2 = view2.contiguous(memory_format=torch.channels_last)
    # masks and noise: streams fixed by (seed, step, micro-batch, rank), the same after a resume
    key = (cfg.run.seed, run.step, micro, run.info.rank)
    mask_gen = step_generator(*key, "mask", device=dev)
    out = run.method.losses(StepContext(view1, view2, batch, key, mask_gen, run.autocast_dtype, run.timings))
    if cfg.train.debug_nan_at_step is not None and run.step + 1 == cfg.train.debug_nan_at_step:
        # TEST ONLY (train.debug_nan_at_step): exercise the non-finite path
        out["loss"] = out["loss"] * float("nan")
        out["objective"] = out["objective"] * float("nan")
    return out


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
            add_phase(run.timings, info.device, "backward", t0)
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
    run.extra.update(run.method.after_step(run.step, finite))
    add_phase(run.timings, info.device, "optimizer", t0)
    values.update(images=images, skipped=not finite, local_loss=local_loss)
    return values


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
    """Everything a bit-exact resume needs (collective under torchrun: call it on every rank)."""
    rngs = [rng_state()]
    if run.info.distributed:  # every rank's RNG, so that each continues its own stream
        rngs = [None] * run.info.world_size
        dist.all_gather_object(rngs, rng_state())
    return {
        "step": run.step,
        "config": run.cfg.to_dict(),
        "world_size": run.info.world_size,
        "student": run.student.state_dict(),
        **run.method.state_dict(),  # "teacher" (SoftCon's teacher, SwiMDiff's key encoder), "queue"
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "loader": loader.state_dict(),
        "rng": rngs,
        "log": log_state,
    }


def restore(run: Run, loader, state: dict) -> dict:
    """Load ``state`` (from ``checkpoint_state``) into ``run`` and ``loader``; returns its log state."""
    run.student.load_state_dict(state["student"])
    run.method.load_state_dict(state)
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


def run_summary(run: Run, log_state: dict, reason: str, last_ckpt, out_dir: str) -> dict:
    """What summary.json holds: how the run ended, first / final loss, speed, memory, files."""
    last = log_state.get("last_row", {})
    seconds = log_state["step_seconds"]
    return {
        "method": run.cfg.method,
        "model": run.cfg.model.name,
        "steps": run.step,
        "end": reason,
        "first_loss": log_state["first_loss"],
        "final_loss": last.get("loss"),
        "images_per_s": log_state["images"] / seconds if seconds > 0 else None,
        "last_images_per_s": last.get("images_per_s"),
        "data_s_per_step": last.get("data_s_per_step"),
        "compute_s_per_step": last.get("compute_s_per_step"),
        "peak_mem_mib": peak_memory_mib(run.info.device),
        "skipped_steps": log_state["skipped_total"],
        "step_seconds": seconds,
        "world_size": run.info.world_size,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "encoder": os.path.join(out_dir, "encoder.safetensors"),
        "metrics": os.path.join(out_dir, "metrics.csv"),
        "plot": os.path.join(out_dir, "loss.png"),
    }


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every key whose value differs (nested keys dotted)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out
