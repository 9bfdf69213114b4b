"""Triton kernels of the soft contrastive loss: the blockwise N x M pass, never storing N x M.

Contract: ``fastcon.reference.sc_core_forward`` / ``sc_core_backward`` (schemas in csrc/ops.cpp).
The autograd Function in ``fastcon/soft_contrastive.py`` does the O(N * (D + C)) target algebra;
``CORE`` below is what it calls. Logits ``s = scale * A B^T`` are computed tile by tile with
``tl.dot`` over D, fp32 accumulation, and thrown away after use.

Kernels (each written once for an "A-side owns its rows" pass; the column pass is the same
kernel with the roles of u/v, ids, statistics and weights swapped and the offset negated):
- ``_sc_forward_kernel``: per row, online log-sum-exp with a true running max (or the softplus
  sum of the sigmoid form). Column log-sum-exps come either from a second, column-owned launch
  of the same kernel, or, when ``0 < logit_bound <= FIXED_MAX_LIMIT`` and torch's deterministic
  mode is off, from the fixed-max trick (SPEC section 5) inside the row pass:
  ``sum_i exp(s_ij - bound) = sum_i p_ij exp(m_i - bound)`` reuses the row pass's exponentials
  (one exp per pair in total) and is accumulated with ``tl.atomic_add``. Why: the column-owned
  pass costs a second 2*N*M*D GEMM and N*M more exps (~2x the forward); the atomics cost
  M adds per row block and make the column sums' fp32 rounding order-dependent (run-to-run
  differences at the 1e-7 level). Deterministic mode and small temperatures (2 * bound beyond
  the range where exp(-2 * bound) stays a normal fp32) take the column-owned pass.
- ``_sc_backward_kernel``: recomputes logit tiles and accumulates ``W B`` (and ``W 1``) for the
  rows it owns. Launched twice: row-owned (W v, W 1) and column-owned (W^T u). Why not one
  kernel with atomics (FlashAttention-2 style dK/dV in registers, dQ by atomics): with D up to
  768 the atomically-updated side moves (N / BLOCK_N) * M * D fp32 read-modify-writes, ~100 GB
  at N = 65536, D = 768, about what the second GEMM costs, and it would be non-deterministic.
  Two launches recompute S twice (2 extra N*M*D GEMMs) but are deterministic and atomic-free.
  With the fixed max, ``W_ij = exp(s_ij - bound) * (a_i + b_j)``: again one exp per pair.
  The W tile feeds ``tl.dot`` in the input dtype (fp16/bf16, like P in FlashAttention), scaled
  per row by 1 / (|g_i| + max|h|) so that fp16 tiles hold values in [-1, 1] and never underflow
  into subnormals; the scale is undone on the fp32 accumulator.
- Few row blocks (small N against large M, or N < ~16k on a 132-SM H100) would leave SMs idle:
  the inner dimension is then split over a second grid axis (flash-decoding style); partial
  log-sum-exps / sums are combined with torch, O(splits * N * D) memory, splits <= 8.

D handling: D <= 256 (power-of-two padded) keeps the A block resident and loads each B tile
once for both the logits and the product; larger D streams 64-wide K chunks for the logits
and keeps up to 4 output accumulators of BLOCK_DO columns (the autotuner picks how much of D
one program covers; the rest goes on a grid axis at the price of recomputing S).

Precision: fp16/bf16 tiles go to tensor cores with fp32 accumulation; fp32 inputs use
``input_precision="tf32x3"`` on NVIDIA GPUs (about fp32 accuracy at tensor-core speed). Under
the interpreter bf16 is upcast to fp32 inside the kernels (its bf16 tl.dot is wrong there).

Roofline, H100 SXM, bf16, N = M = 65536 (P = N^2 = 4.3e9 pairs), softmax symmetric, tau >= 1/32
(fixed max). Peaks: 990 TFLOP/s tensor, 3.35 TB/s HBM, MUFU exp ~3.9 Tops/s, FP32 ALU
~31 Tops/s (128 lanes/SM x 132 x 1.83 GHz).
                       D = 256                          D = 768
  forward  MMA    2PD  = 2.2 TFLOP -> 2.2 ms            6.6 TFLOP -> 6.7 ms
           exp    P    = 4.3 G     -> 1.1 ms            1.1 ms
           ALU    ~8P  (scale, mask, max, sub, sums)    -> 1.1 ms at both D
  backward MMA    8PD  = 8.8 TFLOP -> 8.9 ms            26.4 TFLOP -> 26.7 ms (16PD, 53 ms, if the
                  (2 launches x (recompute S + product))   autotuner picks configs covering D/3)
           exp    2P   -> 2.2 ms                        2.2 ms
  HBM bytes: u, v once = 4ND = 67 MB / 201 MB; B re-streams hit L2 (32 MB fits the 50 MB L2 at
  D = 256; at D = 768 ~132-264 CTAs walk B in step, ~4 HBM passes ~0.4 GB) -> < 0.2 ms.
  Arithmetic intensity against HBM ~1e4 FLOP/B >> ridge 295 FLOP/B: never HBM-bound.
  On-chip feed per tile: resident A (D <= 256): BLOCK_N FLOP per L2 byte (128); streamed A
  (D = 768, 128 x 128 tiles): BLOCK_N*BLOCK_M/(BLOCK_N+BLOCK_M) = 64 FLOP/B, i.e. 17 GB
  (D = 256) and 103 GB (D = 768) of L2->SM traffic in the forward.
  Verdict: compute-bound at both D, not exp-bound: the exp stream is 1/2 (D = 256) and 1/6
  (D = 768) of the MMA time. At D = 256 exp + ALU together (2.2 ms) equal the MMA time, and
  Triton overlaps MUFU with MMA only across warps (no FA3 ping-pong), so expect ~1.5x the MMA
  bound: forward ~3.5 ms, backward ~13 ms. At D = 768 the L2 feed (64 FLOP/B) is the practical
  limiter: expect 50-60% of tensor peak, forward ~12 ms, backward ~45 ms. Small temperatures
  (no fixed max) add a column-owned forward pass (2x forward) and a second exp per pair.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastcon.reference import MODE_SIGMOID, MODE_SOFTMAX, MODE_SOFTMAX_IGNORE

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The fixed max is used while logit_bound <= this: exp(s - bound) >= exp(-64) ~ 1.6e-28 stays a
# normal fp32 (underflow starts near exp(-87)), so every term keeps full relative precision.
FIXED_MAX_LIMIT = 32.0
# A block of A stays resident (and one B tile serves logits and product) up to this D.
RESIDENT_MAX_D = 64 if INTERPRET else 256
# K chunk of the streamed path (D > RESIDENT_MAX_D).
STREAM_BLOCK_K = 32 if INTERPRET else 64
# Split the inner dimension until about this many programs per SM are in flight.
PROGRAMS_PER_SM = 2
MAX_SPLITS = 8
_SPLIT_EST_BLOCK = 64 if INTERPRET else 128  # row-block size assumed when choosing splits

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# autotuning: H100/A100-sized configs on GPUs, one small config under the interpreter (CI speed)


def _cfg(warps, stages, **kw):
    return triton.Config(kw, num_warps=warps, num_stages=stages)


if INTERPRET:
    _FWD_CONFIGS = [_cfg(4, 1, BLOCK_N=64, BLOCK_M=64)]
    _BWD_CONFIGS = [_cfg(4, 1, BLOCK_N=64, BLOCK_M=64, BLOCK_DO=32, N_ACC=2)]
else:
    _FWD_CONFIGS = [
        _cfg(8, 3, BLOCK_N=128, BLOCK_M=128),
        _cfg(8, 4, BLOCK_N=128, BLOCK_M=128),
        _cfg(8, 3, BLOCK_N=128, BLOCK_M=64),
        _cfg(4, 4, BLOCK_N=128, BLOCK_M=64),
        _cfg(4, 3, BLOCK_N=64, BLOCK_M=128),
        _cfg(4, 4, BLOCK_N=64, BLOCK_M=64),
    ]
    _BWD_CONFIGS = [
        # resident path (D <= 256): BLOCK_DO / N_ACC are replaced by the whole padded D
        _cfg(8, 2, BLOCK_N=128, BLOCK_M=64, BLOCK_DO=0, N_ACC=1),
        _cfg(8, 3, BLOCK_N=128, BLOCK_M=64, BLOCK_DO=0, N_ACC=1),
        _cfg(4, 3, BLOCK_N=64, BLOCK_M=64, BLOCK_DO=0, N_ACC=1),
        _cfg(8, 2, BLOCK_N=64, BLOCK_M=128, BLOCK_DO=0, N_ACC=1),
        _cfg(8, 2, BLOCK_N=128, BLOCK_M=128, BLOCK_DO=0, N_ACC=1),
        # streamed path (D > 256): accumulators of N_ACC x BLOCK_DO output columns per program
        _cfg(8, 2, BLOCK_N=64, BLOCK_M=64, BLOCK_DO=256, N_ACC=3),
        _cfg(8, 2, BLOCK_N=32, BLOCK_M=64, BLOCK_DO=256, N_ACC=4),
        _cfg(8, 3, BLOCK_N=64, BLOCK_M=64, BLOCK_DO=128, N_ACC=2),
        _cfg(8, 3, BLOCK_N=128, BLOCK_M=64, BLOCK_DO=128, N_ACC=1),
        _cfg(8, 2, BLOCK_N=64, BLOCK_M=128, BLOCK_DO=256, N_ACC=1),
    ]


def _block_k(d: int) -> int:
    return max(16, triton.next_power_of_2(d)) if d <= RESIDENT_MAX_D else STREAM_BLOCK_K


def _bwd_layout(d: int, block_do: int, n_acc: int) -> tuple[int, int]:
    """(BLOCK_DO, N_ACC) actually used: the resident path covers D with one shared tile."""
    if d <= RESIDENT_MAX_D:
        return _block_k(d), 1
    return block_do, max(1, min(n_acc, triton.cdiv(d, block_do)))


def _prune_bwd(configs, nargs, **kwargs):
    """Keep the configs of D's path, without duplicates after the layout heuristics."""
    d = nargs["D"]
    kept, seen = [], set()
    for c in configs:
        resident = c.kwargs["BLOCK_DO"] == 0
        if resident != (d <= RESIDENT_MAX_D):
            continue
        key = (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], *_bwd_layout(d, c.kwargs["BLOCK_DO"], c.kwargs["N_ACC"]))
        key += (c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            kept.append(c)
    return kept or configs[:1]


_KEYS = ["N_KEY", "M_KEY", "D_KEY", "MODE"]


# --------------------------------------------------------------------------------------------
# kernel building blocks


@triton.jit
def _load_rows(ptr, rows, rows_ok, stride, k0, D, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``rows`` of a row-major (., D) matrix, columns k0 .. k0 + BLOCK_K (zeros outside)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(
        ptr + rows[:, None] * stride + offs_k[None, :], mask=rows_ok[:, None] & (offs_k[None, :] < D), other=0.0
    )
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _streamed_dot(
    a_ptr, b_ptr, rows, rows_ok, cols, cols_ok, D, stride_a, stride_b,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """A[rows] . B[cols]^T over D in BLOCK_K chunks, fp32 accumulation."""
    s = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a = _load_rows(a_ptr, rows, rows_ok, stride_a, k0, D, BLOCK_K, UPCAST)
        b = _load_rows(b_ptr, cols, cols_ok, stride_b, k0, D, BLOCK_K, UPCAST)
        s = tl.dot(a, tl.trans(b), s, input_precision=PRECISION)
    return s


@triton.jit
def _pairs(offs_n, n_ok, offs_m, m_ok, a_id, b_ids_ptr, offset, MODE: tl.constexpr):
    """Which pairs of the tile take part: in range, and for mode 1 the positive or a different id."""
    valid = n_ok[:, None] & m_ok[None, :]
    if MODE == 1:
        b_id = tl.load(b_ids_ptr + offs_m, mask=m_ok, other=0)
        keep = (a_id[:, None] != b_id[None, :]) | (offs_m[None, :] == offs_n[:, None] + offset)
        valid = valid & keep
    return valid


@triton.jit
def _log1p(t):
    """log(1 + t) to full fp32 precision for t in [0, 1] (tl has no log1p that the interpreter runs)."""
    u = 1.0 + t
    tiny = u == 1.0
    return tl.where(tiny, t, tl.log(u) * (t / tl.where(tiny, 1.0, u - 1.0)))


@triton.jit
def _tile_bounds(NB, SPLIT, BLOCK_M: tl.constexpr):
    """The inner tiles [t0, t1) of this program's split."""
    n_tiles = tl.cdiv(NB, BLOCK_M)
    per = tl.cdiv(n_tiles, SPLIT)
    t0 = tl.program_id(2) * per
    return t0, tl.minimum(t0 + per, n_tiles)


# --------------------------------------------------------------------------------------------
# forward: per-row statistics (+ fixed-max column sums)


@triton.autotune(configs=_FWD_CONFIGS, key=_KEYS + ["FIXED_COL"], reset_to_zero=["col_sum_ptr"])
@triton.heuristics(
    {
        "BLOCK_K": lambda a: _block_k(a["D"]),
        "RESIDENT": lambda a: a["D"] <= RESIDENT_MAX_D,
    }
)
@triton.jit
def _sc_forward_kernel(
    a_ptr, b_ptr, a_ids_ptr, b_ids_ptr, out_ptr, col_sum_ptr,
    NA, NB, D, stride_a, stride_b, offset, scale, bias, bound, SPLIT,
    N_KEY, M_KEY, D_KEY,
    MODE: tl.constexpr, FIXED_COL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr,
):  # fmt: skip
    """out[split, i] = logsumexp_j s_ij (modes 0, 1) or sum_j softplus(s_ij + bias) (mode 2) over
    this split's columns; with FIXED_COL also col_sum[j] += sum_i exp(s_ij - bound)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NA
    rows = offs_n.to(tl.int64)
    if RESIDENT:
        a_tile = _load_rows(a_ptr, rows, n_ok, stride_a, 0, D, BLOCK_K, UPCAST)
    a_id = offs_n
    if MODE == 1:
        a_id = tl.load(a_ids_ptr + offs_n, mask=n_ok, other=0)
    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum of exp(s - m_i), or the softplus sum
    t0, t1 = _tile_bounds(NB, SPLIT, BLOCK_M)
    for t in range(t0, t1):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < NB
        cols = offs_m.to(tl.int64)
        if RESIDENT:
            b = _load_rows(b_ptr, cols, m_ok, stride_b, 0, D, BLOCK_K, UPCAST)
            s = tl.dot(a_tile, tl.trans(b), input_precision=PRECISION)
        else:
            s = _streamed_dot(
                a_ptr, b_ptr, rows, n_ok, cols, m_ok, D, stride_a, stride_b, BLOCK_N, BLOCK_M, BLOCK_K, UPCAST,
                PRECISION,
            )  # fmt: skip
        s = s * scale
        valid = _pairs(offs_n, n_ok, offs_m, m_ok, a_id, b_ids_ptr, offset, MODE)
        if MODE == 2:
            x = s + bias
            softplus = tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))
            l_i += tl.sum(tl.where(valid, softplus, 0.0), 1)
        else:
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no pair yet
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(p, 1)
            m_i = m_new
            if FIXED_COL:
                # exp(s - bound) = p * exp(m - bound): the row pass's exponentials, reweighted
                col = tl.sum(p * tl.exp(m_safe - bound)[:, None], 0)
                tl.atomic_add(col_sum_ptr + offs_m, col, mask=m_ok)
    if MODE == 2:
        res = l_i
    else:
        res = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(out_ptr + tl.program_id(2) * NA + offs_n, res, mask=n_ok)


# --------------------------------------------------------------------------------------------
# backward: out = W B and W 1 for the rows this program owns


@triton.jit
def _accumulate(acc, w, b_ptr, cols, m_ok, c0, D, stride_b, BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):  # fmt: skip
    bo = _load_rows(b_ptr, cols, m_ok, stride_b, c0, D, BLOCK_DO, UPCAST)
    return tl.dot(w.to(bo.dtype), bo, acc, input_precision=PRECISION)


@triton.jit
def _store_out(out_ptr, acc, r, rows, n_ok, c0, D, NA, BLOCK_DO: tl.constexpr):
    offs_d = c0 + tl.arange(0, BLOCK_DO)
    base = out_ptr + tl.program_id(2).to(tl.int64) * NA * D
    tl.store(base + rows[:, None] * D + offs_d[None, :], acc * r[:, None], mask=n_ok[:, None] & (offs_d[None, :] < D))


@triton.autotune(
    configs=_BWD_CONFIGS,
    key=_KEYS + ["FIXED", "HAS_AW", "HAS_BW"],
    prune_configs_by={"early_config_prune": _prune_bwd},
)
@triton.heuristics(
    {
        "BLOCK_K": lambda a: _block_k(a["D"]),
        "RESIDENT": lambda a: a["D"] <= RESIDENT_MAX_D,
        "BLOCK_DO": lambda a: _bwd_layout(a["D"], a["BLOCK_DO"], a["N_ACC"])[0],
        "N_ACC": lambda a: _bwd_layout(a["D"], a["BLOCK_DO"], a["N_ACC"])[1],
    }
)
@triton.jit
def _sc_backward_kernel(
    a_ptr, b_ptr, a_ids_ptr, b_ids_ptr, a_stat_ptr, b_stat_ptr, a_w_ptr, b_w_ptr, b_wmax_ptr,
    out_ptr, wsum_ptr,
    NA, NB, D, stride_a, stride_b, offset, scale, bias, bound, SPLIT,
    N_KEY, M_KEY, D_KEY,
    MODE: tl.constexpr, FIXED: tl.constexpr, HAS_AW: tl.constexpr, HAS_BW: tl.constexpr,
    NEED_WSUM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_DO: tl.constexpr, N_ACC: tl.constexpr,
):  # fmt: skip
    """out[split, i, d] = sum_j W_ij B_jd over this split's columns, for N_ACC * BLOCK_DO columns
    d from program_id(1), and wsum[split, i] = sum_j W_ij. Softmax modes:
    W_ij = a_w_i exp(s_ij - a_stat_i) + b_w_j exp(s_ij - b_stat_j); sigmoid:
    W_ij = (a_w_i or b_w_j) sigmoid(s_ij + bias)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NA
    rows = offs_n.to(tl.int64)
    c_base = tl.program_id(1) * (N_ACC * BLOCK_DO)
    if RESIDENT:
        a_tile = _load_rows(a_ptr, rows, n_ok, stride_a, 0, D, BLOCK_K, UPCAST)
    a_id = offs_n
    if MODE == 1:
        a_id = tl.load(a_ids_ptr + offs_n, mask=n_ok, other=0)
    # Row scale r_i >= |W_ij|: the tile fed to tl.dot is W / r in [-1, 1] (no fp16 underflow).
    r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a_w = r
    if HAS_AW:
        a_w = tl.load(a_w_ptr + offs_n, mask=n_ok, other=0.0)
        r += tl.abs(a_w)
    if HAS_BW:
        r += tl.load(b_wmax_ptr)
    r = tl.where(r > 0, r, 1.0)
    inv_r = 1.0 / r
    a_coef = a_w * inv_r
    a_stat = r
    if MODE != 2:
        if HAS_AW:
            a_stat = tl.load(a_stat_ptr + offs_n, mask=n_ok, other=0.0)
            if FIXED:  # a_w exp(s - a_stat) = exp(s - bound) * a_w exp(bound - a_stat)
                a_coef = tl.where(a_stat == float("-inf"), 0.0, a_coef * tl.exp(bound - a_stat))
            else:
                a_stat = tl.where(a_stat == float("-inf"), 0.0, a_stat)  # rows without pairs: W = 0

    acc0 = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    if N_ACC > 1:
        acc1 = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    if N_ACC > 2:
        acc2 = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    if N_ACC > 3:
        acc3 = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t0, t1 = _tile_bounds(NB, SPLIT, BLOCK_M)
    for t in range(t0, t1):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < NB
        cols = offs_m.to(tl.int64)
        if RESIDENT:
            b = _load_rows(b_ptr, cols, m_ok, stride_b, 0, D, BLOCK_K, UPCAST)
            s = tl.dot(a_tile, tl.trans(b), input_precision=PRECISION)
        else:
            s = _streamed_dot(
                a_ptr, b_ptr, rows, n_ok, cols, m_ok, D, stride_a, stride_b, BLOCK_N, BLOCK_M, BLOCK_K, UPCAST,
                PRECISION,
            )  # fmt: skip
        s = s * scale
        valid = _pairs(offs_n, n_ok, offs_m, m_ok, a_id, b_ids_ptr, offset, MODE)
        if MODE == 2:
            x = s + bias
            e = tl.exp(-tl.abs(x))  # sigmoid without overflow on either side
            sig = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            if HAS_AW:
                w = sig * a_coef[:, None]
            else:
                b_w = tl.load(b_w_ptr + offs_m, mask=m_ok, other=0.0)
                w = sig * (inv_r[:, None] * b_w[None, :])
        else:
            s = tl.where(valid, s, float("-inf"))
            if HAS_BW:
                b_w = tl.load(b_w_ptr + offs_m, mask=m_ok, other=0.0)
                b_stat = tl.load(b_stat_ptr + offs_m, mask=m_ok, other=0.0)
            if FIXED:
                e = tl.exp(s - bound)
                if HAS_BW:
                    b_coef = tl.where(b_stat == float("-inf"), 0.0, b_w * tl.exp(bound - b_stat))
                    if HAS_AW:
                        w = e * (a_coef[:, None] + inv_r[:, None] * b_coef[None, :])
                    else:
                        w = e * (inv_r[:, None] * b_coef[None, :])
                else:
                    w = e * a_coef[:, None]
            else:
                w = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                if HAS_AW:
                    w += a_coef[:, None] * tl.exp(s - a_stat[:, None])
                if HAS_BW:
                    b_stat = tl.where(b_stat == float("-inf"), 0.0, b_stat)
                    w += (inv_r[:, None] * b_w[None, :]) * tl.exp(s - b_stat[None, :])
        w = tl.where(valid, w, 0.0)
        if NEED_WSUM:
            wsum += tl.sum(w, 1)
        if RESIDENT:  # one chunk, the B tile already loaded
            acc0 = tl.dot(w.to(b.dtype), b, acc0, input_precision=PRECISION)
        else:
            acc0 = _accumulate(acc0, w, b_ptr, cols, m_ok, c_base, D, stride_b, BLOCK_DO, UPCAST, PRECISION)
            if N_ACC > 1:
                acc1 = _accumulate(
                    acc1, w, b_ptr, cols, m_ok, c_base + BLOCK_DO, D, stride_b, BLOCK_DO, UPCAST, PRECISION
                )
            if N_ACC > 2:
                acc2 = _accumulate(
                    acc2, w, b_ptr, cols, m_ok, c_base + 2 * BLOCK_DO, D, stride_b, BLOCK_DO, UPCAST, PRECISION
                )
            if N_ACC > 3:
                acc3 = _accumulate(
                    acc3, w, b_ptr, cols, m_ok, c_base + 3 * BLOCK_DO, D, stride_b, BLOCK_DO, UPCAST, PRECISION
                )
    _store_out(out_ptr, acc0, r, rows, n_ok, c_base, D, NA, BLOCK_DO)
    if N_ACC > 1:
        _store_out(out_ptr, acc1, r, rows, n_ok, c_base + BLOCK_DO, D, NA, BLOCK_DO)
    if N_ACC > 2:
        _store_out(out_ptr, acc2, r, rows, n_ok, c_base + 2 * BLOCK_DO, D, NA, BLOCK_DO)
    if N_ACC > 3:
        _store_out(out_ptr, acc3, r, rows, n_ok, c_base + 3 * BLOCK_DO, D, NA, BLOCK_DO)
    if NEED_WSUM:
        tl.store(wsum_ptr + tl.program_id(2) * NA + offs_n, wsum * r, mask=n_ok & (tl.program_id(1) == 0))


# --------------------------------------------------------------------------------------------
# launchers


def _bucket(x: int) -> int:
    return triton.next_power_of_2(max(1, x))


class TritonSoftContrastiveCore:
    """The kernel contract (``sc_forward`` / ``sc_backward``) on Triton.

    ``splits``: None chooses how many ways to split the inner dimension from the SM count
    (never under the interpreter); an int forces it (tests use this). ``deterministic``: None
    follows ``torch.are_deterministic_algorithms_enabled()``; True never uses atomics.
    """

    def __init__(self, splits: int | None = None, deterministic: bool | None = None):
        self.splits = splits
        self.deterministic = deterministic

    # ---- helpers ----------------------------------------------------------------------------

    def kernel_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"z1 must be float32, float16 or bfloat16 for backend='triton', got {dtype} "
                "(float64 has no Triton kernel; use backend='cpu' or backend='reference')"
            )
        return dtype

    def _check(self, u: torch.Tensor, v: torch.Tensor):
        self.kernel_dtype(u.dtype)
        if v.dtype != u.dtype:
            raise TypeError(f"v must have u's dtype ({u.dtype}), got {v.dtype}")
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
            raise ValueError(f"u (N, D) and v (M, D) must share D, got {tuple(u.shape)} and {tuple(v.shape)}")
        if u.device != v.device:
            raise ValueError(f"u and v must be on one device, got {u.device} and {v.device}")
        if u.device.type != "cuda" and not INTERPRET:
            raise ValueError(
                f"the triton kernels take CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {u.device}"
            )
        return (u if u.stride(1) == 1 else u.contiguous()), (v if v.stride(1) == 1 else v.contiguous())

    def _use_atomics(self) -> bool:
        det = torch.are_deterministic_algorithms_enabled() if self.deterministic is None else self.deterministic
        return not det

    @staticmethod
    def _fixed_max(bound: float) -> bool:
        return 0.0 < bound <= FIXED_MAX_LIMIT

    def _num_splits(self, na: int, nb: int, device: torch.device, cap: int) -> int:
        if self.splits is not None:
            return max(1, int(self.splits))
        if device.type != "cuda":
            return 1  # the interpreter runs programs one after another: splitting buys nothing
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        blocks = triton.cdiv(na, _SPLIT_EST_BLOCK)
        want = triton.cdiv(PROGRAMS_PER_SM * sms, blocks)
        return max(1, min(want, cap, triton.cdiv(nb, _SPLIT_EST_BLOCK)))

    @staticmethod
    def _precision(dtype: torch.dtype) -> str:
        if INTERPRET or dtype != torch.float32 or torch.version.hip:
            return "ieee"
        return "tf32x3"  # fp32 inputs: ~fp32 accuracy from three TF32 MMAs

    @staticmethod
    def _ids(ids: torch.Tensor | None, other: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
        if ids is None:
            return dummy
        if other is not None and other.dtype != ids.dtype:
            ids = ids.to(torch.int64)
        return ids.contiguous()

    def _device_ctx(self, t: torch.Tensor):
        return torch.cuda.device(t.device) if t.device.type == "cuda" else _nullcontext()

    # ---- forward ----------------------------------------------------------------------------

    def _row_pass(self, a, b, a_ids, b_ids, offset, scale, bias, bound, mode, col_sum):
        na, nb, d = a.shape[0], b.shape[0], a.shape[1]
        split = self._num_splits(na, nb, a.device, MAX_SPLITS)
        buf = torch.empty((split, na), dtype=torch.float32, device=a.device)
        fixed_col = col_sum is not None
        grid = lambda meta: (triton.cdiv(na, meta["BLOCK_N"]), 1, split)  # noqa: E731
        _sc_forward_kernel[grid](
            a, b, a_ids, b_ids, buf, col_sum if fixed_col else torch.empty(1, device=a.device),
            na, nb, d, a.stride(0), b.stride(0), int(offset), float(scale), float(bias), float(bound), split,
            _bucket(na), _bucket(nb), _bucket(d),
            MODE=int(mode), FIXED_COL=fixed_col, UPCAST=INTERPRET and a.dtype == torch.bfloat16,
            PRECISION=self._precision(a.dtype),
        )  # fmt: skip
        if split == 1:
            return buf[0]
        return buf.sum(dim=0) if mode == MODE_SIGMOID else torch.logsumexp(buf, dim=0)

    def forward(self, u, v, row_ids, col_ids, row_offset, scale, bias, logit_bound, mode, need_col):
        u, v = self._check(u, v)
        n, m = u.shape[0], v.shape[0]
        need_col = bool(need_col) and mode != MODE_SIGMOID
        f32 = dict(dtype=torch.float32, device=u.device)
        empty = torch.empty(0, **f32)
        masked = mode == MODE_SOFTMAX_IGNORE
        if n == 0 or m == 0:  # empty sums: logsumexp = -inf, softplus sum = 0
            fill = 0.0 if mode == MODE_SIGMOID else float("-inf")
            return torch.full((n,), fill, **f32), (torch.full((m,), fill, **f32) if need_col else empty)
        dummy = torch.empty(1, dtype=torch.int64, device=u.device)
        r_ids = self._ids(row_ids if masked else None, col_ids, dummy)
        c_ids = self._ids(col_ids if masked else None, row_ids, dummy)
        fixed = need_col and self._fixed_max(float(logit_bound)) and self._use_atomics()
        col_sum = torch.zeros(m, **f32) if fixed else None
        with self._device_ctx(u):
            row = self._row_pass(u, v, r_ids, c_ids, row_offset, scale, bias, logit_bound, mode, col_sum)
            if not need_col:
                col = empty
            elif fixed:
                col = col_sum.log_().add_(float(logit_bound))
            else:  # column-owned pass: the same kernel on the transposed problem
                col = self._row_pass(v, u, c_ids, r_ids, -row_offset, scale, bias, logit_bound, mode, None)
        return row, col

    # ---- backward ---------------------------------------------------------------------------

    def _weighted_pass(self, a, b, a_ids, b_ids, offset, scale, bias, bound, mode, a_stat, b_stat, a_w, b_w, wsum):
        na, nb, d = a.shape[0], b.shape[0], a.shape[1]
        split = self._num_splits(na, nb, a.device, MAX_SPLITS)
        f32 = dict(dtype=torch.float32, device=a.device)
        out = torch.empty((split, na, d), **f32)
        wbuf = torch.empty((split, na), **f32) if wsum else out
        dummy = torch.empty(1, **f32)
        fixed = mode != MODE_SIGMOID and self._fixed_max(float(bound))
        b_wmax = b_w.abs().amax().reshape(1) if b_w is not None else dummy

        def grid(meta):
            chunks = triton.cdiv(triton.cdiv(d, meta["BLOCK_DO"]), meta["N_ACC"])
            return (triton.cdiv(na, meta["BLOCK_N"]), chunks, split)

        _sc_backward_kernel[grid](
            a, b, a_ids, b_ids,
            dummy if a_stat is None else a_stat, dummy if b_stat is None else b_stat,
            dummy if a_w is None else a_w, dummy if b_w is None else b_w, b_wmax,
            out, wbuf,
            na, nb, d, a.stride(0), b.stride(0), int(offset), float(scale), float(bias), float(bound), split,
            _bucket(na), _bucket(nb), _bucket(d),
            MODE=int(mode), FIXED=fixed, HAS_AW=a_w is not None, HAS_BW=b_w is not None, NEED_WSUM=wsum,
            UPCAST=INTERPRET and a.dtype == torch.bfloat16, PRECISION=self._precision(a.dtype),
        )  # fmt: skip
        res = out[0] if split == 1 else out.sum(dim=0)
        if not wsum:
            return res, None
        return res, (wbuf[0] if split == 1 else wbuf.sum(dim=0))

    def backward(self, u, v, row_ids, col_ids, row_offset, scale, bias, logit_bound, mode, row, col, g, h):
        u, v = self._check(u, v)
        n, m, d = u.shape[0], v.shape[0], u.shape[1]
        f32 = dict(dtype=torch.float32, device=u.device)
        if n == 0 or m == 0:
            return torch.zeros(n, d, **f32), torch.zeros(m, d, **f32), torch.zeros(n, **f32)
        sigmoid = mode == MODE_SIGMOID
        masked = mode == MODE_SOFTMAX_IGNORE

        def vec(x):
            return None if x is None else x.to(torch.float32).contiguous()

        row, col, g = vec(row), vec(col), vec(g)
        h = None if sigmoid else vec(h)
        if h is not None and col is None:
            raise ValueError("col (the column log-sum-exps) is needed when column weights h are given")
        dummy = torch.empty(1, dtype=torch.int64, device=u.device)
        r_ids = self._ids(row_ids if masked else None, col_ids, dummy)
        c_ids = self._ids(col_ids if masked else None, row_ids, dummy)
        common = (scale, bias, logit_bound, mode)
        with self._device_ctx(u):
            # rows: W v and W 1, W_ij = g_i p_ij + h_j q_ij (or g_i sigmoid)
            gu, wsum = self._weighted_pass(
                u, v, r_ids, c_ids, row_offset, *common, None if sigmoid else row, col, g, h, True
            )
            # columns: W^T u, the same sum with the roles of rows and columns exchanged
            if sigmoid:
                gv, _ = self._weighted_pass(v, u, c_ids, r_ids, -row_offset, *common, None, None, None, g, False)
            else:
                gv, _ = self._weighted_pass(v, u, c_ids, r_ids, -row_offset, *common, col, row, h, g, False)
        return gu, gv, wsum


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


CORE = TritonSoftContrastiveCore()

__all__ = [
    "CORE",
    "FIXED_MAX_LIMIT",
    "MODE_SIGMOID",
    "MODE_SOFTMAX",
    "MODE_SOFTMAX_IGNORE",
    "TritonSoftContrastiveCore",
]
