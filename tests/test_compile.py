"""torch.compile support: schemas, fake (meta) kernels and autograd registration of the loss ops
agree with the kernels (torch.library.opcheck), and a compiled training loss equals eager."""

import pytest
import torch

import fastcon


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_opcheck_soft_contrastive_ops(mode):
    gen = torch.Generator().manual_seed(mode)
    u = torch.nn.functional.normalize(torch.randn(37, 19, generator=gen), dim=1)
    v = torch.nn.functional.normalize(torch.randn(29, 19, generator=gen), dim=1)
    ids = (torch.randint(0, 4, (37,), generator=gen), torch.randint(0, 4, (29,), generator=gen))
    ids = ids if mode == 1 else (None, None)
    need_col = mode != 2
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-0.5, dtype=torch.float64)
    args = (u, v, *ids, 3, scale, bias, True, mode, need_col)
    torch.library.opcheck(torch.ops.fastcon.sc_forward, args)
    row, col = torch.ops.fastcon.sc_forward(*args)
    g = torch.rand(37, generator=gen)
    h = torch.rand(29, generator=gen) if need_col else None
    bargs = (u, v, *ids, 3, scale, bias, True, mode, row, col if need_col else None, g, h)
    torch.library.opcheck(torch.ops.fastcon.sc_backward, bargs)


@pytest.mark.parametrize("kind", ["multi_hot", "scene", "scene_ignore", "none_queue", "sigmoid"])
def test_opcheck_fused_cpu_loss_ops(kind):
    """The cpu backend's whole-loss ops (sc_loss_forward / sc_loss_backward) against their fake kernels."""
    gen = torch.Generator().manual_seed(1)
    n, d = 23, 11
    z1, z2 = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    labels, queue, queue_labels, bias = None, None, None, None
    loss, symmetric, scene_ignore = "softmax", True, kind == "scene_ignore"
    if kind == "multi_hot":
        labels = (torch.rand(n, 4, generator=gen) < 0.4).float()
    elif kind in ("scene", "scene_ignore"):
        labels = torch.randint(0, 5, (n,), generator=gen, dtype=torch.int32)
    elif kind == "none_queue":
        queue, symmetric = torch.randn(7, d, generator=gen), False
    else:
        loss, bias = "sigmoid", torch.tensor(-1.0)
    tau = torch.tensor(0.2)
    opts = (loss, symmetric, 0.25, True, "mean", scene_ignore)
    args = (z1, z2, tau, bias, labels, queue, queue_labels, *opts)
    torch.library.opcheck(torch.ops.fastcon.sc_loss_forward, args)
    out = torch.ops.fastcon.sc_loss_forward(*args)
    bargs = (torch.tensor(1.0), z1, z2, tau, bias, labels, queue, queue_labels, *out[1:], *opts, True, True, True, True)
    torch.library.opcheck(torch.ops.fastcon.sc_loss_backward, bargs)


def test_compiled_loss_equals_eager():
    def loss_fn(z1, z2, labels):
        return fastcon.soft_contrastive_loss(z1, z2, labels, temperature=0.1, hard_weight=0.2)

    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(64, 32, generator=gen, requires_grad=True)
    z2 = torch.randn(64, 32, generator=gen, requires_grad=True)
    labels = (torch.rand(64, 5, generator=gen) < 0.4).float()
    compiled = torch.compile(loss_fn)(z1, z2, labels)
    compiled.backward()
    grads = z1.grad.clone(), z2.grad.clone()
    z1.grad = z2.grad = None
    eager = loss_fn(z1, z2, labels)
    eager.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], z1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], z2.grad, rtol=1e-5, atol=1e-7)


LABEL_KINDS = ["multi_hot", "fractions", "scene", "scene_ignore", "none", "sigmoid_bias"]


def _labels(kind: str, n: int, gen: torch.Generator):
    if kind in ("multi_hot", "sigmoid_bias"):
        return (torch.rand(n, 5, generator=gen) < 0.4).float()
    if kind == "fractions":
        lab = torch.rand(n, 5, generator=gen)
        return lab / lab.sum(dim=1, keepdim=True)
    if kind in ("scene", "scene_ignore"):
        return torch.randint(0, 9, (n,), generator=gen)
    return None


def _module(kind: str):
    kw = dict(learnable_temperature=True, backend="cpu")
    if kind == "sigmoid_bias":
        kw.update(loss="sigmoid", learnable_bias=True)
    if kind == "scene_ignore":
        kw.update(scene_mode="ignore")
    return fastcon.SoftContrastiveLoss(0.1, hard_weight=0.2 if kind != "scene_ignore" else 0.0, **kw)


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_fullgraph_compile_of_learnable_module_equals_eager(kind):
    """torch.compile(fullgraph=True) of a function holding SoftContrastiveLoss(learnable_temperature
    =True) (and the sigmoid form with a learnable bias) on the cpu backend: no graph break, and
    the loss and every gradient (z1, z2, log_scale, bias) equal eager."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    mod = _module(kind)
    z1 = torch.randn(48, 24, generator=gen, requires_grad=True)
    z2 = torch.randn(48, 24, generator=gen, requires_grad=True)
    labels = _labels(kind, 48, gen)

    def fn(a, b, lab):
        return mod(a, b, lab)

    explained = torch._dynamo.explain(fn)(z1, z2, labels)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1

    params = [z1, z2] + list(mod.parameters())
    results = []
    for f in (torch.compile(fn, fullgraph=True), fn):
        for p in params:
            p.grad = None
        out = f(z1, z2, labels)
        out.backward()
        results.append([out.detach()] + [p.grad.clone() for p in params])
    assert len(params) == (4 if kind == "sigmoid_bias" else 3)
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
