"""Triton soft contrastive loss against the dense reference, on CUDA devices only.

Run with ``pytest benchmarks/ --benchmark-only``. Every row records peak memory, the achieved
rate under the kernels' FLOP model (forward 2 N^2 D; backward 8 N^2 D: two launches that each
recompute the logits and do one product) and the machine's bf16 GEMM rate measured in the same
run, so rows compare as ratios.
"""

from __future__ import annotations

import pytest
import torch

import fastcon
from benchmarks.conftest import matmul_gflops, peak_mib

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="the triton rows need a CUDA device: under the interpreter (TRITON_INTERPRET=1) the kernels run "
    "tile by tile in numpy, which measures nothing about their GPU speed",
)

# (N, D, temperature): tau = 0.07 takes the fixed-max path, tau = 0.01 the column-owned pass
CASES = [
    (4096, 256, 0.07),
    (16384, 256, 0.07),
    (16384, 768, 0.07),
    (16384, 256, 0.01),
    (65536, 256, 0.07),
    (65536, 768, 0.07),
]
DENSE_MAX_N = 16384  # the dense reference keeps several N x N fp32 matrices: 16 GiB each at N = 65536


def _inputs(n, d, dtype=torch.bfloat16, classes=19):
    gen = torch.Generator(device="cuda").manual_seed(0)
    z1 = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen).requires_grad_(True)
    z2 = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen).requires_grad_(True)
    labels = (torch.rand(n, classes, device="cuda", generator=gen) < 0.2).float()  # multi-label land cover
    return z1, z2, labels


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize(("n", "d", "tau"), CASES, ids=[f"N{n}-D{d}-tau{t}" for n, d, t in CASES])
def test_train_step(benchmark, record, backend, n, d, tau):
    """Forward + backward of the symmetric multi-label softmax loss, bf16 embeddings."""
    if backend == "reference" and n > DENSE_MAX_N:
        pytest.skip(f"the dense reference needs several N x N fp32 matrices (N = {n})")
    benchmark.group = f"soft_contrastive train step bf16 N={n} D={d} tau={tau}"
    z1, z2, labels = _inputs(n, d)

    def step():
        loss = fastcon.soft_contrastive_loss(z1, z2, labels, temperature=tau, backend=backend)
        torch.autograd.grad(loss, (z1, z2))
        torch.cuda.synchronize()

    step()  # compilation and autotuning are not part of the step
    record(peak_mib=peak_mib(step, "cuda"))
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    flops = 10.0 * n * n * d
    if tau < 1 / 32:  # below the fixed-max limit the forward adds a column-owned pass
        flops += 2.0 * n * n * d
    record(
        model_tflops=flops / benchmark.stats.stats.mean / 1e12,
        gemm_tflops=matmul_gflops(n, d, torch.bfloat16, "cuda") / 1e3,
    )


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize(("n", "d"), [(16384, 256), (65536, 256)], ids=["N16384-D256", "N65536-D256"])
def test_forward(benchmark, record, backend, n, d):
    """Forward only (evaluation / logging): one blockwise pass, the column sums by the fixed max."""
    if backend == "reference" and n > DENSE_MAX_N:
        pytest.skip(f"the dense reference needs several N x N fp32 matrices (N = {n})")
    benchmark.group = f"soft_contrastive forward bf16 N={n} D={d}"
    z1, z2, labels = _inputs(n, d)

    def fwd():
        with torch.no_grad():
            fastcon.soft_contrastive_loss(z1, z2, labels, temperature=0.07, backend=backend)
        torch.cuda.synchronize()

    fwd()
    record(peak_mib=peak_mib(fwd, "cuda"))
    benchmark.pedantic(fwd, rounds=5, iterations=1, warmup_rounds=1)
    record(model_tflops=2.0 * n * n * d / benchmark.stats.stats.mean / 1e12)
