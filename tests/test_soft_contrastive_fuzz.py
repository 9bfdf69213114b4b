"""Findings of a fuzzing pass over the public ops (issue 13, item 4), one test per finding:
second-order gradients, non-finite embeddings, scene id dtypes and layouts, labels that require
grad, extreme temperatures and module options, the batch of one; and the import graph of the
loss modules (item 5)."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from test_soft_contrastive import FUSED, assert_rel, device_for, make_inputs

import fastcon
from fastcon import reference

# --------------------------------------------------------------------------------------------
# second order: an error naming the op, or exact


def _second_order(fn, *inputs):
    out = fn(*inputs)
    grads = torch.autograd.grad(out.sum(), inputs, create_graph=True)
    penalty = sum((g**2).sum() for g in grads)
    return torch.autograd.grad(penalty, inputs)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_loss_double_backward_is_an_error_naming_the_op(backend, loss):
    z1, z2, _ = make_inputs(8, 5)
    dev = device_for(backend)
    a, b = (z.float().to(dev).requires_grad_() for z in (z1, z2))

    def fn(x, y):
        return fastcon.soft_contrastive_loss(x, y, None, loss=loss, backend=backend)

    with pytest.raises(RuntimeError, match=r"fastcon.soft_contrastive_loss: second-order gradients"):
        _second_order(fn, a, b)


def test_reference_loss_double_backward_works():
    z1, z2, _ = make_inputs(6, 4)
    a, b = z1.requires_grad_(), z2.requires_grad_()
    grads = _second_order(lambda x, y: fastcon.soft_contrastive_loss(x, y, backend="reference"), a, b)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)


def test_first_order_still_works_under_no_create_graph():
    z1, z2, _ = make_inputs(6, 4)
    a = z1.float().requires_grad_()
    fastcon.soft_contrastive_loss(a, z2.float(), backend="cpu").backward()
    assert a.grad is not None


def test_siamese_mask_and_unmask_double_backward_are_errors():
    tokens = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 2, 5], [1, 3, 4]])
    with pytest.raises(RuntimeError, match=r"fastcon.siamese_mask: second-order gradients"):
        _second_order(lambda t: fastcon.siamese_mask(t, ids_keep=ids, backend="cpu")[0] ** 2, tokens)
    visible = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"fastcon.unmask: second-order gradients"):
        _second_order(lambda v: fastcon.unmask(v, ids, 6, backend="cpu") ** 2, visible)


def test_mask_image_double_backward_is_exact():
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 3], [1, 2]])

    def fused(x):
        return fastcon.mask_image(x, 4, ids, backend="cpu") ** 3

    def dense(x):
        return fastcon.mask_image(x, 4, ids, backend="reference") ** 3

    got = _second_order(fused, images)[0]
    expected = _second_order(dense, images)[0]
    assert got.abs().max() > 0
    torch.testing.assert_close(got, expected)


def test_noise_schedule_loss_double_backward_is_an_error():
    sched = fastcon.NoiseSchedule("linear", 10)
    x0 = torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 4, 9])
    pred = torch.randn(3, 2, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"fastcon.NoiseSchedule.loss: second-order gradients"):
        _second_order(lambda p: sched.loss(p, x0, t, seed=1, backend="cpu"), pred)


# --------------------------------------------------------------------------------------------
# NaN / inf in the embeddings propagate as in the dense computation


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(
    ("lossconf", "where"),
    [
        ("softmax_sym", "z1_nan"),
        ("softmax_sym", "z2_nan"),
        ("softmax_sym", "z2_inf"),
        ("softmax", "z1_nan"),
        ("softmax", "z2_inf"),
        ("sigmoid", "z1_nan"),
        ("sigmoid", "z2_nan"),
        ("sigmoid", "z2_inf"),
    ],
)
@pytest.mark.parametrize("tau", [0.1, 0.01])
def test_non_finite_embeddings_propagate_like_the_reference(backend, lossconf, where, tau):
    """NaN (and inf, which normalisation turns into NaN) reaches every per-sample loss and
    gradient row that the dense computation reaches; finite ones stay finite."""
    n = 64
    z1, z2, _ = make_inputs(n, 16, seed=3)
    z1, z2 = z1.float(), z2.float()
    target = z1 if where.startswith("z1") else z2
    target[5, 3] = float("nan") if where.endswith("nan") else float("inf")
    kw = dict(
        temperature=tau,
        loss="sigmoid" if lossconf == "sigmoid" else "softmax",
        symmetric=lossconf == "softmax_sym",
        reduction="none",
    )
    dev = device_for(backend)

    def run(b, device):
        a, c = z1.to(device).requires_grad_(), z2.to(device).requires_grad_()
        out = fastcon.soft_contrastive_loss(a, c, None, backend=b, **kw)
        out.sum().backward()
        return out.detach().cpu(), a.grad.cpu(), c.grad.cpu()

    for got, exp, name in zip(run(backend, dev), run("reference", "cpu"), ["losses", "dz1", "dz2"]):
        bad = ~torch.isfinite(exp) if got.dim() == 1 else ~torch.isfinite(exp).all(dim=1)
        got_bad = ~torch.isfinite(got) if got.dim() == 1 else ~torch.isfinite(got).all(dim=1)
        assert bad.any(), f"{name}: the reference propagates the non-finite value"
        assert torch.equal(got_bad, bad), f"{name}: non-finite rows {got_bad.nonzero().flatten().tolist()}, " + (
            f"reference {bad.nonzero().flatten().tolist()}"
        )


# --------------------------------------------------------------------------------------------
# scene ids: every integer dtype and layout


def _ids(kind: str):
    base = torch.tensor([3, 1, 3, 0, 1, 2, 2, 3, 0, 1, 5, 4])
    if kind == "sliced":
        return torch.stack([base, base]).T[:, 0]  # stride 2
    if kind == "expanded":
        return torch.tensor(7).expand(12)  # one scene, stride 0
    if kind == "nonzero_offset":
        return torch.cat([torch.tensor([9]), base])[1:]
    return base.to(getattr(torch, kind))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["int32", "int16", "int8", "uint8", "sliced", "expanded", "nonzero_offset"])
@pytest.mark.parametrize("scene_mode", ["positive", "ignore"])
def test_scene_ids_of_every_integer_dtype_and_layout(backend, kind, scene_mode):
    z1, z2, _ = make_inputs(12, 6, seed=1)
    ids = _ids(kind)
    dev = device_for(backend)
    kw = dict(temperature=0.2, scene_mode=scene_mode, symmetric=True)
    got = fastcon.soft_contrastive_loss(z1.float().to(dev), z2.float().to(dev), ids.to(dev), backend=backend, **kw)
    expected = reference.soft_contrastive_loss(z1, z2, ids.to(torch.int64).contiguous(), **kw)
    # one scene under "ignore": every row's only candidate is its positive, the loss is 0 up to fp32
    assert_rel(got, expected, 1e-5, f"{kind} scene ids", atol=1e-5 if kind == "expanded" else 0.0)


# --------------------------------------------------------------------------------------------
# labels that require grad: one behaviour on every backend


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("name", ["labels", "queue_labels"])
def test_labels_requiring_grad_are_rejected(backend, name):
    labels = torch.rand(4, 3)
    kw = {}
    if name == "queue_labels":
        kw = dict(queue=torch.randn(5, 3), queue_labels=torch.rand(5, 3).requires_grad_(), symmetric=False)
    else:
        labels.requires_grad_()
    with pytest.raises(ValueError, match=f"{name} must not require grad"):
        fastcon.soft_contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), labels, backend=backend, **kw)


# --------------------------------------------------------------------------------------------
# temperatures and module options


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    ("temperature", "dtype"),
    [(1e-39, torch.float32), (1e-45, torch.float32), (torch.tensor(1e-40), torch.float32), (1e-320, torch.float64)],
)
def test_temperature_whose_inverse_overflows_names_temperature(backend, temperature, dtype):
    z = torch.randn(4, 3, dtype=dtype)
    with pytest.raises(ValueError, match=r"temperature must be >= .*its inverse, the logit scale"):
        fastcon.soft_contrastive_loss(z, z, temperature=temperature, backend=backend)


def test_smallest_valid_temperature_runs():
    z1, z2, _ = make_inputs(6, 4)
    out = fastcon.soft_contrastive_loss(z1.float(), z2.float(), temperature=1e-30, backend="cpu")
    assert out.dtype == torch.float32


@pytest.mark.parametrize("max_scale", [0.0, -1.0, float("inf")])
def test_module_rejects_max_scale(max_scale):
    with pytest.raises(ValueError, match="max_scale must be"):
        fastcon.SoftContrastiveLoss(max_scale=max_scale)


def test_module_rejects_learnable_bias_with_softmax():
    with pytest.raises(ValueError, match="learnable_bias=True needs loss='sigmoid'"):
        fastcon.SoftContrastiveLoss(learnable_bias=True)


# --------------------------------------------------------------------------------------------
# a batch of one (README): 0 exactly in the reference, within a few fp32 ulps of 1/tau fused


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("tau", [0.1, 0.01])
def test_batch_of_one_is_zero_within_fp32_ulps(backend, tau):
    dev = device_for(backend)
    for seed in range(5):
        z1, z2, _ = make_inputs(1, 32, seed=seed)
        out = fastcon.soft_contrastive_loss(
            z1.float().to(dev), z2.float().to(dev), None, temperature=tau, backend=backend
        )
        bound = 0.0 if backend == "reference" else 8 * torch.finfo(torch.float32).eps / tau
        assert abs(float(out)) <= bound, f"batch of one: {float(out):.3g} > {bound:.3g}"


# --------------------------------------------------------------------------------------------
# item 5: the loss modules import each other in one direction only


def _fastcon_imports(path: pathlib.Path) -> set[str]:
    """fastcon modules that a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastcon"):
            if node.module == "fastcon":
                found |= {a.name for a in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fastcon.")}
    return found


def test_loss_modules_have_no_import_cycle():
    root = pathlib.Path(fastcon.__file__).parent
    graph = {p.stem: _fastcon_imports(p) for p in root.glob("*.py")}
    loss_modules = {"soft_contrastive", "distributed", "_sc_algebra"}

    def reaches(src, dst, seen=()):
        return any(m == dst or (m not in seen and reaches(m, dst, (*seen, m))) for m in graph.get(src, ()))

    for mod in loss_modules:
        assert not reaches(mod, mod), f"fastcon.{mod} imports itself through a cycle"
    assert "soft_contrastive" not in graph["distributed"]
    assert "soft_contrastive" not in graph["_sc_algebra"]
    assert "distributed" not in graph["_sc_algebra"]


# --------------------------------------------------------------------------------------------
# label value checks without a host sync (device tensors): torch._assert_async


@pytest.mark.parametrize(
    ("labels", "match"),
    [(-torch.ones(4, 2), "labels must be >= 0"), (torch.full((4, 2), float("nan")), "labels must be finite")],
)
def test_label_value_checks_sync_free_path(labels, match):
    """The path device tensors take (forced here on CPU tensors, where _assert_async raises at
    once): the same message, from torch._assert_async rather than a ValueError."""
    from fastcon.soft_contrastive import check_label_values

    with pytest.raises(RuntimeError, match=match):
        check_label_values(labels, sync_free=True)
    with pytest.raises(ValueError, match=match):
        check_label_values(labels)
    check_label_values(torch.rand(4, 2), sync_free=True)  # valid labels pass


# --------------------------------------------------------------------------------------------
# the whole fused loss (kernels and algebra) is bitwise independent of the thread count


@pytest.mark.parametrize("kind", ["multi_hot", "scene", "scene_ignore", "none", "sigmoid", "queue"])
def test_fused_cpu_loss_bitwise_equal_for_1_and_2_threads(kind):
    gen = torch.Generator().manual_seed(4)
    n, d = 700, 40  # several 256-row tiles
    z1, z2 = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    kw = dict(temperature=torch.tensor(0.1), hard_weight=0.2, backend="cpu")
    labels = (torch.rand(n, 6, generator=gen) < 0.3).float()
    if kind in ("scene", "scene_ignore"):
        labels = torch.randint(0, 50, (n,), generator=gen)
        kw["scene_mode"] = "ignore" if kind == "scene_ignore" else "positive"
    elif kind == "none":
        labels = None
    elif kind == "sigmoid":
        kw.update(loss="sigmoid", bias=torch.tensor(-2.0))
    elif kind == "queue":
        kw.update(
            queue=torch.randn(300, d, generator=gen), queue_labels=torch.rand(300, 6, generator=gen), symmetric=False
        )
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
            t = kw["temperature"].clone().requires_grad_()
            out = fastcon.soft_contrastive_loss(a, b, labels, **{**kw, "temperature": t})
            out.backward()
            results.append([out.detach(), a.grad, b.grad, t.grad])
    finally:
        torch.set_num_threads(before)
    # everything, multi-label gradients included: the one C++ op per direction sums over rows in
    # row order (class projections per block of feature columns), whatever the thread count
    for one, two in zip(results[0], results[1]):
        assert torch.equal(one, two)
