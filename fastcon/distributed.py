"""The soft contrastive loss over a ``torch.distributed`` process group (SPEC section 4).

Every rank holds its ``n`` local rows of z1, z2 and labels; the loss and the gradients are those
of the single-process loss over the global batch of ``W * n`` rows (rank order). Rank r's rows
are scored against all global columns with the fused kernels' row offset (the positive of local
row i is global column ``r * n + i``), so nothing of size N x N exists anywhere.

Two ways to bring the columns to the rows:

- ``"gather"``: all-gather z2 (in the kernel's storage dtype), one kernel pass of n local rows
  against the N = W * n global columns; the column log-sum-exps of the symmetric loss are
  combined exactly across ranks (max-shifted log-sum-exp all-reduce), and backward
  reduce-scatters the column gradients to their owners. Per rank O(N * D + n * C) memory, and
  the fewest, largest messages: the fast choice while the gathered N x D fits.
- ``"ring"`` (Inf-CL style): the z2 blocks circulate with ``isend`` / ``irecv``; each rank scores
  its rows against one visiting block at a time while the next block arrives. The column
  statistics (forward) and column gradients (backward) of a block travel with it and reach its
  owner complete after a full turn. At most two remote blocks are resident: per rank
  O(n * (D + C)) memory whatever the world size, at the price of W sequential steps.

The target terms need no N x N pass either (SPEC section 5): the (C x D) label sums and the
per-scene sums are summed over the ranks (all-reduce of the C x D sums; per-scene sums by
global scene index (gather) or by circulating each rank's scene table (ring)).

Gradient convention (see ``soft_contrastive_loss``): on every rank the loss value and the
z1 / z2 gradient rows equal the single-process ones; temperature and bias, which every rank
holds a replica of, get 1 / W of the single-process gradient on each rank, so that every
gradient is this rank's share of the global one and the shares sum to it. DDP averages
gradients over ranks: call ``(loss * world_size).backward()`` to get the single-process
gradient for every parameter, or leave the loss unscaled for a uniform 1 / W.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastcon import _backends, _checks, reference
from fastcon._sc_algebra import (
    DISTRIBUTED_MODES,
    LOSSES,
    REDUCTIONS,
    SCENE_MODES,
    Targets,
    _input_grads,
    _label_value_messages,
    _loss_weights,
    _normalize,
    _per_sample_losses,
    _queue_keys,
    _scalar_grads,
    _segment_index,
    _sorted_runs,
    _subtract_targets,
)
from fastcon.reference import MODE_SIGMOID, MODE_SOFTMAX, MODE_SOFTMAX_IGNORE

MODES = DISTRIBUTED_MODES


class _World:
    """``fastcon.distributed.WORLD``: the default process group, resolved when the loss runs."""

    def __repr__(self) -> str:
        return "fastcon.distributed.WORLD"


WORLD = _World()

# p2p message channels: a ring step may have a block and an accumulator in flight between the
# same two ranks; gloo matches messages by tag (NCCL by posting order, which is the same on all ranks)
_TAG_BLOCK, _TAG_ACC, _TAG_SCENE = 11, 12, 13

# recent torch names the single-tensor collectives *_single, older versions *_into_tensor / *_tensor
# (getattr: a torch built without distributed support still imports fastcon)
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


# --------------------------------------------------------------------------------------------
# argument checks


def resolve_group(group):
    """``group`` as a ProcessGroup: ``True`` or ``WORLD`` is the default group."""
    if not dist.is_available():
        raise ValueError("group: this build of torch has no torch.distributed support; pass group=None")
    if group is True or group is WORLD:
        if not dist.is_initialized():
            raise ValueError(
                "group=True needs torch.distributed to be initialised: call torch.distributed.init_process_group() "
                "first (under torchrun), or pass group=None for a single process"
            )
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(
        f"group must be None, True, fastcon.distributed.WORLD or a torch.distributed.ProcessGroup, "
        f"got {type(group).__name__}"
    )


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


_ERROR_BYTES = 480  # of each rank's message that reaches the other ranks

# The values each rank reports with its options (read on the host after the one all-gather):
# temperature and bias (their values also checked there), and whether the label values passed
# their checks on the device. Messages as fastcon.soft_contrastive.check_label_values words them.
_VALUE_NAMES = ("temperature", "bias")
_LABEL_CHECKS = tuple(
    (name, check, message)
    for name in ("labels", "queue_labels")
    for check, message in zip(("finite", "nonnegative"), _label_value_messages(name))
)


def _fields(z1, labels, opts: dict, queue) -> dict:
    """The options and sizes that must agree on every rank (else the global loss is undefined, or
    a collective would hang), as numbers."""
    kind = 0 if labels is None else (1 if labels.dim() == 1 else 2)
    fields = {
        "local batch size (rows of z1)": z1.shape[0],
        "feature size D (columns of z1)": z1.shape[1],
        "z1 dtype": _DTYPES.index(z1.dtype),
        "labels kind (0 None, 1 scene ids, 2 multi-label)": kind,
        "number of label classes C": labels.shape[1] if kind == 2 else 0,
        "queue size K (0 without a queue)": 0 if queue is None else queue.shape[0],
    }
    fields.update(opts)
    return fields


def _label_flags(x, device) -> list[torch.Tensor]:
    """[finite, non-negative] of label values as float64 (1 passes) on ``device``, computed there
    (no host read); 1 for scene ids, bool labels or None."""
    one = torch.ones(1, dtype=torch.float64, device=device)
    if x is None or x.dim() != 2:
        return [one, one]
    finite = torch.isfinite(x).all().reshape(1) if x.dtype.is_floating_point else one
    nonneg = (x >= 0).all().reshape(1) if x.dtype != torch.bool else one
    return [finite.to(device=device, dtype=torch.float64), nonneg.to(device=device, dtype=torch.float64)]


def _scalar_value(x, device) -> torch.Tensor:
    """A temperature / bias value as a (1,) float64 tensor on ``device``: tensors stay on the
    device (read on the host only with the gathered message), numbers become one."""
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(1).to(device=device, dtype=torch.float64)
    return torch.tensor([0.0 if x is None else float(x)], dtype=torch.float64, device=device)


def _bad_ranks(kind, bad: list[int], message: str) -> Exception:
    return kind(
        f"rank(s) {bad} of the group got invalid input, so every rank raises (none is left waiting in a "
        f"collective); rank {bad[0]}: {message}"
    )


def _value_error(name: str, value: float, z_dtype, positive: bool) -> str | None:
    """The eager check of a gathered temperature / bias value: its message, or None."""
    try:
        v = _checks.scalar(name, value, positive=positive)
        if positive:
            _checks.inverse_finite(name, v, z_dtype)
    except ValueError as e:
        return str(e)
    return None


def check_all_ranks(comm, error, z1=None, labels=None, opts=None, queue=None, values=None) -> None:
    """The distributed loss's first collective: one small all-gather of a row per rank, read on
    the host once, so that an input error on any rank raises on every rank (none is left waiting
    in a later collective) and the values each rank passed are compared.

    A row holds: this rank's error from its eager checks (``error``: flag, type, the start of the
    message); then, when it has none, the options and sizes of ``_fields`` and ``values``
    (``{"temperature": ..., "bias": ..., "labels": ..., "queue_labels": ...}``): temperature and
    bias as values (tensors stay on the device until the gather) and the label value checks as
    flags computed on the device. The one host read is this collective's: the decision to raise
    is a host decision, and the ranks must take it together before any collective whose message
    sizes depend on the inputs. A rank whose input is bad raises its own error, every other rank
    the same type of error naming the bad rank(s) and the first one's message. The value checks
    come before the comparison (a NaN temperature is reported as such)."""
    device = _exchange_device(comm)
    fields = {} if error is not None else _fields(z1, labels, opts, queue)
    head = _error_row(error, torch.float64)
    n_fields = _N_FIELDS
    assert error is not None or len(fields) == n_fields  # every rank's row has one length
    if error is not None:  # zeros in place of this rank's fields and values (errors come first)
        body = torch.zeros(n_fields + len(_VALUE_NAMES) + 1 + len(_LABEL_CHECKS), dtype=torch.float64, device=device)
    else:
        host = torch.tensor(
            [float(v) for v in fields.values()] + [float(values["bias"] is not None)], dtype=torch.float64
        )
        parts = [host.to(device)] + [_scalar_value(values[k], device) for k in _VALUE_NAMES]
        parts += _label_flags(values["labels"], device) + _label_flags(values["queue_labels"], device)
        body = torch.cat(parts)
    every = comm.all_gather(torch.cat([head.to(device), body])[None]).cpu()  # the one host read
    _raise_reported(every, error)
    rows = every[:, 2 + _ERROR_BYTES :]
    tau_col, bias_col, has_bias_col, flags_col = n_fields + 1, n_fields + 2, n_fields, n_fields + 3
    # the value checks, rank by rank (this rank's own error first, as its eager check would raise)
    z_dtype = z1.dtype
    messages = {}
    for r in range(comm.world):
        msg = _value_error("temperature", float(rows[r, tau_col]), z_dtype, True)
        if msg is None and rows[r, has_bias_col]:
            msg = _value_error("bias", float(rows[r, bias_col]), z_dtype, False)
        if msg is None:
            failed = [m for (_, _, m), ok in zip(_LABEL_CHECKS, rows[r, flags_col:].tolist()) if not ok]
            msg = failed[0] if failed else None
        if msg is not None:
            messages[r] = msg
    if comm.rank in messages:
        raise ValueError(messages[comm.rank])
    if messages:
        bad = sorted(messages)
        raise _bad_ranks(ValueError, bad, messages[bad[0]])
    names = list(fields) + ["temperature", "bias"]
    columns = list(range(n_fields)) + [tau_col, bias_col]
    for name, k in zip(names, columns):
        values_k = rows[:, k].tolist()
        if any(x != values_k[0] for x in values_k):
            if name == "z1 dtype":
                values_k = [str(_DTYPES[int(x)]) for x in values_k]
            elif all(float(x).is_integer() for x in values_k):
                values_k = [int(x) for x in values_k]
            raise ValueError(
                f"{name} must be equal on all ranks of the group, got {values_k} on ranks 0..{comm.world - 1}"
            )


def check_on_every_rank(group, check) -> None:
    """Run this rank's input check ``check()`` so that an error on any rank raises on every rank
    (one small all-gather; see ``check_all_ranks``, which the distributed loss folds into its first
    collective together with its option and value checks)."""
    error = _run(check)
    try:
        comm = _Comm(resolve_group(group))
    except (ValueError, TypeError):
        if error is not None:  # no group to tell: this rank's own error
            raise error from None
        raise
    _raise_any(comm, error)


def _run(check):
    """This rank's eager check: its ValueError / TypeError, or None."""
    try:
        if check is not None:
            check()
    except (ValueError, TypeError) as e:
        return e
    return None


def _raise_any(comm, error) -> None:
    """check_on_every_rank's all-gather: errors only."""
    row = _error_row(error, torch.uint8)
    _raise_reported(comm.all_gather(row[None].to(_exchange_device(comm))).cpu(), error)


def _exchange_device(comm):
    """Where the checks' all-gather runs: the CPU for gloo, this rank's GPU for NCCL."""
    if "gloo" in str(dist.get_backend(comm.group)):
        return "cpu"
    return torch.device("cuda", torch.cuda.current_device())


def _error_row(error, dtype: torch.dtype) -> torch.Tensor:
    """The head of a rank's row in the checks' all-gather: (failed, is TypeError, the message's
    first _ERROR_BYTES bytes), zeros when ``error`` is None."""
    row = torch.zeros(2 + _ERROR_BYTES, dtype=dtype)
    if error is not None:
        text = str(error).encode()
        text = text if len(text) <= _ERROR_BYTES else text[: _ERROR_BYTES - 3] + b"..."
        row[0], row[1] = 1, int(isinstance(error, TypeError))
        row[2 : 2 + len(text)] = torch.tensor(list(text), dtype=dtype)
    return row


def _raise_reported(every: torch.Tensor, error) -> None:
    """After the all-gather of rows headed by ``_error_row``: this rank's own error, else the
    first bad rank's (of its type, naming every bad rank); nothing when no rank failed."""
    if error is not None:
        raise error
    bad = [r for r in range(every.shape[0]) if every[r, 0]]
    if bad:
        first = every[bad[0]]
        message = bytes(first[2 : 2 + _ERROR_BYTES].to(torch.uint8).tolist()).rstrip(b"\0").decode(errors="replace")
        raise _bad_ranks(TypeError if first[1] else ValueError, bad, message)


# --------------------------------------------------------------------------------------------
# the process group seen from one rank


class _Transfer:
    """A ring shift in flight: ``wait()`` returns the received tensors. Holds the sent tensors
    until then (they must not be freed or modified while the send is in flight)."""

    def __init__(self, works, sent, received):
        self.works, self.sent, self.received = works, sent, received

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        self.works, self.sent = [], None
        return self.received


class _Comm:
    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
        self.world = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def all_reduce(self, x: torch.Tensor, op=None) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((self.world * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=self.group)
        return out

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((x.shape[0] // self.world, *x.shape[1:]))
        _reduce_scatter_single(out, x.contiguous(), group=self.group)
        return out

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        """log sum_ranks exp(x), elementwise and exact: the max first, then the shifted sums."""
        m = self.all_reduce(x.clone(), dist.ReduceOp.MAX)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf: exp(-inf) = 0 -> -inf
        return m + self.all_reduce((x - m).exp_()).log_()

    def shift(self, tensors: list[torch.Tensor], tag: int) -> _Transfer:
        """Send ``tensors`` to the next rank and receive the previous rank's (same shapes), async."""
        if self.world == 1:
            return _Transfer([], None, list(tensors))
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group, tag) for r in received]
        return _Transfer(dist.batch_isend_irecv(ops), tensors, received)


# --------------------------------------------------------------------------------------------
# global target sums (the reducer of fastcon.soft_contrastive.Targets)


class _GatherTargetSums:
    """Scene index over the all-gathered scene ids (O(N) ints); per-scene sums all-reduced."""

    def __init__(self, comm: _Comm):
        self.comm = comm

    def all_reduce(self, p: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(p)

    def scene_index(self, ids: torch.Tensor):
        """The global scene index of this rank's rows: equal ids, equal index, in [0, N) (N = W n,
        the global batch) by a sort of the gathered ids, without a host sync (no ``unique``, no
        ``max``: the number of scenes stays on the device). Per-scene tables then have N rows,
        all-reduced whole: O(N K) per reduction instead of O(scenes K), the price of not
        reading the number of scenes on the host."""
        every = self.comm.all_gather(ids.to(torch.int64))
        inverse = _segment_index(every)
        n = ids.shape[0]
        return inverse[self.comm.rank * n : (self.comm.rank + 1) * n], every.shape[0]

    def scene_sum(self, table: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(table)


class _RingTargetSums(_GatherTargetSums):
    """Per-scene sums over the scenes present on this rank only (at most n of them): each
    rank's scene table circulates once around the ring and every rank adds the rows of the
    scenes it has. O(n * K) memory whatever the world size; the C x D label sums are all-reduced."""

    def scene_index(self, ids: torch.Tensor):
        """This rank's scenes by a sort (no ``unique``: no host sync): a table of n rows, the
        scenes in id order, then pad rows that repeat the last id (their sums stay 0)."""
        ordered, order, runs = _sorted_runs(ids)
        n = ids.shape[0]
        self.keys = ordered[-1:].expand(n).clone().scatter_(0, runs, ordered)  # sorted, pads last
        return torch.empty_like(runs).scatter_(0, order, runs), n

    def scene_sum(self, table: torch.Tensor) -> torch.Tensor:
        n = self.keys.numel()
        out = table.clone()
        keys, rows = self.keys, table
        for _ in range(self.comm.world - 1):
            keys, rows = self.comm.shift([keys, rows], _TAG_SCENE).wait()
            # searchsorted finds a scene's first row (pads repeat the last id after it); a row
            # of a scene this rank lacks adds zeros (no boolean indexing: no host sync)
            pos = torch.searchsorted(self.keys, keys).clamp_(max=n - 1)
            hit = (self.keys[pos] == keys).view(-1, *([1] * (rows.dim() - 1)))
            out.index_add_(0, pos, torch.where(hit, rows, torch.zeros((), dtype=rows.dtype, device=rows.device)))
        return out


# --------------------------------------------------------------------------------------------
# the kernel pass: local rows against the global columns


class _GatherPass:
    """One kernel call of the local rows against the all-gathered columns."""

    def __init__(self, comm: _Comm, core):
        self.comm, self.core = comm, core
        self.targets = _GatherTargetSums(comm)

    def forward(self, uk, vk, ids, scale, bias_v, bound, mode, need_col, acc, qk=None, qids=None):
        comm, n = self.comm, uk.shape[0]
        v_all = _then(comm.all_gather(vk), qk)  # the global batch's columns, then the queue's
        ids_all = _then(comm.all_gather(ids), qids) if ids is not None else None
        row, col_part = self.core.forward(uk, v_all, ids, ids_all, comm.rank * n, scale, bias_v, bound, mode, need_col)
        col_all = comm.logsumexp(col_part.to(acc)) if need_col else None
        col = col_all[comm.rank * n : (comm.rank + 1) * n] if need_col else None
        return row.to(acc), col, [v_all, ids_all, col_all]

    def backward(self, saved, uk, vk, ids, scale, bias_v, bound, mode, row, col, g, h, acc):
        comm, n = self.comm, uk.shape[0]
        v_all, ids_all, col_all = saved
        h_all = comm.all_gather(h) if h is not None else None
        ku, kv_all, wsum = self.core.backward(
            uk, v_all, ids, ids_all, comm.rank * n, scale, bias_v, bound, mode, row, col_all, g, h_all
        )
        kv_all = kv_all[: n * comm.world]  # the queue's columns get no gradient
        return ku.to(acc), comm.reduce_scatter(kv_all.to(acc)), wsum.to(acc)


class _RingPass:
    """W steps; at step k the rows meet the block of rank (r - k) mod W, while the next block is
    in flight. Column accumulators travel with their block and reach the owner after a full turn."""

    def __init__(self, comm: _Comm, core):
        self.comm, self.core = comm, core
        self.targets = _RingTargetSums(comm)

    def forward(self, uk, vk, ids, scale, bias_v, bound, mode, need_col, acc, qk=None, qids=None):
        comm, core, n = self.comm, self.core, uk.shape[0]
        block = [vk] + ([ids] if ids is not None else [])
        row = col_acc = None
        for k in range(comm.world):
            src = (comm.rank - k) % comm.world
            nxt = comm.shift(block, _TAG_BLOCK) if k < comm.world - 1 else None
            blk_ids = block[1] if ids is not None else None
            row_k, col_k = core.forward(uk, block[0], ids, blk_ids, (comm.rank - src) * n, scale, bias_v, bound, mode, need_col)  # fmt: skip
            row_k = row_k.to(acc)
            if row is None:
                row = row_k
            elif mode == MODE_SIGMOID:
                row = row.add_(row_k)
            else:  # exact running log-sum-exp across blocks
                row = torch.logaddexp(row, row_k)
            if need_col:  # this block's column statistic: the partial from upstream ranks, plus ours
                col_k = col_k.to(acc)
                if col_acc is not None:
                    col_k = torch.logaddexp(col_acc.wait()[0], col_k)
                col_acc = comm.shift([col_k], _TAG_ACC)  # the last shift takes each block home
            if nxt is not None:
                block = nxt.wait()
        col = col_acc.wait()[0] if need_col else None
        if qk is not None:  # the replicated queue, a last block no rank owns (no positives: offset K)
            row_q, _ = core.forward(uk, qk, ids, qids, qk.shape[0], scale, bias_v, bound, mode, False)
            row_q = row_q.to(acc)
            row = row.add_(row_q) if mode == MODE_SIGMOID else torch.logaddexp(row, row_q)
        return row, col, [qk, qids]

    def backward(self, saved, uk, vk, ids, scale, bias_v, bound, mode, row, col, g, h, acc):
        comm, core, n = self.comm, self.core, uk.shape[0]
        qk, qids = saved
        # a block is its columns, their ids, and the column statistic and weights (symmetric softmax)
        block = [vk] + ([ids] if ids is not None else []) + ([torch.stack([col, h])] if h is not None else [])
        ku = wsum = dv_acc = None
        for k in range(comm.world):
            src = (comm.rank - k) % comm.world
            nxt = comm.shift(block, _TAG_BLOCK) if k < comm.world - 1 else None
            blk_ids = block[1] if ids is not None else None
            blk_col, blk_h = (block[-1][0], block[-1][1]) if h is not None else (None, None)
            ku_k, kv_k, ws_k = core.backward(
                uk, block[0], ids, blk_ids, (comm.rank - src) * n, scale, bias_v, bound, mode, row, blk_col, g, blk_h
            )
            ku = ku_k.to(acc) if ku is None else ku.add_(ku_k)
            wsum = ws_k.to(acc) if wsum is None else wsum.add_(ws_k)
            kv_k = kv_k.to(acc)
            if dv_acc is not None:  # the block's column gradient so far, from the upstream ranks
                kv_k = kv_k.add_(dv_acc.wait()[0])
            dv_acc = comm.shift([kv_k], _TAG_ACC)
            del kv_k
            if nxt is not None:
                block = nxt.wait()
        if qk is not None:
            ku_q, _, ws_q = core.backward(
                uk, qk, ids, qids, qk.shape[0], scale, bias_v, bound, mode, row, None, g, None
            )
            ku, wsum = ku.add_(ku_q), wsum.add_(ws_q)
        return ku, dv_acc.wait()[0], wsum


_PASSES = {"gather": _GatherPass, "ring": _RingPass}


def _then(x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    return x if extra is None else torch.cat([x, extra])


# --------------------------------------------------------------------------------------------
# the autograd Function


class _DistributedSoftContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z1, z2, temperature, bias, labels, cfg, kpass, queue=None, queue_labels=None):
        loss, symmetric, hard_weight, normalize, reduction, scene_ignore = cfg
        comm, n = kpass.comm, z1.shape[0]
        acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
        # scale and bias stay 0-dim float64 tensors on the device (read by the kernels there)
        scale = temperature.detach().to(device=z1.device, dtype=torch.float64).reciprocal()
        bias_v = None if bias is None else bias.detach().to(device=z1.device, dtype=torch.float64)
        mode = MODE_SIGMOID if loss == "sigmoid" else (MODE_SOFTMAX_IGNORE if scene_ignore else MODE_SOFTMAX)
        need_col = loss == "softmax" and symmetric and queue is None

        kdt = kpass.core.kernel_dtype(z1.dtype)
        uk, vk, u, v, n1, n2 = _normalize(z1, z2, normalize, kdt, acc)
        qk, vq = _queue_keys(queue, normalize, kdt, acc)
        ids = labels.to(torch.int64).contiguous() if scene_ignore else None
        qids = queue_labels.to(torch.int64).contiguous() if scene_ignore and qk is not None else None
        bound = normalize  # bounded: |s_ij| <= scale = 1/tau for unit vectors

        row, col, saved = kpass.forward(uk, vk, ids, scale, bias_v, bound, mode, need_col, acc, qk, qids)
        t = Targets(
            None if scene_ignore else labels, n, acc, z1.device, reducer=kpass.targets, queue_labels=queue_labels,
            queue_keys=vq,
        )  # fmt: skip
        per, r_sum = _per_sample_losses(mode, need_col, hard_weight, scale, bias_v, u, v, row, col, t)
        if reduction == "none":
            out = per  # this rank's samples
        else:
            out = comm.all_reduce(per.sum())
            if reduction == "mean":
                out = out / (n * comm.world)

        ctx.cfg = (mode, need_col, hard_weight, normalize, reduction, scale, bias_v, bound)
        ctx.kpass, ctx.targets = kpass, t
        ctx.metas = (
            z1.dtype,
            (temperature.dtype, temperature.device),
            None if bias is None else (bias.dtype, bias.device),
        )
        ctx.save_for_backward(uk, vk, ids, row, col, r_sum, n1, n2, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _checks.first_order_only("fastcon.soft_contrastive_loss (group=...)")
        mode, need_col, hw, normalize, reduction, scale, bias_v, bound = ctx.cfg
        uk, vk, ids, row, col, r_sum, n1, n2, *saved = ctx.saved_tensors
        kpass, t = ctx.kpass, ctx.targets
        comm, acc, n = kpass.comm, row.dtype, uk.shape[0]
        # upstream weight of each of this rank's per-sample losses; other ranks' columns come
        # with their owners' weights (h travels with the block or is all-gathered)
        g, h = _loss_weights(grad_out.to(acc), reduction, need_col, n, n * comm.world)

        ku, kv, wsum = kpass.backward(saved, uk, vk, ids, scale, bias_v, bound, mode, row, col, g, h, acc)
        u, v = uk.to(acc), vk.to(acc)
        gu, gv = ku, kv
        _subtract_targets(mode, hw, g, h, r_sum, u, v, t, gu, gv)

        # temperature and bias are replicated: every rank gets the same 1 / W share of the global
        # gradient (always all-reduced, so that no rank waits on a collective another skips)
        d_tau, d_bias = _scalar_grads(scale, hw, g, r_sum, u, gu, wsum)
        parts = torch.stack([d_tau, d_bias.to(d_tau.dtype) if d_bias is not None else torch.zeros_like(d_tau)])
        parts = comm.all_reduce(parts) / comm.world
        return _input_grads(ctx, scale, gu, gv, u, v, n1, n2, parts[0], parts[1])


# --------------------------------------------------------------------------------------------
# entry point (called by fastcon.soft_contrastive_loss when group is not None)


_OPT_NAMES = (
    "distributed mode",
    "loss",
    "symmetric",
    "scene_mode",
    "hard_weight",
    "normalize",
    "reduction",
    "backend available (1 yes, 0 no)",
)
_N_FIELDS = 6 + len(_OPT_NAMES)  # _fields: the sizes and kinds, then the options


def soft_contrastive_loss(
    z1, z2, labels, *, temperature, loss, symmetric, scene_mode, hard_weight, bias, normalize, reduction, backend,
    group, mode, queue=None, queue_labels=None, check=None,
):  # fmt: skip
    """The distributed loss. ``check``: the caller's eager checks of types, shapes and options
    (fastcon.soft_contrastive_loss), run here so that their errors, the options, sizes and
    values of every rank travel in one all-gather (``check_all_ranks``) before anything else."""
    error = _run(check)
    try:
        comm = _Comm(resolve_group(group))
    except (ValueError, TypeError):
        if error is not None:  # no group to tell: this rank's own error
            raise error from None
        raise
    name = core = unavailable = opts = values = None
    if error is None:
        opts = dict(
            zip(
                _OPT_NAMES,
                (MODES.index(mode), LOSSES.index(loss), symmetric, SCENE_MODES.index(scene_mode), float(hard_weight),
                 normalize, REDUCTIONS.index(reduction)),
            )
        )  # fmt: skip
        # a backend missing on one rank is reported on every rank, rather than leaving the others in a collective
        try:
            name, core = _backends.select("soft_contrastive", backend, z1.device)
        except _backends.BackendError as e:
            unavailable = e
        opts["backend available (1 yes, 0 no)"] = unavailable is None
        values = {"temperature": temperature, "bias": bias, "labels": labels, "queue_labels": queue_labels}
    check_all_ranks(comm, error, z1, labels, opts, queue, values)
    if unavailable is not None:
        raise unavailable
    if name == "reference":
        core = reference.DenseCore()
    core.kernel_dtype(z1.dtype)  # a backend without kernels for this dtype says so before any work
    acc = torch.float64 if z1.dtype == torch.float64 else torch.float32

    def as_tensor(x):  # a number as a 0-dim tensor made on z1's device (a fill: no host-to-device copy)
        return x if isinstance(x, torch.Tensor) else torch.full((), float(x), dtype=acc, device=z1.device)

    tau, b = as_tensor(temperature), None if bias is None else as_tensor(bias)
    cfg = (loss, symmetric, float(hard_weight), normalize, reduction, scene_mode == "ignore")
    queue = None if queue is None else queue.detach()
    kpass = _PASSES[mode](comm, core)
    return _DistributedSoftContrastive.apply(z1, z2, tau, b, labels, cfg, kpass, queue, queue_labels)
