"""``evaluate``: one encoder on one dataset under one protocol, as a report with the published number beside ours."""

from __future__ import annotations

import json
import time
from importlib import resources

from fastcon.eval.data import EvalDataset, Source, fraction_subset, open_split, sample_split
from fastcon.eval.protocols import PROTOCOLS, extract, knn, linear, ssl4eo


def published_table() -> dict:
    """fastcon/eval/published.json: the SoftCon paper's numbers, with their source."""
    return json.loads(resources.files("fastcon.eval").joinpath("published.json").read_text())


def published(model: str, modality: str, dataset: str, metric: str) -> dict | None:
    """The published row for this backbone, modality, dataset and metric, or None."""
    table = published_table()
    for row in table["results"]:
        if (row["model"], row["modality"], row["dataset"], row["metric"]) == (model, modality, dataset, metric):
            return {**row, "source": table["source"]}
    return None


def splits(dataset: str, root: str | None, modality: str, *, run_cfg=None) -> dict[str, Source | None]:
    """train / val / test Sources of a dataset (val None for the sample: CV on train instead)."""
    if dataset == "sample":
        d = run_cfg.data if run_cfg is not None else None
        root = root or (d.root if d is not None else None)
        if root is None:
            raise ValueError("the sample dataset needs --root (a prepared folder) or --run")
        kw = (
            {"holdout_fraction": d.holdout_fraction, "holdout_axis": d.holdout_axis}
            if d
            else {"holdout_fraction": None}
        )
        return {s: sample_split(root, s, **kw) for s in ("train", "test")} | {"val": None}
    if root is None:
        raise ValueError(f"--root is needed for {dataset}: the folder holding the downloaded dataset")
    return {s: open_split(dataset, root, s, modality) for s in ("train", "val", "test")}


def evaluate(
    encoder,
    dataset: str,
    root: str | None = None,
    *,
    protocol: str = "linear",
    modality: str | None = None,
    run_cfg=None,
    train_fraction: float | None = None,
    pool: str = "cls",
    batch_size: int = 64,
    device=None,
    cache_dir: str | None = None,
    seed: int = 0,
    k: int = 20,
    epochs: int = 100,
    lr: float = 0.1,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """``{"results": [...], "encoder": {...}}``: one row per metric, the published number beside ours."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    modality = modality or encoder.modality
    t0 = time.perf_counter()
    parts = splits(dataset, root, modality, run_cfg=run_cfg)
    if train_fraction is None:  # the SSL4EO-S12 / SoftCon BigEarthNet protocol trains on 10 %
        train_fraction = 0.1 if protocol == "ssl4eo" and dataset.startswith("bigearthnet") else 1.0
    train = parts["train"]
    if train_fraction < 1.0:
        train.subset = fraction_subset(len(train.dataset), train_fraction)
    sets = {s: EvalDataset(src, encoder.bands, encoder.norm, encoder.img_size) for s, src in parts.items() if src}
    task, classes = train.task, train.classes
    opts = dict(pool=pool, batch_size=batch_size, device=device, num_workers=num_workers, progress=progress)
    if protocol == "ssl4eo":
        out = ssl4eo(encoder, sets["train"], sets["test"], task, classes, epochs=epochs, lr=lr, seed=seed, **opts)
    else:
        feats = {s: extract(encoder, ds, cache_dir=cache_dir, **opts) for s, ds in sets.items()}
        if protocol == "linear":
            out = linear(feats["train"], feats.get("val"), feats["test"], task, classes, seed=seed)
        else:
            out = knn(feats["train"], feats["test"], task, classes, k=k)
    name = "eurosat-sar" if dataset == "eurosat" and modality == "s1" else dataset
    results = []
    for metric, value in out.pop("metrics").items():
        row = {
            "dataset": dataset,
            "split": "test",
            "protocol": protocol,
            "metric": metric,
            "value": value,
            "n_train": len(parts["train"]),
            "n_val": len(parts["val"]) if parts["val"] is not None else 0,
            "n_test": len(parts["test"]),
            "train_fraction": train_fraction,
            "modality": modality,
        }
        pub = published(encoder.model, modality, name, metric)
        if pub is not None:
            row["published"] = pub["value"] / 100.0
            row["published_source"] = pub["source"]
            row["published_protocol"] = {k: v for k, v in pub.items() if k not in ("value", "source")}
        results.append(row)
    details = {k: v for k, v in out.items()}
    details["seconds"] = time.perf_counter() - t0
    details["pool"] = pool
    return {"results": results, "encoder": encoder.describe(), "details": details}
