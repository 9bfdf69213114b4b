"""Evaluation protocols on frozen features: ``linear``, ``knn`` and ``ssl4eo``.

- ``extract(encoder, dataset, ...)``: features of every item, batched (on the GPU when there is
  one), with a progress bar, cached in a ``.pt`` file keyed by everything they depend on
  (weights file and its modification time, architecture, bands, size, pooling, normalisation,
  dataset root, split and subset).
- ``linear``: logistic regression on the frozen features (``fastcon.train.probe``), its L2
  weight chosen on the validation split (k-fold cross-validation on the training split when
  the dataset has none); multi-label data: micro and macro mAP; multi-class: top-1 accuracy.
- ``knn``: cosine k-nearest neighbours (k = 20) between test and training features, votes
  weighted by ``exp(similarity / 0.07)`` (the weighting of DINO's k-NN evaluation); multi-label
  scores are the weighted mean of the neighbours' multi-hot labels.
- ``ssl4eo``: the SSL4EO-S12 linear-classification protocol: a linear head on the frozen
  backbone trained with SGD (momentum 0.9) and ``MultiLabelSoftMarginLoss`` on augmented views
  (RandomResizedCrop(size, scale 0.8-1) and flips) of the (10 %) training subset, evaluated on
  Resize(256 / 224 * size) + CenterCrop(size) views; micro mAP (multi-label) or top-1 accuracy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastcon.train.probe import check_pool, encoder_features, fit_linear_probe, mean_average_precision, top1_accuracy

PROTOCOLS = ("linear", "knn", "ssl4eo")
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def micro_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """AP of all (sample, class) pairs pooled: scikit-learn's ``average_precision_score(average="micro")``."""
    return mean_average_precision(scores.reshape(-1, 1), targets.reshape(-1, 1))[0]


def scores_to_metrics(scores: torch.Tensor, y: torch.Tensor, task: str, classes) -> tuple[dict, dict]:
    """({metric: value}, {class: AP}) of test scores against targets."""
    if task == "multiclass":
        return {"top1": top1_accuracy(scores, y)}, {}
    macro, ap = mean_average_precision(scores, y)
    per_class = {c: (float(a) if not math.isnan(a) else None) for c, a in zip(classes, ap.tolist())}
    return {"map_micro": micro_average_precision(scores, y), "map_macro": macro}, per_class


def _fingerprint(encoder, dataset, pool: str) -> str:
    src = encoder.source
    stamp = [src]
    if os.path.isfile(src):
        st = os.stat(src)
        stamp += [st.st_size, st.st_mtime_ns]
    s = dataset.source
    key = {
        "encoder": stamp,
        "model": encoder.model,
        "bands": list(map(str, encoder.bands)),
        "size": dataset.size,
        "pool": pool,
        "norm": [list(encoder.norm.mean), list(encoder.norm.std)],
        "arch": sum(p.numel() for p in encoder.module.parameters()),
        "data": [s.name, os.path.abspath(getattr(s.dataset, "root", "") or ""), s.split, list(s.bands), len(s)],
        "subset": hashlib.blake2b(s.subset.tobytes()).hexdigest() if s.subset is not None else None,
        # the sample's spatial split: which tiles of the folder this split holds
        "tiles": hashlib.blake2b(np.asarray(s.dataset.indices).tobytes()).hexdigest()
        if hasattr(s.dataset, "indices")
        else None,
    }
    return hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=10).hexdigest()


@torch.no_grad()
def extract(
    encoder,
    dataset,
    *,
    pool: str = "cls",
    batch_size: int = 64,
    device=None,
    cache_dir: str | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, F) float32, targets (N, C) float32) of an ``EvalDataset``; cached under ``cache_dir``."""
    check_pool(pool)
    path = None
    if cache_dir is not None:
        s = dataset.source
        path = os.path.join(cache_dir, f"{s.name}_{s.split}_{_fingerprint(encoder, dataset, pool)}.pt")
        if os.path.isfile(path):
            cached = torch.load(path, map_location="cpu", weights_only=True)
            return cached["features"], cached["targets"]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = encoder.module.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, targets = [], []
    desc = f"features {dataset.source.name}/{dataset.source.split}"
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        feats.append(encoder_features(module, x.to(device, non_blocking=True), pool).float().cpu())
        targets.append(y)
    x, y = torch.cat(feats), torch.cat(targets)
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        torch.save({"features": x, "targets": y}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return x, y


def linear(train, val, test, task: str, classes, *, seed: int = 0, weight_decays=WEIGHT_DECAYS) -> dict:
    """Fit on ``train`` (x, y), choose the L2 weight on ``val`` (None: 3-fold CV on train), score ``test``."""
    multiclass = task == "multiclass"
    clf = fit_linear_probe(*train, weight_decays=weight_decays, seed=seed, val=val, multiclass=multiclass)
    metrics, per_class = scores_to_metrics(clf.scores(test[0].double()), test[1], task, classes)
    return {
        "metrics": metrics,
        "per_class_ap": per_class,
        "weight_decay": clf.weight_decay,
        "selected_on": clf.selected_on,
        "selection_scores": {str(k): v for k, v in clf.cv_map.items()},
    }


def knn(train, test, task: str, classes, *, k: int = 20, temperature: float = 0.07) -> dict:
    """Cosine k-NN of the test features among the training features."""
    xtr, ytr = F.normalize(train[0].float(), dim=1), train[1].float()
    xte = F.normalize(test[0].float(), dim=1)
    k = min(k, xtr.shape[0])
    scores = []
    for chunk in torch.split(xte, 1024):
        sim, idx = (chunk @ xtr.T).topk(k, dim=1)
        w = (sim / temperature).exp()
        scores.append((w[:, :, None] * ytr[idx]).sum(1) / w.sum(1, keepdim=True))
    metrics, per_class = scores_to_metrics(torch.cat(scores).double(), test[1], task, classes)
    return {"metrics": metrics, "per_class_ap": per_class, "k": k}


def ssl4eo(
    encoder,
    train_set,
    test_set,
    task: str,
    classes,
    *,
    pool: str = "cls",
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    device=None,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """The SSL4EO-S12 linear protocol: an SGD-trained linear head on the frozen backbone, augmented views."""
    from torchvision.transforms import v2 as T

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = train_set.size
    train_set.size = test_set.size = math.ceil(size * 256 / 224)  # the loader resizes to 256/224 of the size
    aug = T.Compose([T.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True), T.RandomHorizontalFlip()])
    aug = T.Compose([aug, T.RandomVerticalFlip()])
    center = T.CenterCrop(size)
    module = encoder.module.to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, shuffle=True, drop_last=False, num_workers=num_workers, generator=gen
    )
    with torch.no_grad():
        dim = encoder_features(module, torch.zeros(1, len(encoder.bands), size, size, device=device), pool).shape[1]
    head = torch.nn.Linear(dim, len(classes)).to(device)
    torch.nn.init.normal_(head.weight, std=0.01)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = torch.nn.MultiLabelSoftMarginLoss() if task == "multilabel" else torch.nn.CrossEntropyLoss()
    for _ in tqdm(range(epochs), desc="ssl4eo linear head", disable=not progress, leave=False):
        for x, y in loader:
            x = torch.stack([aug(xi) for xi in x]).to(device)
            with torch.no_grad():
                f = encoder_features(module, x, pool).float()
            out = head(f)
            loss = loss_fn(out, y.to(device) if task == "multilabel" else y.argmax(1).to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    scores, targets = [], []
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test_set, batch_size=batch_size, num_workers=num_workers):
            f = encoder_features(module, center(x).to(device), pool).float()
            scores.append(head(f).double().cpu())
            targets.append(y)
    train_set.size = test_set.size = size
    metrics, per_class = scores_to_metrics(torch.cat(scores), torch.cat(targets), task, classes)
    return {"metrics": metrics, "per_class_ap": per_class, "epochs": epochs, "lr": lr, "batch_size": batch_size}
