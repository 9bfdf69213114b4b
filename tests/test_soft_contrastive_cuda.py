"""The CUDA loss kernels (csrc/cuda/soft_contrastive.cu) on paths the shared suite does not
reach, run through their SIMT emulation build (on a GPU machine, also natively):
backward D slabs, forward column splits, the fp16 weight scaling, fixed vs running max,
fully masked rows, unaligned and strided inputs, and the binding's argument checks (the same
code checks the CUDA ops)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcon import _backends, reference
from fastcon.reference import MODE_SIGMOID, MODE_SOFTMAX, MODE_SOFTMAX_IGNORE

mod, _err = _backends.load_extension("_C_simt")
if mod is None:  # setup.py always builds it: its absence is a broken build, not a missing device
    raise ImportError(f"fastcon._C_simt is not built: {_err}")

BACKENDS = ["cuda_simt"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def ops(backend):
    _backends.load_extension("_C_simt")
    return torch.ops.fastcon_simt if backend == "cuda_simt" else torch.ops.fastcon


def dev(backend):
    return "cuda" if backend == "cuda" else "cpu"


def f64(x, device="cpu"):
    """A scalar argument of the ops (scale, bias): a 0-dim float64 tensor on the inputs' device."""
    return torch.tensor(float(x), dtype=torch.float64, device=device)


def rel(a, e):
    a, e = a.double().cpu(), e.double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def problem(n, m, d, dtype, seed=0, normalize=True):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(m, d, generator=gen, dtype=torch.float64)
    if normalize:
        u, v = F.normalize(u, dim=1), F.normalize(v, dim=1)
    # compare with the reference on the values the kernel sees
    return u.to(dtype), v.to(dtype), gen


def check_contract(backend, u, v, gen, *, mode, offset=0, scale=10.0, bias=-1.0, bound=None, ids=None, tol=None):
    n, m = u.shape[0], v.shape[0]
    bound = scale if bound is None else bound
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    d = dev(backend)
    rid, cid = ids if ids is not None else (None, None)
    args = (rid, cid, offset, scale, bias, bound > 0, mode)
    dargs = (
        None if rid is None else rid.to(d),
        None if cid is None else cid.to(d),
        offset,
        f64(scale, d),
        f64(bias, d),
    )
    dargs += args[5:]
    need_col = mode != MODE_SIGMOID
    row, col = ops(backend).sc_forward(u.to(d), v.to(d), *dargs, need_col)
    r_row, r_col = reference.sc_core_forward(u.double(), v.double(), *args, need_col)
    tol = tol or TOL[u.dtype]
    assert rel(row, r_row) <= tol, f"row stat {rel(row, r_row):.2e}"
    if need_col:
        assert rel(col, r_col) <= tol, f"col stat {rel(col, r_col):.2e}"
    g = torch.rand(n, generator=gen, dtype=torch.float64)
    h = torch.rand(m, generator=gen, dtype=torch.float64) if need_col else None
    out = ops(backend).sc_backward(
        u.to(d), v.to(d), *dargs, r_row.to(acc).to(d), None if h is None else r_col.to(acc).to(d),
        g.to(acc).to(d), None if h is None else h.to(acc).to(d),
    )  # fmt: skip
    ref = reference.sc_core_backward(u.double(), v.double(), *args, r_row, r_col, g, h)
    for name, a, e in zip(["W v", "W^T u", "W 1"], out, ref):
        assert a.dtype == acc
        assert rel(a, e) <= tol, f"{name} {rel(a, e):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_wide_features_span_several_slabs_and_chunks(backend, dtype):
    """D = 300: several GEMM chunks per logit tile and several 256-wide (64 for fp64) output
    slabs in the backward, with a vector-unfriendly D for 16-bit types (300 % 8 != 0)."""
    u, v, gen = problem(70, 90, 300, dtype)
    check_contract(backend, u, v, gen, mode=MODE_SOFTMAX, offset=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [MODE_SOFTMAX, MODE_SIGMOID])
def test_column_split_of_one_row_tile(backend, mode):
    """One row tile against many column tiles: the forward splits the column sweep over
    blocks and merges row sums by atomics (the emulator reports 4 multiprocessors)."""
    u, v, gen = problem(50, 700, 40, torch.float32)
    check_contract(backend, u, v, gen, mode=mode, offset=-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [MODE_SOFTMAX, MODE_SOFTMAX_IGNORE])
def test_fixed_and_running_max_agree(backend, mode):
    """A usable logit bound takes the fixed-max path (one exp per pair for rows and columns),
    none the running-max path (columns in their own blocks): same statistics and weights. The
    kernels decide from the scale they read: bounded with scale 50 (beyond the fp32 limit of 40)
    takes the running max too."""
    u, v, gen = problem(100, 80, 32, torch.float32, seed=3)
    ids = (torch.randint(0, 5, (100,), generator=gen), torch.randint(0, 5, (80,), generator=gen))
    for scale, bound in ((10.0, 10.0), (10.0, 0.0), (50.0, 50.0)):
        check_contract(backend, u, v, gen, mode=mode, scale=scale, bound=bound, ids=ids if mode else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_small_weights_keep_their_precision(backend):
    """Upstream weights of 1e-7 (a mean over millions of samples) times probabilities would be
    fp16 subnormals; the weight tile is scaled into range before its fp16 product."""
    u, v, gen = problem(64, 64, 32, torch.float16, seed=5)
    d = dev(backend)
    row, col = reference.sc_core_forward(u.double(), v.double(), None, None, 0, 10.0, 0.0, 10.0, 0, True)
    g = torch.full((64,), 1e-7, dtype=torch.float64)
    out = ops(backend).sc_backward(
        u.to(d), v.to(d), None, None, 0, f64(10.0, d), None, True, 0, row.float().to(d), col.float().to(d),
        g.float().to(d), g.float().to(d),
    )  # fmt: skip
    ref = reference.sc_core_backward(u.double(), v.double(), None, None, 0, 10.0, 0.0, 10.0, 0, row, col, g, g)
    for a, e in zip(out, ref):
        assert rel(a, e) <= 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bound", [5.0, 0.0])
def test_fully_masked_rows_and_columns(backend, bound):
    """Mode 1 where row 0 and columns 2, 3 have no positive (offset -1) and share every
    other id: their log-sum-exps are -inf and their weights zero, never NaN."""
    d = dev(backend)
    u, v, gen = problem(3, 4, 8, torch.float32)
    ids = torch.ones(3, dtype=torch.int64), torch.ones(4, dtype=torch.int64)
    args = (-1, 5.0, 0.0, bound, MODE_SOFTMAX_IGNORE)
    dargs = (-1, f64(5.0, d), None, bound > 0, MODE_SOFTMAX_IGNORE)
    row, col = ops(backend).sc_forward(u.to(d), v.to(d), ids[0].to(d), ids[1].to(d), *dargs, True)
    r_row, r_col = reference.sc_core_forward(u.double(), v.double(), *ids, *args, True)
    assert row.isneginf().tolist() == [True, False, False] == r_row.isneginf().tolist()
    assert col.isneginf().tolist() == [False, False, True, True] == r_col.isneginf().tolist()
    assert rel(row[1:], r_row[1:]) <= 2e-5
    assert rel(col[:2], r_col[:2]) <= 2e-5
    g, h = torch.rand(3, generator=gen), torch.rand(4, generator=gen)
    out = ops(backend).sc_backward(u.to(d), v.to(d), ids[0].to(d), ids[1].to(d), *dargs, row, col, g.to(d), h.to(d))
    # dense weights with masked pairs as exact zeros (exp(-inf - -inf) would be NaN)
    s = (5.0 * u.double() @ v.double().T).masked_fill(
        torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]) == 0, -torch.inf
    )
    w = g.double()[:, None] * (s - r_row.double()[:, None]).exp().nan_to_num(0.0)
    w = w + h.double()[None, :] * (s - r_col.double()[None, :]).exp().nan_to_num(0.0)
    for name, a, e in zip(["W v", "W^T u", "W 1"], out, [w @ v.double(), w.T @ u.double(), w.sum(dim=1)]):
        assert bool(torch.isfinite(a).all()), name
        assert rel(a, e) <= 2e-5, name
    assert float(out[0][0].abs().max()) == 0.0
    assert float(out[1][2:].abs().max()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_unaligned_and_strided_inputs(backend):
    """Base pointers off the 16-byte grid (scalar loads) and transposed views (made contiguous)."""
    u, v, gen = problem(40, 30, 16, torch.float32, seed=2)
    big_u = torch.cat([torch.zeros(1), u.flatten()])[1:].view(40, 16)  # 4 bytes past an aligned start
    big_v = v.t().contiguous().t()  # a non-contiguous view of the same values
    assert big_u.data_ptr() % 16 != 0
    assert not big_v.is_contiguous()
    check_contract(backend, big_u, big_v, gen, mode=MODE_SOFTMAX)


# --------------------------------------------------------------------------------------------
# the binding's argument checks: one test per kind of bad input


def _u(n=4, d=3, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype)


def _fwd(backend, u, v, *, ids=(None, None), mode=0, scale=None, bias=None):
    scale = f64(1.0) if scale is None else scale
    return ops(backend).sc_forward(u, v, ids[0], ids[1], 0, scale, bias, True, mode, True)


BAD_FORWARD = [
    ("u_not_2d", lambda: dict(u=torch.randn(4), v=_u()), ValueError, "u must be 2-D"),
    ("integer_u", lambda: dict(u=torch.ones(4, 3, dtype=torch.int32), v=_u()), TypeError, "u must be float16"),
    ("dtype_mismatch", lambda: dict(u=_u(), v=_u(dtype=torch.float64)), TypeError, "v must have u's dtype"),
    ("feature_mismatch", lambda: dict(u=_u(), v=_u(d=5)), ValueError, "same feature size"),
    ("empty_rows", lambda: dict(u=_u(n=0), v=_u()), ValueError, "at least one row"),
    ("mode_out_of_range", lambda: dict(u=_u(), v=_u(), mode=3), ValueError, "mode must be 0"),
    (
        "scale_float32",
        lambda: dict(u=_u(), v=_u(), scale=torch.tensor(1.0)),
        TypeError,
        "scale must be a float64 tensor, got float32",
    ),
    (
        "scale_not_0dim",
        lambda: dict(u=_u(), v=_u(), scale=torch.ones(1, dtype=torch.float64)),
        ValueError,
        "scale must be a 0-dim",
    ),
    (
        "bias_float32",
        lambda: dict(u=_u(), v=_u(), mode=2, bias=torch.tensor(0.0)),
        TypeError,
        "bias must be a float64 tensor",
    ),
    ("ids_missing", lambda: dict(u=_u(), v=_u(), mode=1), ValueError, "row_ids is required in mode 1"),
    (
        "ids_not_int64",
        lambda: dict(
            u=_u(), v=_u(), mode=1, ids=(torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int64))
        ),
        TypeError,
        "row_ids must be int64",
    ),
    (
        "ids_wrong_length",
        lambda: dict(
            u=_u(), v=_u(), mode=1, ids=(torch.zeros(4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
        ),
        ValueError,
        r"col_ids must have shape \(4\)",
    ),
]


@pytest.mark.parametrize(("case", "make", "exc", "match"), BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_forward_rejects_bad_arguments(case, make, exc, match):
    with pytest.raises(exc, match=match):
        _fwd("cuda_simt", **make())


def test_backward_rejects_bad_weights():
    u, v = _u(), _u()
    row, col = _fwd("cuda_simt", u, v)
    bwd = torch.ops.fastcon_simt.sc_backward
    with pytest.raises(
        TypeError, match="row_weight must be float32 .the accumulation dtype of float32 inputs., got float64"
    ):
        bwd(u, v, None, None, 0, f64(1.0), None, True, 0, row, col, torch.ones(4, dtype=torch.float64), None)
    with pytest.raises(ValueError, match=r"row_stat must have shape \(4\)"):
        bwd(u, v, None, None, 0, f64(1.0), None, True, 0, row[:3], col, torch.ones(4), None)
    with pytest.raises(ValueError, match="col_stat is required with col_weight"):
        bwd(u, v, None, None, 0, f64(1.0), None, True, 0, row, None, torch.ones(4), torch.ones(4))


def test_mirrored_schemas_equal_fastcon_schemas():
    """fastcon_simt ops are defined from fastcon's schemas, so the two cannot drift apart."""
    ops("cuda_simt")
    for name in ("sc_forward", "sc_backward"):
        ours = str(getattr(torch.ops.fastcon_simt, name).default._schema)
        theirs = str(getattr(torch.ops.fastcon, name).default._schema)
        assert ours.replace("fastcon_simt::", "fastcon::") == theirs
