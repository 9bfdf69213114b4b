"""Triton-only checks of the soft contrastive kernels.

The shared suite (test_soft_contrastive.py) runs the kernel contract and the public loss on
every fused backend. This file covers what only the Triton launcher does: the launch paths
small default inputs do not take (inner-dimension splits, the column-owned forward used in
deterministic mode, streamed D with several output accumulators), its dtype error, memory
that stays linear in N, and importing the module on a machine without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastcon
from fastcon import reference
from fastcon._memory import PeakMemory, rss_peak_supported
from fastcon.kernels.triton import soft_contrastive as k
from fastcon.reference import MODE_SIGMOID, MODE_SOFTMAX, MODE_SOFTMAX_IGNORE

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual, expected):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def _problem(n, m, d, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    v = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
    row_ids = torch.randint(0, 6, (n,), generator=gen)
    col_ids = torch.randint(0, 6, (m,), generator=gen)
    for i in range(n):  # two views of one sample share their id
        if 0 <= i + offset < m:
            col_ids[i + offset] = row_ids[i]
    return u, v, row_ids, col_ids, gen


CORES = {
    "default": k.CORE,
    "split3": k.TritonSoftContrastiveCore(splits=3),
    "deterministic_split2": k.TritonSoftContrastiveCore(splits=2, deterministic=True),
}


@pytest.mark.parametrize("core_name", list(CORES))
@pytest.mark.parametrize("mode", [MODE_SOFTMAX, MODE_SOFTMAX_IGNORE, MODE_SIGMOID])
@pytest.mark.parametrize(("n", "m", "offset", "d"), [(45, 70, 10, 67), (70, 33, -20, 130), (50, 41, 3, 40)])
@pytest.mark.parametrize("tau", [0.1, 0.01])
def test_launch_paths_match_contract(core_name, mode, n, m, offset, d, tau):
    """Splits (partial LSEs combined), the column-owned forward (deterministic, or tau below the
    fixed-max limit) and each D class vs the contract. Under the interpreter D = 40 is the
    chunked-resident backward (2 chunks of 32), D = 67 and 130 the streamed paths."""
    core = CORES[core_name]
    u, v, row_ids, col_ids, gen = _problem(n, m, d, offset, seed=n + m + d)
    ids = (row_ids, col_ids) if mode == MODE_SOFTMAX_IGNORE else (None, None)
    scale, bias = 1.0 / tau, -0.8
    need_col = mode != MODE_SIGMOID
    args = (ids[0], ids[1], offset, scale, bias, scale, mode)
    r_row, r_col = reference.sc_core_forward(u.double(), v.double(), *args, need_col)
    assert torch.isfinite(r_row).all()
    if need_col:
        assert torch.isfinite(r_col).all(), "every column keeps a pair"
    dev_args = (None if ids[0] is None else ids[0].to(DEV), None if ids[1] is None else ids[1].to(DEV), *args[2:])
    row, col = core.forward(u.to(DEV), v.to(DEV), *dev_args, need_col)
    assert row.dtype == torch.float32
    assert rel_err(row, r_row) <= 1e-5
    if need_col:
        assert rel_err(col, r_col) <= 1e-5
    else:
        assert col.numel() == 0
    g = torch.randn(n, generator=gen, dtype=torch.float64)  # any sign, as with reduction="none"
    h = torch.randn(m, generator=gen, dtype=torch.float64) if need_col else None
    out = core.backward(
        u.to(DEV), v.to(DEV), *dev_args, r_row.float().to(DEV), None if h is None else r_col.float().to(DEV),
        g.float().to(DEV), None if h is None else h.float().to(DEV),
    )  # fmt: skip
    ref = reference.sc_core_backward(u.double(), v.double(), *args, r_row, r_col, g, h)
    for name, a, e in zip(["W v", "W^T u", "W 1"], out, ref):
        assert a.dtype == torch.float32
        assert rel_err(a, e) <= 2e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [7, 130])
@pytest.mark.parametrize("kind", ["clip", "rows_only", "scene_ignore"])
def test_single_pair_cancels_exactly(dtype, d, kind):
    """N = 1: the loss is LSE(s_11) - s_11 = 0. The kernels take the positive logit exactly as the
    Function subtracts it (float64 dot, rounded once), so loss and gradients are exactly 0, not
    fp32 noise (tau = 0.01: the running-max paths; the fixed-max column sums go through one
    exp / log round trip)."""
    gen = torch.Generator().manual_seed(d)
    z1 = torch.randn(1, d, generator=gen).to(DEV, dtype).requires_grad_(True)
    z2 = torch.randn(1, d, generator=gen).to(DEV, dtype).requires_grad_(True)
    kw = {"rows_only": {"symmetric": False}, "scene_ignore": {"scene_mode": "ignore"}}.get(kind, {})
    labels = torch.tensor([3], device=DEV) if kind == "scene_ignore" else None
    out = fastcon.soft_contrastive_loss(z1, z2, labels, temperature=0.01, backend="triton", **kw)
    grads = torch.autograd.grad(out, (z1, z2))
    assert out.item() == 0.0
    for g in grads:
        assert (g == 0).all()


def test_rows_without_pairs():
    """A row (or column) whose pairs are all masked: log-sum-exp -inf, as torch.logsumexp gives,
    and no weight in the backward (zeros, not NaN)."""
    u, v, _, _, gen = _problem(5, 7, 9, 0, seed=1)
    row_ids = torch.zeros(5, dtype=torch.int64)
    col_ids = torch.zeros(7, dtype=torch.int64)
    col_ids[6] = 1  # column 6 is every row's only pair; columns 0-5 have none (no positives at offset 100)
    args = (row_ids.to(DEV), col_ids.to(DEV), 100, 10.0, 0.0, 10.0, MODE_SOFTMAX_IGNORE)
    row, col = k.CORE.forward(u.to(DEV), v.to(DEV), *args, True)
    r_row, r_col = reference.sc_core_forward(u.double(), v.double(), row_ids, col_ids, *args[2:], True)
    assert torch.equal(torch.isinf(col.cpu()), torch.isinf(r_col))
    assert torch.isinf(col[:6]).all()
    assert rel_err(row, r_row) <= 1e-5
    g, h = torch.rand(5, generator=gen).to(DEV), torch.rand(7, generator=gen).to(DEV)
    gu, gv, wsum = k.CORE.backward(u.to(DEV), v.to(DEV), *args, row, col, g, h)
    for out in (gu, gv, wsum):
        assert torch.isfinite(out).all()
    assert (gv[:6] == 0).all(), "columns without pairs get no weight"
    # every row's only pair is column 6: W_i6 = g_i + h_6 q_i6
    q = torch.softmax(10.0 * (u @ v[6]).double(), dim=0)
    expected = g.double().cpu() + h[6].double().cpu() * q
    assert rel_err(wsum, expected) <= 2e-5


def test_float64_rejected_before_any_kernel(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a kernel ran before the dtype check")

    monkeypatch.setattr(k.CORE, "forward", must_not_run)
    monkeypatch.setattr(k.CORE, "backward", must_not_run)
    z = torch.randn(6, 4, dtype=torch.float64, device=DEV)
    with pytest.raises(TypeError, match=r"z1 must be float32, float16 or bfloat16 for backend='triton'"):
        fastcon.soft_contrastive_loss(z, z, backend="triton")


def test_core_rejects_float64():
    u = torch.randn(3, 4, dtype=torch.float64, device=DEV)
    with pytest.raises(TypeError, match="float64 has no Triton kernel"):
        k.CORE.forward(u, u, None, None, 0, 1.0, 0.0, 0.0, MODE_SOFTMAX, True)


def test_core_needs_ids_for_masked_mode():
    u = torch.randn(3, 4, device=DEV)
    with pytest.raises(ValueError, match="needs row_ids and col_ids"):
        k.CORE.forward(u, u, None, None, 0, 1.0, 0.0, 0.0, MODE_SOFTMAX_IGNORE, True)


def test_deterministic_mode_avoids_atomics():
    core = k.TritonSoftContrastiveCore()
    assert core._use_atomics()
    torch.use_deterministic_algorithms(True)
    try:
        assert not core._use_atomics()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.skipif(DEV == "cpu" and not rss_peak_supported(), reason="cannot reset the RSS high-water mark here")
def test_memory_is_linear_in_n():
    """Forward + backward grow linearly in N and stay far below one N x N fp32 matrix, while
    the dense reference needs several. (Under the interpreter the peak includes the
    interpreter's own per-program temporaries, which also grow linearly.)"""
    d = 16
    gen = torch.Generator().manual_seed(0)

    def step(n, backend):
        z1 = torch.randn(n, d, generator=gen).to(DEV).requires_grad_(True)
        z2 = torch.randn(n, d, generator=gen).to(DEV).requires_grad_(True)
        labels = (torch.rand(n, 5, generator=gen) < 0.3).float().to(DEV)
        fastcon.soft_contrastive_loss(z1, z2, labels, temperature=0.1, backend=backend).backward()

    # warm up on a smaller batch of the same autotuning bucket: compilation and caches are
    # not the op's memory, and fresh N x N buffers could not hide in memory freed by it
    step(600, "triton")
    peaks = {}
    for n in (1024, 2048):
        # the lower of two runs: allocations of a long test process (collected garbage, caches)
        # only ever add to a peak, and a real N x N buffer would show in both
        runs = []
        for _ in range(2):
            with PeakMemory(DEV) as m:
                step(n, "triton")
            runs.append(m.peak_mib)
        peaks[n] = min(runs)
    with PeakMemory(DEV) as dense_mem:
        step(1024, "reference")
    nxn_mib = {n: n * n * 4 / 2**20 for n in peaks}
    assert dense_mem.peak_mib > nxn_mib[1024], "the measurement sees an N x N buffer"
    # half of one N x N fp32 matrix: no N x N buffer (the reference needs several), with room for
    # what a long test process's RSS high-water mark adds (4.6 MiB measured once in the full suite)
    assert peaks[2048] < nxn_mib[2048] / 2, f"peak {peaks[2048]:.2f} MiB vs N x N = {nxn_mib[2048]:.0f} MiB"
    # doubling N doubles linear memory and would quadruple anything N x N
    assert peaks[2048] < 3 * peaks[1024] + 1.0, f"peaks {peaks}"


def test_imports_without_gpu_or_interpreter():
    """Importing the kernel module must not need a GPU (TRITON_INTERPRET unset): nothing runs at import."""
    code = (
        "import torch, fastcon.kernels.triton.soft_contrastive as k\n"
        "assert not k.INTERPRET\n"
        "assert k.CORE.kernel_dtype(torch.bfloat16) == torch.bfloat16\n"
        "if not torch.cuda.is_available():\n"
        "    u = torch.randn(4, 8)\n"
        "    try:\n"
        "        k.CORE.forward(u, u, None, None, 0, 1.0, 0.0, 1.0, 0, True)\n"
        "    except ValueError as e:\n"
        "        assert 'CUDA tensors' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('CPU tensors without the interpreter must be refused')\n"
        "print('ok')\n"
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
