"""Linear probing of a frozen encoder on multi-label land cover: features, classifier, average precision.

- ``extract_features(encoder, loader, device, pool="cls")``: one pass over a loader of whole
  tiles; ViTs give the class token (the encoder output that pretraining feeds to the projector,
  and what MoCo v3 / SoftCon probe), the mean patch token, or both concatenated (DINOv2's
  recipe); CNNs their pooled features.
- ``fit_linear_probe(x, y, weight_decays, folds)``: independent logistic regressions (one per
  class) on standardised features, fitted full-batch with L-BFGS; the L2 weight is picked by
  k-fold cross-validated mAP on the training set only.
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


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device, pool: str = "cls") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, F) float32 on the CPU, tile indices (N,)) of every batch's ``view1``."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    encoder.eval()
    feats, indices = [], []
    for batch in loader:
        x = batch["view1"].to(device)
        if hasattr(encoder, "num_prefix_tokens"):  # ViT: tokens (B, P + L, D)
            tokens = encoder.forward_features(x)
            p = encoder.num_prefix_tokens
            cls, avg = tokens[:, 0], tokens[:, p:].mean(dim=1)
            f = {"cls+avg": torch.cat([cls, avg], dim=1), "cls": cls, "avg": avg}[pool]
        else:
            f = encoder(x)
        feats.append(f.float().cpu())
        indices.append(batch["indices"].cpu())
    return torch.cat(feats), torch.cat(indices)


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
    """A fitted multi-label linear classifier on standardised features."""

    weight: torch.Tensor  # (C, F)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (F,)
    std: torch.Tensor  # (F,)
    weight_decay: float
    cv_map: dict

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias


def _fit_many(x: torch.Tensor, y: torch.Tensor, sample_weights: torch.Tensor, weight_decays, iters: int):
    """K independent logistic-regression problems at once: problem k minimises the
    ``sample_weights[k]``-weighted mean BCE plus ``weight_decays[k] / 2 * ||W_k||^2``. Their sum
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
        bce = F.binary_cross_entropy_with_logits(logits, y.expand(k, -1, -1), reduction="none").mean(dim=2)
        loss = (sw * bce).sum() + 0.5 * (wd * (w * w).sum(dim=(1, 2))).sum()
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


def fit_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    weight_decays=(1e-4, 1e-3, 1e-2, 1e-1),
    folds: int = 3,
    seed: int = 0,
    iters: int = 200,
) -> LinearProbe:
    """Fit on (x (N, F), y (N, C) multi-hot); the weight decay with the best cross-validated mAP wins."""
    x, y = x.double(), (y > 0).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    n = x.shape[0]
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[torch.randperm(n, generator=torch.Generator().manual_seed(seed))] = torch.arange(n) % folds
    # every (weight decay, fold) problem in one batched fit
    grid = [(wd, k) for wd in weight_decays for k in range(folds)]
    train_mask = torch.stack([(fold_of != k).double() for _, k in grid])
    w, b = _fit_many(xs, y, train_mask, [wd for wd, _ in grid], iters)
    cv = {}
    for i, (wd, k) in enumerate(grid):
        held = fold_of == k
        m, _ = mean_average_precision(xs[held] @ w[i].T + b[i], y[held])
        cv[wd] = cv.get(wd, 0.0) + m / folds
    best = max(cv, key=lambda wd: (cv[wd], wd))  # ties: the stronger regularisation
    w, b = _fit_many(xs, y, torch.ones(1, n, dtype=torch.float64), [best], iters)
    return LinearProbe(w[0], b[0], mean, std, best, cv)
