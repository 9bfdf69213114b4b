"""Triton kernels of the soft contrastive loss: the blockwise N x M pass, never storing N x M.

Contract: ``fastcon.reference.sc_core_forward`` / ``sc_core_backward`` (schemas in csrc/ops.cpp).
The autograd Function in ``fastcon/soft_contrastive.py`` does the O(N * (D + C)) target algebra;
``CORE`` below is what it calls. Logits ``s = scale * A B^T`` are computed tile by tile with
``tl.dot`` over D, fp32 accumulation, and thrown away after use.

Each kernel is written once for an "A owns its rows" pass; the column pass is the same kernel
with u/v, ids, statistics and weights exchanged and the row offset negated.
- ``_sc_forward_kernel``: per row an online log-sum-exp with a true running max (or the softplus
  sum of the sigmoid form). Column log-sum-exps come either from a second, column-owned launch,
  or, when the rows are unit vectors (``bounded``: bound = scale), ``0 < scale <=
  FIXED_MAX_LIMIT`` and torch's deterministic mode is off, from the fixed-max trick (SPEC
  section 5) inside the row pass: ``sum_i exp(s_ij - bound) = sum_i p_ij exp(m_i - bound)``
  reuses the row pass's exponentials (one exp per pair in all) and is accumulated with
  ``tl.atomic_add``. Why: the column-owned launch costs a second 2 N M D GEMM and N M more exps
  (2x the forward), while the atomics cost M adds per row block and make the fp32 column sums
  order-dependent (run-to-run differences ~1e-7 relative). Deterministic mode and small
  temperatures (exp(-2 bound) no longer a normal fp32 with room to spare, tau < 1/32) take the
  column-owned sweep. scale and bias live in device memory (0-dim float64 tensors) and are
  read by the kernels, never by the host (no synchronisation): so the scale test is made in
  the kernels, and a bounded launch with column statistics always issues the column-owned
  launch too, which skips its sweep (and only turns the column sums into log-sum-exps) when
  the row pass took them.
- ``_sc_backward_kernel``: recomputes logit tiles and accumulates ``W B`` (and ``W 1``) for the
  rows it owns; launched row-owned (W v, W 1) and column-owned (W^T u). Why not one launch with
  atomics (FlashAttention-2: dK/dV in registers, dQ by atomics): at D = 768 the atomic side moves
  (N / BLOCK_N) M D fp32 read-modify-writes (~100 GB at N = 65536), as costly as the second
  logits GEMM it saves, and non-deterministic. Two launches recompute S once more each but are
  deterministic and atomic-free. With the fixed max ``W_ij = exp(s_ij - bound) (a_i + b_j)``:
  one exp per pair again. W enters ``tl.dot`` in the input dtype (fp16/bf16, like P in
  FlashAttention) after a per-row scale 1 / (|g_i| + max|h|), so fp16 tiles lie in [-1, 1] and
  do not underflow into subnormals; the scale is undone on the fp32 accumulator.
- The positive pair's logit (column i + row_offset of row i) is taken as the autograd Function
  takes the one it subtracts: a float64 dot rounded once to fp32 (O(N D), computed by the
  launcher), substituted in the tiles that cross that diagonal. Small losses are differences of
  two ~1/tau terms; this way they cancel cleanly (N = 1 gives exactly 0) instead of carrying
  two independent fp32 roundings.
- Few row blocks (N < ~34k rows on a 132-SM H100, or few local rows against many gathered
  columns) would idle SMs: the inner dimension is then split over a grid axis (flash-decoding
  style) and partial log-sum-exps / sums are combined with torch (<= 8 splits, O(splits N D)).

D: the forward keeps an A block resident for D <= 256 and streams 64-wide K chunks beyond. The
backward holds A's rows in up to 3 resident chunks (D <= 768 = 3 x 256), loads each
B tile once as the same chunks for both the logits and the product, and keeps the BLOCK_N x D
fp32 accumulator in registers; that register budget is what sizes its tiles (BLOCK_N = 32 at
D = 768: ~220 registers/thread, no spills when compiled for sm_90 and sm_80; every config
spills at 4 chunks). D > 768 streams the logits and recomputes them per group of output chunks.

Precision: fp16/bf16 tiles go to tensor cores with fp32 accumulation; fp32 inputs use
``input_precision="tf32x3"`` on NVIDIA GPUs (about fp32 accuracy from three TF32 MMAs). Its
split operands double shared memory and registers, so fp32 runs smaller tiles and the streamed
backward: a correct but slower path (feed the loss bf16/fp16 embeddings for speed). Under the
interpreter bf16 is upcast to fp32 inside the kernels (its bf16 tl.dot is wrong there).

Tile sizes were checked without a GPU by compiling every config for sm_90 and sm_80 and reading
registers, spills and shared memory (``python benchmarks/triton_resources.py``).

Roofline, H100 SXM, bf16, N = M = 65536 (P = N^2 = 4.3e9 pairs), symmetric softmax, tau >= 1/32
(fixed max). Peaks: 990 TFLOP/s tensor, 3.35 TB/s HBM, MUFU exp ~3.9 Tops/s, FP32 ALU ~31 Tops/s.
                                   D = 256                  D = 768
  forward   MMA  2PD               2.2 TFLOP   2.2 ms       6.6 TFLOP   6.7 ms
            exp  P                 4.3 G       1.1 ms       4.3 G       1.1 ms
            ALU  ~8P               34 G        1.1 ms       34 G        1.1 ms
            L2->SM bytes           17 GB (A resident,        103 GB (A and B streamed,
                                   BLOCK_N = 128: 128 F/B)   128 x 128 tiles: 64 F/B)
  backward  MMA  8PD (2 launches   8.8 TFLOP   8.9 ms       26.4 TFLOP  26.7 ms
                 x (S + product))
            exp  2P                8.6 G       2.2 ms       8.6 G       2.2 ms
            ALU  ~20P              86 G        2.8 ms       86 G        2.8 ms
            L2->SM bytes           34 GB (BLOCK_N = 128:     412 GB (BLOCK_N = 32:
                                   256 F/B per launch)       64 F/B per launch)
  HBM: u and v are read once from HBM (4ND = 67 MB / 201 MB); the per-row-block re-reads of B
  hit L2 (B is 32 MB at D = 256; at D = 768, 96 MB, but the ~132-264 resident CTAs walk it in
  step: ~4 HBM passes, 0.4 GB). Intensity vs HBM ~1e4 FLOP/B >> ridge 295: never HBM-bound.
  Verdict. Not exp-bound at either D: MUFU time is 1/2 (D = 256) and 1/6 (D = 768) of the MMA
  time. D = 256 is tensor-core-bound; exp + ALU (2.2 ms forward) match the MMA time and Triton
  overlaps them only across warps (no FA3-style ping-pong), so expect ~1.5x the MMA bound:
  forward ~3.5 ms, backward ~13 ms; the L2 feed needed (7.7 TB/s forward, 3.9 backward) is at
  the edge of what H100's L2 delivers in the forward. D = 768 would need ~15 TB/s of L2->SM
  feed to run at MMA speed, more than the L2 provides (microbenchmarks report roughly 5-10 TB/s;
  the brief's figures do not include it): on-chip-bandwidth-bound at 64 FLOP/B, forward ~10-20 ms
  and backward ~40-80 ms, with the register file (the D-wide fp32 accumulator) capping the
  backward's BLOCK_N at 32.
  Small temperatures (no fixed max) add the column-owned forward (2x forward FLOPs) and a
  second exp per pair in the backward.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from fastcon.reference import MODE_SIGMOID, MODE_SOFTMAX, MODE_SOFTMAX_IGNORE

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The fixed max is used while the bound (the scale) <= this: exp(s - bound) >= exp(-64) ~ 1.6e-28 stays a
# normal fp32 (underflow starts near exp(-87)), so every term keeps full relative precision.
FIXED_MAX_LIMIT = 32.0
_FIXED_MAX_LIMIT = tl.constexpr(FIXED_MAX_LIMIT)  # for the kernels (which read only constexpr globals)
# Forward: a block of A stays resident (each B tile is one load) up to RESIDENT_MAX_D; beyond
# it the logits stream over D in STREAM_BLOCK_K chunks. Keyed by element size: fp32 operands
# (tf32x3 splits each into two TF32 halves) need about twice the shared memory and registers.
RESIDENT_MAX_D = {2: 64, 4: 64} if INTERPRET else {2: 256, 4: 64}
STREAM_BLOCK_K = {2: 32, 4: 32} if INTERPRET else {2: 64, 4: 32}
# Backward (fp16/bf16): A is held in up to MAX_CHUNKS resident chunks of at most MAX_CHUNK
# columns, each B tile is loaded once as the same chunks and serves both the logits and the
# product, and the output accumulators cover all of D. Beyond MAX_CHUNKS * MAX_CHUNK, and for
# fp32 on GPUs, the streamed path recomputes the logits for each group of output chunks.
MAX_CHUNK = 32 if INTERPRET else 256
MAX_CHUNKS = 2 if INTERPRET else 3
# Split the inner dimension until about this many programs per SM are in flight.
PROGRAMS_PER_SM = 2
MAX_SPLITS = 8
_SPLIT_EST_BLOCK = 64 if INTERPRET else 128  # row-block size assumed when choosing splits

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# autotuning: H100/A100-sized configs on GPUs, one small config per class under the
# interpreter (CI speed). Configs are tagged with the class (dtype, D range) they are sized for.

LOWP, F32 = "lowp", "f32"  # forward classes
D_SMALL, D_CHUNKED, D_STREAMED, D_F32 = "small", "chunked", "streamed", "f32"  # backward classes


def _cfg(warps, stages, cls=None, max_d=None, min_arch=0, maxnreg=None, **kw):
    """A config for a class; ``max_d``: largest D it is kept for, ``min_arch``: smallest compute
    capability it is kept for (sm_80 has fewer registers per thread to spare than sm_90 under
    Triton's layouts, and less shared memory); ``maxnreg=255`` stops ptxas from capping a
    kernel at 128 registers for occupancy and spilling."""
    c = triton.Config(kw, num_warps=warps, num_stages=stages, maxnreg=maxnreg)
    c.cls, c.max_d, c.min_arch = cls, max_d, min_arch
    return c


def _elt(t: torch.Tensor) -> int:
    return 4 if t.dtype == torch.float32 else 2


def _fwd_class(elt: int) -> str:
    return F32 if elt == 4 and not INTERPRET else LOWP


def _bwd_class(d: int, elt: int) -> str:
    if elt == 4 and not INTERPRET:
        return D_F32
    if d <= MAX_CHUNK:
        return D_SMALL
    return D_CHUNKED if d <= MAX_CHUNK * MAX_CHUNKS else D_STREAMED


if INTERPRET:
    _FWD_CONFIGS = [_cfg(4, 1, LOWP, BLOCK_N=64, BLOCK_M=64)]
    _BWD_CONFIGS = [
        _cfg(4, 1, D_SMALL, BLOCK_N=64, BLOCK_M=64, CHUNK=0, N_CHUNK=0),
        _cfg(4, 1, D_CHUNKED, BLOCK_N=64, BLOCK_M=64, CHUNK=0, N_CHUNK=0),
        _cfg(4, 1, D_STREAMED, BLOCK_N=64, BLOCK_M=64, CHUNK=32, N_CHUNK=2),
    ]
else:
    # Sizes checked by compiling for sm_90 / sm_80 (registers, spills, shared memory; see the
    # module docstring): shared memory is the A block (resident D) plus num_stages B tiles.
    # min_arch=90: spills (or exceeds shared memory) on sm_80 at some D; max_d: the same above it.
    _FWD_CONFIGS = [
        _cfg(8, 2, LOWP, min_arch=90, BLOCK_N=128, BLOCK_M=128),
        _cfg(8, 3, LOWP, max_d=128, min_arch=90, BLOCK_N=128, BLOCK_M=128),
        _cfg(8, 3, LOWP, min_arch=90, BLOCK_N=128, BLOCK_M=64),
        _cfg(8, 4, LOWP, min_arch=90, BLOCK_N=128, BLOCK_M=64),
        _cfg(4, 3, LOWP, min_arch=90, BLOCK_N=64, BLOCK_M=128),
        _cfg(4, 4, LOWP, min_arch=90, BLOCK_N=64, BLOCK_M=64),
        _cfg(8, 3, LOWP, BLOCK_N=64, BLOCK_M=64),  # sm_80: the softplus form spills the others
        _cfg(4, 3, LOWP, BLOCK_N=64, BLOCK_M=32),
        _cfg(4, 3, F32, min_arch=90, BLOCK_N=64, BLOCK_M=64),
        # maxnreg: ptxas caps these at 168 registers on sm_80 and spills 4 B in the masked
        # (scene_mode "ignore") column pass after fixed-max column sums
        _cfg(4, 2, F32, maxnreg=255, BLOCK_N=64, BLOCK_M=32),
        _cfg(4, 3, F32, maxnreg=255, BLOCK_N=32, BLOCK_M=32),
        _cfg(8, 3, F32, min_arch=90, BLOCK_N=128, BLOCK_M=64),
    ]
    _BWD_CONFIGS = [
        # D <= 256: one chunk; accumulator BLOCK_N x D fp32 in registers (128 rows spill at D = 256)
        # (sm_90 only: with both forms of W in one kernel, BOUNDED, it spills 16 B on sm_80)
        _cfg(8, 2, D_SMALL, max_d=128, min_arch=90, BLOCK_N=128, BLOCK_M=64, CHUNK=0, N_CHUNK=0),
        _cfg(8, 3, D_SMALL, max_d=128, BLOCK_N=128, BLOCK_M=64, CHUNK=0, N_CHUNK=0),
        _cfg(4, 3, D_SMALL, max_d=128, BLOCK_N=64, BLOCK_M=64, CHUNK=0, N_CHUNK=0),
        _cfg(8, 2, D_SMALL, BLOCK_N=64, BLOCK_M=64, CHUNK=0, N_CHUNK=0),
        _cfg(8, 2, D_SMALL, BLOCK_N=64, BLOCK_M=128, CHUNK=0, N_CHUNK=0),
        # 256 < D <= 768 (MAX_CHUNKS = 3: every resident config spills at 4 chunks): the BLOCK_N x D
        # fp32 accumulator must fit the registers: 32 x 32 tiles with 8 warps at D = 768, 64 rows
        # at D = 512 (32 x 64 spills there too)
        _cfg(8, 2, D_CHUNKED, maxnreg=255, BLOCK_N=32, BLOCK_M=32, CHUNK=0, N_CHUNK=0),
        _cfg(8, 3, D_CHUNKED, BLOCK_N=32, BLOCK_M=32, CHUNK=0, N_CHUNK=0),
        _cfg(8, 2, D_CHUNKED, max_d=512, BLOCK_N=64, BLOCK_M=32, CHUNK=0, N_CHUNK=0),
        # D > 768: logits streamed over D, N_CHUNK x CHUNK output columns per program
        _cfg(8, 2, D_STREAMED, BLOCK_N=32, BLOCK_M=64, CHUNK=128, N_CHUNK=4),
        _cfg(8, 2, D_STREAMED, BLOCK_N=32, BLOCK_M=64, CHUNK=128, N_CHUNK=2),
        _cfg(8, 3, D_STREAMED, BLOCK_N=64, BLOCK_M=64, CHUNK=128, N_CHUNK=2),
        # (128 x 64 with one 128-wide chunk spills 28 B on sm_90 with both forms of W, BOUNDED)
        # fp32 (tf32x3): streamed, small tiles (larger ones spill or exceed shared memory)
        _cfg(4, 2, D_F32, min_arch=90, BLOCK_N=64, BLOCK_M=32, CHUNK=64, N_CHUNK=1),
        _cfg(4, 2, D_F32, BLOCK_N=32, BLOCK_M=64, CHUNK=64, N_CHUNK=1),
        _cfg(4, 2, D_F32, BLOCK_N=32, BLOCK_M=32, CHUNK=64, N_CHUNK=1),
    ]


def _block_k(d: int, elt: int) -> int:
    """Forward K width: all of D (resident) or the streaming chunk."""
    return max(16, triton.next_power_of_2(d)) if d <= RESIDENT_MAX_D[elt] else STREAM_BLOCK_K[elt]


def _chunks(d: int, elt: int, chunk: int, n_chunk: int) -> tuple[int, int]:
    """Backward (CHUNK, N_CHUNK) actually used. Resident classes cover D with the fewest padded
    columns (then the widest chunks): D = 768 -> 3 x 256, D = 384 -> 3 x 128, D = 100 -> 1 x 128.
    The streamed classes use the config's chunks, no more of them than D needs."""
    if _bwd_class(d, elt) in (D_STREAMED, D_F32):
        chunk = min(chunk, max(16, triton.next_power_of_2(d)))
        return chunk, max(1, min(n_chunk, triton.cdiv(d, chunk)))
    best = None
    c = MAX_CHUNK
    while c >= 16:
        n = triton.cdiv(d, c)
        if n <= MAX_CHUNKS:
            cand = (n * c, -c)
            if best is None or cand < best[0]:
                best = (cand, c, n)
        c //= 2
    return best[1], best[2]


def _arch(nargs) -> int:
    """The compute capability to prune for: the inputs' GPU, or ``ARCH`` when the ahead-of-time
    compile check (compile_check.py) prunes for a target; 0 (no limits) off GPUs."""
    if "ARCH" in nargs:
        return nargs["ARCH"]
    t = nargs["a_ptr"]
    if t.device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _fits(c, d: int, arch: int) -> bool:
    return (c.max_d is None or d <= c.max_d) and (arch == 0 or arch >= c.min_arch)


# Pruned so that no config the autotuner can pick spills registers or exceeds the shared memory
# of sm_80 / sm_90: `python -m fastcon.kernels.triton.compile_check` checks every kept config.
def _prune_fwd(configs, nargs, **kwargs):
    cls, arch = _fwd_class(_elt(nargs["a_ptr"])), _arch(nargs)
    kept = [c for c in configs if c.cls == cls and _fits(c, nargs["D"], arch)]
    # the fp16 softplus form spills 44-76 B in 128 x 128 tiles on sm_90 (at D = 128 and 512)
    if nargs.get("MODE", kwargs.get("MODE")) == MODE_SIGMOID and nargs["a_ptr"].dtype == torch.float16:
        kept = [c for c in kept if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] < 128 * 128]
    return kept or configs[:1]


def _prune_bwd(configs, nargs, **kwargs):
    cls, arch = _bwd_class(nargs["D"], _elt(nargs["a_ptr"])), _arch(nargs)
    kept = [c for c in configs if c.cls == cls and _fits(c, nargs["D"], arch)]
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
def _with_positive_logit(s, pos, offs_n, offs_m, t, offset, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """The positive pair's logit as the launcher took it (float64 dot, rounded once, as the
    autograd Function takes it) in place of the tile's fp32 one, so that small losses, the
    difference of two ~1/tau terms, cancel cleanly. Only tiles crossing the diagonal pay."""
    first = tl.program_id(0) * BLOCK_N + offset  # positive column of the block's first row
    if (t * BLOCK_M < first + BLOCK_N) & (t * BLOCK_M + BLOCK_M > first):
        s = tl.where(offs_m[None, :] == offs_n[:, None] + offset, pos[:, None], s)
    return s


@triton.jit
def _log1p(t):
    """log(1 + t) to full fp32 precision for t in [0, 1] (tl has no log1p that the interpreter runs)."""
    u = 1.0 + t
    tiny = u == 1.0
    return tl.where(tiny, t, tl.log(u) * (t / tl.where(tiny, 1.0, u - 1.0)))


@triton.jit
def _scalars(scale_ptr, bias_ptr, MODE: tl.constexpr, BOUNDED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(scale, bias, bound, fixed) of a launch, read from device memory (float64 scalars, used in
    fp32): bound = scale when BOUNDED (|s| <= scale), else 0; fixed: the softmax modes may use the
    bound as a fixed max (exp(s - bound) stays normal)."""
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    bound = 0.0
    fixed = False
    if BOUNDED:
        bound = scale
        if MODE != 2:
            fixed = (scale > 0.0) & (scale <= _FIXED_MAX_LIMIT)
    return scale, bias, bound, fixed


@triton.jit
def _tile_bounds(NB, SPLIT, BLOCK_M: tl.constexpr):
    """The inner tiles [t0, t1) of this program's split."""
    n_tiles = tl.cdiv(NB, BLOCK_M)
    per = tl.cdiv(n_tiles, SPLIT)
    t0 = tl.program_id(2) * per
    return t0, tl.minimum(t0 + per, n_tiles)


# --------------------------------------------------------------------------------------------
# forward: per-row statistics (+ fixed-max column sums)


@triton.autotune(
    configs=_FWD_CONFIGS,
    key=_KEYS + ["FIXED_COL", "COL_OF_FIXED"],
    prune_configs_by={"early_config_prune": _prune_fwd},
    reset_to_zero=["col_sum_ptr"],
)
@triton.heuristics(
    {
        "BLOCK_K": lambda a: _block_k(a["D"], _elt(a["a_ptr"])),
        "RESIDENT": lambda a: a["D"] <= RESIDENT_MAX_D[_elt(a["a_ptr"])],
    }
)
@triton.jit
def _sc_forward_kernel(
    a_ptr, b_ptr, a_ids_ptr, b_ids_ptr, pos_ptr, out_ptr, col_sum_ptr, col_in_ptr, scale_ptr, bias_ptr,
    NA, NB, D, stride_a, stride_b, offset, SPLIT,
    N_KEY, M_KEY, D_KEY,
    MODE: tl.constexpr, BOUNDED: tl.constexpr, HAS_BIAS: tl.constexpr, FIXED_COL: tl.constexpr,
    COL_OF_FIXED: tl.constexpr, HAS_POS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr,
):  # fmt: skip
    """out[split, i] = logsumexp_j s_ij (modes 0, 1) or sum_j softplus(s_ij + bias) (mode 2) over
    this split's columns. scale and bias are read from device memory (no host synchronisation);
    with BOUNDED (|s| <= scale) the fixed max bound = scale is usable while scale <= FIXED_MAX_LIMIT,
    decided here. FIXED_COL: when it is, also col_sum[j] += sum_i exp(s_ij - bound).
    COL_OF_FIXED (the column-owned pass after a FIXED_COL row pass): when it is, no sweep; out
    = log(col_in) + bound (split 0; -inf in the others, which the split merge ignores). col_in
    is col_sum under a name the autotuner does not reset to zero."""
    scale, bias, bound, fixed = _scalars(scale_ptr, bias_ptr, MODE, BOUNDED, HAS_BIAS)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NA
    rows = offs_n.to(tl.int64)
    if RESIDENT:
        a_tile = _load_rows(a_ptr, rows, n_ok, stride_a, 0, D, BLOCK_K, UPCAST)
    a_id = offs_n
    if MODE == 1:
        a_id = tl.load(a_ids_ptr + offs_n, mask=n_ok, other=0)
    pos = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_POS:
        pos = tl.load(pos_ptr + offs_n, mask=n_ok, other=0.0)
    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum of exp(s - m_i), or the softplus sum
    t0, t1 = _tile_bounds(NB, SPLIT, BLOCK_M)
    if COL_OF_FIXED:
        t1 = tl.where(fixed, t0, t1)  # the row pass took the column sums: nothing to sweep
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
        if HAS_POS:
            s = _with_positive_logit(s, pos, offs_n, offs_m, t, offset, BLOCK_N, BLOCK_M)
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
                tl.atomic_add(col_sum_ptr + offs_m, col, mask=tl.where(fixed, m_ok, False))
    if MODE == 2:
        res = l_i
    else:
        # no pair: -inf; a NaN logit made l_i NaN and stays NaN (SPEC section 1), not -inf
        res = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_i)))
    if COL_OF_FIXED:
        col_lse = tl.log(tl.load(col_in_ptr + offs_n, mask=n_ok, other=1.0)) + bound
        res = tl.where(fixed, tl.where(tl.program_id(2) == 0, col_lse, float("-inf")), res)
    tl.store(out_ptr + tl.program_id(2) * NA + offs_n, res, mask=n_ok)


# --------------------------------------------------------------------------------------------
# backward: out = W B and W 1 for the rows this program owns


@triton.jit
def _chunk(ptr, rows, rows_ok, stride, c, D, CHUNK: tl.constexpr, UPCAST: tl.constexpr):
    """Columns [c * CHUNK, (c + 1) * CHUNK) of the given rows."""
    return _load_rows(ptr, rows, rows_ok, stride, c * CHUNK, D, CHUNK, UPCAST)


@triton.jit
def _product(acc, w, b, PRECISION: tl.constexpr):
    """acc += W b with W in b's dtype: fp16/bf16 tensor-core tiles, fp32 accumulation."""
    return tl.dot(w.to(b.dtype), b, acc, input_precision=PRECISION)


@triton.jit
def _store_out(out_ptr, acc, r, rows, n_ok, c, D, NA, CHUNK: tl.constexpr):
    offs_d = c * CHUNK + tl.arange(0, CHUNK)
    base = out_ptr + tl.program_id(2).to(tl.int64) * NA * D
    tl.store(base + rows[:, None] * D + offs_d[None, :], acc * r[:, None], mask=n_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _weights(
    s, valid, offs_m, m_ok, a_coef, a_coef_fixed, a_stat, inv_r, b_w_ptr, b_stat_ptr, bias, bound, fixed,
    MODE: tl.constexpr, BOUNDED: tl.constexpr, HAS_AW: tl.constexpr, HAS_BW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """The tile of W / r (r the row scale) from the logits s; ``fixed`` (run time, from the
    scale; only when BOUNDED) picks the fixed-max form (a_coef_fixed) over the two-stat form."""
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
        b_w = inv_r  # unused without HAS_BW
        b_stat = inv_r
        if HAS_BW:
            b_w = tl.load(b_w_ptr + offs_m, mask=m_ok, other=0.0)
            b_stat = tl.load(b_stat_ptr + offs_m, mask=m_ok, other=0.0)
        if BOUNDED:
            if fixed:
                w = _fixed_weights(s, a_coef_fixed, inv_r, b_w, b_stat, bound, HAS_AW, HAS_BW)
            else:
                w = _two_stat_weights(s, a_coef, a_stat, inv_r, b_w, b_stat, HAS_AW, HAS_BW, BLOCK_N, BLOCK_M)
        else:
            w = _two_stat_weights(s, a_coef, a_stat, inv_r, b_w, b_stat, HAS_AW, HAS_BW, BLOCK_N, BLOCK_M)
    return tl.where(valid, w, 0.0)


@triton.jit
def _fixed_weights(s, a_coef, inv_r, b_w, b_stat, bound, HAS_AW: tl.constexpr, HAS_BW: tl.constexpr):
    """One exp per pair: W = exp(s - bound) * (a_w exp(bound - a_stat) + b_w exp(bound - b_stat))."""
    e = tl.exp(s - bound)
    if HAS_BW:
        b_coef = tl.where(b_stat == float("-inf"), 0.0, b_w * tl.exp(bound - b_stat))
        if HAS_AW:
            w = e * (a_coef[:, None] + inv_r[:, None] * b_coef[None, :])
        else:
            w = e * (inv_r[:, None] * b_coef[None, :])
    else:
        w = e * a_coef[:, None]
    return w


@triton.jit
def _two_stat_weights(
    s, a_coef, a_stat, inv_r, b_w, b_stat, HAS_AW: tl.constexpr, HAS_BW: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """W = a_w exp(s - a_stat) + b_w exp(s - b_stat), without a common max."""
    w = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if HAS_AW:
        w += a_coef[:, None] * tl.exp(s - a_stat[:, None])
    if HAS_BW:
        b_stat = tl.where(b_stat == float("-inf"), 0.0, b_stat)  # columns without pairs: W = 0
        w += (inv_r[:, None] * b_w[None, :]) * tl.exp(s - b_stat[None, :])
    return w


@triton.autotune(
    configs=_BWD_CONFIGS,
    key=_KEYS + ["BOUNDED", "HAS_AW", "HAS_BW"],
    prune_configs_by={"early_config_prune": _prune_bwd},
)
@triton.heuristics(
    {
        "RESIDENT": lambda a: _bwd_class(a["D"], _elt(a["a_ptr"])) in (D_SMALL, D_CHUNKED),
        "BLOCK_K": lambda a: STREAM_BLOCK_K[_elt(a["a_ptr"])],
        "CHUNK": lambda a: _chunks(a["D"], _elt(a["a_ptr"]), a["CHUNK"], a["N_CHUNK"])[0],
        "N_CHUNK": lambda a: _chunks(a["D"], _elt(a["a_ptr"]), a["CHUNK"], a["N_CHUNK"])[1],
    }
)
@triton.jit
def _sc_backward_kernel(
    a_ptr, b_ptr, a_ids_ptr, b_ids_ptr, pos_ptr, a_stat_ptr, b_stat_ptr, a_w_ptr, b_w_ptr, b_wmax_ptr,
    out_ptr, wsum_ptr, scale_ptr, bias_ptr,
    NA, NB, D, stride_a, stride_b, offset, SPLIT,
    N_KEY, M_KEY, D_KEY,
    MODE: tl.constexpr, BOUNDED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_AW: tl.constexpr, HAS_BW: tl.constexpr,
    NEED_WSUM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, W_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr,
    CHUNK: tl.constexpr, N_CHUNK: tl.constexpr,
):  # fmt: skip
    """out[split, i, d] = sum_j W_ij B_jd over this split's columns j, and wsum[split, i] =
    sum_j W_ij. Softmax modes: W_ij = a_w_i exp(s_ij - a_stat_i) + b_w_j exp(s_ij - b_stat_j);
    sigmoid: W_ij = (a_w_i or b_w_j) sigmoid(s_ij + bias).
    RESIDENT: A's rows sit in N_CHUNK chunks of CHUNK columns; each B tile is loaded once, as
    the same chunks, for the logits and the product; one program covers all of D.
    Otherwise the logits stream over D and program_id(1) picks N_CHUNK x CHUNK output columns.
    scale and bias are read from device memory; with BOUNDED the fixed max (bound = scale) is
    used while it is usable, decided here (run time) as in the forward."""
    scale, bias, bound, fixed = _scalars(scale_ptr, bias_ptr, MODE, BOUNDED, HAS_BIAS)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NA
    rows = offs_n.to(tl.int64)
    c0 = tl.program_id(1) * N_CHUNK  # first output chunk of this program (0 when RESIDENT)
    if RESIDENT:
        a0 = _chunk(a_ptr, rows, n_ok, stride_a, 0, D, CHUNK, UPCAST)
        if N_CHUNK > 1:
            a1 = _chunk(a_ptr, rows, n_ok, stride_a, 1, D, CHUNK, UPCAST)
        if N_CHUNK > 2:
            a2 = _chunk(a_ptr, rows, n_ok, stride_a, 2, D, CHUNK, UPCAST)
        if N_CHUNK > 3:
            a3 = _chunk(a_ptr, rows, n_ok, stride_a, 3, D, CHUNK, UPCAST)
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
    a_coef_fixed = a_coef
    a_stat = r
    if MODE != 2:
        if HAS_AW:
            a_stat = tl.load(a_stat_ptr + offs_n, mask=n_ok, other=0.0)
            if BOUNDED:  # fixed max: a_w exp(s - a_stat) = exp(s - bound) * a_w exp(bound - a_stat)
                a_coef_fixed = tl.where(a_stat == float("-inf"), 0.0, a_coef * tl.exp(bound - a_stat))
            a_stat = tl.where(a_stat == float("-inf"), 0.0, a_stat)  # rows without pairs: W = 0

    pos = r
    if HAS_POS:
        pos = tl.load(pos_ptr + offs_n, mask=n_ok, other=0.0)

    acc0 = tl.zeros((BLOCK_N, CHUNK), dtype=tl.float32)
    if N_CHUNK > 1:
        acc1 = tl.zeros((BLOCK_N, CHUNK), dtype=tl.float32)
    if N_CHUNK > 2:
        acc2 = tl.zeros((BLOCK_N, CHUNK), dtype=tl.float32)
    if N_CHUNK > 3:
        acc3 = tl.zeros((BLOCK_N, CHUNK), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t0, t1 = _tile_bounds(NB, SPLIT, BLOCK_M)
    for t in range(t0, t1):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < NB
        cols = offs_m.to(tl.int64)
        if RESIDENT:
            b0 = _chunk(b_ptr, cols, m_ok, stride_b, 0, D, CHUNK, UPCAST)
            s = tl.dot(a0, tl.trans(b0), input_precision=PRECISION)
            if N_CHUNK > 1:
                b1 = _chunk(b_ptr, cols, m_ok, stride_b, 1, D, CHUNK, UPCAST)
                s = tl.dot(a1, tl.trans(b1), s, input_precision=PRECISION)
            if N_CHUNK > 2:
                b2 = _chunk(b_ptr, cols, m_ok, stride_b, 2, D, CHUNK, UPCAST)
                s = tl.dot(a2, tl.trans(b2), s, input_precision=PRECISION)
            if N_CHUNK > 3:
                b3 = _chunk(b_ptr, cols, m_ok, stride_b, 3, D, CHUNK, UPCAST)
                s = tl.dot(a3, tl.trans(b3), s, input_precision=PRECISION)
        else:
            s = _streamed_dot(
                a_ptr, b_ptr, rows, n_ok, cols, m_ok, D, stride_a, stride_b, BLOCK_N, BLOCK_M, BLOCK_K, UPCAST,
                PRECISION,
            )  # fmt: skip
            b0 = _chunk(b_ptr, cols, m_ok, stride_b, c0, D, CHUNK, UPCAST)
            if N_CHUNK > 1:
                b1 = _chunk(b_ptr, cols, m_ok, stride_b, c0 + 1, D, CHUNK, UPCAST)
            if N_CHUNK > 2:
                b2 = _chunk(b_ptr, cols, m_ok, stride_b, c0 + 2, D, CHUNK, UPCAST)
            if N_CHUNK > 3:
                b3 = _chunk(b_ptr, cols, m_ok, stride_b, c0 + 3, D, CHUNK, UPCAST)
        s = s * scale
        if HAS_POS:
            s = _with_positive_logit(s, pos, offs_n, offs_m, t, offset, BLOCK_N, BLOCK_M)
        valid = _pairs(offs_n, n_ok, offs_m, m_ok, a_id, b_ids_ptr, offset, MODE)
        w = _weights(
            s, valid, offs_m, m_ok, a_coef, a_coef_fixed, a_stat, inv_r, b_w_ptr, b_stat_ptr, bias, bound, fixed,
            MODE, BOUNDED, HAS_AW, HAS_BW, BLOCK_N, BLOCK_M,
        )  # fmt: skip
        if NEED_WSUM:
            wsum += tl.sum(w, 1)
        acc0 = _product(acc0, w, b0, W_PRECISION)
        if N_CHUNK > 1:
            acc1 = _product(acc1, w, b1, W_PRECISION)
        if N_CHUNK > 2:
            acc2 = _product(acc2, w, b2, W_PRECISION)
        if N_CHUNK > 3:
            acc3 = _product(acc3, w, b3, W_PRECISION)
    _store_out(out_ptr, acc0, r, rows, n_ok, c0, D, NA, CHUNK)
    if N_CHUNK > 1:
        _store_out(out_ptr, acc1, r, rows, n_ok, c0 + 1, D, NA, CHUNK)
    if N_CHUNK > 2:
        _store_out(out_ptr, acc2, r, rows, n_ok, c0 + 2, D, NA, CHUNK)
    if N_CHUNK > 3:
        _store_out(out_ptr, acc3, r, rows, n_ok, c0 + 3, D, NA, CHUNK)
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

    sync_free = True  # the GPU code path: the loss checks values with torch._assert_async

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

    @staticmethod
    def _check_ids(mode, row_ids, col_ids):
        if mode == MODE_SOFTMAX_IGNORE and (row_ids is None or col_ids is None):
            raise ValueError("mode 1 (same-id pairs left out) needs row_ids and col_ids")

    def _use_atomics(self) -> bool:
        det = torch.are_deterministic_algorithms_enabled() if self.deterministic is None else self.deterministic
        return not det

    @staticmethod
    def _scalar(x, device) -> torch.Tensor | None:
        """scale / bias as the kernels read them: a 0-dim float64 tensor on the device (a number,
        as tests pass, becomes one; None stays None). Never read on the host."""
        if x is None or isinstance(x, torch.Tensor):
            return None if x is None else x.to(device=device, dtype=torch.float64)
        return torch.full((), float(x), dtype=torch.float64, device=device)

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

    @staticmethod
    def _positive_logits(a, b, offset, scale, rows: int = 4096):
        """scale * (a_i . b_{i + offset}) accumulated in float64 and rounded once to fp32, the way
        the autograd Function takes the positive logits it subtracts (0 where i + offset is out
        of range); None when no row has its positive in range."""
        na, nb = a.shape[0], b.shape[0]
        lo, hi = max(0, -offset), min(na, nb - offset)
        if lo >= hi:
            return None
        out = torch.zeros(na, dtype=torch.float32, device=a.device)
        for i in range(lo, hi, rows):  # O(rows * D) float64 scratch
            j = min(i + rows, hi)
            out[i:j] = scale * (a[i:j].double() * b[i + offset : j + offset].double()).sum(dim=1)
        return out

    @staticmethod
    def _transposed(pos, offset, m):
        """The positive logits indexed by column (column j's positive is row j - offset)."""
        if pos is None:
            return None
        n = pos.shape[0]
        lo, hi = max(0, -offset), min(n, m - offset)
        out = torch.zeros(m, dtype=torch.float32, device=pos.device)
        out[lo + offset : hi + offset] = pos[lo:hi]
        return out

    def _device_ctx(self, t: torch.Tensor):
        return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()

    # ---- forward ----------------------------------------------------------------------------

    def _row_pass(self, a, b, a_ids, b_ids, pos, offset, scale, bias, bounded, mode, col_sum, col_of_fixed=False):
        """col_sum: the fixed-max column sums, taken by this pass (a row pass) or, with
        col_of_fixed (the column-owned pass after it), turned into log-sum-exps where the kernels
        found the fixed max usable; a sweep of their own otherwise."""
        na, nb, d = a.shape[0], b.shape[0], a.shape[1]
        split = self._num_splits(na, nb, a.device, MAX_SPLITS)
        buf = torch.empty((split, na), dtype=torch.float32, device=a.device)
        fixed_col = col_sum is not None and not col_of_fixed
        grid = lambda meta: (triton.cdiv(na, meta["BLOCK_N"]), 1, split)  # noqa: E731
        dummy = torch.empty(1, device=a.device)
        _sc_forward_kernel[grid](
            a, b, a_ids, b_ids, buf if pos is None else pos, buf,
            col_sum if fixed_col else dummy, col_sum if col_of_fixed else dummy, scale,
            scale if bias is None else bias,
            na, nb, d, a.stride(0), b.stride(0), int(offset), split,
            _bucket(na), _bucket(nb), _bucket(d),
            MODE=int(mode), BOUNDED=bool(bounded), HAS_BIAS=bias is not None, FIXED_COL=fixed_col,
            COL_OF_FIXED=col_of_fixed, HAS_POS=pos is not None,
            UPCAST=INTERPRET and a.dtype == torch.bfloat16, PRECISION=self._precision(a.dtype),
        )  # fmt: skip
        if split == 1:
            return buf[0]
        return buf.sum(dim=0) if mode == MODE_SIGMOID else torch.logsumexp(buf, dim=0)

    def forward(self, u, v, row_ids, col_ids, row_offset, scale, bias, bounded, mode, need_col):
        u, v = self._check(u, v)
        self._check_ids(mode, row_ids, col_ids)
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
        scale, bias = self._scalar(scale, u.device), self._scalar(bias, u.device)
        # the fixed-max column sums in the row pass, where the kernels find the bound usable
        fixed = need_col and bool(bounded) and mode != MODE_SIGMOID and self._use_atomics()
        col_sum = torch.zeros(m, **f32) if fixed else None
        with self._device_ctx(u):
            pos = self._positive_logits(u, v, int(row_offset), scale)
            row = self._row_pass(u, v, r_ids, c_ids, pos, row_offset, scale, bias, bounded, mode, col_sum)
            if not need_col:
                col = empty
            else:  # column-owned pass: the same kernel on the transposed problem (no sweep if fixed)
                pos_t = self._transposed(pos, int(row_offset), m)
                col = self._row_pass(v, u, c_ids, r_ids, pos_t, -row_offset, scale, bias, bounded, mode, col_sum, fixed)
        return row, col

    # ---- backward ---------------------------------------------------------------------------

    def _weighted_pass(
        self, a, b, a_ids, b_ids, pos, offset, scale, bias, bounded, mode, a_stat, b_stat, a_w, b_w, wsum
    ):
        na, nb, d = a.shape[0], b.shape[0], a.shape[1]
        split = self._num_splits(na, nb, a.device, MAX_SPLITS)
        f32 = dict(dtype=torch.float32, device=a.device)
        out = torch.empty((split, na, d), **f32)
        wbuf = torch.empty((split, na), **f32) if wsum else out
        dummy = torch.empty(1, **f32)
        b_wmax = b_w.abs().amax().reshape(1) if b_w is not None else dummy
        prec = self._precision(a.dtype)

        def grid(meta):
            chunks = triton.cdiv(triton.cdiv(d, meta["CHUNK"]), meta["N_CHUNK"])
            return (triton.cdiv(na, meta["BLOCK_N"]), chunks, split)

        _sc_backward_kernel[grid](
            a, b, a_ids, b_ids, dummy if pos is None else pos,
            dummy if a_stat is None else a_stat, dummy if b_stat is None else b_stat,
            dummy if a_w is None else a_w, dummy if b_w is None else b_w, b_wmax,
            out, wbuf, scale, scale if bias is None else bias,
            na, nb, d, a.stride(0), b.stride(0), int(offset), split,
            _bucket(na), _bucket(nb), _bucket(d),
            MODE=int(mode), BOUNDED=bool(bounded) and mode != MODE_SIGMOID, HAS_BIAS=bias is not None,
            HAS_POS=pos is not None, HAS_AW=a_w is not None, HAS_BW=b_w is not None, NEED_WSUM=wsum,
            UPCAST=INTERPRET and a.dtype == torch.bfloat16, PRECISION=prec, W_PRECISION=prec,
        )  # fmt: skip
        res = out[0] if split == 1 else out.sum(dim=0)
        if not wsum:
            return res, None
        return res, (wbuf[0] if split == 1 else wbuf.sum(dim=0))

    def backward(self, u, v, row_ids, col_ids, row_offset, scale, bias, bounded, mode, row, col, g, h):
        u, v = self._check(u, v)
        self._check_ids(mode, row_ids, col_ids)
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
        scale, bias = self._scalar(scale, u.device), self._scalar(bias, u.device)
        common = (scale, bias, bounded, mode)
        off = int(row_offset)
        with self._device_ctx(u):
            pos = self._positive_logits(u, v, off, scale)
            # rows: W v and W 1, W_ij = g_i p_ij + h_j q_ij (or g_i sigmoid)
            gu, wsum = self._weighted_pass(
                u, v, r_ids, c_ids, pos, off, *common, None if sigmoid else row, col, g, h, True
            )
            # columns: W^T u, the same sum with the roles of rows and columns exchanged
            pos_t = self._transposed(pos, off, m)
            if sigmoid:
                gv, _ = self._weighted_pass(v, u, c_ids, r_ids, pos_t, -off, *common, None, None, None, g, False)
            else:
                gv, _ = self._weighted_pass(v, u, c_ids, r_ids, pos_t, -off, *common, col, row, h, g, False)
        return gu, gv, wsum


CORE = TritonSoftContrastiveCore()

__all__ = [
    "CORE",
    "FIXED_MAX_LIMIT",
    "MODE_SIGMOID",
    "MODE_SOFTMAX",
    "MODE_SOFTMAX_IGNORE",
    "TritonSoftContrastiveCore",
]
