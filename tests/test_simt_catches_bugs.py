"""The emulated tests catch the bugs the SIMT emulator is for.

fastcon._C_simt also holds the loss kernels compiled with deliberate bugs (csrc/simt/
kernels_broken.cpp, op namespace fastcon_simt_broken), selected at run time:
  1: no __syncthreads between staging a GEMM chunk in shared memory and reading it
  2: off-by-one tile bound: the zero padding column after the last one joins the sums
  3: no __syncthreads between reading a GEMM chunk and staging the next one over it
Here the "cuda_simt" backend is pointed at that build and tests of tests/test_soft_contrastive.py
are run unchanged: with a bug selected they must fail, with none they must pass (so the
failures come from the bug, not from the plumbing).
"""

from __future__ import annotations

import pytest
import test_soft_contrastive as suite
import torch

from fastcon import _backends
from fastcon.reference import MODE_SIGMOID, MODE_SOFTMAX, MODE_SOFTMAX_IGNORE
from fastcon.soft_contrastive import _OpsCore

mod, _err = _backends.load_extension("_C_simt")
if mod is None:  # setup.py always builds it: its absence is a broken build, not a missing device
    raise ImportError(f"fastcon._C_simt is not built: {_err}")

# Suite tests (function, arguments) chosen to reach each path of the kernels: the contract at
# a few shapes and modes (fp32 FMA tiles), wide features (several GEMM chunks: variant 3 needs
# D > 32), and bf16 (tensor-core tiles).
CASES = {
    "contract softmax 37x37": (suite.test_kernel_contract, ("cuda_simt", MODE_SOFTMAX, 37, 37, 0, 0.1)),
    "contract ignore 20x45": (suite.test_kernel_contract, ("cuda_simt", MODE_SOFTMAX_IGNORE, 20, 45, 10, 0.01)),
    "contract sigmoid 9x70": (suite.test_kernel_contract, ("cuda_simt", MODE_SIGMOID, 9, 70, 100, 0.1)),
    "feature dims 130": (suite.test_feature_dims, ("cuda_simt", 130)),
    "bf16 multi-label": (suite.test_low_precision, ("cuda_simt", torch.bfloat16, "multi_hot", "softmax_sym")),
}
# The cases each bug must break. A missing barrier reads poisoned (NaN) or stale shared memory
# everywhere. The stray padding column adds exp(0 - LSE) to each row: visible at tau = 0.1,
# below resolution at tau = 0.01 (e^-100) and inside bf16's tolerance. The early overwrite
# needs several D chunks per tile (fp32 chunks are 32 wide: D = 130; the others have D <= 48).
MUST_FAIL = {
    1: list(CASES),
    2: ["contract softmax 37x37", "contract sigmoid 9x70", "feature dims 130"],
    3: ["feature dims 130"],
}


@pytest.fixture
def broken_backend(monkeypatch):
    """Route the cuda_simt backend to the deliberately broken build; yields the variant setter."""
    core = _OpsCore("fastcon_simt_broken", "_C_simt", native_low_precision=True)
    monkeypatch.setitem(_backends._IMPLS, ("soft_contrastive", "cuda_simt"), lambda: core)
    set_variant = torch.ops.fastcon_simt_broken.set_break_variant
    yield set_variant
    set_variant(0)


def _run(case: str) -> str | None:
    """Runs a suite test; returns its assertion message if it failed."""
    fn, args = CASES[case]
    try:
        fn(*args)
    except AssertionError as e:
        return str(e).split("\n")[0] or "assertion failed"
    return None


def test_broken_build_passes_with_no_bug_selected(broken_backend):
    broken_backend(0)
    for case in CASES:
        assert _run(case) is None, f"{case} fails on the broken build with no bug selected"


@pytest.mark.parametrize("variant", sorted(MUST_FAIL))
def test_emulated_tests_fail_on_broken_kernels(broken_backend, variant):
    broken_backend(variant)
    caught = {case: _run(case) for case in CASES}
    missed = [case for case in MUST_FAIL[variant] if caught[case] is None]
    assert not missed, f"bug {variant} went unnoticed by: {', '.join(missed)}"
