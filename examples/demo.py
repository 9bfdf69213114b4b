"""`make demo`: the main job end to end on the bundled real Sentinel-2 sample, in minutes on a CPU.

    python examples/demo.py [--fresh | --resume] [section.key=value ...]

1. Prepare the sample into data/sample: 253 tiles of 13 x 128 x 128 with OpenStreetMap land-use
   multi-labels (8 classes); a rerun finds the work done and takes a second.
2. Pretrain SoftCon with examples/configs/demo.yaml into runs/demo (a 4-block ViT on 56 px
   crops; the east quarter of the scene is held out). The configuration is checked first, so a
   typo in an override is a one-line error before any work. A rerun resumes the run where it
   stopped (or, when it finished, just reports it); --fresh deletes runs/demo, saying what it
   held, and starts over. train.max_minutes (30) is only a safety net: the demo is defined by its
   600 steps, and the summary says when the cap cut them short.
3. Linear probe on the held-out region with examples/evaluate.py (--dataset sample): the
   pretrained encoder, and the same architecture at the random initialisation pretraining
   started from; reports in runs/demo/eval_pretrained.json and eval_random.json, the mAPs
   added to runs/demo/summary.json.
4. Print images/s over the whole run (and the last logged window apart), the first and final
   loss, both mAPs, and where the plot and metrics are.

Runs on the GPU when there is one (bf16, DALI), on the CPU otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling example scripts

import evaluate
import pretrain

from fastcon.data import prepare_sample
from fastcon.train import CheckpointDir, CheckpointError, ConfigError, load_config, read_metrics, run_throughput
from fastcon.train.checkpoint import checkpoint_step

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "demo.yaml")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="demo config overrides")
    p.add_argument("--data", default="data/sample", help="where to prepare the sample")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fresh", action="store_true", help="delete runs/demo (listing what it holds) and start over")
    mode.add_argument(
        "--resume", action="store_true", help="continue runs/demo where it stopped (a plain rerun does too)"
    )
    args = p.parse_args(argv)
    started = time.perf_counter()

    # the configuration before any work: a typo is one line, not a traceback after data preparation
    try:
        cfg = load_config(CONFIG, [f"data.root={args.data}", *args.overrides], defaults=pretrain.DEFAULTS)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    print("== 1. data: the bundled Sentinel-2 sample with OpenStreetMap land-use labels")
    t0 = time.perf_counter()
    prepare_sample(args.data, store="npy")  # the faster store here (docs/raw-data.md)
    prep_s = time.perf_counter() - t0

    print("\n== 2. pretraining (SoftCon, examples/configs/demo.yaml)")
    t0 = time.perf_counter()
    try:
        summary = finished_run(cfg, fresh=args.fresh)
        if summary is None:
            resume = "auto" if CheckpointDir(os.path.join(cfg.run.out_dir, "checkpoints")).latest() else None
            if args.resume and resume is None:
                print(f"--resume: {cfg.run.out_dir} holds no run to continue; starting one")
            summary = pretrain.train(cfg, resume=resume)
    except (CheckpointError, pretrain.NonFiniteLossError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    train_s = time.perf_counter() - t0

    print("\n== 3. linear probe on the spatially held-out region (examples/evaluate.py --dataset sample)")
    t0 = time.perf_counter()
    maps = {}
    for name, extra in (("pretrained", []), ("random", ["--random-init"])):
        out = os.path.join(cfg.run.out_dir, f"eval_{name}.json")
        argv = ["--dataset", "sample", "--run", cfg.run.out_dir, "--out", out, "--no-progress", *extra]
        if evaluate.main(argv) != 0:
            return 1
        with open(out) as f:
            maps[name] = {r["metric"]: r["value"] for r in json.load(f)["results"]}
    probe_s = time.perf_counter() - t0
    summary_file = os.path.join(cfg.run.out_dir, "summary.json")
    with open(summary_file) as f:
        saved = json.load(f)
    saved["probe"] = {name: {"map_macro": m["map_macro"], "map_micro": m["map_micro"]} for name, m in maps.items()}
    with open(summary_file, "w") as f:
        json.dump(saved, f, indent=2)

    pre, rnd = maps["pretrained"]["map_macro"], maps["random"]["map_macro"]
    speed = run_throughput(read_metrics(summary["metrics"]))
    last = speed["last"]
    window = f"last {last['steps']} step{'s' if last['steps'] != 1 else ''}"
    print("\n== summary")
    if summary["steps"] >= cfg.train.steps:
        print(f"  pretraining      {summary['steps']} steps of {cfg.data.batch_size} two-view pairs (finished)")
    else:
        reason = summary["end"].split(" (resume with")[0]
        print(f"  pretraining      {summary['steps']} of {cfg.train.steps} steps ({reason})")
        print("  CUT SHORT        the loss and mAPs below are not those of the full demo; `make demo` continues it")
    print(
        f"  throughput       {speed['images_per_s']:.1f} images/s over the run "
        f"(per step: data wait {speed['data_s_per_step']:.3f} s, compute {speed['compute_s_per_step']:.3f} s)"
    )
    print(
        f"                   {window} alone: {last['images_per_s']:.1f} images/s "
        f"(data wait {last['data_s_per_step']:.3f} s, compute {last['compute_s_per_step']:.3f} s)"
    )
    print(
        f"  loss             {summary['first_loss']:.4f} at step 1 -> {summary['final_loss']:.4f} "
        f"(mean of the {window})"
    )
    print(f"  linear probe mAP pretrained {pre:.4f} vs random init {rnd:.4f} ({pre - rnd:+.4f}) (macro; micro ", end="")
    print(f"{maps['pretrained']['map_micro']:.4f} vs {maps['random']['map_micro']:.4f})")
    print(f"  outputs          {summary['plot']}, {summary['metrics']}, {summary['encoder']}")
    print(
        f"  time             data {prep_s:.0f} s, pretraining {train_s:.0f} s, probes {probe_s:.0f} s, total {time.perf_counter() - started:.0f} s"
    )
    return 0


def finished_run(cfg, fresh: bool) -> dict | None:
    """Clears run.out_dir when asked (--fresh) or when it holds another configuration's run, saying
    what it deletes; returns the summary of a run of this configuration that already finished
    (reported, not trained again), else None (train: from scratch, or from the newest checkpoint)."""
    out = cfg.run.out_dir
    saved = os.path.join(out, "config.yaml")
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.exists(saved) and not os.path.isdir(os.path.join(out, "checkpoints")):
            raise FileExistsError(
                f"run.out_dir {out} exists and holds no run (no config.yaml, no checkpoints/): choose another"
            )
        try:
            same = load_config(saved, defaults=pretrain.DEFAULTS) == cfg
        except (OSError, ValueError):  # no config, or one written by another version
            same = False
        if fresh or not same:
            why = "--fresh" if fresh else f"{out} holds a run of another configuration"
            print(f"{why}: deleting {out} ({describe_run(out)}) and starting over")
            shutil.rmtree(out)
            return None
    latest = CheckpointDir(os.path.join(out, "checkpoints")).latest()
    if latest is None:
        return None
    step = checkpoint_step(latest)
    try:
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        summary = {}
    if step >= cfg.train.steps and summary.get("steps") == step and os.path.exists(summary.get("encoder", "")):
        print(f"{out} already finished its {step} steps: reporting it (--fresh starts over)")
        return summary
    print(f"continuing the run in {out} from step {step} of {cfg.train.steps} (--fresh starts over)")
    return None


def describe_run(out: str) -> str:
    """What a run folder holds, for the message before it is deleted."""
    parts = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name == "checkpoints" and os.path.isdir(path):
            steps = [str(checkpoint_step(c)) for c in CheckpointDir(path).all()]
            parts.append(f"checkpoints of step {', '.join(steps)}" if steps else "checkpoints/")
        else:
            parts.append(name + ("/" if os.path.isdir(path) else ""))
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
