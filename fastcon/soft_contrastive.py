"""``fastcon.soft_contrastive_loss``: the SoftCon / SwiMDiff contrastive loss (SPEC section 1).

How the fused backends compute it, never materialising N x N:
- a fused kernel (``sc_forward`` / ``sc_backward``; cpu, triton or cuda) makes the one
  blockwise pass over logit tiles that needs all pairs: row and column log-sum-exps (or the
  softplus row sums of the sigmoid form) forward, and softmax-weighted sums of the embeddings
  backward, recomputing tiles like FlashAttention;
- the multi-label cosine targets enter only through sums that are low rank (SPEC section 5):
  ``sum_j T_ij x_j = lhat_i . (sum_j lhat_j x_j^T) + (1 - |lhat_i|^2) x_i``, a pair of
  (N x C) by (C x D) products. That is O(N * C * D) instead of the O(N^2 * C) of building
  target tiles from label tiles inside the kernel, keeps the kernels free of per-option code,
  and is exact, so the targets are never formed at all. Scene ids are the one-hot case and
  use per-scene sums (``index_add``).
The reference backend is the dense spec (``fastcon.reference``), differentiated by autograd.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastcon import _backends, _checks, reference
from fastcon.reference import MODE_SIGMOID, MODE_SOFTMAX, MODE_SOFTMAX_IGNORE

LOSSES = ("softmax", "sigmoid")
REDUCTIONS = ("mean", "sum", "none")
SCENE_MODES = ("positive", "ignore")
DISTRIBUTED_MODES = ("gather", "ring")
_EPS = 1e-12  # the norm floor of the spec: u = z / max(||z||, 1e-12)


# --------------------------------------------------------------------------------------------
# argument checks


def check_labels(labels, n: int, ref: torch.Tensor, name: str = "labels", rows: str = "") -> None:
    """``rows`` says what the length n is (default: the batch size of z1)."""
    if labels is None:
        return
    _checks.tensor(name, labels, dims=(1, 2))
    _checks.same_device(name, labels, "z1", ref)
    if labels.dtype.is_complex:
        raise TypeError(f"{name} must be real (multi-label vectors) or integer (scene ids), got {labels.dtype}")
    if labels.shape[0] != n:
        rows = rows or f"one row per sample (length {n}, the batch size of z1)"
        raise ValueError(f"{name} must have {rows}, got shape {tuple(labels.shape)}")
    if labels.dim() == 1:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(
                f"1-D {name} are scene ids and must be an integer tensor, got {labels.dtype}; "
                "pass multi-label vectors as a 2-D (N, C) tensor"
            )
        return
    if labels.shape[1] == 0:
        raise ValueError(f"{name} must have at least one class column, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point:
        if not bool(torch.isfinite(labels).all()):
            raise ValueError(f"{name} must be finite, got NaN or infinite values")
    if labels.dtype != torch.bool and bool((labels < 0).any()):
        raise ValueError(f"{name} must be >= 0 (multi-hot or class-fraction vectors), got negative values")


def check_queue(queue, queue_labels, labels, z2: torch.Tensor, loss: str, symmetric: bool) -> None:
    """SPEC section 1b: a (K, D) key queue in z2's dtype and device, and labels of its keys of
    the kind of ``labels``."""
    if queue is None:
        if queue_labels is not None:
            raise ValueError("queue_labels are the labels of a key queue: pass queue= too, or queue_labels=None")
        return
    _checks.tensor("queue", queue, dims=2, floating=True)
    _checks.same_device("queue", queue, "z2", z2)
    _checks.same_dtype("queue", queue, "z2", z2)
    if queue.shape[0] == 0 or queue.shape[1] != z2.shape[1]:
        raise ValueError(
            f"queue must be (K, D) with K >= 1 keys of z2's feature size D = {z2.shape[1]}, got shape {tuple(queue.shape)}"
        )
    if loss == "softmax" and symmetric:
        raise ValueError(
            "symmetric=True is not defined with a queue (the queue's keys have no rows): pass symmetric=False, "
            "and symmetrise as MoCo does by calling again with the views swapped"
        )
    k = queue.shape[0]
    want = {
        None: "None (labels is None)",
        1: f"(K,) = ({k},) integer scene ids (labels holds scene ids)",
        2: f"(K, C) = ({k}, {labels.shape[1] if labels is not None and labels.dim() == 2 else 0}) multi-label "
        "vectors (labels is (N, C))",
    }[None if labels is None else labels.dim()]
    got = None if queue_labels is None else queue_labels.dim() if isinstance(queue_labels, torch.Tensor) else -1
    if (labels is None) != (queue_labels is None) or (labels is not None and got != labels.dim()):
        shown = "None" if queue_labels is None else getattr(queue_labels, "shape", type(queue_labels).__name__)
        raise ValueError(f"queue_labels must be {want}, got {shown}")
    if labels is None:
        return
    rows = f"one entry per queue key (length K = {k})"
    check_labels(queue_labels, k, z2, "queue_labels", rows)
    if labels.dim() == 2 and queue_labels.shape[1] != labels.shape[1]:
        raise ValueError(f"queue_labels must be {want}, got shape {tuple(queue_labels.shape)}")


def _check(
    z1, z2, labels, temperature, loss, symmetric, scene_mode, hard_weight, bias, normalize, reduction, queue=None,
    queue_labels=None,
):  # fmt: skip
    _checks.tensor("z1", z1, dims=2, floating=True)
    _checks.tensor("z2", z2, dims=2, floating=True)
    _checks.same_device("z2", z2, "z1", z1)
    _checks.same_dtype("z2", z2, "z1", z1)
    if z1.shape != z2.shape:
        raise ValueError(f"z2 must have the shape of z1 (N, D) = {tuple(z1.shape)}, got {tuple(z2.shape)}")
    if z1.shape[0] == 0:
        raise ValueError(f"z1 must hold at least one sample (N >= 1), got shape {tuple(z1.shape)}")
    if z1.shape[1] == 0:
        raise ValueError(f"z1 must have at least one feature (D >= 1), got shape {tuple(z1.shape)}")
    check_labels(labels, z1.shape[0], z1)
    _checks.choice("loss", loss, LOSSES)
    _checks.choice("reduction", reduction, REDUCTIONS)
    _checks.choice("scene_mode", scene_mode, SCENE_MODES)
    _checks.boolean("symmetric", symmetric)
    _checks.boolean("normalize", normalize)
    _checks.real("hard_weight", hard_weight, low=0.0, high=1.0)
    tau = _checks.scalar("temperature", temperature, positive=True, device=z1.device)
    if scene_mode == "ignore":
        if labels is None or labels.dim() != 1:
            raise ValueError("scene_mode='ignore' needs scene ids: labels must be a 1-D integer tensor (N,)")
        if loss != "softmax":
            raise ValueError("scene_mode='ignore' is defined for loss='softmax' only")
    if bias is not None:
        if loss != "sigmoid":
            raise ValueError("bias is only used by loss='sigmoid'; pass bias=None for loss='softmax'")
        _checks.scalar("bias", bias, device=z1.device)
    check_queue(queue, queue_labels, labels, z2, loss, symmetric)
    return tau


# --------------------------------------------------------------------------------------------
# low-rank target terms


class Targets:
    """The target similarity T through its off-diagonal formula T~ (T = T~ off the positive
    diagonal, 1 on it; T~_ii = nn_i). ``apply(x)_i = sum_j T~_ij x_j`` for x of shape (N,) or (N, K).
    Labels ``None`` is T~ = 0, so every formula below also covers plain InfoNCE.

    Each sum is a projection onto the classes (``lhat^T x``, C x K) or the scenes (per-scene sums),
    then a lift back to the rows. With a ``reducer`` (fastcon.distributed) the rows are this rank's
    samples and j runs over the global batch: the reducer sums the projections over the ranks
    (``all_reduce`` of the C x K sums; per-scene sums with ``scene_index`` / ``scene_sum``).

    With a key queue (SPEC 1b), ``queue_labels`` label K further columns that hold no row: sums
    over the columns (``full(x, w, xq)`` with xq the queue's part of x) add the queue's own
    projection, lifted to the rows; it is the same on every rank and never reduced."""

    def __init__(self, labels, n: int, acc: torch.dtype, device, reducer=None, queue_labels=None, queue_keys=None):
        self.kind = "none" if labels is None else ("scene" if labels.dim() == 1 else "labels")
        self._reduce = None
        self._queue = None
        # the queue's part of the column sums of ones and of v (None without a queue)
        self.q_ones = None if queue_keys is None else queue_keys.new_ones(queue_keys.shape[0])
        self.q_v = queue_keys
        if self.kind == "labels":
            self.lhat = _unit_rows(labels, acc)
            self.nn = (self.lhat * self.lhat).sum(dim=1)
            self._reduce = None if reducer is None else reducer.all_reduce
            if queue_labels is not None:
                self._queue = _unit_rows(queue_labels, acc)
        elif self.kind == "scene":
            if reducer is None:
                self.inverse, self.num_scenes = _segment_index(labels), n
            else:
                self.inverse, self.num_scenes = reducer.scene_index(labels)
                self._reduce = reducer.scene_sum
            self.nn = torch.ones(n, dtype=acc, device=device)
            if queue_labels is not None:
                self._queue = _SceneLookup(labels, queue_labels)
        else:
            self.nn = torch.zeros(n, dtype=acc, device=device)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "labels":
            return self.lhat.T @ x
        return x.new_zeros((self.num_scenes, *x.shape[1:])).index_add_(0, self.inverse, x)

    def _lift(self, p: torch.Tensor) -> torch.Tensor:
        return self.lhat @ p if self.kind == "labels" else p[self.inverse]

    def _queue_sum(self, xq: torch.Tensor | None) -> torch.Tensor | None:
        """sum over the queue's columns q of T_iq xq_q, for the rows i (None: no queue term)."""
        if self._queue is None or xq is None:
            return None
        if self.kind == "labels":
            return self.lhat @ (self._queue.T @ xq)
        return self._queue.sum(xq)

    def apply(self, x: torch.Tensor, xq: torch.Tensor | None = None) -> torch.Tensor | None:
        """sum_j T~_ij x_j (plus the queue's columns with xq); None stands for zeros (no labels)."""
        if self.kind == "none":
            return None
        p = self._project(x)
        return _plus(self._lift(p if self._reduce is None else self._reduce(p)), self._queue_sum(xq))

    def full(self, x: torch.Tensor, w: torch.Tensor | None = None, xq: torch.Tensor | None = None) -> torch.Tensor:
        """sum_j T_ij (w_j x_j) with the true diagonal T_ii = 1, for x (N,) or (N, D) and optional w (N,);
        xq: the queue's part of x (its columns carry no weight w), None for a sum over the batch only."""
        wx = _weighted(x, w)
        off = self.apply(wx, xq)
        diag = _weighted(wx, 1 - self.nn)
        return diag if off is None else off.add_(diag)

    def full_many(self, items):
        """``full(x, w, xq)`` for each (x, w, xq) in items, yielded one at a time. With a reducer, the
        projections of all items are summed over the ranks in one communication; without one,
        each is computed only when the caller asks for it (no extra memory)."""
        if self._reduce is None:
            for x, w, xq in items:
                yield self.full(x, w, xq)
            return
        projs = [self._project(_weighted(x, w)) for x, w, _ in items]
        widths = [p[0].numel() for p in projs]
        total = self._reduce(torch.cat([p.reshape(p.shape[0], -1) for p in projs], dim=1))
        del projs
        for (x, w, xq), chunk in zip(items, total.split(widths, dim=1)):
            wx = _weighted(x, w)
            off = _plus(self._lift(chunk.reshape(chunk.shape[0], *x.shape[1:])), self._queue_sum(xq))
            yield off.add_(_weighted(wx, 1 - self.nn))


def _plus(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return a if b is None else a.add_(b)


def _unit_rows(labels: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """l_i / ||l_i|| in acc, 0 for a zero row."""
    l = labels.to(acc)
    norm = l.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, l / norm.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(l))


def _sorted_runs(ids: torch.Tensor):
    """(sorted ids, their order, the run number of each sorted position): equal ids share a run."""
    ordered, order = torch.sort(ids.to(torch.int64))
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    return ordered, order, starts.cumsum(0).sub_(1)


def _segment_index(ids: torch.Tensor) -> torch.Tensor:
    """A scene index in [0, n) for each of the n ids (equal ids, equal index), without a host
    sync (no ``unique``, no ``max``): per-scene tables then have n rows."""
    _, order, runs = _sorted_runs(ids)
    return torch.empty_like(runs).scatter_(0, order, runs)


class _SceneLookup:
    """Per-row sums over the queue keys of the row's scene: the queue's ids sorted once, a
    per-scene table of the values, and a binary search of each row's id (no host sync)."""

    def __init__(self, row_ids: torch.Tensor, queue_ids: torch.Tensor):
        ordered, order, runs = _sorted_runs(queue_ids)
        self.inverse = torch.empty_like(runs).scatter_(0, order, runs)
        rid = row_ids.to(torch.int64)
        pos = torch.searchsorted(ordered, rid).clamp_(max=ordered.shape[0] - 1)
        self.hit = ordered[pos] == rid  # the row's scene has keys in the queue
        self.row_scene = runs[pos]

    def sum(self, xq: torch.Tensor) -> torch.Tensor:
        table = xq.new_zeros(xq.shape).index_add_(0, self.inverse, xq)
        return torch.where(self.hit if xq.dim() == 1 else self.hit[:, None], table[self.row_scene], 0.0)


def _weighted(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """w_i x_i for x (N,) or (N, K)."""
    if w is None:
        return x
    return w * x if x.dim() == 1 else w[:, None] * x


# --------------------------------------------------------------------------------------------
# the algebra around the kernel pass, shared by the single-process Function and the distributed
# one (fastcon.distributed): rows are the local samples, column sums run over the whole batch


def _normalize(z1, z2, normalize: bool, kdt: torch.dtype, acc: torch.dtype):
    """Unit rows in the accumulation dtype, handed to the kernel in its storage dtype ``kdt``.
    Returns (uk, vk) for the kernel, (u, v) = the values the kernel sees in ``acc`` (for the target
    terms), and the row norms (None without normalisation) for the backward."""
    z1a, z2a = z1.to(acc), z2.to(acc)
    if normalize:
        n1 = z1a.norm(dim=1).clamp_min_(_EPS)
        n2 = z2a.norm(dim=1).clamp_min_(_EPS)
        z1a, z2a = z1a / n1[:, None], z2a / n2[:, None]
    else:
        n1 = n2 = None
    uk, vk = z1a.to(kdt).contiguous(), z2a.to(kdt).contiguous()
    return uk, vk, uk.to(acc), vk.to(acc), n1, n2


def _queue_keys(queue, normalize: bool, kdt: torch.dtype, acc: torch.dtype):
    """The queue's keys normalised like z2 (no gradient): (for the kernel, in acc), or (None, None)."""
    if queue is None:
        return None, None
    q = queue.detach().to(acc)
    if normalize:
        q = q / q.norm(dim=1, keepdim=True).clamp_min_(_EPS)
    qk = q.to(kdt).contiguous()
    return qk, qk.to(acc)


def _scene_ids(labels, queue_labels):
    """int64 scene ids of the rows and of the columns (batch, then queue) for the kernels."""
    ids = labels.to(torch.int64).contiguous()
    if queue_labels is None:
        return ids, ids
    return ids, torch.cat([ids, queue_labels.to(torch.int64)])


def _per_sample_losses(mode, need_col, hw, scale, bias_v, u, v, row, col, t: Targets):
    """Per-sample losses from the kernel statistics (row / col log-sum-exps or softplus sums) and
    the target sums. Returns (per-sample losses, target row sums R or None)."""
    sd = _logit_dot(u, v, scale)  # s_ii, the positive logits
    if mode == MODE_SOFTMAX_IGNORE:
        per_a = row - sd
        per_b = col - sd if need_col else None
        r_sum = None
    elif mode == MODE_SOFTMAX:
        ones = torch.ones_like(t.nn)
        sums = t.full_many([(ones, None, t.q_ones), (v, None, t.q_v)] + ([(u, None, None)] if need_col else []))
        r_sum = next(sums)
        ts = _logit_dot(u, next(sums), scale)  # sum_j T_ij s_ij
        per_a = row - hw * sd - (1 - hw) * ts / r_sum
        if need_col:  # T is symmetric here: column sums equal row sums
            tsc = _logit_dot(v, next(sums), scale)
            per_b = col - hw * sd - (1 - hw) * tsc / r_sum
        else:
            per_b = None
    else:  # sigmoid: sum_j T'_ij x_ij = hw x_ii + (1 - hw) (sum_j T_ij s_ij + bias R_i)
        sums = t.full_many([(torch.ones_like(t.nn), None, t.q_ones), (v, None, t.q_v)])
        r_sum = next(sums)
        ts = _logit_dot(u, next(sums), scale)
        per_a = row - hw * (sd + bias_v) - (1 - hw) * (ts + bias_v * r_sum)
        per_b = None
    per = (per_a + per_b) / 2 if per_b is not None else per_a
    return per, r_sum


def _subtract_targets(mode, hw, g, h, r_sum, u, v, t: Targets, gu, gv) -> None:
    """GU_i = sum_j G_ij v_j and GV_j = sum_i G_ij u_i, where G = dL/ds: the kernel gives the
    softmax / sigmoid part in gu, gv; this subtracts the target part, in place."""
    if mode == MODE_SOFTMAX_IGNORE:
        gu.sub_((g + (h if h is not None else 0))[:, None] * v)
        gv.sub_((g + (h if h is not None else 0))[:, None] * u)
    elif mode == MODE_SOFTMAX:
        # - g_i sum_j P'_ij v_j  and  - sum_i g_i P'_ij u_i
        items = [(v, None, t.q_v), (u, g / r_sum, None)]
        items += [(v, h / r_sum, None), (u, None, None)] if h is not None else []
        sums = t.full_many(items)
        gu.sub_(((1 - hw) * g / r_sum)[:, None] * next(sums)).sub_((hw * g)[:, None] * v)
        gv.sub_((1 - hw) * next(sums)).sub_((hw * g)[:, None] * u)
        if h is not None:  # - sum_j h_j Q'_ij v_j  and  - h_j sum_i Q'_ij u_i  (C_j = R_j)
            gu.sub_((1 - hw) * next(sums)).sub_((hw * h)[:, None] * v)
            gv.sub_(((1 - hw) * h / r_sum)[:, None] * next(sums)).sub_((hw * h)[:, None] * u)
    else:  # sigmoid: G_ij = g_i (sigmoid(x_ij) - T'_ij)
        sums = t.full_many([(v, None, t.q_v), (u, g, None)])
        gu.sub_(((1 - hw) * g)[:, None] * next(sums)).sub_((hw * g)[:, None] * v)
        gv.sub_((1 - hw) * next(sums)).sub_((hw * g)[:, None] * u)


def _scalar_grads(scale, hw, g, r_sum, u, gu, wsum):
    """(dL/dtau, dL/dbias) from this process's rows, before gu is scaled:
    dL/dtau = -scale^2 * sum_ij G_ij (u_i . v_j) = -scale^2 * sum_i u_i . GU_i;
    dL/dbias = sum_ij G_ij (sigmoid only; None otherwise)."""
    d_tau = -(scale**2) * (u * gu).sum()
    d_bias = None if r_sum is None else wsum.sum() - (g * (hw + (1 - hw) * r_sum)).sum()
    return d_tau, d_bias


# --------------------------------------------------------------------------------------------
# the autograd Function shared by every fused backend


class _FusedSoftContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z1, z2, temperature, bias, labels, cfg, core, queue=None, queue_labels=None):
        loss, symmetric, hard_weight, normalize, reduction, scene_ignore = cfg
        n = z1.shape[0]
        acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
        scale = 1.0 / float(temperature)
        bias_v = 0.0 if bias is None else float(bias)
        mode = MODE_SIGMOID if loss == "sigmoid" else (MODE_SOFTMAX_IGNORE if scene_ignore else MODE_SOFTMAX)
        need_col = loss == "softmax" and symmetric and queue is None

        kdt = core.kernel_dtype(z1.dtype)
        uk, vk, u, v, n1, n2 = _normalize(z1, z2, normalize, kdt, acc)
        qk, vq = _queue_keys(queue, normalize, kdt, acc)
        ids, col_ids = _scene_ids(labels, queue_labels) if scene_ignore else (None, None)
        cols = vk if qk is None else torch.cat([vk, qk])  # the M = N + K columns
        bound = scale if normalize else 0.0  # |s_ij| <= 1/tau for unit vectors

        row, col = core.forward(uk, cols, ids, col_ids, 0, scale, bias_v, bound, mode, need_col)
        t = Targets(None if scene_ignore else labels, n, acc, z1.device, queue_labels=queue_labels, queue_keys=vq)
        per, r_sum = _per_sample_losses(mode, need_col, hard_weight, scale, bias_v, u, v, row, col, t)
        out = per.mean() if reduction == "mean" else (per.sum() if reduction == "sum" else per)

        ctx.cfg = (mode, need_col, hard_weight, normalize, reduction, scale, bias_v, bound, kdt)
        ctx.core, ctx.targets = core, t
        ctx.metas = (
            z1.dtype,
            (temperature.dtype, temperature.device),
            None if bias is None else (bias.dtype, bias.device),
        )
        ctx.save_for_backward(uk, cols, ids, col_ids, row, col, r_sum, n1, n2)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mode, need_col, hw, normalize, reduction, scale, bias_v, bound, kdt = ctx.cfg
        uk, cols, ids, col_ids, row, col, r_sum, n1, n2 = ctx.saved_tensors
        t, core = ctx.targets, ctx.core
        acc = row.dtype
        n = uk.shape[0]
        g, h = _loss_weights(grad_out.to(acc), reduction, need_col, n, n)
        ku, kv, wsum = core.backward(
            uk, cols, ids, col_ids, 0, scale, bias_v, bound, mode, row, col if need_col else None, g, h
        )
        kv = kv[:n]  # the queue's columns get no gradient
        u, v = uk.to(acc), cols[:n].to(acc)
        gu, gv = ku, kv
        _subtract_targets(mode, hw, g, h, r_sum, u, v, t, gu, gv)

        d_tau = d_bias = None
        if any(ctx.needs_input_grad[2:4]):
            d_tau, d_bias = _scalar_grads(scale, hw, g, r_sum, u, gu, wsum)
        return _input_grads(ctx, scale, gu, gv, u, v, n1, n2, d_tau, d_bias)


def _loss_weights(go, reduction, need_col, n, total):
    """(g, h): the upstream weight of each of the n per-sample losses here (of ``total`` in the
    mean over the whole batch), halved for the row and the column half of the symmetric softmax
    (h = g then, None otherwise)."""
    if reduction == "mean":
        w = (go / total).expand(n)
    elif reduction == "sum":
        w = go.expand(n)
    else:
        w = go
    g = (w / 2 if need_col else w).contiguous()
    return g, (g if need_col else None)


def _input_grads(ctx, scale, gu, gv, u, v, n1, n2, d_tau, d_bias) -> tuple:
    """The Functions' backward result (z1, z2, temperature, bias, then None for the rest): the
    logit-space row gradients gu, gv scaled and taken through the normalisation, each in its
    input's dtype, and only where an input needs one."""
    z_dtype, tau_meta, bias_meta = ctx.metas
    need_z1, need_z2, need_tau, need_bias = ctx.needs_input_grad[:4]
    d_z1 = _norm_backward(gu.mul_(scale), u, n1).to(z_dtype) if need_z1 else None
    d_z2 = _norm_backward(gv.mul_(scale), v, n2).to(z_dtype) if need_z2 else None
    d_tau = d_tau.to(dtype=tau_meta[0], device=tau_meta[1]) if need_tau else None
    d_bias = d_bias.to(dtype=bias_meta[0], device=bias_meta[1]) if need_bias else None
    return (d_z1, d_z2, d_tau, d_bias) + (None,) * (len(ctx.needs_input_grad) - 4)


def _logit_dot(a: torch.Tensor, b: torch.Tensor, scale: float, rows: int = 4096) -> torch.Tensor:
    """scale * (a_i . b_i) accumulated in float64 and rounded once to a's dtype, in row chunks
    (O(rows * D) extra memory). These positive / target logits are subtracted from log-sum-exps of
    the same size (about 1 / tau): a small loss is their difference, so they must carry no
    rounding beyond the one the kernels' own (float64-accumulated) positive logits carry."""
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    for i in range(0, a.shape[0], rows):
        out[i : i + rows] = scale * (a[i : i + rows].double() * b[i : i + rows].double()).sum(dim=1)
    return out


def _norm_backward(du: torch.Tensor, u: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
    """Backward of u = z / max(||z||, eps): (du - u (u . du)) / ||z|| where ||z|| > eps, du / eps otherwise."""
    if norm is None:
        return du
    proj = (u * du).sum(dim=1, keepdim=True)
    clamped = (norm <= _EPS)[:, None]
    return torch.where(clamped, du, du - u * proj).div_(norm[:, None])


# --------------------------------------------------------------------------------------------
# backends: each fused backend supplies a "core" with kernel_dtype / forward / backward


class _OpsCore:
    """sc_forward / sc_backward registered with TORCH_LIBRARY (csrc/), dispatched by device."""

    def __init__(self, namespace: str, ext: str, native_low_precision: bool):
        self.namespace, self.ext, self.native_low_precision = namespace, ext, native_low_precision

    def kernel_dtype(self, dtype):
        if dtype == torch.float64 or self.native_low_precision:
            return dtype
        return torch.float32  # the CPU kernels work in fp32 (their GEMM tiles gain nothing from bf16)

    def _ops(self):
        _backends.load_extension(self.ext)
        return getattr(torch.ops, self.namespace)

    def forward(self, u, v, row_ids, col_ids, row_offset, scale, bias, bound, mode, need_col):
        return self._ops().sc_forward(u, v, row_ids, col_ids, row_offset, scale, bias, bound, mode, need_col)

    def backward(self, u, v, row_ids, col_ids, row_offset, scale, bias, bound, mode, row, col, g, h):
        return self._ops().sc_backward(u, v, row_ids, col_ids, row_offset, scale, bias, bound, mode, row, col, g, h)


def _triton_core():
    from fastcon.kernels.triton import soft_contrastive as k

    return k.CORE


_backends.register("soft_contrastive", "reference", lambda: None)
_backends.register("soft_contrastive", "cpu", lambda: _OpsCore("fastcon", "_C", native_low_precision=False))
_backends.register("soft_contrastive", "cuda", lambda: _OpsCore("fastcon", "_C", native_low_precision=True))
_backends.register(
    "soft_contrastive", "cuda_simt", lambda: _OpsCore("fastcon_simt", "_C_simt", native_low_precision=True)
)
_backends.register("soft_contrastive", "triton", _triton_core)


# --------------------------------------------------------------------------------------------
# public API


def soft_contrastive_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.1,
    loss: str = "softmax",
    symmetric: bool = True,
    scene_mode: str = "positive",
    hard_weight: float = 0.0,
    bias: float | torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    group=None,
    distributed: str = "gather",
    queue: torch.Tensor | None = None,
    queue_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft-target contrastive loss between two views, fused so that no N x N matrix is stored.

    Args:
        z1, z2: (N, D) embeddings of the two views (fp32, fp16, bf16; fp64 for checks).
        labels: (N, C) multi-label vectors (targets = cosine of label vectors, SoftCon),
            (N,) integer scene ids (same scene = positive, SwiMDiff), or None (InfoNCE / CLIP).
        temperature: tau > 0, a float or a 0-dim tensor (its gradient is returned).
        loss: "softmax" (soft-target InfoNCE) or "sigmoid" (soft-target SigLIP).
        symmetric: softmax only: average the row and column losses (CLIP style).
        scene_mode: with scene ids, "positive" (same-scene pairs are positives) or "ignore"
            (same-scene pairs leave the softmax; softmax only).
        hard_weight: mixes in the one-hot identity target: hw * I + (1 - hw) * soft target.
        bias: sigmoid only: logit bias, a float or a 0-dim tensor (its gradient is returned).
        normalize: L2-normalise the embeddings first.
        reduction: "mean", "sum" or "none" (per-sample losses, shape (N,)).
        backend: "auto", "reference", "cpu", "triton" or "cuda" (see ``fastcon.backends()``).
        group: None for one process; a ``torch.distributed`` ProcessGroup (``True`` or
            ``fastcon.distributed.WORLD`` for the default group) to compute the loss of the
            global batch, every rank passing its own N local rows (N equal on all ranks).
        distributed: with a group, "gather" (all-gather z2; O(W N D + N C) memory per rank) or
            "ring" (z2 blocks circulate; O(N (D + C)) per rank, any world size W). No effect
            without a group.
        queue: (K, D) key queue (memory bank, MoCo v2 / SwiMDiff) in z2's dtype: K further
            columns (negatives, or soft positives by their labels) after z2's N, normalised like
            z2, never given a gradient. Softmax rows only: needs symmetric=False. With a group,
            every rank passes the same queue.
        queue_labels: the queue keys' labels, of the kind of ``labels``: (K, C) multi-label
            vectors, (K,) integer scene ids, or None when labels is None.

    Returns: the loss in fp32 (fp64 for fp64 inputs); gradients flow to z1, z2 and to tensor
    temperature / bias. With a group: every rank gets the loss of the global batch (its own
    samples' per-sample losses for reduction="none") and the exact gradient rows of its samples;
    temperature and bias get 1 / W of their gradient on each rank (DDP averages: scale the loss
    by W for single-process gradients; see fastcon.distributed).
    """
    _check(
        z1, z2, labels, temperature, loss, symmetric, scene_mode, hard_weight, bias, normalize, reduction, queue,
        queue_labels,
    )  # fmt: skip
    _checks.choice("distributed", distributed, DISTRIBUTED_MODES)
    if group is not None:
        from fastcon import distributed as dist_loss

        return dist_loss.soft_contrastive_loss(
            z1, z2, labels, temperature=temperature, loss=loss, symmetric=symmetric, scene_mode=scene_mode,
            hard_weight=hard_weight, bias=bias, normalize=normalize, reduction=reduction, backend=backend,
            group=group, mode=distributed, queue=queue, queue_labels=queue_labels,
        )  # fmt: skip
    name, core = _backends.select("soft_contrastive", backend, z1.device)
    if core is not None:
        core.kernel_dtype(z1.dtype)  # a backend without kernels for this dtype says so before any work
    if name == "reference":
        return reference.soft_contrastive_loss(
            z1,
            z2,
            labels,
            temperature=temperature,
            loss=loss,
            symmetric=symmetric,
            scene_mode=scene_mode,
            hard_weight=float(hard_weight),
            bias=bias,
            normalize=normalize,
            reduction=reduction,
            queue=queue,
            queue_labels=queue_labels,
        )
    acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
    tau = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(float(temperature), dtype=acc)
    b = None if bias is None else (bias if isinstance(bias, torch.Tensor) else torch.tensor(float(bias), dtype=acc))
    cfg = (loss, symmetric, float(hard_weight), normalize, reduction, scene_mode == "ignore")
    queue = None if queue is None else queue.detach()
    return _FusedSoftContrastive.apply(z1, z2, tau, b, labels, cfg, core, queue, queue_labels)


class SoftContrastiveLoss(nn.Module):
    """``soft_contrastive_loss`` as a module, with an optional learnable temperature and bias.

    A learnable temperature is stored as ``log_scale = log(1 / tau)`` (as in CLIP / SigLIP) so
    that it stays positive; ``max_scale`` clamps 1 / tau from above (CLIP uses 100).
    ``group`` / ``distributed``: the loss of the global batch over a process group (see
    ``soft_contrastive_loss``); under DDP, scale the loss by the world size before backward.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        learnable_temperature: bool = False,
        max_scale: float = 100.0,
        loss: str = "softmax",
        bias: float | None = None,
        learnable_bias: bool = False,
        symmetric: bool = True,
        scene_mode: str = "positive",
        hard_weight: float = 0.0,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        group=None,
        distributed: str = "gather",
    ):
        super().__init__()
        _checks.real("temperature", temperature, low=0.0, low_open=True)
        _checks.choice("loss", loss, LOSSES)
        if loss == "sigmoid" and bias is None:
            bias = -10.0 if learnable_bias else 0.0  # SigLIP's initial bias
        if bias is not None and loss != "sigmoid":
            raise ValueError("bias is only used by loss='sigmoid'")
        log_scale = torch.tensor(1.0 / temperature).log()
        if learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        if bias is None:
            self.bias = None
        elif learnable_bias:
            self.bias = nn.Parameter(torch.tensor(float(bias)))
        else:
            self.register_buffer("bias", torch.tensor(float(bias)))
        self.max_scale = float(max_scale)
        self.options = dict(
            loss=loss,
            symmetric=symmetric,
            scene_mode=scene_mode,
            hard_weight=hard_weight,
            normalize=normalize,
            reduction=reduction,
            backend=backend,
            distributed=distributed,
        )
        self.group = group  # a ProcessGroup is not an option to print or copy

    @property
    def temperature(self) -> torch.Tensor:
        return 1.0 / self.log_scale.clamp(max=math.log(self.max_scale)).exp()

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        queue: torch.Tensor | None = None,
        queue_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of z1 against z2 (and the key ``queue`` with its ``queue_labels``, if given)."""
        return soft_contrastive_loss(
            z1, z2, labels, temperature=self.temperature, bias=self.bias, group=self.group, queue=queue,
            queue_labels=queue_labels, **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature.detach()):.4g}, " + ", ".join(
            f"{k}={v!r}" for k, v in self.options.items()
        )
