"""The SIMT emulator (csrc/simt) itself: warp intrinsics, wmma, 16-bit conversions, and the
misuse it must turn into errors. The CUDA kernels' numerics are tested through the "cuda_simt"
backend in the op test files; this file checks that the ground they stand on is sound."""

from __future__ import annotations

import re

import pytest
import torch

from fastcon import _backends

mod, _err = _backends.load_extension("_C_simt")
if mod is None:  # setup.py always builds it: its absence is a broken build, not a missing device
    raise ImportError(f"fastcon._C_simt is not built: {_err}")


def selftest(name: str) -> str:
    return torch.ops.fastcon_simt.simt_selftest(name)


@pytest.mark.parametrize("name", ["shuffle", "wmma_half", "wmma_bfloat16"])
def test_intrinsics_compute_what_cuda_defines(name):
    # shuffles (xor / down / up with width / indexed / two half-warp groups at once), ballot,
    # and a 16x16x16 wmma product against a plain loop
    assert selftest(name) == "ok"


def test_missing_barrier_gives_wrong_results():
    """Threads of a block run in turn between barriers: reading a neighbour's shared slot
    without __syncthreads sees stale data, with it the right value."""
    assert selftest("race_without_barrier") == "wrong 256"
    assert selftest("race_with_barrier") == "wrong 0"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("early_exit", r"__syncthreads reached by 16 of 64 threads; the others exited"),
        ("divergent_warp", r"deadlock: .*lanes 0x0000ffff wait at __shfl_xor_sync for lanes 0xffff0000"),
        ("mask_disagree", r"warp 0 diverged: .*lane 3 calls __shfl_xor_sync \(mask 0x0000ffff\)"),
        ("outside_mask", r"lane 0 shuffles from lane 16, which is not in the mask 0x0000ffff"),
        ("wmma_misaligned", r"wmma::load_matrix_sync: pointer .* is not 256-bit aligned"),
    ],
)
def test_undefined_behaviour_is_an_error(name, message):
    out = selftest(name)
    assert out.startswith("error: SIMT emulator: "), out
    assert re.search(message, out), out


def test_fragment_layout_is_opaque():
    # a kernel assuming lane l holds A[l / 2][(l % 2) * 8] in element 0 reads other entries
    assert selftest("fragment_layout") == "matches 0"


def test_shared_memory_poisoning():
    # never-written shared memory reads as NaN, in every block
    assert selftest("poison") == "nan 32 ones 32"


def test_unknown_selftest_is_a_value_error():
    with pytest.raises(ValueError, match="unknown SIMT self-test"):
        selftest("no_such_test")


def _specials() -> torch.Tensor:
    f32 = torch.finfo(torch.float32)
    vals = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 1e5, 2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-26]
    vals += [f32.max, f32.tiny, f32.tiny / 4, float("inf"), float("-inf"), 1 + 2.0**-11, 1 + 3 * 2.0**-11]
    return torch.tensor(vals, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_conversions_match_torch(dtype):
    """float -> 16-bit -> float rounds to nearest even exactly as torch (and the GPU) does:
    random floats over many binades, ties, subnormals, overflow, and every 16-bit value."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=gen) * torch.exp2(torch.randint(-30, 20, (200_000,), generator=gen).float())
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    every = every[~every.isnan()]
    for values in (x, _specials(), every):
        got = torch.ops.fastcon_simt.simt_round(values, str(dtype).removeprefix("torch."))
        want = values.to(dtype).float()
        bad = (got != want) & ~(got.isnan() & want.isnan())
        assert not bad.any(), f"{values[bad][:3]} -> {got[bad][:3]}, torch gives {want[bad][:3]}"
    nan = torch.ops.fastcon_simt.simt_round(torch.tensor([float("nan")]), str(dtype).removeprefix("torch."))
    assert nan.isnan().all()
