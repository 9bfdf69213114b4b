"""The CUDA masking and diffusion kernels (csrc/cuda/masking.cu, diffusion.cu) on paths the shared
suites do not reach, through their SIMT emulation build: bit-identical noise with the cpu kernels,
multi-chunk sums, the per-pixel fallback of mask_image, out-of-range ids, fp64 gradcheck."""

from __future__ import annotations

import pytest
import torch

import fastcon
from fastcon import _backends, masking, reference
from fastcon.diffusion import NoiseSchedule, seeded_noise

mod, _err = _backends.load_extension("_C_simt")
if mod is None:  # setup.py always builds it: its absence is a broken build, not a missing device
    raise ImportError(f"fastcon._C_simt is not built: {_err}")
BACKEND = "cuda_simt"


def ids_for(b, length, k, seed=0):
    return masking.random_ids_keep(b, length, k, generator=torch.Generator().manual_seed(seed))


def test_normals_bit_identical_to_cpu_kernels():
    """The fp32 transform is evaluated without contraction, as on the cpu: the same bits."""
    idx = torch.cat([torch.arange(20_000), torch.arange(2**32 - 100, 2**32 + 100), torch.arange(2**50, 2**50 + 50)])
    for seed in (0, 5, 2**63 + 77):
        s = seed - 2**64 if seed >= 2**63 else seed
        assert torch.equal(torch.ops.fastcon_simt.philox_normal(idx, s), torch.ops.fastcon.philox_normal(idx, s))
    assert torch.equal(seeded_noise(9, (3, 7, 11), backend=BACKEND), seeded_noise(9, (3, 7, 11), backend="cpu"))


def test_loss_is_deterministic_and_sums_chunks_in_order():
    """Samples of several 4096-element chunks: the last block of a sample adds the partial sums
    in chunk order, so repeated runs give the same bits, close to the float64 sum."""
    sched = NoiseSchedule()
    gen = torch.Generator().manual_seed(1)
    x0, pred = torch.randn(2, 3, 4100, generator=gen), torch.randn(2, 3, 4100, generator=gen)
    t = torch.tensor([3, 900])
    a, s = sched.coefficients(t, torch.float32)
    runs = [torch.ops.fastcon_simt.diffusion_loss(pred, x0, a, s, None, 11, 2) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    want = reference.diffusion_loss(pred.double(), x0.double(), a.double(), s.double(), None, 11, 2)
    assert (runs[0].double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fill_gradient_over_many_chunks(dtype):
    """grad_fill sums every dropped row of B * L = 3200 rows: 50 partial sums added in order."""
    gen = torch.Generator().manual_seed(2)
    grad_out = torch.randn(64, 50, 24, generator=gen).to(dtype)
    ids = ids_for(64, 50, 20, seed=3)
    got_vis, got_fill = torch.ops.fastcon_simt.mask_unmask_backward(grad_out, ids, True)
    want_vis, _ = reference.mask_unmask_backward(grad_out, ids, True)
    want_fill = reference.mask_unmask_backward(grad_out.double(), ids, True)[1]
    assert torch.equal(got_vis, want_vis)
    assert got_fill.dtype == torch.float32
    assert (got_fill.double() - want_fill).abs().max().item() <= 1e-5 * want_fill.abs().max().item()


def test_mask_image_wide_patch_rows_fall_back_to_search():
    """More than 4096 patches in a row are looked up per pixel instead of marked in shared memory."""
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(2, 2, 2, 4100, generator=gen)
    ids = ids_for(2, 2 * 4100, 3000, seed=5)
    out = torch.ops.fastcon_simt.mask_image(images, 1, ids)
    assert torch.equal(out, reference.mask_image(images, 1, ids))


def test_out_of_range_ids_stay_in_bounds():
    """Direct op calls with ids the public API would refuse read and write nothing out of
    bounds: an id past L gathers a zero row, unsorted ids only find fewer rows."""
    tokens = torch.randn(2, 5, 8)
    bad = torch.tensor([[0, 99], [-4, 2]])
    out = torch.ops.fastcon_simt.mask_gather(tokens, bad, None)
    assert torch.equal(out[0, 0], tokens[0, 0])
    assert torch.equal(out[1, 1], tokens[1, 2])
    assert float(out[0, 1].abs().max()) == 0.0
    assert float(out[1, 0].abs().max()) == 0.0
    full = torch.ops.fastcon_simt.mask_unmask(torch.randn(2, 2, 8), torch.tensor([[3, 1], [4, 0]]), 5, torch.zeros(8))
    assert bool(torch.isfinite(full).all())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: torch.ops.fastcon_simt.mask_gather(torch.randn(2, 5), torch.zeros(2, 1, dtype=torch.int64), None),
            "must be 3-D",
        ),
        (
            lambda: torch.ops.fastcon_simt.mask_gather(torch.randn(2, 5, 3), torch.zeros(2, 1), None),
            "ids_keep must be int64",
        ),
        (
            lambda: torch.ops.fastcon_simt.mask_gather(
                torch.randn(2, 5, 3), torch.zeros(2, 6, dtype=torch.int64), None
            ),
            "1 <= K <= L",
        ),
        (
            lambda: torch.ops.fastcon_simt.mask_image(torch.randn(1, 1, 6, 8), 4, torch.zeros(1, 1, dtype=torch.int64)),
            "patch must divide",
        ),
        (
            lambda: torch.ops.fastcon_simt.diffusion_q_sample(torch.randn(2, 3), torch.ones(3), torch.ones(2), None, 0),
            "coefficients must be",
        ),
        (
            lambda: torch.ops.fastcon_simt.diffusion_loss(
                torch.randn(2, 3), torch.randn(2, 3), torch.ones(2), torch.ones(2), None, 0, 3
            ),
            "target must be 0",
        ),
        (lambda: torch.ops.fastcon_simt.philox_uint32(torch.zeros(3, 3, dtype=torch.int64), 0), "counter must be"),
    ],
    ids=["tokens_not_3d", "ids_not_int64", "k_above_l", "patch_not_dividing", "coef_shape", "target", "counter_shape"],
)
def test_ops_check_their_arguments(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.parametrize("pos_batch", [1, 3])
def test_gradcheck_masking(pos_batch):
    gen = torch.Generator().manual_seed(12)
    tokens = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(pos_batch, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = ids_for(3, 5, 2)
    assert torch.autograd.gradcheck(
        lambda t, p: fastcon.siamese_mask(t, None, pos_embed=p, ids_keep=ids, backend=BACKEND)[0], (tokens, pos)
    )
    visible = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    token = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = ids_for(2, 7, 3)
    assert torch.autograd.gradcheck(lambda v, f: fastcon.unmask(v, ids, 7, f, backend=BACKEND), (visible, token))


def test_gradcheck_diffusion():
    sched = NoiseSchedule("linear", 100)
    gen = torch.Generator().manual_seed(0)
    x0, pred, noise = (torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    t = torch.tensor([3, 97])
    assert torch.autograd.gradcheck(lambda a, n: sched.q_sample(a, t, n, backend=BACKEND)[0], (x0, noise))
    for target in fastcon.diffusion.TARGETS:
        assert torch.autograd.gradcheck(
            lambda p, a, target=target: sched.loss(p, a, t, seed=5, target=target, backend=BACKEND), (pred, x0)
        )
