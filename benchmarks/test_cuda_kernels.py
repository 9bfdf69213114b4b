"""The CUDA kernels on a GPU, against triton and the reference in the same run: time, the achieved
rate next to the H100 roofline of csrc/cuda/soft_contrastive.cu, and peak memory.

Skipped without a CUDA device. FASTCON_BENCH_DRY=1 runs the same harness on the CPU through the
SIMT emulation build ("cuda_simt") with tiny shapes, to check the harness itself; its timings
mean nothing.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import peak_mib  # benchmarks/conftest.py (pytest puts its folder on sys.path)

import fastcon

DRY = os.environ.get("FASTCON_BENCH_DRY") == "1"
DEVICE = "cpu" if DRY else "cuda"
CUDA = "cuda_simt" if DRY else "cuda"
if not DRY:
    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# H100 SXM figures the roofline in csrc/cuda/soft_contrastive.cu uses
PEAK_TFLOPS_BF16, HBM_TBPS = 990.0, 3.35


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, rounds: int) -> float:
    fn()  # warm-up: JIT (triton), allocator, caches
    best = float("inf")
    for _ in range(rounds):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


def _backends(*names):
    out = []
    for name in names:
        if name == "triton" and DRY:
            continue  # the interpreter has nothing to say about GPU speed
        out.append(name)
    return out


LOSS_SHAPES = [(64, 32, torch.bfloat16)] if DRY else [
    (8192, 256, torch.bfloat16),
    (16384, 256, torch.bfloat16),
    (16384, 768, torch.bfloat16),
    (16384, 256, torch.float32),
]  # fmt: skip


@pytest.mark.parametrize(("n", "d", "dtype"), LOSS_SHAPES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("backend", _backends(CUDA, "triton", "reference"))
def test_soft_contrastive_fwd_bwd(benchmark, record, n, d, dtype, backend):
    benchmark.group = f"soft contrastive loss fwd+bwd, N = {n}, D = {d}, {str(dtype)[6:]}"
    if backend == "reference" and n * n * 4 > (2 << 30):
        pytest.skip("the dense reference needs N^2 fp32 logits several times over")
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, d, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    z2 = (z1.detach().float() + 0.5 * torch.randn(n, d, generator=gen).to(DEVICE)).to(dtype).requires_grad_(True)
    labels = (torch.rand(n, 10, generator=gen) < 0.3).float().to(DEVICE)

    def step():
        loss = fastcon.soft_contrastive_loss(z1, z2, labels, temperature=0.1, backend=backend)
        torch.autograd.grad(loss, (z1, z2))

    best = _best_time(step, rounds=1 if DRY else 5)
    benchmark.pedantic(step, rounds=1 if DRY else 3, iterations=1)
    flop = 2 * n * n * d * (1 + 4)  # forward GEMM1 + backward (two roles: GEMM1 + GEMM2 each), D <= 256
    record(
        backend=backend,
        ms=round(best * 1e3, 3),
        tflops=round(flop / best / 1e12, 1),
        fraction_of_bf16_peak=round(flop / best / 1e12 / PEAK_TFLOPS_BF16, 3),
        peak_mib=round(peak_mib(step, DEVICE), 1) if DEVICE == "cuda" else None,
    )


MASK_SHAPES = [(2, 9, 16, 4)] if DRY else [(256, 196, 768, 49), (64, 1024, 1024, 256)]  # (B, L, D, K)


@pytest.mark.parametrize(("b", "length", "d", "k"), MASK_SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("backend", _backends(CUDA, "triton", "reference"))
def test_siamese_mask_fwd_bwd(benchmark, record, b, length, d, k, backend):
    benchmark.group = f"siamese_mask fwd+bwd, bf16, (B, L, D, K) = ({b}, {length}, {d}, {k})"
    tokens = torch.randn(b, length, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(1, length, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    gen = torch.Generator(DEVICE).manual_seed(0)
    _, ids = fastcon.siamese_mask(tokens.detach(), k, generator=gen, backend="reference")
    grad = torch.randn(b, k, d, device=DEVICE, dtype=torch.bfloat16)

    def step():
        visible, _ = fastcon.siamese_mask(tokens, None, pos_embed=pos, ids_keep=ids, backend=backend)
        torch.autograd.grad(visible, (tokens, pos), grad)

    best = _best_time(step, rounds=1 if DRY else 10)
    benchmark.pedantic(step, rounds=1 if DRY else 5, iterations=1)
    # read tokens rows + pos rows, write visible; backward: read grad, write d tokens and d pos
    moved = 2 * (3 * b * k * d + b * length * d + 2 * length * d)
    record(backend=backend, ms=round(best * 1e3, 3), gb_per_s=round(moved / best / 1e9, 1),
           fraction_of_hbm=round(moved / best / 1e12 / HBM_TBPS, 3))  # fmt: skip


DIFF_SHAPES = [(2, 3, 8, 8)] if DRY else [(64, 3, 224, 224), (16, 4, 64, 64)]


@pytest.mark.parametrize("shape", DIFF_SHAPES, ids=lambda x: "x".join(map(str, x)))
@pytest.mark.parametrize("backend", _backends(CUDA, "triton", "reference"))
def test_diffusion_step(benchmark, record, shape, backend):
    benchmark.group = f"diffusion q_sample + loss fwd/bwd, seeded, bf16, {'x'.join(map(str, shape))}"
    sched = fastcon.NoiseSchedule("linear", 1000)
    x0 = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    t = sched.sample_timesteps(shape[0], device=DEVICE)
    pred = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)

    def step():
        sched.q_sample(x0, t, seed=1234, backend=backend)
        torch.autograd.grad(sched.loss(pred, x0, t, seed=1234, backend=backend), pred)

    best = _best_time(step, rounds=1 if DRY else 10)
    benchmark.pedantic(step, rounds=1 if DRY else 5, iterations=1)
    n = x0.numel()
    record(backend=backend, ms=round(best * 1e3, 3), gelem_per_s=round(3 * n / best / 1e9, 2))
