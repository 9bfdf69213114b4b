"""Linear probing of a frozen encoder: features, classifier, average precision and accuracy.

- ``encoder_features(encoder, x, pool="cls")``: ViTs give the class token (the encoder output
  that pretraining feeds to the projector, and what MoCo v3 / SoftCon probe), the mean patch
  token, or both concatenated (DINOv2's recipe); CNNs their pooled features.
- ``fit_linear_probe(x, y, weight_decays, folds, val=None, multiclass=False)``: logistic
  regression on standardised features, fitted full-batch with L-BFGS: independent sigmoid
  outputs (multi-label, scored by mAP) or one softmax (``multiclass``: ``y`` one-hot, scored by
  top-1 accuracy). The L2 weight is picked on ``val = (x_val, y_val)`` when given (a
  validation split), else by k-fold cross-validation on the training set; never on the test set.
- ``average_precision(scores, targets)``: per-class AP as the area under the precision-recall
  step curve over distinct score thresholds (what scikit-learn's ``average_precision_score``
  computes); NaN for a class without positives, which ``mean_average_precision`` leaves out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

POOLS = ("cls", "cls+avg", "avg")


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    return pool


def encoder_features(encoder: nn.Module, x: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """Frozen features (B, F) of a batch of normalised images (B, C, H, W)."""
    if hasattr(encoder, "num_prefix_tokens"):  # ViT: tokens (B, P + L, D)
        tokens = encoder.forward_features(x)
        p = encoder.num_prefix_tokens
        cls, avg = tokens[:, 0], tokens[:, p:].mean(dim=1)
        return {"cls+avg": torch.cat([cls, avg], dim=1), "cls": cls, "avg": avg}[pool]
    return encoder(x)


def top1_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose highest score is at their class (``targets`` one-hot (N, C) or indices (N,))."""
    if targets.dim() == 2:
        targets = targets.argmax(dim=1)
    return float((scores.argmax(dim=1) == targets).double().mean())


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(C,) AP of each column of ``scores`` (N, C) against binary ``targets`` (N, C); NaN without positives."""
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and targets must both be (N, C), got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    out = torch.full((scores.shape[1],), math.nan, dtype=torch.float64)
    for c in range(scores.shape[1]):
        s, t = scores[:, c].double(), (targets[:, c] > 0).double()
        positives = t.sum()
        if positives == 0:
            continue
        order = torch.argsort(s, descending=True, stable=True)
        s, t = s[order], t[order]
        tp = torch.cumsum(t, 0)
        # the last index of each run of equal scores is one threshold
        last = torch.ones_like(s, dtype=torch.bool)
        last[:-1] = s[1:] != s[:-1]
        tp, seen = tp[last], torch.nonzero(last).squeeze(1).double() + 1
        precision, recall = tp / seen, tp / positives
        recall_step = torch.diff(recall, prepend=recall.new_zeros(1))
        out[c] = (recall_step * precision).sum()
    return out


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(mean AP over the classes that have positives, per-class AP with NaN for the others)."""
    ap = average_precision(scores, targets)
    valid = ~torch.isnan(ap)
    return (float(ap[valid].mean()) if valid.any() else math.nan), ap


@dataclass
class LinearProbe:
    """A fitted linear classifier on standardised features (sigmoid outputs, or softmax if ``multiclass``)."""

    weight: torch.Tensor  # (C, F)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (F,)
    std: torch.Tensor  # (F,)
    weight_decay: float
    cv_map: dict  # weight decay -> its selection score (mAP, or top-1 accuracy if multiclass)
    multiclass: bool = False
    selected_on: str = "cv"  # "cv" (k-fold on the training set) or "val" (the validation split)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias


def _fit_many(
    x: torch.Tensor, y: torch.Tensor, sample_weights: torch.Tensor, weight_decays, iters: int, multiclass: bool = False
):
    """K independent logistic-regression problems at once: problem k minimises the
    ``sample_weights[k]``-weighted mean BCE (or softmax cross-entropy, ``multiclass``) plus ``weight_decays[k] / 2 * ||W_k||^2``. Their sum
    separates, so one full-batch L-BFGS over all of them finds each one's optimum (every problem
    is strictly convex), with one small batched product per evaluation instead of K.
    Returns W (K, C, F) and b (K, C)."""
    k, c, f = len(weight_decays), y.shape[1], x.shape[1]
    wd = torch.as_tensor(weight_decays, dtype=torch.float64)
    sw = sample_weights / sample_weights.sum(dim=1, keepdim=True)  # (K, N), rows sum to 1
    w = torch.zeros(k, c, f, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, c, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=iters, history_size=20, tolerance_grad=1e-10, tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        logits = torch.einsum("nf,kcf->knc", x, w) + b[:, None, :]
        if multiclass:
            per_sample = -(y * F.log_softmax(logits, dim=2)).sum(dim=2)
        else:
            per_sample = F.binary_cross_entropy_with_logits(logits, y.expand(k, -1, -1), reduction="none").mean(dim=2)
        loss = (sw * per_sample).sum() + 0.5 * (wd * (w * w).sum(dim=(1, 2))).sum()
        loss.backward()
        return loss

    # a small problem: one thread avoids OpenMP synchronisation that costs more than the work
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return w.detach(), b.detach()


def _score(scores: torch.Tensor, y: torch.Tensor, multiclass: bool) -> float:
    return top1_accuracy(scores, y) if multiclass else mean_average_precision(scores, y)[0]


def fit_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    weight_decays=(1e-4, 1e-3, 1e-2, 1e-1),
    folds: int = 3,
    seed: int = 0,
    iters: int = 200,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    multiclass: bool = False,
) -> LinearProbe:
    """Fit on (x (N, F), y (N, C) multi-hot, or one-hot if ``multiclass``); the weight decay with the
    best validation score wins: on ``val`` when given, else k-fold cross-validated on (x, y)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be (N, F) and (N, C), got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), (y > 0).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    n = x.shape[0]
    cv = {}
    if val is not None:  # one fit per weight decay on all training rows, scored on the validation split
        xv, yv = (val[0].double() - mean) / std, (val[1] > 0).double()
        w, b = _fit_many(
            xs, y, torch.ones(len(weight_decays), n, dtype=torch.float64), weight_decays, iters, multiclass
        )
        for i, wd in enumerate(weight_decays):
            cv[wd] = _score(xv @ w[i].T + b[i], yv, multiclass)
    else:
        fold_of = torch.empty(n, dtype=torch.long)
        fold_of[torch.randperm(n, generator=torch.Generator().manual_seed(seed))] = torch.arange(n) % folds
        # every (weight decay, fold) problem in one batched fit
        grid = [(wd, k) for wd in weight_decays for k in range(folds)]
        train_mask = torch.stack([(fold_of != k).double() for _, k in grid])
        w, b = _fit_many(xs, y, train_mask, [wd for wd, _ in grid], iters, multiclass)
        for i, (wd, k) in enumerate(grid):
            held = fold_of == k
            cv[wd] = cv.get(wd, 0.0) + _score(xs[held] @ w[i].T + b[i], y[held], multiclass) / folds
    best = max(cv, key=lambda wd: (cv[wd], wd))  # ties: the stronger regularisation
    if val is not None:
        i = list(weight_decays).index(best)
        w, b = w[i : i + 1], b[i : i + 1]
    else:
        w, b = _fit_many(xs, y, torch.ones(1, n, dtype=torch.float64), [best], iters, multiclass)
    return LinearProbe(w[0], b[0], mean, std, best, cv, multiclass, "val" if val is not None else "cv")
