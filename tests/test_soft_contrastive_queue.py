"""The key queue (memory bank) of SPEC section 1b: every backend against the float64 dense
reference, the dense reference against MoCo's cross-entropy form, gradchecks, argument checks.
The distributed gather and ring modes with a queue are in test_distributed.py."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from test_soft_contrastive import F64, FUSED, assert_rel, device_for, loss_and_grads, make_inputs, make_labels

import fastcon
from fastcon import reference

KINDS = ["multi_hot", "fractions", "zero_rows", "scene", "scene_ignore", "none"]
QUEUE_SIZES = [1, 37, 4096]


def make_queue(kind: str, k: int, d: int, c: int, seed: int):
    """(K, D) float64 keys and their labels of the kind of the batch's labels. Scene ids are drawn
    from a range that overlaps the batch's (shared scenes) and goes beyond it (queue-only scenes)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    queue = torch.randn(k, d, generator=gen, dtype=torch.float64)
    if kind in ("scene", "scene_ignore"):
        return queue, torch.randint(0, 8, (k,), generator=gen)
    return queue, make_labels(kind, k, c, gen)


def _kwargs(kind, loss, hw, tau=0.2):
    kw = dict(temperature=tau, loss=loss, symmetric=False, hard_weight=hw)
    if kind == "scene_ignore":
        kw["scene_mode"] = "ignore"
    if loss == "sigmoid":
        kw["bias"] = -0.7
    return kw


def _grid(backend=None):
    """Every label kind x loss form x hard weight x K. The interpreted triton kernels take about a
    second a call: they run K = 4096 at hard_weight 0.3 (every kind and form), K = 1 and 37 at all."""
    for kind, loss, hw, k in itertools.product(KINDS, ["softmax", "sigmoid"], [0.0, 0.3, 1.0], QUEUE_SIZES):
        if kind == "scene_ignore" and loss == "sigmoid":
            continue
        if backend == "triton" and k == 4096 and hw != 0.3:
            continue
        yield backend, kind, loss, hw, k


def _case(kind, loss, hw, k, n=13, d=9, c=5):
    z1, z2, gen = make_inputs(n, d, seed=k + n)
    labels = make_labels("scene" if kind == "scene_ignore" else kind, n, c, gen)
    queue, queue_labels = make_queue(kind, k, d, c, seed=k)
    kw = _kwargs(kind, loss, hw)
    return z1, z2, labels, queue, queue_labels, kw


def _with_queue(fn, queue, queue_labels):
    def run(a, b, lab, **kw):
        return fn(a, b, lab, queue=queue.to(a), queue_labels=queue_labels, **kw)

    return run


def _fused(backend):
    def fn(a, b, lab, **kw):
        return fastcon.soft_contrastive_loss(a, b, lab, backend=backend, **kw)

    return fn


@pytest.mark.parametrize(("backend", "kind", "loss", "hw", "k"), [c for b in FUSED for c in _grid(b)])
def test_queue_matches_reference(backend, kind, loss, hw, k):
    z1, z2, labels, queue, queue_labels, kw = _case(kind, loss, hw, k)
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(k)
    upstream = torch.rand(z1.shape[0], generator=gen, dtype=torch.float64)
    kw["reduction"] = "none"
    opts = dict(learn_tau=True, learn_bias=loss == "sigmoid", upstream=upstream)
    lab = None if labels is None else labels.to(dev)
    qlab = None if queue_labels is None else queue_labels.to(dev)
    out, grads = loss_and_grads(
        _with_queue(_fused(backend), queue.to(dev), qlab), z1, z2, lab, kw, dtype=torch.float32, device=dev, **opts
    )
    r_out, r_grads = loss_and_grads(
        _with_queue(reference.soft_contrastive_loss, queue, queue_labels), z1, z2, labels, kw,
        dtype=torch.float64, device="cpu", **opts,
    )  # fmt: skip
    assert out.shape == (z1.shape[0],)
    assert_rel(out, r_out, 1e-5, "per-sample losses")
    for name, g, rg in zip(["dz1", "dz2", "dtau", "dbias"], grads, r_grads):
        assert_rel(g, rg, 1e-4, name)


@pytest.mark.parametrize("k", [1, 37])
@pytest.mark.parametrize("hw", [0.0, 1.0])
def test_reference_queue_is_moco_cross_entropy(k, hw):
    """Without labels the softmax loss with a queue is MoCo's: cross-entropy over [positive,
    batch negatives, queue negatives], the positive at column i (hard_weight has no effect)."""
    z1, z2, _ = make_inputs(11, 6, seed=k)
    queue = torch.randn(k, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    u, v, q = F.normalize(z1, dim=1), F.normalize(z2, dim=1), F.normalize(queue, dim=1)
    logits = torch.cat([u @ v.T, u @ q.T], dim=1) / 0.1
    expected = F.cross_entropy(logits, torch.arange(11))
    got = reference.soft_contrastive_loss(z1, z2, None, temperature=0.1, symmetric=False, hard_weight=hw, queue=queue)
    assert_rel(got, expected, 1e-12, "reference vs MoCo cross-entropy")


def test_reference_queue_soft_targets_by_hand():
    """One row, one batch column, two queue keys: the soft targets spelled out."""
    z1 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    z2 = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    queue = torch.tensor([[0.0, 2.0], [-3.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    queue_labels = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    s = torch.tensor([0.6, 0.0, -1.0], dtype=torch.float64) / 0.5
    t = torch.tensor([1.0, 2**-0.5, 0.0], dtype=torch.float64)  # T_ii = 1, cosines with the queue
    expected = torch.logsumexp(s, 0) - (t / t.sum() * s).sum()
    got = reference.soft_contrastive_loss(
        z1, z2, labels, temperature=0.5, symmetric=False, queue=queue, queue_labels=queue_labels
    )
    assert_rel(got, expected, 1e-12, "softmax with queue by hand")
    x = s - 0.2
    expected = (F.softplus(x) - t * x).sum()
    got = reference.soft_contrastive_loss(
        z1, z2, labels, temperature=0.5, loss="sigmoid", bias=-0.2, queue=queue, queue_labels=queue_labels
    )
    assert_rel(got, expected, 1e-12, "sigmoid with queue by hand")


@pytest.mark.parametrize("backend", ["reference", *sorted(set(FUSED) & F64)])
@pytest.mark.parametrize(("kind", "loss"), [("multi_hot", "softmax"), ("scene", "sigmoid"), ("scene_ignore", "softmax"), ("none", "softmax"), ("fractions", "sigmoid")])  # fmt: skip
def test_queue_gradcheck(backend, kind, loss):
    z1, z2, labels, queue, queue_labels, kw = _case(kind, loss, 0.3, 5, n=6, d=4, c=3)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True) if loss == "sigmoid" else None
    kw.pop("temperature")
    kw.pop("bias", None)

    def f(a, b, t, *rest):
        return fastcon.soft_contrastive_loss(
            a, b, labels, temperature=t, bias=rest[0] if rest else None, backend=backend, reduction="none",
            queue=queue, queue_labels=queue_labels, **kw,
        )  # fmt: skip

    inputs = (z1.clone().requires_grad_(), z2.clone().requires_grad_(), tau) + ((bias,) if bias is not None else ())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_queue_gets_no_gradient(backend):
    z1, z2, labels, queue, queue_labels, kw = _case("multi_hot", "softmax", 0.3, 7)
    queue = queue.clone().requires_grad_(True)
    a = z1.clone().requires_grad_(True)
    out = fastcon.soft_contrastive_loss(a, z2, labels, queue=queue, queue_labels=queue_labels, backend=backend, **kw)
    out.backward()
    assert queue.grad is None
    assert a.grad is not None
    assert torch.isfinite(a.grad).all()


def test_module_forward_takes_a_queue():
    z1, z2, labels, queue, queue_labels, kw = _case("scene", "softmax", 0.0, 37)
    mod = fastcon.SoftContrastiveLoss(0.2, learnable_temperature=True, symmetric=False, backend="cpu").double()
    out = mod(z1, z2, labels, queue=queue, queue_labels=queue_labels)
    out.backward()
    expected = reference.soft_contrastive_loss(
        z1, z2, labels, temperature=0.2, symmetric=False, queue=queue, queue_labels=queue_labels
    )
    assert_rel(out, expected, 1e-6, "module with a queue")  # log_scale was rounded in fp32
    assert mod.log_scale.grad is not None
    assert torch.isfinite(mod.log_scale.grad)


def _z(n=4, d=3, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype)


NO_SYM = {"symmetric": False}
BAD_QUEUES = [
    ("symmetric_with_queue", lambda: (None, {"queue": _z(5)}), "symmetric=True is not defined with a queue"),
    ("queue_dtype", lambda: (None, {"queue": _z(5, dtype=torch.float64), **NO_SYM}), "queue must have z2's dtype"),
    ("queue_device", lambda: (None, {"queue": _z(5).to("meta"), **NO_SYM}), "queue must be on z2's device"),
    ("queue_feature_size", lambda: (None, {"queue": _z(5, 4), **NO_SYM}), r"queue must be \(K, D\) with K >= 1"),
    ("queue_empty", lambda: (None, {"queue": _z(0, 3), **NO_SYM}), r"queue must be \(K, D\) with K >= 1"),
    ("queue_1d", lambda: (None, {"queue": torch.randn(3), **NO_SYM}), "queue must be 2-D"),
    ("queue_int", lambda: (None, {"queue": torch.ones(5, 3, dtype=torch.int64), **NO_SYM}), "queue must be a floating"),
    (
        "queue_labels_without_queue",
        lambda: (torch.arange(4), {"queue_labels": torch.arange(5), **NO_SYM}),
        "queue_labels are the labels of a key queue",
    ),
    (
        "queue_labels_missing",
        lambda: (torch.arange(4), {"queue": _z(5), **NO_SYM}),
        r"queue_labels must be \(K,\) = \(5,\) integer scene ids",
    ),
    (
        "queue_labels_without_labels",
        lambda: (None, {"queue": _z(5), "queue_labels": torch.arange(5), **NO_SYM}),
        r"queue_labels must be None \(labels is None\)",
    ),
    (
        "queue_labels_kind",
        lambda: (torch.ones(4, 2), {"queue": _z(5), "queue_labels": torch.arange(5), **NO_SYM}),
        r"queue_labels must be \(K, C\) = \(5, 2\) multi-label",
    ),
    (
        "queue_labels_classes",
        lambda: (torch.ones(4, 2), {"queue": _z(5), "queue_labels": torch.ones(5, 3), **NO_SYM}),
        r"queue_labels must be \(K, C\) = \(5, 2\)",
    ),
    (
        "queue_labels_length",
        lambda: (torch.arange(4), {"queue": _z(5), "queue_labels": torch.arange(6), **NO_SYM}),
        r"queue_labels must have one entry per queue key \(length K = 5\)",
    ),
    (
        "queue_labels_float_ids",
        lambda: (torch.arange(4), {"queue": _z(5), "queue_labels": torch.ones(5), **NO_SYM}),
        "1-D queue_labels are scene ids and must be an integer tensor",
    ),
    (
        "queue_labels_negative",
        lambda: (torch.ones(4, 2), {"queue": _z(5), "queue_labels": -torch.ones(5, 2), **NO_SYM}),
        "queue_labels must be >= 0",
    ),
]


@pytest.mark.parametrize(("case", "make", "match"), BAD_QUEUES, ids=[c[0] for c in BAD_QUEUES])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_queue(case, make, match, backend):
    labels, kw = make()
    exc = TypeError if case in ("queue_dtype", "queue_int", "queue_labels_float_ids") else ValueError
    with pytest.raises(exc, match=match):
        fastcon.soft_contrastive_loss(_z(), _z(), labels, backend=backend, **kw)


def test_sigmoid_with_queue_ignores_symmetric():
    """symmetric has no effect on the sigmoid form (SPEC 1), with or without a queue."""
    z1, z2, labels, queue, queue_labels, kw = _case("multi_hot", "sigmoid", 0.3, 37)
    kw.pop("symmetric")
    a = fastcon.soft_contrastive_loss(z1, z2, labels, queue=queue, queue_labels=queue_labels, symmetric=True, **kw)
    b = fastcon.soft_contrastive_loss(z1, z2, labels, queue=queue, queue_labels=queue_labels, symmetric=False, **kw)
    assert torch.equal(a, b)
