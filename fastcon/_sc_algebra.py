"""The algebra around the loss kernels' one blockwise pass (SPEC sections 1, 1b and 5), shared by
the single-process autograd Function (fastcon.soft_contrastive) and the distributed one
(fastcon.distributed): normalisation, the low-rank target sums, per-sample losses from the
kernels' statistics, the target part of the gradient, the temperature / bias gradients and the
normalisation backward. Rows are the local samples; column sums run over the whole batch (and
the key queue). Both Functions import from here, so that neither imports the other.
"""

from __future__ import annotations

import torch

from fastcon.reference import MODE_SOFTMAX, MODE_SOFTMAX_IGNORE

LOSSES = ("softmax", "sigmoid")
REDUCTIONS = ("mean", "sum", "none")
SCENE_MODES = ("positive", "ignore")
DISTRIBUTED_MODES = ("gather", "ring")
_EPS = 1e-12  # the norm floor of the spec: u = z / max(||z||, 1e-12)


def _label_value_messages(name: str = "labels") -> tuple[str, str]:
    """The label value checks' messages (not finite, negative), eager or by the device."""
    return (
        f"{name} must be finite, got NaN or infinite values",
        f"{name} must be >= 0 (multi-hot or class-fraction vectors), got negative values",
    )


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

    def __init__(
        self,
        labels,
        n: int,
        acc: torch.dtype,
        device,
        reducer=None,
        queue_labels=None,
        queue_keys=None,
        scene_index=None,
    ):
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
                # scene_index: this index from an earlier call (the forward's, in the backward)
                self.inverse = _segment_index(labels) if scene_index is None else scene_index
                self.num_scenes = n
            else:
                self.inverse, self.num_scenes = reducer.scene_index(labels)
                self._reduce = reducer.scene_sum
            self.nn = torch.ones(n, dtype=acc, device=device)
            if queue_labels is not None:
                self._queue = _SceneLookup(labels, queue_labels)
        else:
            self.nn = torch.zeros(n, dtype=acc, device=device)
        self.off_nn = 1 - self.nn  # the weight of x_i in its own row's sum (T_ii - T~_ii)

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
        if off is None:
            return _weighted(wx, self.off_nn)
        return off.addcmul_(wx, self.off_nn if wx.dim() == 1 else self.off_nn[:, None])

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
            yield off.addcmul_(wx, self.off_nn if wx.dim() == 1 else self.off_nn[:, None])


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


def _normalize(z1, z2, normalize: bool, kdt: torch.dtype, acc: torch.dtype, norms=None):
    """Unit rows in the accumulation dtype, handed to the kernel in its storage dtype ``kdt``.
    Returns (uk, vk) for the kernel, (u, v) = the values the kernel sees in ``acc`` (for the target
    terms), and the row norms (None without normalisation) for the backward; ``norms``: these
    norms from an earlier call (the forward's, in the backward), not computed again."""
    z1a, z2a = _as(z1, acc), _as(z2, acc)
    if normalize:
        if norms is None:
            norms = (torch.linalg.vector_norm(z, dim=1).clamp_min_(_EPS) for z in (z1a, z2a))
        n1, n2 = norms
        z1a, z2a = z1a / n1[:, None], z2a / n2[:, None]
    else:
        n1 = n2 = None
    uk, vk = _as(z1a, kdt).contiguous(), _as(z2a, kdt).contiguous()
    return uk, vk, _as(uk, acc), _as(vk, acc), n1, n2


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype, without dispatching a conversion when it already is (fewer ops per call)."""
    return x if x.dtype == dtype else x.to(dtype)


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
    the target sums. scale (1 / tau) and bias_v (sigmoid; None: 0) are 0-dim float64 tensors,
    never read on the host. Returns (per-sample losses, target row sums R or None)."""
    dt = row.dtype
    if u.shape[0] <= _DOT_ROWS:  # one float64 copy of u and v for all the dots below
        ud, vd = _as(u, torch.float64), _as(v, torch.float64)
        sd64 = (ud * vd).sum(dim=1).mul_(scale)
        sd = sd64.to(dt)  # s_ii, the positive logits
    else:
        ud, vd, sd64 = u, v, None
        sd = _logit_dot(ud, vd, scale, dt)
    if mode == MODE_SOFTMAX_IGNORE:
        per_a = row - sd
        per_b = col - sd if need_col else None
        r_sum = None
    elif mode == MODE_SOFTMAX:
        sums = _target_sums(t, sd64, scale, dt, [(ud, v, t.q_v)] + ([(vd, u, None)] if need_col else []))
        r_sum = next(sums)
        ts = next(sums)  # sum_j T_ij s_ij
        per_a = row - hw * sd - (1 - hw) * ts / r_sum
        if need_col:  # T is symmetric here: column sums equal row sums
            tsc = next(sums)
            per_b = col - hw * sd - (1 - hw) * tsc / r_sum
        else:
            per_b = None
    else:  # sigmoid: sum_j T'_ij x_ij = hw x_ii + (1 - hw) (sum_j T_ij s_ij + bias R_i)
        sums = _target_sums(t, sd64, scale, dt, [(ud, v, t.q_v)])
        r_sum = next(sums)
        ts = next(sums)
        if bias_v is None:
            per_a = row - hw * sd - (1 - hw) * ts
        else:
            per_a = row - hw * (sd + bias_v) - (1 - hw) * (ts + bias_v * r_sum)
        per_b = None
    per = (per_a + per_b) / 2 if per_b is not None else per_a
    return per, r_sum


def _target_sums(t: Targets, sd64, scale: torch.Tensor, dtype: torch.dtype, pairs):
    """Yields the target row sums R_i = sum_j T_ij, then for each (a, x, xq) in pairs the target
    logit sums scale * sum_j T_ij (a_i . x_j) (xq: the queue's part of x, or None), accumulated in
    float64 and rounded once. sd64: scale * (u_i . v_i) in float64 (None beyond _DOT_ROWS rows),
    the diagonal term of every pair (the pairs are (u, v) and (v, u))."""
    ones = torch.ones_like(t.nn)
    if t.kind == "labels" and t._reduce is None and sd64 is not None:
        # low rank without an N x D temporary: sum_j T~_ij (a_i . x_j) = lhat_i . (a_i P^T) with
        # P = lhat^T x (C x D; plus the queue's own projection), then the diagonal's (1 - nn_i) s_ii
        yield t.full(ones, None, t.q_ones)
        f64 = torch.float64
        lhat, off = _as(t.lhat, f64), _as(t.off_nn, f64) * sd64
        for a, x, xq in pairs:
            p = t.lhat.T @ x
            if t._queue is not None and xq is not None:
                p = p.add_(t._queue.T @ xq)
            yield (_as(a, f64) @ _as(p, f64).T).mul_(lhat).sum(dim=1).mul_(scale).add_(off).to(dtype)
        return
    sums = t.full_many([(ones, None, t.q_ones)] + [(x, None, xq) for _, x, xq in pairs])
    yield next(sums)
    for a, _, _ in pairs:
        yield _logit_dot(a, next(sums), scale, dtype)


def _subtract_targets(mode, hw, g, h, r_sum, u, v, t: Targets, gu, gv) -> None:
    """GU_i = sum_j G_ij v_j and GV_j = sum_i G_ij u_i, where G = dL/ds: the kernel gives the
    softmax / sigmoid part in gu, gv; this subtracts the target part, in place."""
    if mode == MODE_SOFTMAX_IGNORE:
        gh = (g + (h if h is not None else 0))[:, None]
        gu.addcmul_(gh, v, value=-1)
        gv.addcmul_(gh, u, value=-1)
    elif mode == MODE_SOFTMAX:
        # - g_i sum_j P'_ij v_j  and  - sum_i g_i P'_ij u_i
        items = [(v, None, t.q_v), (u, g / r_sum, None)]
        items += [(v, h / r_sum, None), (u, None, None)] if h is not None else []
        sums = t.full_many(items)
        _sub_target(gu, ((1 - hw) * g / r_sum)[:, None], next(sums), hw, g, v)
        _sub_target(gv, 1 - hw, next(sums), hw, g, u)
        if h is not None:  # - sum_j h_j Q'_ij v_j  and  - h_j sum_i Q'_ij u_i  (C_j = R_j)
            _sub_target(gu, 1 - hw, next(sums), hw, h, v)
            _sub_target(gv, ((1 - hw) * h / r_sum)[:, None], next(sums), hw, h, u)
    else:  # sigmoid: G_ij = g_i (sigmoid(x_ij) - T'_ij)
        sums = t.full_many([(v, None, t.q_v), (u, g, None)])
        _sub_target(gu, ((1 - hw) * g)[:, None], next(sums), hw, g, v)
        _sub_target(gv, 1 - hw, next(sums), hw, g, u)


def _sub_target(out, a, soft, hw: float, w, hard) -> None:
    """out -= a * soft + hw * w[:, None] * hard, in place (a: a float or an (N, 1) column); the
    hard term dispatches nothing for hard_weight 0, the soft one nothing for hard_weight 1."""
    if hw != 1:
        if isinstance(a, torch.Tensor):
            out.addcmul_(a, soft, value=-1)
        else:
            out.sub_(soft, alpha=a)
    if hw != 0:
        out.addcmul_(w[:, None], hard, value=-hw)


def _row_dots(u: torch.Tensor, gu: torch.Tensor) -> torch.Tensor:
    """u_i . GU_i (N,): the temperature gradient's rows and the normalisation backward's projection."""
    return (u * gu).sum(dim=1)


def _scalar_grads(scale, hw, g, r_sum, u, gu, wsum, pu=None):
    """(dL/dtau, dL/dbias) from this process's rows, before gu is scaled:
    dL/dtau = -scale^2 * sum_ij G_ij (u_i . v_j) = -scale^2 * sum_i u_i . GU_i;
    dL/dbias = sum_ij G_ij (sigmoid only; None otherwise). pu: _row_dots(u, gu), if already known.
    scale: a 0-dim float64 tensor; dL/dtau comes out in float64 (one rounding, to tau's dtype, later)."""
    d_tau = (_row_dots(u, gu) if pu is None else pu).sum().mul(scale).mul_(scale).neg_()
    d_bias = None if r_sum is None else wsum.sum() - (g * (hw + (1 - hw) * r_sum)).sum()
    return d_tau, d_bias


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


def _input_grads(ctx, scale, gu, gv, u, v, n1, n2, d_tau, d_bias, pu=None) -> tuple:
    """The Functions' backward result (z1, z2, temperature, bias, then None for the rest): the
    logit-space row gradients gu, gv scaled and taken through the normalisation, each in its
    input's dtype, and only where an input needs one. pu: _row_dots(u, gu), if already known."""
    z_dtype, tau_meta, bias_meta = ctx.metas
    need_z1, need_z2, need_tau, need_bias = ctx.needs_input_grad[:4]
    d_z1 = _as(_norm_backward(gu, u, n1, scale, pu), z_dtype) if need_z1 else None
    d_z2 = _as(_norm_backward(gv, v, n2, scale), z_dtype) if need_z2 else None
    d_tau = d_tau.to(dtype=tau_meta[0], device=tau_meta[1]) if need_tau else None
    d_bias = d_bias.to(dtype=bias_meta[0], device=bias_meta[1]) if need_bias else None
    return (d_z1, d_z2, d_tau, d_bias) + (None,) * (len(ctx.needs_input_grad) - 4)


_DOT_ROWS = 4096  # _logit_dot's row chunk: O(_DOT_ROWS * D) float64 temporaries


def _logit_dot(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale * (a_i . b_i) accumulated in float64 and rounded once to ``dtype``, in row chunks
    (O(_DOT_ROWS * D) extra memory; one chunk, no copies, for a batch that fits). These positive /
    target logits are subtracted from log-sum-exps of the same size (about 1 / tau): a small loss
    is their difference, so they must carry no rounding beyond the one the kernels' own
    (float64-accumulated) positive logits carry."""
    f64 = torch.float64
    if a.shape[0] <= _DOT_ROWS:
        return (_as(a, f64) * _as(b, f64)).sum(dim=1).mul_(scale).to(dtype)
    out = torch.empty(a.shape[0], dtype=dtype, device=a.device)
    for i in range(0, a.shape[0], _DOT_ROWS):
        out[i : i + _DOT_ROWS] = scale * (_as(a[i : i + _DOT_ROWS], f64) * _as(b[i : i + _DOT_ROWS], f64)).sum(dim=1)
    return out


def _norm_backward(
    du: torch.Tensor, u: torch.Tensor, norm: torch.Tensor | None, scale: torch.Tensor, proj=None
) -> torch.Tensor:
    """Backward of u = z / max(||z||, eps) for the upstream gradient scale * du, in place in du:
    scale (du - u (u . du)) / ||z|| where ||z|| > eps, scale du / eps otherwise (proj: u . du, if known)."""
    if norm is None:
        return du.mul_(scale)
    proj = (_row_dots(u, du) if proj is None else proj).masked_fill(norm <= _EPS, 0.0)
    return du.addcmul_(u, proj[:, None], value=-1).div_((norm / scale)[:, None])
