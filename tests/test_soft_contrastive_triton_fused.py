"""The fused Triton loss (fastcon/kernels/triton/fused_loss.py, issue 13 item 1): the whole loss of
single-process calls in Triton kernels, checked against the float64 reference for every option
(every label kind: none, multi-label vectors, scene ids in both scene modes and any integer
dtype / layout; the key queue), its inner-dimension splits and deterministic mode, and the
launches and torch ops of one forward + backward (upper bounds, as measured).

The shared suite (test_soft_contrastive.py, test_soft_contrastive_fuzz.py) runs the public loss
with backend="triton" too, which now takes this path for the covered calls. Small N, D: the
interpreter is slow.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from test_soft_contrastive_opcount import _OpCounter
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes

import fastcon
from fastcon import soft_contrastive as sc_mod
from fastcon._sc_algebra import _label_value_messages
from fastcon.kernels.triton import fused_loss as fl
from fastcon.kernels.triton import soft_contrastive as k

DEV = "cuda" if torch.cuda.is_available() else "cpu"
N, D, C = 37, 40, 5  # two row blocks of 32, two feature chunks (interpreter), C not a power of 2


def rel_err(actual, expected):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def _labels(kind, n, gen):
    if kind == "none":
        return None
    if kind in ("scene", "scene_ignore"):
        return torch.randint(0, 6, (n,), generator=gen)  # ~6 rows a scene: shared and lone scenes
    if kind == "multi_hot":
        lab = (torch.rand(n, C, generator=gen) < 0.35).float()
        lab[3] = 0  # a row without classes: T is the identity there
        return lab
    if kind == "fractions":
        return torch.rand(n, C, generator=gen)
    if kind == "bool":
        return torch.rand(n, C, generator=gen) < 0.35
    if kind == "strided":  # a non-contiguous (N, C) view
        return torch.rand(C, n, generator=gen).T
    raise ValueError(kind)


def _run(z1, z2, labels, kw, backend, dtype=torch.float32, upstream=None, learn_bias=False):
    """(loss, [d z1, d z2, d tau (, d bias)]) of one call, in float64 for the reference."""
    dev = DEV if backend == "triton" else "cpu"
    a = z1.to(dev, dtype).requires_grad_()
    b = z2.to(dev, dtype).requires_grad_()
    tau = torch.tensor(kw["temperature"], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    tau = tau.to(dev).requires_grad_()
    rest = {key: val for key, val in kw.items() if key not in ("temperature", "bias", "queue", "queue_labels")}
    if "queue" in kw:  # the queue in the inputs' dtype; its labels in float64 for the reference
        rest["queue"] = kw["queue"].to(dev, dtype)
        ql = kw["queue_labels"]
        if ql is not None:
            ql = ql.to(dev)
            rest["queue_labels"] = ql.double() if ql.dtype.is_floating_point and dtype == torch.float64 else ql
        else:
            rest["queue_labels"] = None
    bias = None
    if "bias" in kw:
        bias = torch.tensor(kw["bias"], dtype=tau.dtype, device=dev).requires_grad_(learn_bias)
    lab = None if labels is None else labels.to(dev)
    if labels is not None and labels.dtype.is_floating_point and dtype == torch.float64:
        lab = labels.double()
    out = fastcon.soft_contrastive_loss(a, b, lab, temperature=tau, bias=bias, backend=backend, **rest)
    up = torch.ones_like(out) if upstream is None else upstream.to(out)
    inputs = [a, b, tau] + ([bias] if learn_bias else [])
    return out, torch.autograd.grad(out, inputs, up)


def _check(labels_kind, kw, seed=0, dtype=torch.float32, learn_bias=False, n=N, d=D):
    gen = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    labels = _labels(labels_kind, n, gen)
    upstream = torch.rand(n, generator=gen) if kw.get("reduction") == "none" else None
    before = fl.LAUNCHES["count"]
    out, grads = _run(z1, z2, labels, kw, "triton", dtype, upstream, learn_bias)
    assert fl.LAUNCHES["count"] > before, "the call took the fused Triton path"
    r_out, r_grads = _run(z1, z2, labels, kw, "reference", torch.float64, upstream, learn_bias)
    return out, grads, r_out, r_grads


LOSSES = {
    "softmax_sym": {"loss": "softmax", "symmetric": True},
    "softmax": {"loss": "softmax", "symmetric": False},
    "sigmoid": {"loss": "sigmoid", "bias": -1.5},
    "sigmoid_nobias": {"loss": "sigmoid"},
}


def _cases():
    """Each label kind x loss form, with hard weight, reduction and normalisation cycled through."""
    out = []
    for i, (kind, lossconf) in enumerate(itertools.product(["multi_hot", "fractions", "none"], LOSSES)):
        out.append((kind, lossconf, [0.0, 0.3, 1.0][i % 3], ["mean", "sum", "none"][(i // 3) % 3], i % 2 == 0))
    out += [("bool", "softmax_sym", 0.3, "mean", True), ("strided", "sigmoid", 0.0, "none", False)]
    return out


def _assert_close(out, grads, r_out, r_grads, dtype=None):
    """The fused loss and gradients against the float64 reference's (fp32 kernels' tolerances);
    ``dtype``: the dtype every result must have."""
    assert out.shape == r_out.shape
    assert rel_err(out, r_out) <= 1e-5
    for g, rg in zip(grads, r_grads):
        assert dtype is None or g.dtype == dtype
        assert rel_err(g, rg) <= 1e-4
    assert dtype is None or out.dtype == dtype


@pytest.mark.parametrize(("labels_kind", "lossconf", "hw", "red", "norm"), _cases())
def test_matches_reference(labels_kind, lossconf, hw, red, norm):
    kw = dict(LOSSES[lossconf], temperature=0.1, hard_weight=hw, reduction=red, normalize=norm)
    learn_bias = "bias" in kw
    out, grads, r_out, r_grads = _check(labels_kind, kw, seed=len(labels_kind) + int(hw * 10), learn_bias=learn_bias)
    _assert_close(out, grads, r_out, r_grads, dtype=torch.float32)


@pytest.mark.parametrize("lossconf", ["softmax_sym", "sigmoid"])
def test_small_temperature(lossconf):
    """tau = 0.01: the tile kernels' two-statistic (no fixed max) path."""
    kw = dict(LOSSES[lossconf], temperature=0.01, hard_weight=0.3)
    out, grads, r_out, r_grads = _check("fractions", kw, seed=3, learn_bias="bias" in kw)
    _assert_close(out, grads, r_out, r_grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(dtype):
    """fp16 / bf16: no worse than 2x the error of the dense reference run in the same dtype."""
    kw = dict(LOSSES["softmax_sym"], temperature=0.1, hard_weight=0.3)
    out, grads, r_out, r_grads = _check("multi_hot", kw, seed=4, dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(N, D, generator=gen), torch.randn(N, D, generator=gen)
    labels = _labels("multi_hot", N, gen)
    lp_out, lp_grads = _run(z1, z2, labels, kw, "reference", dtype)
    assert out.dtype == torch.float32
    assert all(g.dtype == dtype for g in grads[:2])
    assert rel_err(out, r_out) <= max(2 * rel_err(lp_out, r_out), 1e-4)
    for g, lg, rg in zip(grads, lp_grads, r_grads):
        assert rel_err(g, rg) <= max(2 * rel_err(lg, rg), 4e-3 if dtype == torch.bfloat16 else 5e-4)


@pytest.mark.parametrize(
    "core",
    [k.TritonSoftContrastiveCore(splits=3), k.TritonSoftContrastiveCore(splits=2, deterministic=True)],
    ids=["split3", "deterministic_split2"],
)
@pytest.mark.parametrize("lossconf", ["softmax_sym", "softmax", "sigmoid"])
def test_splits_and_deterministic_mode(core, lossconf):
    """Inner-dimension splits merged in the epilogues; deterministic mode (no fixed-max atomics):
    bitwise equal over two runs. The launchers called directly with the core."""
    gen = torch.Generator().manual_seed(9)
    z1, z2 = torch.randn(N, D, generator=gen).to(DEV), torch.randn(N, D, generator=gen).to(DEV)
    labels = _labels("fractions", N, gen).to(DEV)
    cfg = LOSSES[lossconf]
    sym = cfg.get("symmetric", False)
    tau = torch.tensor(0.1, device=DEV)
    bias = torch.tensor(-1.5, device=DEV) if "bias" in cfg else None
    messages = ("temperature", "bias", "finite", ">= 0")

    def both():
        fwd = fl.forward(z1, z2, tau, bias, labels, cfg["loss"], sym, 0.3, True, "mean", messages, core=core)
        go = torch.tensor(1.0, device=DEV)
        bwd = fl.backward(
            go, z1, z2, tau, bias, labels, *fwd[1:], cfg["loss"], sym, 0.3, True, "mean", [True, True, True, True],
            core=core,
        )  # fmt: skip
        return fwd, bwd

    (out, *_), grads = both()
    r_out, r_grads = _run(z1.cpu(), z2.cpu(), labels.cpu(), dict(cfg, temperature=0.1, hard_weight=0.3), "reference",
                          torch.float64, learn_bias="bias" in cfg)  # fmt: skip
    _assert_close(out, grads, r_out, r_grads)
    if core.deterministic:
        (out2, *_), grads2 = both()
        assert torch.equal(out, out2)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads2))


@pytest.mark.parametrize("lossconf", ["softmax_sym", "sigmoid"])
def test_prologue_programs_loop_over_row_blocks(lossconf, monkeypatch):
    """Fewer prologue programs than row blocks (each sums several blocks' projections into its
    slot; what bounds the partial projections' memory at any N): 3 blocks on 1 and 2 programs."""
    kw = dict(LOSSES[lossconf], temperature=0.1, hard_weight=0.3, reduction="none")
    for programs in (1, 2):
        monkeypatch.setattr(fl, "PROLOGUE_PROGRAMS", programs)
        out, grads, r_out, r_grads = _check("fractions", kw, seed=programs, learn_bias="bias" in kw, n=70, d=D)
        _assert_close(out, grads, r_out, r_grads)


def test_strided_embeddings_without_normalisation():
    """Column slices (row stride > D) and transposed storage, with normalize=False (the rows are
    then the kernels' inputs as given)."""
    gen = torch.Generator().manual_seed(6)
    wide = torch.randn(N, D + 7, generator=gen)
    z1, z2 = wide[:, 3 : 3 + D], torch.randn(D, N, generator=gen).T
    kw = dict(LOSSES["softmax_sym"], temperature=0.5, normalize=False)
    out, grads = _run(z1, z2, _labels("fractions", N, gen), kw, "triton")
    gen = torch.Generator().manual_seed(6)
    wide = torch.randn(N, D + 7, generator=gen)
    z1, z2 = wide[:, 3 : 3 + D], torch.randn(D, N, generator=gen).T
    r_out, r_grads = _run(z1, z2, _labels("fractions", N, gen), kw, "reference", torch.float64)
    _assert_close(out, grads, r_out, r_grads)


def test_non_finite_inputs_propagate():
    """A NaN in z1 (and an inf in z2) reach every loss term as in the dense computation."""
    gen = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(N, D, generator=gen), torch.randn(N, D, generator=gen)
    labels = _labels("multi_hot", N, gen)
    for bad, where in [(float("nan"), 0), (float("inf"), 1)]:
        a, b = z1.clone(), z2.clone()
        (a if where == 0 else b)[5, 3] = bad
        kw = dict(LOSSES["softmax_sym"], temperature=0.1, reduction="none")
        out, grads = _run(a, b, labels, kw, "triton")
        r_out, r_grads = _run(a, b, labels, kw, "reference", torch.float64)
        assert torch.equal(out.isnan().cpu(), r_out.isnan())
        for g, rg in zip(grads, r_grads):
            assert torch.equal(g.isnan().cpu(), rg.isnan())


# --------------------------------------------------------------------------------------------
# scene ids (both scene modes) and the key queue


def test_no_fallback_predicate():
    """Every single-process call takes the fused Triton path: the predicate that sent scene ids
    and the queue to the general path is gone."""
    assert not hasattr(fl, "covers")
    assert not hasattr(sc_mod, "triton_fused_covers")


def _scene_cases():
    """Scene ids (positives or ignored) x loss form, hard weight / reduction / normalisation cycled."""
    out = []
    forms = ["softmax_sym", "softmax", "sigmoid", "sigmoid_nobias"]
    for i, (kind, lossconf) in enumerate(itertools.product(["scene", "scene_ignore"], forms)):
        if kind == "scene_ignore" and lossconf.startswith("sigmoid"):
            continue
        out.append((kind, lossconf, [0.0, 0.3, 1.0][i % 3], ["mean", "sum", "none"][(i + 1) % 3], i % 2 == 0))
    return out


@pytest.mark.parametrize(("labels_kind", "lossconf", "hw", "red", "norm"), _scene_cases())
def test_scene_ids_match_reference(labels_kind, lossconf, hw, red, norm):
    kw = dict(LOSSES[lossconf], temperature=0.1, hard_weight=hw, reduction=red, normalize=norm)
    if labels_kind == "scene_ignore":
        kw["scene_mode"] = "ignore"
    out, grads, r_out, r_grads = _check(labels_kind, kw, seed=11 + int(hw * 10), learn_bias="bias" in kw)
    _assert_close(out, grads, r_out, r_grads, dtype=torch.float32)


def _ids(layout, n, gen):
    """Scene ids in another integer dtype or layout (the prologue reads them as they are)."""
    base = torch.randint(-3, 4, (2 * n,), generator=gen)
    if layout == "int32":
        return base[:n].to(torch.int32)
    if layout == "int8":  # negative ids too
        return base[:n].to(torch.int8)
    if layout == "uint8":
        return (base[:n] + 3).to(torch.uint8)
    if layout == "sliced":  # stride 2
        return base[::2]
    if layout == "expanded":  # stride 0: one scene for the whole batch
        return torch.tensor([5]).expand(n)
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["int32", "int8", "uint8", "sliced", "expanded"])
@pytest.mark.parametrize("scene_mode", ["positive", "ignore"])
def test_scene_id_dtypes_and_layouts(layout, scene_mode):
    gen = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(N, D, generator=gen), torch.randn(N, D, generator=gen)
    ids = _ids(layout, N, gen)
    kw = dict(LOSSES["softmax_sym"], temperature=0.1, hard_weight=0.3, scene_mode=scene_mode)
    before = fl.LAUNCHES["count"]
    out, grads = _run(z1, z2, ids, kw, "triton")
    assert fl.LAUNCHES["count"] > before
    r_out, r_grads = _run(z1, z2, ids.to(torch.int64), kw, "reference", torch.float64)
    if layout == "expanded" and scene_mode == "ignore":
        # one scene, every pair but the positive left out: loss and gradients are 0; the fused
        # column log-sum-exps (fixed max: log(exp(s_ii - 1/tau)) + 1/tau) are off by a rounding
        assert r_out.abs().item() == 0.0
        assert abs(out.item()) <= 1e-6
        assert all(g.abs().max().item() <= 1e-6 for g in grads)
        return
    _assert_close(out, grads, r_out, r_grads)


def _queue_labels(kind, k, gen):
    """The queue's labels of the kind of the batch's (scene ids overlap the batch's range and go
    beyond it: shared and queue-only scenes)."""
    if kind == "none":
        return None
    if kind in ("scene", "scene_ignore"):
        return torch.randint(0, 9, (k,), generator=gen)
    if kind == "multi_hot":
        lab = (torch.rand(k, C, generator=gen) < 0.35).float()
        lab[0] = 0  # a key without classes
        return lab
    return torch.rand(k, C, generator=gen)


def _queue_cases():
    """label kind x K x loss form (softmax row losses only; sigmoid with and without a bias),
    hard weight, reduction and normalisation cycled through."""
    out = []
    kinds = ["none", "multi_hot", "fractions", "scene", "scene_ignore"]
    forms = ["softmax", "sigmoid", "sigmoid_nobias"]
    for i, (kind, kq, lossconf) in enumerate(itertools.product(kinds, [1, 37], forms)):
        if kind == "scene_ignore" and lossconf.startswith("sigmoid"):
            continue
        out.append((kind, kq, lossconf, [0.0, 0.3, 1.0][i % 3], ["mean", "sum", "none"][(i // 3) % 3], i % 4 != 3))
    return out


@pytest.mark.parametrize(("labels_kind", "kq", "lossconf", "hw", "red", "norm"), _queue_cases())
def test_queue_matches_reference(labels_kind, kq, lossconf, hw, red, norm):
    gen = torch.Generator().manual_seed(100 + kq)
    kw = dict(LOSSES[lossconf], temperature=0.1, hard_weight=hw, reduction=red, normalize=norm)
    kw.update(queue=torch.randn(kq, D, generator=gen), queue_labels=_queue_labels(labels_kind, kq, gen))
    if labels_kind == "scene_ignore":
        kw["scene_mode"] = "ignore"
    out, grads, r_out, r_grads = _check(labels_kind, kw, seed=kq + int(hw * 10), learn_bias="bias" in kw)
    _assert_close(out, grads, r_out, r_grads)


def test_queue_gets_no_gradient_and_small_temperature():
    """tau = 0.01 (no fixed max) with a queue of scene ids; a queue that requires grad is detached."""
    gen = torch.Generator().manual_seed(8)
    queue = torch.randn(37, D, generator=gen)
    kw = dict(LOSSES["softmax"], temperature=0.01, hard_weight=0.3, queue=queue,
              queue_labels=_queue_labels("scene", 37, gen))  # fmt: skip
    out, grads, r_out, r_grads = _check("scene", kw, seed=8)
    _assert_close(out, grads, r_out, r_grads)
    q = queue.to(DEV).requires_grad_()
    z = torch.randn(N, D, generator=gen).to(DEV).requires_grad_()
    labels = _labels("scene", N, gen).to(DEV)
    fastcon.soft_contrastive_loss(z, z, labels, symmetric=False, queue=q, queue_labels=kw["queue_labels"].to(DEV),
                                  backend="triton").backward()  # fmt: skip
    assert q.grad is None
    assert z.grad is not None


@pytest.mark.parametrize("kind", ["scene", "scene_ignore", "scene_queue", "queue_fractions"])
def test_deterministic_scene_and_queue(kind):
    """Two calls give bitwise equal losses and gradients (deterministic mode: no fixed-max
    atomics; every other sum in a fixed order), with splits of the inner dimension."""
    gen = torch.Generator().manual_seed(12)
    z1, z2 = torch.randn(N, D, generator=gen).to(DEV), torch.randn(N, D, generator=gen).to(DEV)
    core = k.TritonSoftContrastiveCore(splits=2, deterministic=True)
    labels = _labels("fractions" if kind == "queue_fractions" else "scene", N, gen).to(DEV)
    queue = qlabels = None
    sym = True
    if "queue" in kind:
        queue = torch.randn(37, D, generator=gen).to(DEV)
        qlabels = _queue_labels("fractions" if kind == "queue_fractions" else "scene", 37, gen).to(DEV)
        sym = False
    tau = torch.tensor(0.1, device=DEV)
    opts = dict(core=core, queue=queue, queue_labels=qlabels, scene_ignore=kind == "scene_ignore")
    messages = ("temperature", "bias", "finite", ">= 0")

    def both():
        fwd = fl.forward(z1, z2, tau, None, labels, "softmax", sym, 0.3, True, "mean", messages, **opts)
        bwd = fl.backward(torch.tensor(1.0, device=DEV), z1, z2, tau, None, labels, *fwd[1:], "softmax", sym, 0.3,
                          True, "mean", [True, True, True, False], **opts)  # fmt: skip
        return fwd, bwd

    (out, *_), grads = both()
    kw = dict(temperature=0.1, symmetric=sym, hard_weight=0.3)
    if kind == "scene_ignore":
        kw["scene_mode"] = "ignore"
    if queue is not None:
        kw.update(queue=queue.cpu(), queue_labels=qlabels.cpu())
    r_out, r_grads = _run(z1.cpu(), z2.cpu(), labels.cpu(), kw, "reference", torch.float64)
    _assert_close(out, grads, r_out, r_grads)
    (out2, *_), grads2 = both()
    assert torch.equal(out, out2)
    assert all(torch.equal(a, b) for a, b in zip(grads[:3], grads2[:3]))


@pytest.mark.parametrize("kind", ["scene", "scene_ignore", "scene_queue", "queue"])
def test_low_precision_scene_and_queue(kind):
    """fp16 with scene ids / a queue: no worse than 2x the error of the dense reference run in fp16."""
    dtype = torch.float16
    gen = torch.Generator().manual_seed(14)
    z1, z2 = torch.randn(N, D, generator=gen), torch.randn(N, D, generator=gen)
    labels_kind = "fractions" if kind == "queue" else "scene"
    labels = _labels(labels_kind, N, gen)
    kw = dict(LOSSES["softmax_sym"], temperature=0.1, hard_weight=0.3)
    if kind == "scene_ignore":
        kw["scene_mode"] = "ignore"
    if "queue" in kind:
        kw.update(symmetric=False, queue=torch.randn(37, D, generator=gen),
                  queue_labels=_queue_labels(labels_kind, 37, gen))  # fmt: skip
    out, grads = _run(z1, z2, labels, kw, "triton", dtype)
    r_out, r_grads = _run(z1, z2, labels, kw, "reference", torch.float64)
    lp_out, lp_grads = _run(z1, z2, labels, kw, "reference", dtype)
    assert out.dtype == torch.float32
    assert all(g.dtype == dtype for g in grads[:2])
    assert rel_err(out, r_out) <= max(2 * rel_err(lp_out, r_out), 1e-4)
    for g, lg, rg in zip(grads, lp_grads, r_grads):
        assert rel_err(g, rg) <= max(2 * rel_err(lg, rg), 5e-4)


@pytest.mark.parametrize("kind", ["none", "multi", "scene", "scene_ignore", "scene_queue", "multi_queue"])
def test_outputs_have_the_fake_shapes(kind):
    """The forward op's outputs on triton have the shapes and dtypes its fake implementation
    gives torch.compile, for every label kind (the scene index included, which the Triton
    backward does not read)."""
    gen = torch.Generator().manual_seed(15)
    z1, z2 = torch.randn(N, D, generator=gen).to(DEV), torch.randn(N, D, generator=gen).to(DEV)
    labels = {"none": None, "multi": _labels("fractions", N, gen)}.get(kind.replace("_queue", ""), None)
    if kind.startswith("scene"):
        labels = _labels("scene", N, gen)
    labels = None if labels is None else labels.to(DEV)
    queue = qlabels = None
    if "queue" in kind:
        queue = torch.randn(37, D, generator=gen).to(DEV)
        qlabels = _queue_labels("scene" if kind.startswith("scene") else "fractions", 37, gen).to(DEV)
    tau = torch.tensor(0.1, device=DEV)
    args = (z1, z2, tau, None, labels, queue, qlabels, "triton", "softmax", queue is None, 0.3, True, "none",
            kind == "scene_ignore")  # fmt: skip
    real = torch.ops.fastcon_loss.fused_forward(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.fastcon_loss.fused_forward(
            *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        )
    assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in fake]


@pytest.mark.parametrize("kind", ["scene", "queue"])
def test_prologue_programs_loop_over_queue_blocks(kind, monkeypatch):
    """One and two prologue programs for 3 row blocks and 2 queue blocks: each program takes its
    queue blocks after its row blocks, adding to its own slot."""
    gen = torch.Generator().manual_seed(21)
    for programs in (1, 2):
        monkeypatch.setattr(fl, "PROLOGUE_PROGRAMS", programs)
        labels_kind = "scene" if kind == "scene" else "fractions"
        kw = dict(LOSSES["sigmoid"], temperature=0.1, hard_weight=0.3, reduction="none", queue=torch.randn(37, D, generator=gen),
                  queue_labels=_queue_labels(labels_kind, 37, gen))  # fmt: skip
        out, grads, r_out, r_grads = _check(labels_kind, kw, seed=programs, learn_bias=True, n=70)
        _assert_close(out, grads, r_out, r_grads)


# --------------------------------------------------------------------------------------------
# counts: launches and torch ops of one forward + backward


# _OpCounter (test_soft_contrastive_opcount.py) counts the aten ops dispatched, the custom ops'
# bodies included. Triton launches are counted separately (fused_loss.LAUNCHES): under the
# interpreter a launch dispatches torch ops of its own (copies to host), which a GPU launch does not.


# kind: (launches, torch ops) of one forward + backward, as measured (upper bounds). The ops
# include the 4 of autograd itself (the upstream ones, the 3 accumulations into .grad); of the
# rest all but the value checks' device asserts (1 temperature, 2 multi-label values, 1 bias,
# 2 queue label values) and the two custom ops are allocations and views (the outputs, two
# workspaces cut by one split each, the int64 scene ids, the (N + K, D) columns): no torch op
# of the loss's algebra launches a kernel. Scene ids: no reduction launch (their sums are taken
# in the epilogues); a queue: no column pass (row losses only).
COUNT_BOUNDS = {
    "multi_hot": (10, 28),
    "fractions": (10, 28),
    "none": (8, 26),
    "sigmoid": (9, 30),
    "softmax": (9, 28),
    "scene": (8, 28),
    "scene_ignore": (8, 28),
    "scene_sigmoid": (7, 30),
    "queue": (9, 31),
    "queue_none": (7, 27),
    "scene_queue": (7, 29),
    "scene_ignore_queue": (7, 29),
}


@pytest.mark.parametrize("kind", list(COUNT_BOUNDS))
def test_launch_and_op_counts(kind, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(N, D, generator=gen).to(DEV).requires_grad_()
    z2 = torch.randn(N, D, generator=gen).to(DEV).requires_grad_()
    labels = (torch.rand(N, C, generator=gen) < 0.3).float().to(DEV)
    kw = {}
    if kind == "fractions":
        labels = torch.rand(N, C, generator=gen).to(DEV)
    elif kind == "none":
        labels = None
    elif kind == "sigmoid":
        kw = {"loss": "sigmoid", "bias": torch.tensor(-10.0, device=DEV, requires_grad=True)}
    elif kind == "softmax":
        kw = {"symmetric": False}
    if kind.startswith("scene"):
        labels = torch.randint(0, 6, (N,), generator=gen).to(DEV)
        if "ignore" in kind:
            kw["scene_mode"] = "ignore"
        if "sigmoid" in kind:
            kw.update(loss="sigmoid", bias=torch.tensor(-10.0, device=DEV, requires_grad=True))
    if "queue" in kind:
        kw.update(symmetric=False, queue=torch.randn(37, D, generator=gen).to(DEV))
        if kind == "queue":
            kw["queue_labels"] = (torch.rand(37, C, generator=gen) < 0.3).float().to(DEV)
        elif kind == "queue_none":
            labels = None
        else:
            kw["queue_labels"] = torch.randint(0, 9, (37,), generator=gen).to(DEV)
    temperature = torch.tensor(0.1, device=DEV, requires_grad=True)
    launch = fl._launch

    def quiet_launch(*args, **kwargs):
        with _disable_current_modes():
            return launch(*args, **kwargs)

    monkeypatch.setattr(fl, "_launch", quiet_launch)

    def step():
        fastcon.soft_contrastive_loss(z1, z2, labels, temperature=temperature, backend="triton", **kw).backward()

    step()  # first call: .grad created, kernels compiled
    before = fl.LAUNCHES["count"]
    with _OpCounter() as counter:
        step()
    launches = fl.LAUNCHES["count"] - before
    counts = counter.counts
    assert counts["fastcon_loss.fused_forward.default"] == 1
    assert counts["fastcon_loss.fused_backward.default"] == 1
    assert z1.grad is not None
    assert temperature.grad is not None
    max_launches, max_ops = COUNT_BOUNDS[kind]
    total = sum(counts.values())
    assert launches <= max_launches, f"{kind}: {launches} launches"
    assert total <= max_ops, f"{kind}: {total} ops > {max_ops}: {counts.most_common()}"
    # no op of the general path's algebra ran (norms, matmuls, index sums, elementwise math)
    # (detach: the public API detaches the queue before the op)
    allowed = (
        "empty", "new_empty", "empty_like", "split_with_sizes", "_assert_async", "fused_", "ones_like", "add_", "detach",
    )  # fmt: skip
    assert all(any(w in name for w in allowed) for name in counts), counts


@pytest.mark.parametrize(
    ("kw", "labels", "match"),
    [
        ({"temperature": torch.tensor(float("nan"))}, None, "temperature must be finite"),
        ({"temperature": torch.tensor(0.0)}, None, "temperature must be finite"),
        ({"loss": "sigmoid", "bias": torch.tensor(float("inf"))}, None, "bias must be finite"),
        ({}, -torch.ones(8, 3), "labels must be >= 0"),
        ({}, torch.full((8, 3), float("nan")), "labels must be finite"),
        ({"queue_labels": -torch.ones(5, 3)}, torch.ones(8, 3), re.escape(_label_value_messages("queue_labels")[1])),
        (
            {"queue_labels": torch.full((5, 3), float("inf"))},
            torch.ones(8, 3),
            re.escape(_label_value_messages("queue_labels")[0]),
        ),
        (
            {"queue_labels": torch.tensor([[0.5, float("nan"), 1.0]] * 5)},
            torch.rand(8, 3),
            "queue_labels must be finite",
        ),
    ],
)
def test_value_checks(kw, labels, match):
    """The value checks run in the prologue (flags, raised by torch._assert_async: no host
    sync; on CPU tensors at once), before the tile pass."""
    z = torch.randn(8, 4)
    kw = {key: (val.to(DEV) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    if "queue_labels" in kw:
        kw.update(queue=torch.randn(5, 4, device=DEV), symmetric=False)
    before = fl.LAUNCHES["count"]

    def call():
        fastcon.soft_contrastive_loss(
            z.to(DEV), z.to(DEV), None if labels is None else labels.to(DEV), backend="triton", **kw
        )
        if DEV == "cuda":
            torch.cuda.synchronize()

    with pytest.raises(RuntimeError, match=match):
        call()
    assert fl.LAUNCHES["count"] - before <= 2, "no tile pass after a failed check"
