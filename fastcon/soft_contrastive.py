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
from types import SimpleNamespace

import torch
from torch import nn

from fastcon import _backends, _checks, reference
from fastcon import distributed as dist_loss
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
    _row_dots,
    _scalar_grads,
    _scene_ids,
    _subtract_targets,
)
from fastcon.reference import MODE_SIGMOID, MODE_SOFTMAX, MODE_SOFTMAX_IGNORE

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
    if labels.requires_grad:  # one behaviour on every backend: targets are constants
        raise ValueError(
            f"{name} must not require grad: the targets are constants of the loss (no backend differentiates "
            f"them); pass {name}.detach()"
        )
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


def check_label_values(labels, name: str = "labels", sync_free: bool | None = None) -> None:
    """The checks that read label values (multi-label vectors: finite, >= 0). They run where the
    values are read anyway: eagerly for the reference and distributed paths, inside the fused
    loss op otherwise (so that torch.compile sees no data-dependent branch).

    ``sync_free`` (default: for tensors not on the CPU) checks with ``torch._assert_async``
    instead of reading the result on the host: no host-device synchronisation; a failure is then
    reported by the device (on CUDA a device-side assert naming the check, surfacing at the
    next synchronisation), not as a ValueError here. On CPU tensors reading a value costs no
    synchronisation, so the check raises the ValueError at once."""
    if labels is None or labels.dim() != 2:
        return
    checks = []
    not_finite, negative = _label_value_messages(name)
    if labels.dtype.is_floating_point:
        checks.append((torch.isfinite(labels).all(), not_finite))
    if labels.dtype != torch.bool:
        checks.append(((labels >= 0).all(), negative))
    for ok, message in checks:
        if sync_free if sync_free is not None else labels.device.type != "cpu":
            torch._assert_async(ok, message)
        elif not bool(ok):
            raise ValueError(message)


def _temperature_message(dtype: torch.dtype) -> str:
    """The device-side temperature check's message for inputs of ``dtype``."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (
        f"temperature must be finite, > 0 and >= {1.0 / torch.finfo(acc).max:.3g} for {dtype} inputs (its "
        f"inverse, the logit scale, must be finite in {acc})"
    )


def _check_values(z1, temperature, bias, labels, queue_labels, sync_free: bool | None = None, scale=None) -> None:
    """The value checks of the loss's arguments: temperature (finite, > 0, with a finite inverse
    in the accumulation dtype), bias (finite) and the label values (``check_label_values``).

    ``sync_free`` (default: for z1 not on the CPU; the fused loss also takes it for the GPU
    backends' code path on CPU tensors) checks tensors with ``torch._assert_async``: no value is
    read on the host, so no host-device synchronisation; a failure is reported by the device (on
    CUDA a device-side assert naming the check, surfacing at the next synchronisation; on CPU
    tensors a RuntimeError at once). Otherwise a failure is the ValueError here (reading a CPU
    tensor's value costs no synchronisation). ``scale``: 1 / temperature in float64, if known.
    Python numbers were checked by ``_check`` already."""
    if sync_free is None:
        sync_free = z1.device.type != "cpu"
    if sync_free:
        acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
        if scale is None:
            scale = _logit_scale(temperature, z1.device)
        # one comparison for all: scale in [smallest double, finfo(acc).max] fails for a NaN, an
        # infinite, zero or negative temperature and for one whose inverse overflows acc
        ok = scale.clamp(math.ulp(0.0), torch.finfo(acc).max) == scale
        torch._assert_async(ok, _temperature_message(z1.dtype))
        if bias is not None:
            torch._assert_async(torch.isfinite(bias), "bias must be finite")
    else:
        tau = _checks.scalar("temperature", temperature, positive=True, device=z1.device)
        _checks.inverse_finite("temperature", tau, z1.dtype)
        if bias is not None:
            _checks.scalar("bias", bias, device=z1.device)
    check_label_values(labels, sync_free=sync_free)
    check_label_values(queue_labels, "queue_labels", sync_free=sync_free)


def _logit_scale(temperature: torch.Tensor, device) -> torch.Tensor:
    """1 / temperature as the kernels take it: a 0-dim float64 tensor on ``device`` (float64 so
    that it equals the Python float ``1.0 / float(temperature)`` the loss used before; the
    kernels round it to their accumulation type). Never read on the host."""
    return temperature.to(device=device, dtype=torch.float64).reciprocal()


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
    tau = _checks.scalar("temperature", temperature, positive=True, device=z1.device, read=False)
    if tau is not None:  # a Python number: checked at once (the fused loss checks tensors in its op)
        _checks.inverse_finite("temperature", tau, z1.dtype)
    if scene_mode == "ignore":
        if labels is None or labels.dim() != 1:
            raise ValueError("scene_mode='ignore' needs scene ids: labels must be a 1-D integer tensor (N,)")
        if loss != "softmax":
            raise ValueError("scene_mode='ignore' is defined for loss='softmax' only")
    if bias is not None:
        if loss != "sigmoid":
            raise ValueError("bias is only used by loss='sigmoid'; pass bias=None for loss='softmax'")
        _checks.scalar("bias", bias, device=z1.device, read=False)
    check_queue(queue, queue_labels, labels, z2, loss, symmetric)


def _triton_fused_loss():
    """fastcon/kernels/triton/fused_loss.py, imported on first use (importing triton is slow)."""
    from fastcon.kernels.triton import fused_loss

    return fused_loss


# --------------------------------------------------------------------------------------------
# the fused loss: two custom ops (forward, backward) over every fused backend's kernel core
#
# Both are ``torch.library.custom_op``s, so that torch.compile(fullgraph=True) takes the fused loss
# as two opaque nodes (with fake implementations for tracing) instead of breaking the graph where
# the algebra reads the temperature or the label values. What autograd saves between them: the
# inputs and the O(N) kernel statistics (row / column log-sum-exps, target row sums); backward
# recomputes the normalised rows and the low-rank target sums, O(N * (D + C)), rather than
# keeping normalised copies alive.


def _cpu_ops():
    """torch.ops.fastcon with the cpu extension loaded (its fused loss ops sc_loss_forward / _backward)."""
    _backends.load_extension("_C")
    return torch.ops.fastcon


_CUDA_OPS = ("cuda", "cuda_simt")  # the backends of the cuda fused loss ops
_CUDA_SCALAR_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_CUDA_LABEL_DTYPES = (
    *_CUDA_SCALAR_DTYPES, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)  # fmt: skip


def cuda_fused_covers(z1, temperature, bias, labels, queue_labels) -> bool:
    """Whether the cuda backends' fused loss ops (csrc/cuda/soft_contrastive_loss.cu) compute this
    call: temperature and bias (floating) on z1's device, labels and queue_labels of a dtype the
    kernels read (float64/32/16, bfloat16, int64/32/16/8, uint8, bool). Every label kind, option
    and the key queue are covered; anything else takes the general path (the torch algebra)."""
    for x in (temperature, bias):
        if x is not None and (x.device != z1.device or x.dtype not in _CUDA_SCALAR_DTYPES or x.numel() != 1):
            return False
    return all(x is None or x.dtype in _CUDA_LABEL_DTYPES for x in (labels, queue_labels))


def _whole_loss_ops(backend: str, z1, temperature, bias, labels, queue_labels):
    """The op namespace whose ``sc_loss_forward`` / ``sc_loss_backward`` compute this call whole, or
    None (the general path): the cpu backend's (torch.ops.fastcon, CPU key) for every call; the
    cuda backends' (torch.ops.fastcon for the CUDA key, or torch.ops.fastcon_simt, the SIMT
    emulation; tests may point it at another build) for the calls ``cuda_fused_covers`` accepts."""
    if backend == "cpu":
        return _cpu_ops()
    if backend in _CUDA_OPS and cuda_fused_covers(z1, temperature, bias, labels, queue_labels):
        return _core_for(backend, z1.device)._ops()
    return None


def _mode(loss: str, scene_ignore: bool) -> int:
    return MODE_SIGMOID if loss == "sigmoid" else (MODE_SOFTMAX_IGNORE if scene_ignore else MODE_SOFTMAX)


def _core_for(backend: str, device):
    """The kernel core of a fused backend; "reference" is the dense kernel contract (the algebra
    below with no kernel: tests)."""
    if backend == "reference":
        return reference.DenseCore()
    return _backends.select("soft_contrastive", backend, device)[1]


def _prepare(core, z1, z2, temperature, bias, labels, queue, queue_labels, cfg, check: bool, norms=None, scenes=None):
    """Everything both directions recompute from the inputs: scalars, normalised rows and columns
    (batch, then queue), kernel ids, target sums. ``check``: the value checks first (forward);
    ``norms`` / ``scenes``: the forward's row norms and scene index (backward), not computed again."""
    loss, symmetric, hard_weight, normalize, reduction, scene_ignore = cfg
    acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
    # scale and bias stay tensors on the device (float64, 0-dim): the kernels and the algebra
    # read them there, so that no call synchronises with the host on a GPU. The GPU backends
    # take this path (asserts instead of eager errors) on CPU tensors too (tests count it).
    scale = _logit_scale(temperature, z1.device)
    bias_v = None if bias is None else bias.to(device=z1.device, dtype=torch.float64)
    if check:
        sync_free = getattr(core, "sync_free", False) or z1.device.type != "cpu"
        _check_values(z1, temperature, bias, labels, queue_labels, sync_free, scale)
    kdt = core.kernel_dtype(z1.dtype)
    uk, vk, u, v, n1, n2 = _normalize(z1, z2, normalize, kdt, acc, norms)
    qk, vq = _queue_keys(queue, normalize, kdt, acc)
    ids, col_ids = _scene_ids(labels, queue_labels) if scene_ignore else (None, None)
    cols = vk if qk is None else torch.cat([vk, qk])  # the M = N + K columns
    t = Targets(
        None if scene_ignore else labels, z1.shape[0], acc, z1.device, queue_labels=queue_labels, queue_keys=vq,
        scene_index=scenes,
    )  # fmt: skip
    # bounded: |s_ij| <= scale = 1/tau for unit vectors (the kernels may use it as a fixed max)
    need_col = loss == "softmax" and symmetric and queue is None
    kargs = (ids, col_ids, 0, scale, bias_v, normalize, _mode(loss, scene_ignore))
    return uk, cols, u, v, n1, n2, t, kargs, need_col


@torch.library.custom_op("fastcon_loss::fused_forward", mutates_args=())
def _fused_forward(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    queue: torch.Tensor | None,
    queue_labels: torch.Tensor | None,
    backend: str,
    loss: str,
    symmetric: bool,
    hard_weight: float,
    normalize: bool,
    reduction: str,
    scene_ignore: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, row statistics (N,), column statistics (N,) or (0,), target row sums (N,) or (0,),
    the row norms of z1 and z2 (N,) each, (0,) without normalisation, the int64 scene index of the
    rows (N,) for scene ids as positives, (0,) otherwise), all saved for backward. On the cpu backend
    (one process) the whole forward is the one C++ op ``fastcon::sc_loss_forward``, which returns
    the scene order (rows sorted by scene id) as the scene index; on the cuda backends (cuda,
    cuda_simt) the same op for the CUDA key (csrc/cuda/soft_contrastive_loss.cu, 3-4 launches), which
    returns each row's scene leader (its scene's smallest row index) as the scene index, for the
    calls ``cuda_fused_covers`` accepts; on the triton backend the Triton kernels of
    ``fastcon.kernels.triton.fused_loss`` every call."""
    ops = _whole_loss_ops(backend, z1, temperature, bias, labels, queue_labels)
    if ops is not None:
        return ops.sc_loss_forward(
            z1, z2, temperature, bias, labels, queue, queue_labels, loss, symmetric, hard_weight, normalize, reduction,
            scene_ignore,
        )  # fmt: skip
    if backend == "triton":
        return _triton_forward(
            z1, z2, temperature, bias, labels, queue, queue_labels, loss, symmetric, hard_weight, normalize, reduction,
            scene_ignore,
        )  # fmt: skip
    cfg = (loss, symmetric, hard_weight, normalize, reduction, scene_ignore)
    core = _core_for(backend, z1.device)
    uk, cols, u, v, n1, n2, t, kargs, need_col = _prepare(
        core, z1, z2, temperature, bias, labels, queue, queue_labels, cfg, True
    )
    scale, bias_v, mode = kargs[3], kargs[4], kargs[6]
    row, col = core.forward(uk, cols, *kargs, need_col)
    acc = u.dtype
    row, col = row.to(acc), col.to(acc)
    per, r_sum = _per_sample_losses(mode, need_col, hard_weight, scale, bias_v, u, v, row, col, t)
    out = per.mean() if reduction == "mean" else (per.sum() if reduction == "sum" else per)
    stats = [row.new_empty(0) if x is None else x for x in (r_sum, n1, n2)]  # (0,): none
    scenes = t.inverse if t.kind == "scene" else row.new_empty(0, dtype=torch.int64)
    return out, row, col, *stats, scenes


def _triton_forward(
    z1, z2, temperature, bias, labels, queue, queue_labels, loss, symmetric, hard_weight, normalize, reduction,
    scene_ignore,
):  # fmt: skip
    """The fused forward as Triton kernels only (fastcon/kernels/triton/fused_loss.py), every label
    kind and the key queue; the value checks are flags its prologue computes, raised by
    ``torch._assert_async`` with the messages of ``_check_values`` (no host sync). The outputs of
    ``fused_forward``; the scene index (shaped as the fake implementation says) is left unwritten:
    the Triton backward compares the ids instead."""
    messages = (
        _temperature_message(z1.dtype), "bias must be finite", *_label_value_messages(),
        *_label_value_messages("queue_labels"),
    )  # fmt: skip
    out = _triton_fused_loss().forward(
        z1, z2, temperature, bias, labels, loss, symmetric, hard_weight, normalize, reduction, messages,
        queue=queue, queue_labels=queue_labels, scene_ignore=scene_ignore,
    )  # fmt: skip
    scene_pos = labels is not None and labels.dim() == 1 and not scene_ignore
    return *out, z1.new_empty(z1.shape[0] if scene_pos else 0, dtype=torch.int64)


@_fused_forward.register_fake
def _(z1, z2, temperature, bias, labels, queue, queue_labels, backend, loss, symmetric, hard_weight, normalize, reduction, scene_ignore):  # fmt: skip
    acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
    n = z1.shape[0]
    need_col = loss == "softmax" and symmetric and queue is None
    out = z1.new_empty((n,) if reduction == "none" else (), dtype=acc)
    r_sum = z1.new_empty(0 if scene_ignore else n, dtype=acc)
    norm = z1.new_empty(n if normalize else 0, dtype=acc)
    scene_pos = labels is not None and labels.dim() == 1 and not scene_ignore
    scenes = z1.new_empty(n if scene_pos else 0, dtype=torch.int64)
    return (
        out,
        z1.new_empty(n, dtype=acc),
        z1.new_empty(n if need_col else 0, dtype=acc),
        r_sum,
        norm,
        norm.clone(),
        scenes,
    )


@torch.library.custom_op("fastcon_loss::fused_backward", mutates_args=())
def _fused_backward(
    grad_out: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    queue: torch.Tensor | None,
    queue_labels: torch.Tensor | None,
    row: torch.Tensor,
    col: torch.Tensor,
    r_sum: torch.Tensor,
    n1: torch.Tensor,
    n2: torch.Tensor,
    scenes: torch.Tensor,
    backend: str,
    loss: str,
    symmetric: bool,
    hard_weight: float,
    normalize: bool,
    reduction: str,
    scene_ignore: bool,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d z1, d z2, d temperature, d bias); an empty tensor where ``needs`` says no gradient. On the cpu
    backend the whole backward is the one C++ op ``fastcon::sc_loss_backward``; on the triton backend
    the fused Triton kernels, every call."""
    ops = _whole_loss_ops(backend, z1, temperature, bias, labels, queue_labels)
    if ops is not None:
        return ops.sc_loss_backward(
            grad_out, z1, z2, temperature, bias, labels, queue, queue_labels, row, col, r_sum, n1, n2, scenes, loss,
            symmetric, hard_weight, normalize, reduction, scene_ignore, *needs,
        )  # fmt: skip
    if backend == "triton":
        return _triton_fused_loss().backward(
            grad_out, z1, z2, temperature, bias, labels, row, col, r_sum, n1, n2, loss, symmetric, hard_weight,
            normalize, reduction, needs, queue=queue, queue_labels=queue_labels, scene_ignore=scene_ignore,
        )  # fmt: skip
    cfg = (loss, symmetric, hard_weight, normalize, reduction, scene_ignore)
    core = _core_for(backend, z1.device)
    norms = (n1, n2) if normalize else None
    scene_pos = labels is not None and labels.dim() == 1 and not scene_ignore
    uk, cols, u, v, n1, n2, t, kargs, need_col = _prepare(
        core, z1, z2, temperature, bias, labels, queue, queue_labels, cfg, False, norms, scenes if scene_pos else None
    )
    scale, mode = kargs[3], kargs[6]
    acc, n = u.dtype, z1.shape[0]
    g, h = _loss_weights(grad_out.to(acc), reduction, need_col, n, n)
    ku, kv, wsum = core.backward(uk, cols, *kargs, row, col if need_col else None, g, h)
    gu, gv = ku.to(acc), kv[:n].to(acc)  # the queue's columns get no gradient
    r = None if scene_ignore else r_sum
    _subtract_targets(mode, hard_weight, g, h, r, u, v, t, gu, gv)
    d_tau = d_bias = None
    pu = _row_dots(u, gu) if needs[2] or (needs[0] and normalize) else None  # shared by both below
    if needs[2] or needs[3]:
        d_tau, d_bias = _scalar_grads(scale, hard_weight, g, r, u, gu, wsum.to(acc), pu)
    shell = SimpleNamespace(
        metas=(z1.dtype, (temperature.dtype, temperature.device), None if bias is None else (bias.dtype, bias.device)),
        needs_input_grad=tuple(needs),
    )
    grads = _input_grads(shell, scale, gu, gv, u, v, n1, n2, d_tau, d_bias, pu)
    return tuple(z1.new_empty(0) if x is None else x for x in grads)


@_fused_backward.register_fake
def _(grad_out, z1, z2, temperature, bias, labels, queue, queue_labels, row, col, r_sum, n1, n2, scenes, backend, loss, symmetric, hard_weight, normalize, reduction, scene_ignore, needs):  # fmt: skip
    return (
        torch.empty_like(z1) if needs[0] else z1.new_empty(0),
        torch.empty_like(z2) if needs[1] else z1.new_empty(0),
        torch.empty_like(temperature) if needs[2] else z1.new_empty(0),
        torch.empty_like(bias) if needs[3] and bias is not None else z1.new_empty(0),
    )


_TENSOR_INPUTS = 7  # z1, z2, temperature, bias, labels, queue, queue_labels


def _setup_context(ctx, inputs, output):
    stats = output[1:]  # row, col, r_sum, n1, n2, scenes
    ctx.mark_non_differentiable(*stats)
    ctx.set_materialize_grads(False)  # no zero gradients made for the six statistics (6 ops per call)
    ctx.save_for_backward(*inputs[:_TENSOR_INPUTS], *stats)
    ctx.cfg = inputs[_TENSOR_INPUTS:]


def _backward(ctx, grad_out, *_):
    _checks.first_order_only("fastcon.soft_contrastive_loss")
    needs = [bool(x) for x in ctx.needs_input_grad[:4]]
    if not any(needs) or grad_out is None:
        return (None,) * (_TENSOR_INPUTS + len(ctx.cfg))
    grads = _fused_backward(grad_out, *ctx.saved_tensors, *ctx.cfg, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * (3 + len(ctx.cfg))


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


@torch._dynamo.assume_constant_result
def _backend_name(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a call on ``device`` runs on; torch.compile takes it as a constant of the graph
    (chosen when compiling) instead of tracing the registry. A backend without kernels for
    ``dtype`` says so here, before any work."""
    name, core = _backends.select("soft_contrastive", backend, device)
    if core is not None:
        core.kernel_dtype(dtype)
    return name


def _fused_loss(z1, z2, temperature, bias, labels, cfg, backend: str, queue=None, queue_labels=None):
    """The fused loss on a backend's kernels (``backend="reference"``: the dense kernel contract)."""
    loss, symmetric, hard_weight, normalize, reduction, scene_ignore = cfg
    out = _fused_forward(
        z1, z2, temperature, bias, labels, queue, queue_labels, backend, loss, symmetric, float(hard_weight),
        normalize, reduction, scene_ignore,
    )  # fmt: skip
    return out[0]


# --------------------------------------------------------------------------------------------
# backends: each fused backend supplies a "core" with kernel_dtype / forward / backward


class _OpsCore:
    """sc_forward / sc_backward registered with TORCH_LIBRARY (csrc/), dispatched by device."""

    def __init__(self, namespace: str, ext: str, native_low_precision: bool, sync_free: bool = False):
        self.namespace, self.ext, self.native_low_precision = namespace, ext, native_low_precision
        self.sync_free = sync_free  # the GPU code path (value checks by torch._assert_async), on any device

    def kernel_dtype(self, dtype):
        if dtype == torch.float64 or self.native_low_precision:
            return dtype
        return torch.float32  # the CPU kernels work in fp32 (their GEMM tiles gain nothing from bf16)

    def _ops(self):
        _backends.load_extension(self.ext)
        return getattr(torch.ops, self.namespace)

    @staticmethod
    def _scalars(u, scale, bias, bounded):
        """scale / bias as the ops take them: 0-dim float64 tensors on u's device (the loss passes
        them so; a number, as tests pass, becomes one), bounded as a bool."""

        def f64(x):
            if x is None or isinstance(x, torch.Tensor):
                return x
            return torch.full((), float(x), dtype=torch.float64, device=u.device)

        return f64(scale), f64(bias), bool(bounded)

    def forward(self, u, v, row_ids, col_ids, row_offset, scale, bias, bounded, mode, need_col):
        scalars = self._scalars(u, scale, bias, bounded)
        return self._ops().sc_forward(u, v, row_ids, col_ids, row_offset, *scalars, mode, need_col)

    def backward(self, u, v, row_ids, col_ids, row_offset, scale, bias, bounded, mode, row, col, g, h):
        scalars = self._scalars(u, scale, bias, bounded)
        return self._ops().sc_backward(u, v, row_ids, col_ids, row_offset, *scalars, mode, row, col, g, h)


def _triton_core():
    from fastcon.kernels.triton import soft_contrastive as k

    return k.CORE


_backends.register("soft_contrastive", "reference", lambda: None)
_backends.register("soft_contrastive", "cpu", lambda: _OpsCore("fastcon", "_C", native_low_precision=False))
_backends.register(
    "soft_contrastive", "cuda", lambda: _OpsCore("fastcon", "_C", native_low_precision=True, sync_free=True)
)
_backends.register(
    "soft_contrastive",
    "cuda_simt",
    lambda: _OpsCore("fastcon_simt", "_C_simt", native_low_precision=True, sync_free=True),
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

    # checks of types, shapes and options here; the value checks of tensors (temperature, bias
    # and label values) where the values are read: below for the reference, in the fused op
    # otherwise. Under a group every rank runs this check and the loss's first collective (one
    # small all-gather, fastcon.distributed) tells every rank about every rank's errors and
    # values, so that an input error on one rank raises on all.
    def check():
        _check(
            z1, z2, labels, temperature, loss, symmetric, scene_mode, hard_weight, bias, normalize, reduction, queue,
            queue_labels,
        )  # fmt: skip
        _checks.choice("distributed", distributed, DISTRIBUTED_MODES)

    if group is None:
        check()
    else:
        return dist_loss.soft_contrastive_loss(
            z1, z2, labels, temperature=temperature, loss=loss, symmetric=symmetric, scene_mode=scene_mode,
            hard_weight=hard_weight, bias=bias, normalize=normalize, reduction=reduction, backend=backend,
            group=group, mode=distributed, queue=queue, queue_labels=queue_labels, check=check,
        )  # fmt: skip
    name = _backend_name(backend, z1.device, z1.dtype)
    if name == "reference":
        _check_values(z1, temperature, bias, labels, queue_labels, sync_free=False)
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
    tau, b = _as_tensor(temperature, z1), None if bias is None else _as_tensor(bias, z1)
    cfg = (loss, symmetric, float(hard_weight), normalize, reduction, scene_mode == "ignore")
    queue = None if queue is None else queue.detach()
    return _fused_loss(z1, z2, tau, b, labels, cfg, name, queue, queue_labels)


def _as_tensor(x, z1: torch.Tensor) -> torch.Tensor:
    """A temperature or bias for the fused op: a tensor as given, a number as a 0-dim tensor in
    the accumulation dtype made on z1's device (a fill, not a host-to-device copy: no sync)."""
    if isinstance(x, torch.Tensor):
        return x
    acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
    return torch.full((), float(x), dtype=acc, device=z1.device)


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
        _checks.real("max_scale", max_scale, low=0.0, low_open=True)
        _checks.choice("loss", loss, LOSSES)
        _checks.boolean("learnable_bias", learnable_bias)
        if learnable_bias and loss != "sigmoid":
            raise ValueError("learnable_bias=True needs loss='sigmoid' (the softmax form has no bias)")
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
