"""Evaluate a frozen encoder: the run's own held-out tiles, or the papers' benchmarks through torchgeo.

    python examples/evaluate.py --dataset sample --run runs/demo                  # held-out tiles
    python examples/evaluate.py --dataset sample --run runs/demo --random-init    # same architecture, untrained
    python examples/evaluate.py --dataset eurosat --root data/eurosat --run runs/demo
    python examples/evaluate.py --dataset bigearthnet --root data/bigearthnet \\
        --weights B13_vits14_softcon.pth --model vit_small_patch14_dinov2 --protocol ssl4eo
    python examples/evaluate.py --dataset bigearthnet --root data/bigearthnet --modality s1 \\
        --weights ViTSmall14_DINOv2_Weights.SENTINEL1_GRD_SOFTCON --download

1. The encoder (fastcon.eval.load_encoder): a run folder (its config.yaml gives the architecture,
   the crop size and the data statistics; weights RUN/encoder.safetensors, a pretraining .ckpt
   with --weights, or --random-init: the very initialisation pretraining started from), an
   encoder.safetensors, the SoftCon release .pth files, torchgeo's *_softcon_enc.pth, or a
   torchgeo weights name (from torch.hub's cache; fetched only with --download).
2. The dataset through torchgeo's own classes (EuroSAT 13 bands, BigEarthNet v1 19 classes,
   BigEarthNetV2) or, for --dataset sample, the run's prepared folder split as pretraining split
   it (the held-out east quarter is the test set). Bands are picked by name in the encoder's
   order (BigEarthNet has no B10: a zero band), normalised with the run's stats.json or, for
   released weights, the SSL4EO-S12 statistics, and resized to the encoder's input size.
3. The protocol (fastcon.eval): linear (default; frozen features, cached beside --out, and a
   logistic regression whose L2 weight is chosen on the validation split), knn (cosine, k=20)
   or ssl4eo (the SSL4EO-S12 linear protocol: SGD head on augmented views, 10 % of BigEarthNet).
4. A table on stdout and --out JSON {"results": [...], "encoder": {...}}, with the SoftCon
   paper's number (fastcon/eval/published.json) beside ours for the same backbone and data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fastcon.eval import DATASETS, PROTOCOLS, evaluate, load_encoder
from fastcon.models import MODELS, S1_BANDS
from fastcon.train import load_config
from fastcon.train.probe import POOLS

DEFAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "defaults.yaml")


def print_report(report: dict) -> None:
    e = report["encoder"]
    print(f"{e['model']} ({e['weights']}), {len(e['bands'])} bands at {e['img_size']} px, {e['normalisation']}")
    for r in report["results"]:
        pub = f"   published {100 * r['published']:.1f}" if "published" in r else ""
        print(
            f"  {r['dataset']:15s} {r['modality']} {r['protocol']:7s} {r['metric']:10s} {100 * r['value']:6.2f}"
            f"   (train {r['n_train']}, val {r['n_val']}, test {r['n_test']}){pub}"
        )
    d = report["details"]
    if "weight_decay" in d:
        print(
            f"  L2 weight {d['weight_decay']:g} chosen on {'validation' if d['selected_on'] == 'val' else '3-fold CV'}"
        )


def run(args) -> dict:
    cfg = None
    if args.run:
        overrides = [f"data.root={args.data}"] if args.data else []
        cfg = load_config(os.path.join(args.run, "config.yaml"), overrides, defaults=DEFAULTS)
        cfg.run.out_dir = args.run
    seed = args.seed if args.seed is not None else (cfg.run.seed if cfg is not None else 0)
    encoder = load_encoder(
        run_cfg=cfg,
        weights=args.weights,
        model=args.model,
        random_init=args.random_init,
        img_size=args.img_size,
        seed=seed,
        download=args.download,
        timm_kwargs=json.loads(args.timm_kwargs) if args.timm_kwargs else None,
        bands=S1_BANDS if args.modality == "s1" else None,  # a random encoder without a run
    )
    cache = args.cache or (os.path.splitext(args.out)[0] + ".features" if args.out else None)
    return evaluate(
        encoder,
        args.dataset,
        args.root,
        protocol=args.protocol,
        modality=args.modality,
        run_cfg=cfg,
        train_fraction=args.train_fraction,
        pool=args.pool,
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=cache,
        seed=seed,
        k=args.k,
        epochs=args.epochs,
        lr=args.lr,
        num_workers=args.workers,
        progress=not args.no_progress,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--root", help="the dataset folder (for sample: a prepared folder; default the run's data.root)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", help="weights file, or a torchgeo weights name (default with --run: its encoder)")
    src.add_argument("--random-init", action="store_true", help="the untrained encoder")
    p.add_argument("--run", help="a pretraining output folder (holds config.yaml)")
    p.add_argument("--model", choices=MODELS, help="architecture (released weights, --random-init without --run)")
    p.add_argument("--timm-kwargs", help="JSON of extra timm.create_model arguments, e.g. '{\"depth\": 2}'")
    p.add_argument("--img-size", type=int, default=None, help="input size without --run (default 224)")
    p.add_argument("--protocol", default="linear", choices=PROTOCOLS)
    p.add_argument("--modality", choices=["s2", "s1"], default=None, help="default: the encoder's")
    p.add_argument("--train-fraction", type=float, default=None, help="training subset (ssl4eo on BigEarthNet: 0.1)")
    p.add_argument("--pool", default="cls", choices=POOLS, help="ViT features (default: the class token)")
    p.add_argument("--k", type=int, default=20, help="neighbours of the knn protocol")
    p.add_argument("--epochs", type=int, default=100, help="ssl4eo protocol: epochs of the linear head")
    p.add_argument("--lr", type=float, default=0.1, help="ssl4eo protocol: SGD learning rate")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--seed", type=int, default=None, help="init seed of --random-init (default: run.seed)")
    p.add_argument("--data", help="override the run's data.root (dataset sample)")
    p.add_argument("--download", action="store_true", help="allow fetching a torchgeo weights name")
    p.add_argument("--out", help="JSON report (features are cached beside it in OUT.features/)")
    p.add_argument("--cache", help="feature cache folder (default: beside --out)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.run is None and args.weights is None and not args.random_init:
        print("error: give --run, --weights or --random-init", file=sys.stderr)
        return 2
    if args.run and not os.path.isfile(os.path.join(args.run, "config.yaml")):
        print(f"error: --run {args.run} holds no config.yaml (a pretraining output folder)", file=sys.stderr)
        return 2
    if args.run and not args.random_init:
        w = args.weights or os.path.join(args.run, "encoder.safetensors")
        if not os.path.exists(w):
            print(f"error: {w} does not exist (pretrain first, or pass --weights / --random-init)", file=sys.stderr)
            return 1
    if args.dataset == "sample" and args.run and not args.data:
        cfg = load_config(os.path.join(args.run, "config.yaml"), defaults=DEFAULTS)
        if cfg.data.holdout_fraction is None:
            print(
                f"warning: this run pretrained on every tile of {cfg.data.root} (data.holdout_fraction: null), "
                "so the test tiles below were seen in pretraining; pass --data with another prepared folder "
                "for an unseen region",
                file=sys.stderr,
            )
    try:
        report = run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_report(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"  wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
