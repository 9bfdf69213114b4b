"""The cuda backend's fused loss ops (fastcon::sc_loss_forward / sc_loss_backward for the CUDA key,
csrc/cuda/soft_contrastive_loss.cu), run through their SIMT emulation build (backend cuda_simt):
the launches per step (issue 13: <= 8 for forward + backward), agreement with the dense
reference for every label kind and option, bitwise determinism, and the coverage predicate."""

from __future__ import annotations

import pytest
import torch
from test_soft_contrastive_opcount import count_step_ops

import fastcon
from fastcon import _backends
from fastcon import soft_contrastive as sc

mod, _err = _backends.load_extension("_C_simt")
if mod is None:  # setup.py always builds it: its absence is a broken build, not a missing device
    raise ImportError(f"fastcon._C_simt is not built: {_err}")


def launches() -> int:
    return torch.ops.fastcon_simt.simt_launch_count()


def _labels(kind, n, k, gen, c=5):
    """(labels, queue_labels) of a kind."""
    if kind == "none":
        return None, None
    if kind == "multi_hot":
        return (torch.rand(n, c, generator=gen) < 0.4).double(), (torch.rand(k, c, generator=gen) < 0.4).double()
    if kind == "fractions":
        return torch.rand(n, c, generator=gen), torch.rand(k, c, generator=gen)
    if kind == "int_labels":
        return torch.randint(0, 3, (n, c), generator=gen, dtype=torch.int32), torch.randint(
            0, 3, (k, c), generator=gen, dtype=torch.int32
        )
    if kind == "bool_labels":  # a strided (N, C) view
        full = torch.rand(c, n, generator=gen) < 0.4
        return full.T, (torch.rand(k, c, generator=gen) < 0.4)
    if kind in ("scene", "scene_ignore"):  # int16 ids, strided
        ids = torch.randint(0, 6, (2 * n,), generator=gen).to(torch.int16)[::2]
        return ids, torch.randint(0, 6, (k,), generator=gen)
    raise ValueError(kind)


LAUNCH_CASES = {
    # kind: (labels kind, options, queue, expected launches forward + backward)
    "multi_hot": ("multi_hot", {}, False, 8),
    "fractions": ("fractions", {}, False, 8),
    "scene": ("scene", {}, False, 8),
    "scene_ignore": ("scene_ignore", {"scene_mode": "ignore"}, False, 6),
    "none": ("none", {}, False, 6),
    "sigmoid_bias": ("none", {"loss": "sigmoid", "learnable_bias": True}, False, 6),
    "sigmoid_labels": ("multi_hot", {"loss": "sigmoid", "learnable_bias": True}, False, 8),
    "queue": ("multi_hot", {"symmetric": False}, True, 8),
    "scene_queue": ("scene", {"symmetric": False}, True, 8),
    "none_queue": ("none", {"symmetric": False}, True, 6),
}


@pytest.mark.parametrize("case", list(LAUNCH_CASES))
def test_launches_per_step(case):
    """forward: prologue, reduce (labels / scene ids only), tile pass, epilogue; backward the same
    shape. Counted on the second step (grads accumulating, learnable temperature)."""
    kind, opts, with_queue, expected = LAUNCH_CASES[case]
    gen = torch.Generator().manual_seed(3)
    n, d, k = 24, 16, 7
    z1 = torch.randn(n, d, generator=gen).requires_grad_()
    z2 = torch.randn(n, d, generator=gen).requires_grad_()
    labels, qlabels = _labels(kind, n, k, gen)
    queue = torch.randn(k, d, generator=gen) if with_queue else None
    if not with_queue:
        qlabels = None
    module = fastcon.SoftContrastiveLoss(0.1, learnable_temperature=True, backend="cuda_simt", **opts)
    module(z1, z2, labels, queue=queue, queue_labels=qlabels).backward()
    before = launches()
    module(z1, z2, labels, queue=queue, queue_labels=qlabels).backward()
    count = launches() - before
    assert count == expected
    assert count <= 8
    assert module.log_scale.grad is not None
    assert z1.grad is not None
    assert z2.grad is not None
    if opts.get("learnable_bias"):
        assert module.bias.grad is not None


def test_launch_counter_counts_each_launch():
    before = launches()
    z = torch.randn(8, 4, dtype=torch.float64)
    torch.ops.fastcon_simt.sc_forward(
        z, z, None, None, 0, torch.tensor(10.0, dtype=torch.float64), None, True, 0, False
    )
    assert launches() - before == 1


def test_fp16_backward_has_the_weight_scale_launch():
    """fp16: the backward's reduce launch also takes max |g| for the tile pass's weight scaling."""
    gen = torch.Generator().manual_seed(4)
    z1 = torch.randn(20, 16, generator=gen).half().requires_grad_()
    z2 = torch.randn(20, 16, generator=gen).half().requires_grad_()
    before = launches()
    fastcon.soft_contrastive_loss(z1, z2, backend="cuda_simt").backward()
    assert launches() - before == 7


# --------------------------------------------------------------------------------------------
# against the reference

CASES = [
    # (labels kind, options, queue keys K (0: none))
    ("none", {}, 0),
    ("none", {"symmetric": False, "hard_weight": 0.3}, 0),
    ("multi_hot", {}, 0),
    ("multi_hot", {"hard_weight": 0.3, "reduction": "sum"}, 0),
    ("multi_hot", {"hard_weight": 1.0, "reduction": "none"}, 0),
    ("fractions", {"symmetric": False, "normalize": False, "temperature": 0.5}, 0),
    ("int_labels", {"hard_weight": 0.3}, 0),
    ("bool_labels", {"reduction": "none"}, 0),
    ("scene", {}, 0),
    ("scene", {"hard_weight": 0.3, "symmetric": False, "reduction": "sum"}, 0),
    ("scene_ignore", {"scene_mode": "ignore"}, 0),
    ("scene_ignore", {"scene_mode": "ignore", "symmetric": False, "reduction": "none"}, 0),
    ("none", {"loss": "sigmoid", "bias": -2.0}, 0),
    ("multi_hot", {"loss": "sigmoid", "bias": 1.5, "hard_weight": 0.3}, 0),
    ("fractions", {"loss": "sigmoid", "reduction": "none"}, 0),
    ("scene", {"loss": "sigmoid", "bias": -1.0, "hard_weight": 1.0}, 0),
    ("none", {"symmetric": False}, 1),
    ("multi_hot", {"symmetric": False, "hard_weight": 0.3}, 37),
    ("fractions", {"symmetric": False}, 1),
    ("scene", {"symmetric": False}, 37),
    ("scene", {"symmetric": False, "hard_weight": 0.3, "reduction": "none"}, 1),
    ("scene_ignore", {"scene_mode": "ignore", "symmetric": False}, 37),
    ("multi_hot", {"loss": "sigmoid", "bias": -1.0}, 37),
]


# the fused op in its SIMT build, and natively where a GPU is present (tools/gpu_check.py runs
# the "cuda and not simt" cases of this file on one)
BACKENDS = ["cuda_simt"] + (["cuda"] if torch.cuda.is_available() else [])


def _run(backend, z1, z2, labels, tau, bias, queue, qlabels, opts, grad_out=None):
    """loss and gradients (z1, z2, temperature, bias) on CPU tensors; "cuda" runs on the GPU."""
    dev = "cuda" if backend == "cuda" else "cpu"
    z1 = z1.detach().to(dev).requires_grad_()  # views keep their strides
    z2 = z2.detach().to(dev).requires_grad_()
    tau = tau.detach().clone().to(dev).requires_grad_()
    bias = None if bias is None else bias.detach().clone().to(dev).requires_grad_()
    labels, queue, qlabels, grad_out = (None if x is None else x.to(dev) for x in (labels, queue, qlabels, grad_out))
    out = fastcon.soft_contrastive_loss(
        z1, z2, labels, temperature=tau, bias=bias, backend=backend, queue=queue, queue_labels=qlabels, **opts
    )
    inputs = [z1, z2, tau] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(out, inputs, grad_out if grad_out is not None else torch.ones_like(out))
    return out.detach().cpu(), tuple(g.cpu() for g in grads)


def _problem(kind, opts, k, dtype, n=37, d=19, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    z2 = (z1.double() + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)).to(dtype)
    labels, qlabels = _labels(kind, n, max(k, 1), gen)
    queue = torch.randn(k, d, generator=gen, dtype=torch.float64).to(dtype) if k else None
    if not k:
        qlabels = None
    opts = dict(opts)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tau = torch.tensor(opts.pop("temperature", 0.2), dtype=acc)
    b = opts.pop("bias", None)
    bias = None if b is None else torch.tensor(b, dtype=acc)
    return z1, z2, labels, tau, bias, queue, qlabels, opts


def _close(a, e, tol):
    a, e = a.double(), e.double()
    scale = e.abs().max().clamp_min(1.0)
    assert ((a - e).abs().max() / scale).item() <= tol, ((a - e).abs().max().item(), scale.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference_float64(case, backend):
    kind, opts, k = CASES[case]
    z1, z2, labels, tau, bias, queue, qlabels, opts = _problem(kind, opts, k, torch.float64)
    gen = torch.Generator().manual_seed(9)
    go = None
    if opts.get("reduction") == "none":
        go = torch.rand(z1.shape[0], generator=gen, dtype=torch.float64)
    out, grads = _run(backend, z1, z2, labels, tau, bias, queue, qlabels, opts, go)
    ref, rgrads = _run("reference", z1, z2, labels, tau, bias, queue, qlabels, opts, go)
    _close(out, ref, 1e-11)
    assert len(grads) == len(rgrads)
    for g, r in zip(grads, rgrads):
        assert g.shape == r.shape
        assert g.dtype == r.dtype
        _close(g, r, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [0, 3, 9, 11, 13, 17, 19])
def test_matches_reference_low_precision(dtype, case, backend):
    kind, opts, k = CASES[case]
    z1, z2, labels, tau, bias, queue, qlabels, opts = _problem(kind, opts, k, dtype, n=21, d=16, seed=1)
    out, grads = _run(backend, z1, z2, labels, tau, bias, queue, qlabels, opts)
    # the reference on the same (rounded) inputs in float64
    b64 = None if bias is None else bias.double()
    q64 = None if queue is None else queue.double()
    ref, rgrads = _run("reference", z1.double(), z2.double(), labels, tau.double(), b64, q64, qlabels, opts)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    assert out.dtype == torch.float32
    _close(out, ref, tol)
    for g, r in zip(grads, rgrads):
        _close(g, r, tol * 5)


def test_only_the_grads_asked_for():
    z1, z2, labels, tau, bias, queue, qlabels, opts = _problem("multi_hot", {}, 0, torch.float64, n=13, d=7)
    z1 = z1.requires_grad_()
    loss = fastcon.soft_contrastive_loss(z1, z2, labels, temperature=tau, backend="cuda_simt")
    (g1,) = torch.autograd.grad(loss, [z1])
    ref = fastcon.soft_contrastive_loss(z1, z2, labels, temperature=tau, backend="reference")
    (r1,) = torch.autograd.grad(ref, [z1])
    _close(g1, r1, 1e-10)


def test_grads_accumulate():
    z1, z2, labels, tau, bias, queue, qlabels, opts = _problem("scene", {}, 0, torch.float64, n=13, d=7)
    z1 = z1.requires_grad_()
    for _ in range(2):
        fastcon.soft_contrastive_loss(z1, z2, labels, temperature=tau, backend="cuda_simt").backward()
    z1r = z1.detach().clone().requires_grad_()
    fastcon.soft_contrastive_loss(z1r, z2, labels, temperature=tau, backend="reference").backward()
    _close(z1.grad, 2 * z1r.grad, 1e-10)


# --------------------------------------------------------------------------------------------
# determinism, coverage


@pytest.mark.parametrize("case", [2, 9, 17, 19])
def test_bitwise_deterministic(case):
    """Every sum of the op outside the tile pass runs in a fixed order. (On a GPU the tile pass's
    forward merges row / column sums of split sweeps by float atomics: SIMT only here.)"""
    backend = "cuda_simt"
    kind, opts, k = CASES[case]
    z1, z2, labels, tau, bias, queue, qlabels, opts = _problem(kind, opts, k, torch.float32, n=29, d=12)
    a, ga = _run(backend, z1, z2, labels, tau, bias, queue, qlabels, opts)
    b, gb = _run(backend, z1, z2, labels, tau, bias, queue, qlabels, opts)
    assert torch.equal(a, b)
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)


def test_scene_output_is_the_leader():
    ids = torch.tensor([5, 3, 5, 7, 3, 5])
    z = torch.randn(6, 4, dtype=torch.float64)
    t = torch.tensor(0.1, dtype=torch.float64)
    out = torch.ops.fastcon_simt.sc_loss_forward(
        z, z, t, None, ids, None, None, "softmax", True, 0.0, True, "mean", False
    )
    assert out[6].tolist() == [0, 1, 0, 3, 1, 0]


def test_coverage_predicate():
    z = torch.randn(4, 3)
    t = torch.tensor(0.1)
    assert sc.cuda_fused_covers(z, t, None, None, None)
    assert sc.cuda_fused_covers(z, t, torch.tensor(1.0), torch.ones(4, 2, dtype=torch.int8), None)
    assert not sc.cuda_fused_covers(z, t.to("meta"), None, None, None)  # temperature on another device
    assert not sc.cuda_fused_covers(z, t, torch.tensor(1.0, device="meta"), None, None)
    assert not sc.cuda_fused_covers(z, t, None, torch.ones(4, 2, dtype=torch.complex64), None)
    assert not sc.cuda_fused_covers(z, torch.tensor([0.1, 0.2]), None, None, None)


def test_bad_values_raise_with_the_python_messages():
    z = torch.randn(6, 4)
    q = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"temperature must be finite, > 0 and >= 2.94e-39 for torch.float32"):
        fastcon.soft_contrastive_loss(z, z, temperature=torch.tensor(0.0), backend="cuda_simt")
    with pytest.raises(RuntimeError, match="queue_labels must be >= 0"):
        fastcon.soft_contrastive_loss(
            z, z, torch.ones(6, 2), backend="cuda_simt", symmetric=False, queue=q, queue_labels=-torch.ones(3, 2)
        )
    with pytest.raises(RuntimeError, match="queue_labels must be finite"):
        fastcon.soft_contrastive_loss(
            z, z, torch.ones(6, 2), backend="cuda_simt", symmetric=False, queue=q,
            queue_labels=torch.full((3, 2), float("inf")),
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="labels must be >= 0"):
        fastcon.soft_contrastive_loss(z, z, -torch.ones(6, 2, dtype=torch.int64), backend="cuda_simt")


OPS = {"multi_hot": 8, "fractions": 8, "scene": 8, "scene_ignore": 8, "none": 8, "sigmoid": 9}


@pytest.mark.parametrize("kind", list(OPS))
def test_torch_ops_per_step(kind):
    """The op counter of tests/test_soft_contrastive_opcount.py (as there: a tensor temperature
    that requires grad): the two custom operators, the C++ op each calls, the unit gradient and
    one add_ per accumulated .grad, as on the cpu backend; no torch op of the algebra."""
    counts = count_step_ops(kind, "cuda_simt")[0]  # the op-count suite's inputs and step
    assert counts["fastcon_simt.sc_loss_forward.default"] == 1
    assert counts["fastcon_simt.sc_loss_backward.default"] == 1
    assert counts["fastcon_simt.sc_forward.default"] == 0
    assert counts["fastcon_simt.sc_backward.default"] == 0
    assert sum(counts.values()) == OPS[kind], counts.most_common()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["multi_hot", "scene"])
def test_strided_inputs(kind, backend):
    """z1, z2 and the queue as strided views, read in place by the prologue (any layout)."""
    gen = torch.Generator().manual_seed(5)
    n, d, k = 23, 11, 9
    z1 = torch.randn(d, n, generator=gen, dtype=torch.float64).T
    z2 = torch.randn(n, 2 * d, generator=gen, dtype=torch.float64)[:, ::2]
    queue = torch.randn(k, d + 3, generator=gen, dtype=torch.float64)[:, 2:-1]
    labels, qlabels = _labels(kind, n, k, gen)
    tau = torch.tensor(0.3, dtype=torch.float64)
    opts = {"symmetric": False, "hard_weight": 0.3}
    out, grads = _run(backend, z1, z2, labels, tau, None, queue, qlabels, opts)
    ref, rgrads = _run("reference", z1, z2, labels, tau, None, queue, qlabels, opts)
    assert not z2.is_contiguous()
    assert not queue.is_contiguous()
    _close(out, ref, 1e-11)
    for g, r in zip(grads, rgrads):
        _close(g, r, 1e-10)
