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

This script is the orchestration: config -> data -> model -> loop -> logging. The methods live in
fastcon.train.methods (docs/methods.md):
- softcon: a Siamese-masked online ViT + predictor against an EMA teacher, land-cover soft targets;
- swimdiff: MoCo (momentum key encoder, queue of keys with their scene ids) + a diffusion branch.
The optimiser step, checkpoint state and resume are in fastcon.train.trainer.

Speed: bf16 autocast on GPUs, fused AdamW, channels_last for CNNs, DALI loading on GPUs, fastcon's
fused loss / masking / diffusion kernels, optional torch.compile and activation checkpointing,
gradient accumulation. Each metrics row logs images/s, the step time split into waiting for
data and computing, and peak memory.

Scale: under torchrun every rank trains on its shard of each batch (DDP); the contrastive loss is
the global batch's (negatives from every rank); only rank 0 logs and writes files.

Reliability: checkpoints hold model, teacher / key encoder, queue, optimiser, scheduler, step,
every rank's RNG states and the loader position, written atomically; `--resume` continues bit
for bit on CPUs. SIGTERM / SIGINT (also to the whole process group) finish the current step,
checkpoint and exit 0 (docs/faults.md). A non-finite loss stops the run naming the step, or skips
the step with `train.skip_nonfinite: true`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from tqdm import tqdm

from fastcon.data import TileDataset, make_loader, spatial_split
from fastcon.models import save_encoder
from fastcon.train import (
    CheckpointDir,
    CheckpointError,
    Config,
    ConfigError,
    MetricsLog,
    NonFiniteLossError,
    Run,
    StepTimer,
    StopRequest,
    all_ranks_any,
    checkpoint_state,
    collective_failure,
    config_differences,
    endless,
    init_distributed,
    load_config,
    ops_backend,
    peak_memory_mib,
    plot_metrics,
    restore,
    run_summary,
    save_config,
    setup,
    shutdown_distributed,
    train_step,
)
from fastcon.train.methods import METHODS

DEFAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "defaults.yaml")
LOSS_TERMS = {name: method.loss_terms for name, method in METHODS.items()}


def make_data(cfg: Config):
    """The training loader over the tiles outside the spatial hold-out region (the probe's test set)."""
    dataset = TileDataset(cfg.data.root)
    indices = None
    if cfg.data.holdout_fraction is not None:
        indices, _ = spatial_split(dataset, cfg.data.holdout_fraction, axis=cfg.data.holdout_axis)
    return make_loader(
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
    if main_rank and (stale := ckpts.remove_stale_temporaries()):  # left by writes killed midway
        print(ckpts.describe_removed(stale))

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
    return finish(run, cfg, log_state, reason, last_ckpt, out_dir)


def finish(run: Run, cfg: Config, log_state: dict, reason: str, last_ckpt, out_dir: str) -> dict:
    """Encoder weights, loss plot and summary.json (rank 0); returns the summary."""
    info = run.info
    summary = run_summary(run, log_state, reason, last_ckpt, out_dir)
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (keys: examples/configs/defaults.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="section.key=value")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CKPT", help="continue a run (default: the newest)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run_main(args)
    finally:
        # after train() has returned or raised: the Run (DDP holds the process group) is released,
        # so leaving the group stops its threads (see shutdown_distributed)
        shutdown_distributed()


def run_main(args) -> int:
    try:
        cfg = load_config(args.config, [*args.overrides, *args.set_overrides], defaults=DEFAULTS)
        train(cfg, resume=args.resume)
    except (ConfigError, NonFiniteLossError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a collective that timed out or lost its peer: named (docs/faults.md)
        if (failure := collective_failure(e)) is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
