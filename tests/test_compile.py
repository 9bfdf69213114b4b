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
    args = (u, v, *ids, 3, 5.0, -0.5, 5.0, mode, need_col)
    torch.library.opcheck(torch.ops.fastcon.sc_forward, args)
    row, col = torch.ops.fastcon.sc_forward(*args)
    g = torch.rand(37, generator=gen)
    h = torch.rand(29, generator=gen) if need_col else None
    bargs = (u, v, *ids, 3, 5.0, -0.5, 5.0, mode, row, col if need_col else None, g, h)
    torch.library.opcheck(torch.ops.fastcon.sc_backward, bargs)


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
