"""The CPU kernels of the soft contrastive loss beyond the shared suite (tests/test_soft_contrastive.py):
tile boundaries, every code path on any machine, float64, determinism and the ops' own argument checks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcon
from fastcon import _backends, reference
from fastcon.reference import MODE_SIGMOID, MODE_SOFTMAX, MODE_SOFTMAX_IGNORE

_backends.load_extension()


class _Ops:
    """torch.ops.fastcon's loss ops with scale, bias and the logit bound written as numbers, as
    these tests write them: the ops take scale and bias as 0-dim float64 tensors (never read on
    the host by the GPU kernels) and ``bounded`` (here: a bound > 0, which is always the scale)."""

    @staticmethod
    def _args(scale, bias, bound):
        f64 = dict(dtype=torch.float64)
        return torch.tensor(float(scale), **f64), torch.tensor(float(bias), **f64), bool(bound > 0)

    def sc_forward(self, u, v, row_ids, col_ids, offset, scale, bias, bound, *rest):
        return torch.ops.fastcon.sc_forward(u, v, row_ids, col_ids, offset, *self._args(scale, bias, bound), *rest)

    def sc_backward(self, u, v, row_ids, col_ids, offset, scale, bias, bound, *rest):
        return torch.ops.fastcon.sc_backward(u, v, row_ids, col_ids, offset, *self._args(scale, bias, bound), *rest)


ops = _Ops()

# Code paths: the AVX-512 tile passes and MKL tile GEMMs are what this machine runs by default;
# FASTCON_CPU_ISA=avx2 / scalar and FASTCON_CPU_GEMM=builtin force the others (read on every call).
PATHS = {
    "default": {},
    "builtin_gemm": {"FASTCON_CPU_GEMM": "builtin"},
    "avx2": {"FASTCON_CPU_ISA": "avx2"},
    "scalar": {"FASTCON_CPU_ISA": "scalar", "FASTCON_CPU_GEMM": "builtin"},
}


def rel_err(a, e):
    a, e = a.double(), e.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def _problem(n, m, d, offset, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    v = F.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    row_ids = torch.randint(0, 5, (n,), generator=gen)
    col_ids = torch.randint(0, 5, (m,), generator=gen)
    for i in range(n):
        if 0 <= i + offset < m:
            col_ids[i + offset] = row_ids[i]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.rand(n, generator=gen, dtype=torch.float64).to(acc)
    h = torch.rand(m, generator=gen, dtype=torch.float64).to(acc)
    return u, v, row_ids, col_ids, g, h


def _check_contract(u, v, row_ids, col_ids, offset, scale, bound, mode, g, h, fwd_tol, bwd_tol):
    ids = (row_ids, col_ids) if mode == MODE_SOFTMAX_IGNORE else (None, None)
    need_col = mode != MODE_SIGMOID
    args = (*ids, offset, scale, -0.8, bound, mode)
    row, col = ops.sc_forward(u, v, *args, need_col)
    r_row, r_col = reference.sc_core_forward(u.double(), v.double(), *args, need_col)
    assert rel_err(row, r_row) <= fwd_tol
    if need_col:
        assert rel_err(col, r_col) <= fwd_tol
    else:
        assert col.numel() == 0
    out = ops.sc_backward(u, v, *args, r_row.to(row.dtype), r_col.to(row.dtype) if need_col else None, g,
                          h if need_col else None)  # fmt: skip
    ref = reference.sc_core_backward(
        u.double(), v.double(), *args, r_row, r_col, g.double(), h.double() if need_col else None
    )
    for name, a, e in zip(["W v", "W^T u", "W 1"], out, ref):
        assert a.dtype == row.dtype
        assert rel_err(a, e) <= bwd_tol, name


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mode", [MODE_SOFTMAX, MODE_SOFTMAX_IGNORE, MODE_SIGMOID])
@pytest.mark.parametrize("tau", [0.1, 0.01], ids=["fixed_max", "running_max"])
def test_contract_across_tiles(monkeypatch, path, mode, tau):
    """Several row and column tiles (equal blocks of at most 256), ragged edges, a row offset
    reaching past both ends."""
    for key, value in PATHS[path].items():
        monkeypatch.setenv(key, value)
    n, m, d, offset = 530, 600, 37, -70
    u, v, row_ids, col_ids, g, h = _problem(n, m, d, offset, seed=mode)
    _check_contract(u, v, row_ids, col_ids, offset, 1 / tau, 1 / tau, mode, g, h, 1e-5, 2e-5)


@pytest.mark.parametrize("mode", [MODE_SOFTMAX, MODE_SOFTMAX_IGNORE, MODE_SIGMOID])
@pytest.mark.parametrize("tau", [0.1, 0.01], ids=["fixed_max", "running_max"])
def test_contract_float64(mode, tau):
    """The float64 kernels (used by gradcheck) agree with the dense contract far beyond fp32.
    (1e-10: torch's float64 softplus returns x itself above x = 20, off by up to 2e-9.)"""
    n, m, d, offset = 270, 300, 19, 5
    u, v, row_ids, col_ids, g, h = _problem(n, m, d, offset, seed=10 + mode, dtype=torch.float64)
    _check_contract(u, v, row_ids, col_ids, offset, 1 / tau, 1 / tau, mode, g, h, 1e-10, 1e-10)


def test_unnormalised_large_logits():
    """No logit bound (normalize=False): logits up to 100, where a fixed max of 0 would overflow."""
    u, v, row_ids, col_ids, g, h = _problem(300, 280, 16, 0, seed=3)
    _check_contract(u * 4, v * 2.5, row_ids, col_ids, 0, 10.0, 0.0, MODE_SOFTMAX, g, h, 1e-5, 2e-5)


def test_fixed_and_running_max_agree():
    u, v, *_ = _problem(300, 300, 24, 0, seed=4)
    fixed = ops.sc_forward(u, v, None, None, 0, 10.0, 0.0, 10.0, MODE_SOFTMAX, True)
    running = ops.sc_forward(u, v, None, None, 0, 10.0, 0.0, 0.0, MODE_SOFTMAX, True)
    for a, b in zip(fixed, running):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("bound", [5.0, 0.0], ids=["fixed_max", "running_max"])
def test_rows_without_pairs(monkeypatch, path, bound):
    """A row whose pairs are all masked (positive outside [0, M)): -inf forward, no weight backward."""
    for key, value in PATHS[path].items():
        monkeypatch.setenv(key, value)
    u, v, _, _, g, h = _problem(4, 6, 8, 10, seed=5)
    ids = torch.zeros(4, dtype=torch.int64), torch.zeros(6, dtype=torch.int64)  # one scene: all masked
    row, col = ops.sc_forward(u, v, *ids, 10, 5.0, 0.0, bound, MODE_SOFTMAX_IGNORE, True)
    assert torch.isneginf(row).all()
    assert torch.isneginf(col).all()
    gu, gv, wsum = ops.sc_backward(u, v, *ids, 10, 5.0, 0.0, bound, MODE_SOFTMAX_IGNORE, row, col, g, h)
    assert torch.equal(gu, torch.zeros_like(gu))
    assert torch.equal(gv, torch.zeros_like(gv))
    assert torch.equal(wsum, torch.zeros_like(wsum))


# --------------------------------------------------------------------------------------------
# determinism


def _with_threads(n_threads, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def _kernel_run():
    u, v, row_ids, col_ids, g, h = _problem(1100, 1300, 48, 0, seed=6)
    row, col = ops.sc_forward(u, v, row_ids, col_ids, 0, 12.0, 0.0, 12.0, MODE_SOFTMAX_IGNORE, True)
    back = ops.sc_backward(u, v, row_ids, col_ids, 0, 12.0, 0.0, 12.0, MODE_SOFTMAX_IGNORE, row, col, g, h)
    return (row, col, *back)


def _loss_run():
    gen = torch.Generator().manual_seed(7)
    z1 = torch.randn(1100, 48, generator=gen).requires_grad_()
    z2 = torch.randn(1100, 48, generator=gen).requires_grad_()
    labels = (torch.rand(1100, 9, generator=gen) < 0.3).float()
    loss = fastcon.soft_contrastive_loss(z1, z2, labels, temperature=0.05, backend="cpu")
    return (loss.detach(), *torch.autograd.grad(loss, (z1, z2)))


def test_deterministic_across_runs_and_threads():
    """Same thread count: bitwise identical. The kernels cut columns into a fixed number of chunks
    reduced in a fixed order, so 1 and 2 threads give bitwise identical kernel outputs too; the
    torch ops around them may reduce differently per thread count (fp32 rounding)."""
    one = _with_threads(1, _kernel_run)
    two = _with_threads(2, _kernel_run)
    two_again = _with_threads(2, _kernel_run)
    for a, b, c in zip(one, two, two_again):
        assert torch.equal(b, c)
        assert torch.equal(a, b)
    loss_one = _with_threads(1, _loss_run)
    loss_two = _with_threads(2, _loss_run)
    loss_two_again = _with_threads(2, _loss_run)
    for a, b, c in zip(loss_one, loss_two, loss_two_again):
        assert torch.equal(b, c)
        assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("mode", [MODE_SOFTMAX, MODE_SOFTMAX_IGNORE, MODE_SIGMOID])
@pytest.mark.parametrize(("n", "m"), [(256, 256), (200, 450)])
def test_small_batch_split(mode, n, m):
    """Up to 512 columns are cut into 2 equal column blocks (two chunks, so that 2 threads share a
    small batch, one row block): the kernels still meet the contract, and 1 and 2 threads give
    bitwise identical outputs."""
    u, v, row_ids, col_ids, g, h = _problem(n, m, 40, 3, seed=20 + mode)
    _check_contract(u, v, row_ids, col_ids, 3, 10.0, 10.0, mode, g, h, 1e-5, 2e-5)
    ids = (row_ids, col_ids) if mode == MODE_SOFTMAX_IGNORE else (None, None)
    need_col = mode != MODE_SIGMOID

    def run():
        row, col = ops.sc_forward(u, v, *ids, 3, 10.0, -0.8, 10.0, mode, need_col)
        back = ops.sc_backward(u, v, *ids, 3, 10.0, -0.8, 10.0, mode, row, col if need_col else None, g,
                               h if need_col else None)  # fmt: skip
        return (row, col, *back)

    for a, b in zip(_with_threads(1, run), _with_threads(2, run)):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# the ops' own argument checks (the public API checks its arguments before reaching them)


def _good():
    u = F.normalize(torch.randn(5, 4), dim=1)
    v = F.normalize(torch.randn(6, 4), dim=1)
    ids = torch.arange(5), torch.arange(6)
    return u, v, ids


def _fwd(u=None, v=None, row_ids=None, col_ids=None, mode=MODE_SOFTMAX, scale=2.0):
    gu, gv, _ = _good()
    u = gu if u is None else u
    v = gv if v is None else v
    return ops.sc_forward(u, v, row_ids, col_ids, 0, scale, 0.0, 2.0, mode, True)


def _bwd(row=None, col=None, g=None, h=None):
    u, v, _ = _good()
    row = torch.zeros(5) if row is None else row
    g = torch.ones(5) if g is None else g
    return ops.sc_backward(u, v, None, None, 0, 2.0, 0.0, 2.0, MODE_SOFTMAX, row, col, g, h)


OP_BAD_INPUTS = [
    ("half_u", lambda: _fwd(u=torch.randn(5, 4).half(), v=torch.randn(6, 4).half()), TypeError, "float32 or float64"),
    ("mixed_dtypes", lambda: _fwd(v=torch.randn(6, 4, dtype=torch.float64)), TypeError, "v must have u's dtype"),
    ("u_not_2d", lambda: _fwd(u=torch.randn(20)), ValueError, "u must be 2-D"),
    ("not_contiguous", lambda: _fwd(u=torch.randn(4, 5).T), ValueError, "u must be contiguous"),
    ("feature_mismatch", lambda: _fwd(v=torch.randn(6, 3)), ValueError, "same number of features"),
    ("mode_out_of_range", lambda: _fwd(mode=3), ValueError, "mode must be 0"),
    ("ignore_without_ids", lambda: _fwd(mode=MODE_SOFTMAX_IGNORE), ValueError, "needs row_ids and col_ids"),
    (
        "ids_int32",
        lambda: _fwd(row_ids=torch.arange(5, dtype=torch.int32), col_ids=torch.arange(6), mode=1),
        TypeError,
        "row_ids must be Long",
    ),
    ("ids_wrong_length", lambda: _fwd(row_ids=torch.arange(5), col_ids=torch.arange(5), mode=1), ValueError, r"\(6,\)"),
    ("scale_not_finite", lambda: _fwd(scale=float("inf")), ValueError, "must be finite"),
    (
        "scale_float32",
        lambda: torch.ops.fastcon.sc_forward(*_good()[:2], None, None, 0, torch.tensor(2.0), None, True, 0, True),
        TypeError,
        "scale must be float64",
    ),
    ("row_stat_shape", lambda: _bwd(row=torch.zeros(4)), ValueError, "row_stat must have shape"),
    ("row_weight_dtype", lambda: _bwd(g=torch.ones(5, dtype=torch.float64)), TypeError, "row_weight must be Float"),
    ("col_weight_without_stat", lambda: _bwd(h=torch.ones(6)), ValueError, "col_weight needs col_stat"),
]


@pytest.mark.parametrize(("case", "call", "exc", "match"), OP_BAD_INPUTS, ids=[c[0] for c in OP_BAD_INPUTS])
def test_op_bad_input(case, call, exc, match):
    with pytest.raises(exc, match=match):
        call()
