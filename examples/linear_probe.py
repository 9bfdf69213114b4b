"""Linear probe: how well do a frozen encoder's features predict land cover in an unseen region?

    python examples/linear_probe.py --run runs/demo                  # the run's encoder.safetensors
    python examples/linear_probe.py --run runs/demo --random-init    # same architecture, untrained
    python examples/linear_probe.py --run runs/demo --weights runs/demo/checkpoints/step_00000100.ckpt

1. The run's config.yaml gives the architecture, the input size, the data folder and the spatial
   hold-out used in pretraining. The test tiles are the held-out region (the east quarter of each
   scene by default): pretraining never saw them, and no test pixel lies in a training tile.
2. The encoder is built as in pretraining and frozen: loaded from ``--weights`` (a timm
   ``.safetensors`` / ``.pth``, or a pretraining ``.ckpt``), or left at its random initial weights
   (``--random-init``: by default the very initialisation pretraining started from, run.seed).
3. Features of every whole tile (resized to the pretraining crop size): for ViTs the class token,
   the encoder output that pretraining shapes (``--pool cls+avg`` adds the mean patch token, as
   DINOv2 probes); for CNNs the pooled features.
4. One logistic regression per class (multi-label), its L2 weight chosen by 3-fold cross-validation
   on the training tiles; the test set reports average precision per class and their mean (mAP).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from fastcon.data import TileDataset, make_loader, spatial_split
from fastcon.models import create_encoder, load_pretrained
from fastcon.train import load_checkpoint, load_config, seed_everything
from fastcon.train.probe import POOLS, extract_features, fit_linear_probe, mean_average_precision

DEFAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "defaults.yaml")


def build_encoder(cfg, bands, weights: str | None, seed: int):
    """The pretraining architecture; weights from a file, or the random initialisation of ``seed``."""
    seed_everything(seed)  # pretrain.py seeds the same way before it builds the encoder
    m = cfg.model
    encoder = create_encoder(m.name, bands=list(bands), img_size=cfg.data.crop_size, **m.timm_kwargs)
    if weights is None:
        return encoder, f"random init (seed {seed})"
    if weights.endswith(".ckpt"):  # a pretraining checkpoint: the student's encoder
        student = load_checkpoint(weights)["student"]
        prefix = "online.encoder."
        encoder.load_state_dict({k[len(prefix) :]: v for k, v in student.items() if k.startswith(prefix)})
    else:
        load_pretrained(encoder, weights)
    return encoder, weights


def probe(cfg, weights: str | None, *, seed: int, pool: str, device, batch_size: int = 64) -> dict:
    dataset = TileDataset(cfg.data.root)
    fraction = cfg.data.holdout_fraction if cfg.data.holdout_fraction is not None else 0.25
    train_idx, test_idx = spatial_split(dataset, fraction, axis=cfg.data.holdout_axis)
    encoder, source = build_encoder(cfg, dataset.band_names, weights, seed)
    encoder.to(device)

    def features(indices):
        loader = make_loader(
            dataset, batch_size, augment=False, shuffle=False, drop_last=False, indices=indices,
            crop_size=cfg.data.crop_size, num_workers=0, backend="torch", labels="multihot",
        )  # fmt: skip
        return extract_features(encoder, loader, device, pool=pool)

    t0 = time.perf_counter()
    x_train, i_train = features(train_idx)
    x_test, i_test = features(test_idx)
    multihot = torch.from_numpy(dataset.multihot).float()
    y_train, y_test = multihot[i_train], multihot[i_test]
    clf = fit_linear_probe(x_train, y_train, seed=seed)
    test_map, ap = mean_average_precision(clf.scores(x_test.double()), y_test)
    return {
        "encoder": source,
        "model": cfg.model.name,
        "pool": pool,
        "train_tiles": len(i_train),
        "test_tiles": len(i_test),
        "feature_dim": x_train.shape[1],
        "weight_decay": clf.weight_decay,
        "cv_map": {str(k): v for k, v in clf.cv_map.items()},
        "test_map": test_map,
        "test_ap": {name: float(a) for name, a in zip(dataset.class_names, ap.tolist())},
        "test_positives": {name: int(n) for name, n in zip(dataset.class_names, y_test.sum(0).tolist())},
        "seconds": time.perf_counter() - t0,
    }


def print_report(r: dict) -> None:
    print(f"linear probe of {r['model']} ({r['encoder']}), {r['pool']} features of dim {r['feature_dim']}")
    print(f"  {r['train_tiles']} training tiles, {r['test_tiles']} test tiles (spatially held out)")
    print(f"  L2 weight {r['weight_decay']:g} (3-fold CV mAP on training tiles: {max(r['cv_map'].values()):.3f})")
    for name, ap in r["test_ap"].items():
        n = r["test_positives"][name]
        print(
            f"    {name:14s} AP {ap:.3f}  ({n} positive test tiles)" if n else f"    {name:14s} no positive test tile"
        )
    print(f"  test mAP {r['test_map']:.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a pretraining output folder (holds config.yaml)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", help="encoder weights (default: RUN/encoder.safetensors)")
    src.add_argument("--random-init", action="store_true", help="probe the untrained encoder")
    p.add_argument("--seed", type=int, default=None, help="init seed with --random-init (default: run.seed)")
    p.add_argument("--pool", default="cls", choices=POOLS, help="ViT features (default: the class token)")
    p.add_argument("--data", help="override the run's data.root")
    p.add_argument("--out", help="JSON report (default: RUN/probe_pretrained.json or RUN/probe_random.json)")
    args = p.parse_args(argv)

    overrides = [f"data.root={args.data}"] if args.data else []
    cfg = load_config(os.path.join(args.run, "config.yaml"), overrides, defaults=DEFAULTS)
    weights = None if args.random_init else (args.weights or os.path.join(args.run, "encoder.safetensors"))
    if weights is not None and not os.path.exists(weights):
        print(f"error: {weights} does not exist (pretrain first, or pass --weights / --random-init)", file=sys.stderr)
        return 1
    if cfg.data.holdout_fraction is None and not args.data:
        print(
            f"warning: this run pretrained on every tile of {cfg.data.root} (data.holdout_fraction: null), "
            "so the test tiles below were seen in pretraining; pass --data with another prepared folder "
            "for an unseen region",
            file=sys.stderr,
        )
    seed = cfg.run.seed if args.seed is None else args.seed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = probe(cfg, weights, seed=seed, pool=args.pool, device=device)
    print_report(report)
    out = args.out or os.path.join(args.run, f"probe_{'random' if args.random_init else 'pretrained'}.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
