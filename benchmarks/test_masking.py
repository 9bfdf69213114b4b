"""Siamese masking: the fused cpu ops against the reference (torch gather + add and autograd).

Each row times one backend; the cpu rows also time the reference interleaved with themselves
(best of the same number of runs, so that a noisy neighbour hits both alike) and record the
ratio as ``speedup_vs_reference``. ``mae_style`` is what MAE-style code does (add pos_embed to
all L tokens, then gather), for scale. extra_info: ``gb_per_s`` = the bytes the op must move
at least (reads of kept rows + pos_embed, writes of outputs) over the time, and ``peak_mib``
= memory one call adds on top of its inputs.
"""

from __future__ import annotations

import ctypes
import time

import pytest
import torch

import fastcon
from benchmarks.conftest import peak_mib
from fastcon import masking

# (B, L, D): a ViT-B/16 batch at 256 x 256 pixels, and a ViT-S/16 batch of 224 x 224
SIZES = {"B256_L256_D768": (256, 256, 768), "B64_L196_D384": (64, 196, 384)}
KEEP = 0.5


def _inputs(size, pos_batch=1):
    b, length, d = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(b, length, d, generator=gen).requires_grad_(True)
    pos = torch.randn(pos_batch, length, d, generator=gen).requires_grad_(True)
    ids = masking.random_ids_keep(b, length, round(length * KEEP), generator=gen)
    return tokens, pos, ids


def _mae_style(tokens, pos, ids):
    x = tokens + pos
    return torch.gather(x, 1, ids[:, :, None].expand(-1, -1, x.shape[2]))


def _step(backend, phase, tokens, pos, ids):
    """One call of the op (and its backward) as a training step runs it."""
    grad = torch.ones(ids.shape[0], ids.shape[1], tokens.shape[2])

    def run():
        if backend == "mae_style":
            visible = _mae_style(tokens, pos, ids)
        else:
            visible, _ = fastcon.siamese_mask(tokens, None, pos_embed=pos, ids_keep=ids, backend=backend)
        if phase == "forward_backward":
            torch.autograd.grad(visible, (tokens, pos), grad)
        return visible

    return run


def _bytes(phase, tokens, pos, ids):
    b, length, d = tokens.shape
    k = ids.shape[1]
    e = tokens.element_size()
    fwd = (2 * b * k * d + pos.numel() + b * k) * e  # kept rows in, visible out, pos table, ids
    bwd = (b * k * d + b * length * d + pos.numel()) * e  # d visible in, d tokens and d pos out
    return fwd if phase == "forward" else fwd + bwd


def _peak_mib(fn) -> float:
    """peak_mib after handing freed heap memory back to the OS: otherwise glibc serves small
    outputs from memory that is already resident and the resident-set peak misses them."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    return round(peak_mib(fn), 1)


def _best(fn, runs):
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("phase", ["forward", "forward_backward"])
@pytest.mark.parametrize("backend", ["reference", "mae_style", "cpu"])
def test_siamese_mask(benchmark, record, size, phase, backend):
    benchmark.group = f"masking: siamese_mask {phase} {size}"
    tokens, pos, ids = _inputs(size)
    run = _step(backend, phase, tokens, pos, ids)
    run()  # warm up
    record(peak_mib=_peak_mib(run), size=size, keep=KEEP, threads=torch.get_num_threads())
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    record(gb_per_s=round(_bytes(phase, tokens, pos, ids) / benchmark.stats.stats.min / 1e9, 2))
    if backend == "cpu":
        reference = _step("reference", phase, tokens, pos, ids)
        fused_t, ref_t = float("inf"), float("inf")
        for _ in range(4):  # interleaved, so that both see the same machine load
            fused_t = min(fused_t, _best(run, 1))
            ref_t = min(ref_t, _best(reference, 1))
        record(
            speedup_vs_reference=round(ref_t / fused_t, 2),
            fused_ms=round(fused_t * 1e3, 2),
            reference_ms=round(ref_t * 1e3, 2),
            reference_peak_mib=_peak_mib(reference),
        )


@pytest.mark.parametrize("op", ["unmask", "mask_image"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_unmask_and_mask_image(benchmark, record, op, backend):
    """Forward + backward at the realistic size: unmask with a learned mask token, mask_image
    on a batch of 256 x 256 x 12-band images (patch 16, L = 256)."""
    benchmark.group = f"masking: {op} forward_backward"
    b, length, d = SIZES["B256_L256_D768"]
    gen = torch.Generator().manual_seed(0)
    ids = masking.random_ids_keep(b, length, round(length * KEEP), generator=gen)
    if op == "unmask":
        x = torch.randn(b, ids.shape[1], d, generator=gen).requires_grad_(True)
        token = torch.randn(d, generator=gen).requires_grad_(True)
        inputs = (x, token)

        def forward():
            return fastcon.unmask(x, ids, length, token, backend=backend)

        moved = (2 * x.numel() + 2 * b * length * d) * 4  # visible in, out, d out in, d visible out
    else:
        x = torch.randn(b // 4, 12, 256, 256, generator=gen).requires_grad_(True)
        ids = ids[: b // 4]
        inputs = (x,)

        def forward():
            return fastcon.mask_image(x, 16, ids, backend=backend)

        moved = (KEEP * x.numel() + x.numel()) * 4 * 2  # kept pixels in, all out; twice (backward)
    grad = torch.ones_like(forward())

    def run():
        torch.autograd.grad(forward(), inputs, grad)

    run()
    record(peak_mib=_peak_mib(run), threads=torch.get_num_threads())
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    record(gb_per_s=round(moved / benchmark.stats.stats.min / 1e9, 2))
