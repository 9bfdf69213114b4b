"""`make demo`: the main job end to end on the bundled real Sentinel-2 sample, in minutes on a CPU.

    python examples/demo.py [--fresh] [section.key=value ...]

1. Prepare the sample into data/sample: 253 tiles of 13 x 128 x 128 with OpenStreetMap land-use
   multi-labels (8 classes); a rerun finds the work done and takes a second.
2. Pretrain SoftCon with examples/configs/demo.yaml into runs/demo (a 4-block ViT on 56 px
   crops; the east quarter of the scene is held out). A rerun resumes the run where it stopped
   (or, when it finished, just reports it); --fresh starts over. Overrides go to the config.
3. Linear probe on the held-out region with examples/evaluate.py (--dataset sample): the
   pretrained encoder, and the same architecture at the random initialisation pretraining
   started from; reports in runs/demo/eval_pretrained.json and eval_random.json, the mAPs
   added to runs/demo/summary.json.
4. Print images/s, the first and final loss, both mAPs, and where the plot and metrics are.

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
from fastcon.train import CheckpointDir, load_config

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "demo.yaml")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="demo config overrides")
    p.add_argument("--data", default="data/sample", help="where to prepare the sample")
    p.add_argument("--fresh", action="store_true", help="start pretraining over instead of resuming runs/demo")
    args = p.parse_args(argv)
    started = time.perf_counter()

    print("== 1. data: the bundled Sentinel-2 sample with OpenStreetMap land-use labels")
    t0 = time.perf_counter()
    prepare_sample(args.data)
    prep_s = time.perf_counter() - t0

    print("\n== 2. pretraining (SoftCon, examples/configs/demo.yaml)")
    cfg = load_config(CONFIG, [f"data.root={args.data}", *args.overrides], defaults=pretrain.DEFAULTS)
    ckpts = CheckpointDir(os.path.join(cfg.run.out_dir, "checkpoints"))
    saved = os.path.join(cfg.run.out_dir, "config.yaml")
    try:
        same = load_config(saved, defaults=pretrain.DEFAULTS) == cfg
    except (OSError, ValueError):  # no run yet, or one written by another version
        same = False
    if os.path.isdir(cfg.run.out_dir) and (args.fresh or not same):
        if not args.fresh:
            print(f"{cfg.run.out_dir} holds a run of another configuration: starting over")
        shutil.rmtree(cfg.run.out_dir)
    resume = "auto" if ckpts.latest() is not None else None
    if resume:
        print(f"continuing the run in {cfg.run.out_dir} (--fresh starts over)")
    t0 = time.perf_counter()
    summary = pretrain.train(cfg, resume=resume)
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

    print("\n== summary")
    print(f"  pretraining      {summary['steps']} steps of {cfg.data.batch_size} two-view pairs ({summary['end']})")
    print(
        f"  throughput       {summary['images_per_s']:.1f} images/s (data wait {summary['data_s_per_step']:.3f} s, compute {summary['compute_s_per_step']:.3f} s per step at the end)"
    )
    print(f"  loss             {summary['first_loss']:.4f} at step 1 -> {summary['final_loss']:.4f} at the end")
    pre, rnd = maps["pretrained"]["map_macro"], maps["random"]["map_macro"]
    print(f"  linear probe mAP pretrained {pre:.4f} vs random init {rnd:.4f} ({pre - rnd:+.4f}) (macro; micro ", end="")
    print(f"{maps['pretrained']['map_micro']:.4f} vs {maps['random']['map_micro']:.4f})")
    print(f"  outputs          {summary['plot']}, {summary['metrics']}, {summary['encoder']}")
    print(
        f"  time             data {prep_s:.0f} s, pretraining {train_s:.0f} s, probes {probe_s:.0f} s, total {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
