"""The whole soft contrastive loss on Triton for one process (issue 13): the algebra around the
blockwise pass (normalisation, low-rank target sums, per-sample losses, reduction, target
subtraction, normalisation backward, temperature / bias gradients) inside Triton kernels
instead of ~40 torch ops (fastcon/_sc_algebra.py). SPEC sections 1 and 5.

Launch split (B = row blocks of ``BLOCK_N`` rows; P = min(B, PROLOGUE_PROGRAMS) prologue
programs). Every reduction over N is deterministic: partials summed in a fixed order, either by
the next launch or by the block that finishes an epilogue last (a block counter, zeroed by the
prologue, elects it; the atomic decides who sums, not the order). The only other atomics are
the existing tile kernels' fixed-max column sums, which deterministic mode turns off.

forward (5 launches; 4 without the column pass or without labels, 3 with neither)
  1. ``_prologue_kernel`` (P programs, each over its row blocks): row norms of z1, z2, the
     normalised rows in the kernel dtype, the positive logits ``scale * u_i . v_i`` (float64
     dot of the rounded rows, rounded once, as the tile kernels substitute them), partial class
     projections ``lhat^T v``, ``lhat^T u`` (symmetric) and ``sum lhat`` into the program's slot
     (multi-label only); program 0: the logit scale ``1 / tau`` read from the device, the
     block counter, the temperature / bias checks; every block: its label checks.
  2. ``_reduce_kernel`` (multi-label only): the slots summed in order, the label checks' flags.
     Then the value checks' ``torch._assert_async`` (no host read), before the tile pass.
  3. the tile pass: ``_sc_forward_kernel`` row-owned (row log-sum-exps / softplus sums),
  4. and column-owned (symmetric softmax only; no sweep when the row pass took the fixed-max
     column sums).
  5. ``_fwd_epilogue_kernel`` (B programs): merges inner-dimension splits, the target sums
     ``R_i`` and ``sum_j T_ij s_ij`` (float64, rounded once) from the projections, the
     per-sample losses; mean / sum: one partial per block, summed by the last block.
backward (5 launches; 4 without labels and for a mean / sum, one less without the column pass)
  1. ``_prologue_kernel`` again, with the saved norms (not recomputed): normalised rows,
     positive logits, the upstream weights ``g`` (per-block ``max |g|``; for a mean / sum g is
     one value and program 0 writes ``max |g|``), and the partial projections of the target
     subtraction: ``lhat^T v``, ``lhat^T (w u)`` and for the symmetric softmax ``lhat^T (w v)``,
     ``lhat^T u`` (``w = g / R`` softmax, ``g`` sigmoid).
  2. ``_reduce_kernel`` (multi-label, or reduction "none"): the projections and ``max |g|``
     (the tile kernels' row scale).
  3. / 4. the tile pass: ``_sc_backward_kernel`` row-owned (``W v``, ``W 1``) and column-owned
     (``W^T u``).
  5. ``_bwd_epilogue_kernel`` (B programs): merges splits, subtracts the target part, takes the
     gradient through the normalisation (dz1, dz2 in the inputs' dtype), per-block partials of
     the temperature and bias gradients, summed by the last block into ``d tau``, ``d bias``.

Saved for backward: the inputs and O(N) statistics (row / column log-sum-exps, target row sums,
row norms). Covered: every single-process call. Labels None, (N, C) multi-label vectors or (N,)
scene ids (both scene modes), softmax (symmetric or not), sigmoid (with bias), hard_weight,
every reduction, normalize True / False, and the key queue (SPEC section 1b).

Scene ids (no reduction launch: 4 / 3 forward, 4 / 3 backward with / without the column pass,
plus the backward reduction for reduction "none"). The prologue writes the ids of the rows and
the queue keys as int64 (read in their own dtype and stride: no conversion op). As positives
(``SCENES``): no projections; the epilogues take per-scene sums per row block by comparing the
block's ids with each column tile's ids and, in a matching tile, adding each matching column's
row chunk where the ids match (``_scene_sums_fwd`` / ``_scene_sums_bwd``; fixed order, no sort,
no host read; tiles and columns without a match skipped). ``scene_mode="ignore"``: the tile kernels' mode 1 with the ids; no R (the target
is the positive alone: the formulas of labels None with R = 1).

Key queue (no column pass: row losses only). The prologue normalises the K keys like z2 into the
rows N.. of one (N + K, D) column matrix (z2's rows first; its norms are recomputed in the
backward), adds their part to the first projection and to sum lhat (multi-label), and checks
their labels; the row passes run over the N + K columns, the column-owned backward pass over the
N batch columns (the queue gets no gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcon._sc_algebra import _label_value_messages
from fastcon.kernels.triton import soft_contrastive as sc
from fastcon.reference import MODE_SIGMOID, MODE_SOFTMAX, MODE_SOFTMAX_IGNORE

_EPS = 1e-12  # the spec's norm floor
BLOCK_N = 32  # rows per program of the prologue / epilogues
BLOCK_D = 32  # feature chunk (64 spills registers in the prologue and the forward epilogue on sm_90)
BLOCK_C = 16  # class chunk of the projections (tl.dot needs >= 16)
SCENE_BLOCK_M = tl.constexpr(32)  # column tile of the epilogues' per-scene sums (tl.dot needs >= 16)
REDUCE_BLOCK = 256
PROLOGUE_PROGRAMS = 128  # at most this many prologue programs (slots of partial projections)
# the prologue's launch options: ptxas caps it at 168 registers and spills otherwise (compiled
# for sm_80 / sm_90 by compile_check.py); the interpreter ignores them
PROLOGUE_OPTIONS = {"maxnreg": 255}
# the epilogues with per-scene sums: without it ptxas caps them below what they need on sm_90
# (64-96 registers) and spills a few bytes in the nested column loops
SCENE_OPTIONS = {"maxnreg": 255}


# --------------------------------------------------------------------------------------------
# launch counting (tests): every launch of this module goes through _launch


LAUNCHES = {"count": 0}


def _launch(kernel, grid, *args, **kw):
    LAUNCHES["count"] += 1
    kernel[grid](*args, **kw)


# --------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _lhat_inv(lab_ptr, rows, rok, s_lab, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """1 / ||l_i|| (0 for a zero row)."""
    lsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        lab = tl.load(
            lab_ptr + rows[:, None] * s_lab + offs_c[None, :], mask=rok[:, None] & (offs_c[None, :] < C), other=0
        )
        lab = lab.to(tl.float32)
        lsq += tl.sum(lab * lab, 1)
    norm = tl.sqrt(lsq)
    return tl.where(norm > 0, 1.0 / tl.where(norm > 0, norm, 1.0), 0.0)


@triton.jit
def _project(part_ptr, lh_t, x, offs_c, offs_d, C, D, again):
    """part[c, d] (+)= sum over the block's rows of lhat_ic x_id (fp32, IEEE products); again:
    add to what the slot holds."""
    ptrs = part_ptr + offs_c[:, None] * D + offs_d[None, :]
    m = (offs_c[:, None] < C) & (offs_d[None, :] < D)
    p = tl.dot(lh_t, x, input_precision="ieee") + tl.load(ptrs, mask=m & again, other=0.0)
    tl.store(ptrs, p, mask=m)


@triton.jit
def _to_kernel_dtype(x, ptr, RNE_BF16: tl.constexpr):
    """x (fp32) in ptr's element type. RNE_BF16: round to nearest even by hand (the interpreter
    truncates fp32 -> bf16; a GPU rounds to nearest even, as torch does)."""
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _scale64(tau_ptr):
    """1 / tau in float64, as the general path takes it (``temperature.double().reciprocal()``)."""
    return 1.0 / tl.load(tau_ptr).to(tl.float64)


@triton.jit
def _label_flags(lab_ptr, rows, rok, s_lab, C, LAB_FLOAT: tl.constexpr, LAB_BOOL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """(all finite, all >= 0) of a block's label rows, as 1.0 / 0.0."""
    finite = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    nonneg = finite
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = rok[:, None] & (offs_c[None, :] < C)
        lab = tl.load(lab_ptr + rows[:, None] * s_lab + offs_c[None, :], mask=mc, other=0)
        if LAB_FLOAT:
            fin = (lab == lab) & (tl.abs(lab) < float("inf"))
            finite = tl.minimum(finite, tl.min(tl.where(fin, 1.0, 0.0), 1))
        if not LAB_BOOL:
            nonneg = tl.minimum(nonneg, tl.min(tl.where(lab >= 0, 1.0, 0.0), 1))
    return tl.min(finite, 0), tl.min(nonneg, 0)


@triton.jit
def _prologue_kernel(
    z1_ptr, z2_ptr, lab_ptr, tau_ptr, bias_ptr, go_ptr, r_ptr,
    uk_ptr, vk_ptr, n1_ptr, n2_ptr, pos_ptr, g_ptr, part_ptr, gmax_ptr, zero_ptr,
    scale_out_ptr, counter_ptr, ok_tau_ptr, ok_bias_ptr, lflag_ptr, gmax_out_ptr,
    q_ptr, qlab_ptr, ids_in_ptr, qids_in_ptr, ids_ptr,
    N, D, C, s_z1, s_z2, s_lab, PART, g_factor, NBLK, NPROG, K, s_q, s_qlab, s_ids, s_qids, QBLK,
    BACKWARD: tl.constexpr, NORMALIZE: tl.constexpr, HAS_LABELS: tl.constexpr, NPROJ: tl.constexpr,
    SIGMOID: tl.constexpr, GO_VECTOR: tl.constexpr, ZERO: tl.constexpr, RNE_BF16: tl.constexpr,
    CHECK: tl.constexpr, HAS_BIAS: tl.constexpr, LAB_FLOAT: tl.constexpr, LAB_BOOL: tl.constexpr,
    GMAX_DIRECT: tl.constexpr, HAS_QUEUE: tl.constexpr, QLAB_FLOAT: tl.constexpr, QLAB_BOOL: tl.constexpr,
    IDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Forward: norms (stored), normalised rows, positive logits, projections [v, u][:NPROJ] and
    sum lhat. Backward: the saved norms, normalised rows, positive logits, g = go * g_factor,
    max |g| per block, projections [v, w u, w v, u][:NPROJ]. ZERO: zero the rows' entries of
    zero_ptr (the fixed-max column sums the row pass accumulates into).
    Program 0 also writes the logit scale in fp32 (what the tile kernels read), zeroes the
    epilogue's block counter, and with CHECK the value checks' flags (1: fine, 0: not): the
    temperature (its inverse finite and > 0), the bias (finite); every program the flags of its
    label rows (finite, >= 0). GMAX_DIRECT: g is one value (reduction mean / sum): max |g| too.
    Grid: NPROG programs (at most PROLOGUE_PROGRAMS), each taking row blocks pid, pid + NPROG, ...
    and summing their projections into its own slot of part_ptr (no atomics): the partial
    projections take NPROG * PART floats, whatever N.
    HAS_QUEUE: the K queue keys (QBLK blocks, taken the same way after the row blocks) normalised
    like z2 (norms recomputed in the backward: they are not saved) into the rows N.. of vk_ptr
    (the M = N + K columns; without normalisation a copy, as the columns must be one matrix);
    with multi-label queue_labels their part of the first projection (lhat_q^T q) and, forward,
    of sum lhat, and their label flags after the rows' ones. IDS: the scene ids of the rows and
    of the queue keys (any integer dtype and stride) as int64 into ids_ptr (N + K entries), what
    the tile kernels and the epilogues compare."""
    pid = tl.program_id(0)
    scale = _scale64(tau_ptr)
    if pid == 0:
        tl.store(scale_out_ptr, scale.to(tl.float32))
        tl.store(counter_ptr, 0.0)
        if CHECK:
            tl.store(ok_tau_ptr, tl.where((scale > 0.0) & (scale <= 3.4028234663852886e38), 1.0, 0.0))
            if HAS_BIAS:
                b = tl.load(bias_ptr).to(tl.float64)
                tl.store(ok_bias_ptr, tl.where((b == b) & (tl.abs(b) < float("inf")), 1.0, 0.0))
        if GMAX_DIRECT:
            tl.store(gmax_out_ptr, tl.abs(tl.load(go_ptr).to(tl.float32) * g_factor))
    for blk in range(pid, NBLK, NPROG):  # this program's row blocks, accumulated into its slot
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rok = offs_n < N
        rows = offs_n.to(tl.int64)
        again = blk != pid  # the slot holds earlier blocks' projections
        if IDS:
            tl.store(ids_ptr + rows, tl.load(ids_in_ptr + rows * s_ids, mask=rok, other=0).to(tl.int64), mask=rok)
        if CHECK and HAS_LABELS:
            fin, neg = _label_flags(lab_ptr, rows, rok, s_lab, C, LAB_FLOAT, LAB_BOOL, BLOCK_N, BLOCK_C)
            tl.store(lflag_ptr + 2 * blk, fin)
            tl.store(lflag_ptr + 2 * blk + 1, neg)
        if ZERO:
            tl.store(zero_ptr + offs_n, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=rok)
        n1 = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
        n2 = n1
        if NORMALIZE:
            if BACKWARD:
                n1 = tl.load(n1_ptr + offs_n, mask=rok, other=1.0)
                n2 = tl.load(n2_ptr + offs_n, mask=rok, other=1.0)
            else:
                ss1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
                ss2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    m = rok[:, None] & (offs_d[None, :] < D)
                    x1 = tl.load(z1_ptr + rows[:, None] * s_z1 + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
                    x2 = tl.load(z2_ptr + rows[:, None] * s_z2 + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
                    ss1 += tl.sum(x1 * x1, 1)
                    ss2 += tl.sum(x2 * x2, 1)
                n1 = tl.maximum(tl.sqrt(ss1), 1e-12)
                n2 = tl.maximum(tl.sqrt(ss2), 1e-12)
                tl.store(n1_ptr + offs_n, n1, mask=rok)
                tl.store(n2_ptr + offs_n, n2, mask=rok)
        w = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if BACKWARD:
            if GO_VECTOR:
                g = tl.load(go_ptr + offs_n, mask=rok, other=0.0).to(tl.float32) * g_factor
            else:
                g = tl.zeros((BLOCK_N,), dtype=tl.float32) + tl.load(go_ptr).to(tl.float32) * g_factor
            g = tl.where(rok, g, 0.0)
            tl.store(g_ptr + offs_n, g, mask=rok)
            tl.store(gmax_ptr + blk, tl.max(tl.abs(g), 0))
            w = g
            if HAS_LABELS and not SIGMOID:
                w = g / tl.load(r_ptr + offs_n, mask=rok, other=1.0)
        linv = n1
        if HAS_LABELS:
            linv = _lhat_inv(lab_ptr, rows, rok, s_lab, C, BLOCK_N, BLOCK_C)
        base = part_ptr + pid.to(tl.int64) * PART
        pos = tl.zeros((BLOCK_N,), dtype=tl.float64)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m = rok[:, None] & (offs_d[None, :] < D)
            x1 = tl.load(z1_ptr + rows[:, None] * s_z1 + offs_d[None, :], mask=m, other=0.0)
            x2 = tl.load(z2_ptr + rows[:, None] * s_z2 + offs_d[None, :], mask=m, other=0.0)
            if NORMALIZE:
                uk = _to_kernel_dtype(x1.to(tl.float32) / n1[:, None], uk_ptr, RNE_BF16)
                tl.store(uk_ptr + rows[:, None] * D + offs_d[None, :], uk, mask=m)
                u = uk.to(tl.float32)
            else:
                u = x1.to(tl.float32)
            if NORMALIZE or HAS_QUEUE:  # with a queue the columns are one (M, D) matrix: a copy
                vk = _to_kernel_dtype(x2.to(tl.float32) / n2[:, None], vk_ptr, RNE_BF16)
                tl.store(vk_ptr + rows[:, None] * D + offs_d[None, :], vk, mask=m)
                v = vk.to(tl.float32)
            else:
                v = x2.to(tl.float32)
            pos += tl.sum(u.to(tl.float64) * v.to(tl.float64), 1)
            if HAS_LABELS:
                for c0 in range(0, C, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    mc = rok[:, None] & (offs_c[None, :] < C)
                    lab = tl.load(lab_ptr + rows[:, None] * s_lab + offs_c[None, :], mask=mc, other=0).to(tl.float32)
                    lh = lab * linv[:, None]
                    lh_t = tl.trans(lh)
                    CD = C * D
                    _project(base, lh_t, v, offs_c, offs_d, C, D, again)
                    if BACKWARD:
                        _project(base + CD, lh_t, u * w[:, None], offs_c, offs_d, C, D, again)
                        if NPROJ > 2:
                            _project(base + 2 * CD, lh_t, v * w[:, None], offs_c, offs_d, C, D, again)
                            _project(base + 3 * CD, lh_t, u, offs_c, offs_d, C, D, again)
                    else:
                        if NPROJ > 1:
                            _project(base + CD, lh_t, u, offs_c, offs_d, C, D, again)
                        if d0 == 0:
                            s_ptrs = base + NPROJ * CD + offs_c
                            prev = tl.load(s_ptrs, mask=(offs_c < C) & again, other=0.0)
                            tl.store(s_ptrs, tl.sum(lh, 0) + prev, mask=offs_c < C)
        tl.store(pos_ptr + offs_n, (pos * scale).to(tl.float32), mask=rok)
        tl.debug_barrier()  # this block's slot updates before the next block reads them
    if HAS_QUEUE:
        for qb in range(pid, QBLK, NPROG):  # this program's queue blocks, after its row blocks
            _queue_block(
                q_ptr, qlab_ptr, qids_in_ptr, ids_ptr, vk_ptr, lflag_ptr, part_ptr + pid.to(tl.int64) * PART,
                qb, N, K, D, C, s_q, s_qlab, s_qids, NBLK,
                BACKWARD, NORMALIZE, HAS_LABELS, NPROJ, RNE_BF16, CHECK, QLAB_FLOAT, QLAB_BOOL, IDS,
                BLOCK_N, BLOCK_D, BLOCK_C,
            )  # fmt: skip
            tl.debug_barrier()


@triton.jit
def _queue_block(
    q_ptr, qlab_ptr, qids_in_ptr, ids_ptr, vk_ptr, lflag_ptr, base, qb, N, K, D, C, s_q, s_qlab, s_qids, NBLK,
    BACKWARD: tl.constexpr, NORMALIZE: tl.constexpr, HAS_LABELS: tl.constexpr, NPROJ: tl.constexpr,
    RNE_BF16: tl.constexpr, CHECK: tl.constexpr, QLAB_FLOAT: tl.constexpr, QLAB_BOOL: tl.constexpr,
    IDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One block of queue keys: normalised into the columns N + k of vk_ptr; their ids; with
    multi-label queue_labels their flags and their part of the program's slot (which its row
    blocks wrote: added to)."""
    offs_q = qb * BLOCK_N + tl.arange(0, BLOCK_N)
    qok = offs_q < K
    qrows = offs_q.to(tl.int64)
    cols = qrows + N
    if IDS:
        tl.store(ids_ptr + cols, tl.load(qids_in_ptr + qrows * s_qids, mask=qok, other=0).to(tl.int64), mask=qok)
    if CHECK and HAS_LABELS:
        fin, neg = _label_flags(qlab_ptr, qrows, qok, s_qlab, C, QLAB_FLOAT, QLAB_BOOL, BLOCK_N, BLOCK_C)
        tl.store(lflag_ptr + 2 * (NBLK + qb), fin)
        tl.store(lflag_ptr + 2 * (NBLK + qb) + 1, neg)
    nq = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    if NORMALIZE:
        ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m = qok[:, None] & (offs_d[None, :] < D)
            x = tl.load(q_ptr + qrows[:, None] * s_q + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
            ss += tl.sum(x * x, 1)
        nq = tl.maximum(tl.sqrt(ss), 1e-12)
    qinv = nq
    if HAS_LABELS:
        qinv = _lhat_inv(qlab_ptr, qrows, qok, s_qlab, C, BLOCK_N, BLOCK_C)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = qok[:, None] & (offs_d[None, :] < D)
        x = tl.load(q_ptr + qrows[:, None] * s_q + offs_d[None, :], mask=m, other=0.0)
        qk = _to_kernel_dtype(x.to(tl.float32) / nq[:, None], vk_ptr, RNE_BF16)
        tl.store(vk_ptr + cols[:, None] * D + offs_d[None, :], qk, mask=m)
        if HAS_LABELS:
            qv = qk.to(tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mc = qok[:, None] & (offs_c[None, :] < C)
                lab = tl.load(qlab_ptr + qrows[:, None] * s_qlab + offs_c[None, :], mask=mc, other=0).to(tl.float32)
                lh = lab * qinv[:, None]
                _project(base, tl.trans(lh), qv, offs_c, offs_d, C, D, True)
                if not BACKWARD:
                    if d0 == 0:
                        s_ptrs = base + NPROJ * C * D + offs_c
                        prev = tl.load(s_ptrs, mask=offs_c < C, other=0.0)
                        tl.store(s_ptrs, tl.sum(lh, 0) + prev, mask=offs_c < C)


@triton.jit
def _reduce_kernel(
    part_ptr, out_ptr, gmax_ptr, max_out_ptr, lflag_ptr, ok_fin_ptr, ok_neg_ptr, NSLOT, PART, L, NBLK,
    QBLK, HAS_MAX: tl.constexpr, HAS_FLAGS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out[:L] = sum over the prologue's slots b (in order) of part[b, :L]; program 0: with HAS_MAX,
    max_out = max_b gmax[b]; with HAS_FLAGS the label flags of all blocks (min over the blocks)
    into ok_fin_ptr[0], ok_neg_ptr[0], and those of the QBLK queue blocks after them into
    ok_fin_ptr[1], ok_neg_ptr[1] (1.0 without a queue)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for b in range(0, NSLOT):
        acc += tl.load(part_ptr + b * PART + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc, mask=ok)
    if HAS_MAX:
        if pid == 0:
            m = tl.zeros((BLOCK,), dtype=tl.float32)
            for b0 in range(0, NBLK, BLOCK):
                ob = b0 + tl.arange(0, BLOCK)
                m = tl.maximum(m, tl.load(gmax_ptr + ob, mask=ob < NBLK, other=0.0))
            tl.store(max_out_ptr, tl.max(m, 0))
    if HAS_FLAGS:
        if pid == 0:
            f = tl.full((BLOCK,), 1.0, dtype=tl.float32)
            g = f
            for b0 in range(0, NBLK, BLOCK):
                ob = b0 + tl.arange(0, BLOCK)
                f = tl.minimum(f, tl.load(lflag_ptr + 2 * ob, mask=ob < NBLK, other=1.0))
                g = tl.minimum(g, tl.load(lflag_ptr + 2 * ob + 1, mask=ob < NBLK, other=1.0))
            tl.store(ok_fin_ptr, tl.min(f, 0))
            tl.store(ok_neg_ptr, tl.min(g, 0))
            f = tl.full((BLOCK,), 1.0, dtype=tl.float32)
            g = f
            for b0 in range(0, QBLK, BLOCK):
                ob = NBLK + b0 + tl.arange(0, BLOCK)
                f = tl.minimum(f, tl.load(lflag_ptr + 2 * ob, mask=ob < NBLK + QBLK, other=1.0))
                g = tl.minimum(g, tl.load(lflag_ptr + 2 * ob + 1, mask=ob < NBLK + QBLK, other=1.0))
            tl.store(ok_fin_ptr + 1, tl.min(f, 0))
            tl.store(ok_neg_ptr + 1, tl.min(g, 0))


@triton.jit
def _merge(buf_ptr, offs_n, rok, N, SPLIT: tl.constexpr, SUM: tl.constexpr):
    """The statistic over all splits: the sum (SUM) or the log-sum-exp of the partial ones."""
    x = tl.load(buf_ptr + offs_n, mask=rok, other=0.0)
    if SPLIT > 1:
        if SUM:
            for s in range(1, SPLIT):
                x += tl.load(buf_ptr + s * N + offs_n, mask=rok, other=0.0)
        else:
            m = x
            for s in range(1, SPLIT):
                m = tl.maximum(m, tl.load(buf_ptr + s * N + offs_n, mask=rok, other=0.0))
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            t = tl.zeros_like(x)
            for s in range(0, SPLIT):
                t += tl.exp(tl.load(buf_ptr + s * N + offs_n, mask=rok, other=0.0) - m_safe)
            x = m_safe + tl.log(t)
    return x


@triton.jit
def _fwd_epilogue_kernel(
    uk_ptr, vk_ptr, lab_ptr, p_ptr, rowbuf_ptr, colbuf_ptr, tau_ptr, bias_ptr, hw,
    row_ptr, col_ptr, r_ptr, per_ptr, lpart_ptr, counter_ptr, out_ptr, factor, ids_ptr,
    N, M, D, C, s_lab, s_uk, s_vk, NBLK,
    SPLIT: tl.constexpr, SIGMOID: tl.constexpr, NEED_COL: tl.constexpr, HAS_LABELS: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_PER: tl.constexpr, SCENES: tl.constexpr, HAS_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per-sample losses from the statistics and the target sums. Reductions: one partial sum
    per block; the block that finishes last (a counter, zeroed by the prologue) sums them in
    block order into out (deterministic: the atomic only elects that block).
    SCENES (scene ids as positives): R_i counts the columns (batch, then queue: M of them) of
    row i's scene and the target sums are u_i . (sum of v_j over those columns) (and v_i . (sum
    of u_j over the batch rows of the scene) for the column half), the per-scene sums taken by
    each row block itself from id comparisons over the column tiles (fixed order: deterministic;
    tiles without a match skipped). HAS_R: store R (not for scene_mode "ignore", which has
    none: R = 1 there and the target is the positive alone)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rok = offs_n < N
    rows = offs_n.to(tl.int64)
    scale = _scale64(tau_ptr)
    row = _merge(rowbuf_ptr, offs_n, rok, N, SPLIT, SIGMOID)
    tl.store(row_ptr + offs_n, row, mask=rok)
    if NEED_COL:
        col = _merge(colbuf_ptr, offs_n, rok, N, SPLIT, False)
        tl.store(col_ptr + offs_n, col, mask=rok)
    # nn_i and R_i = lhat_i . S - nn_i + 1 (fp32, as the general path)
    r = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    nn = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_LABELS:
        linv = _lhat_inv(lab_ptr, rows, rok, s_lab, C, BLOCK_N, BLOCK_C)
        ls = tl.zeros((BLOCK_N,), dtype=tl.float32)
        s_at = C * D
        if NEED_COL:
            s_at = 2 * C * D
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mc = rok[:, None] & (offs_c[None, :] < C)
            lh = tl.load(lab_ptr + rows[:, None] * s_lab + offs_c[None, :], mask=mc, other=0).to(tl.float32)
            lh = lh * linv[:, None]
            nn += tl.sum(lh * lh, 1)
            s_c = tl.load(p_ptr + s_at + offs_c, mask=offs_c < C, other=0.0)
            ls += tl.sum(lh * s_c[None, :], 1)
        r = ls - nn + 1.0
    if SCENES:
        my_id = tl.load(ids_ptr + offs_n, mask=rok, other=0)
        r = tl.where(rok, _scene_count(ids_ptr, my_id, rok, M, BLOCK_N, SCENE_BLOCK_M), 1.0)  # 1: rows out of range
        nn = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    # float64: s_ii / scale and the low-rank sums u_i . (P^T lhat_i) (and v_i . (P_u^T lhat_i))
    sd = tl.zeros((BLOCK_N,), dtype=tl.float64)
    ts = tl.zeros((BLOCK_N,), dtype=tl.float64)
    tsc = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dok = offs_d < D
        if SCENES:  # first, while nothing else of the chunk is live (registers)
            sv, su = _scene_sums_fwd(vk_ptr, uk_ptr, ids_ptr, my_id, rok, offs_d, dok, s_vk, s_uk, N, M, D,
                                     NEED_COL, BLOCK_N, SCENE_BLOCK_M, BLOCK_D)  # fmt: skip
        m = rok[:, None] & dok[None, :]
        u = tl.load(uk_ptr + rows[:, None] * s_uk + offs_d[None, :], mask=m, other=0.0).to(tl.float64)
        v = tl.load(vk_ptr + rows[:, None] * s_vk + offs_d[None, :], mask=m, other=0.0).to(tl.float64)
        sd += tl.sum(u * v, 1)
        if HAS_LABELS:
            q = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float64)
            qc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float64)
            for c in range(0, C):
                lh = tl.load(lab_ptr + rows * s_lab + c, mask=rok, other=0).to(tl.float32) * linv
                lh = lh.to(tl.float64)
                pv = tl.load(p_ptr + c * D + offs_d, mask=dok, other=0.0).to(tl.float64)
                q += lh[:, None] * pv[None, :]
                if NEED_COL:
                    pu = tl.load(p_ptr + C * D + c * D + offs_d, mask=dok, other=0.0).to(tl.float64)
                    qc += lh[:, None] * pu[None, :]
            ts += tl.sum(u * q, 1)
            if NEED_COL:
                tsc += tl.sum(v * qc, 1)
        if SCENES:
            ts += tl.sum(u * sv.to(tl.float64), 1)
            if NEED_COL:
                tsc += tl.sum(v * su.to(tl.float64), 1)
    sd = sd * scale
    s_ii = sd.to(tl.float32)
    if SCENES:  # T~_ii = 1: no diagonal correction
        t_row = (ts * scale).to(tl.float32)
        t_col = (tsc * scale).to(tl.float32)
    elif HAS_LABELS:
        off = (1.0 - nn).to(tl.float64) * sd
        t_row = (ts * scale + off).to(tl.float32)
        t_col = (tsc * scale + off).to(tl.float32)
    else:
        t_row = s_ii
        t_col = s_ii
    if SIGMOID:
        if HAS_BIAS:
            b = tl.load(bias_ptr).to(tl.float32)
            per = row - hw * (s_ii + b) - (1.0 - hw) * (t_row + b * r)
        else:
            per = row - hw * s_ii - (1.0 - hw) * t_row
    else:
        per = row - hw * s_ii - (1.0 - hw) * t_row / r
        if NEED_COL:
            per = (per + (col - hw * s_ii - (1.0 - hw) * t_col / r)) / 2
    if HAS_R:
        tl.store(r_ptr + offs_n, r, mask=rok)
    if STORE_PER:
        tl.store(per_ptr + offs_n, per, mask=rok)
    else:
        tl.store(lpart_ptr + pid, tl.sum(tl.where(rok, per, 0.0), 0))
        if _last_block(counter_ptr, NBLK):
            total = _sum_parts(lpart_ptr, NBLK, 1, 0, BLOCK_N)
            tl.store(out_ptr, total.to(tl.float32) * factor)


@triton.jit
def _same_scene(ids_ptr, my_id, rok, t, NCOL, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """(columns of tile t, in range, the (BLOCK_N, BLOCK_M) 0/1 matrix of same-id pairs)."""
    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    mok = offs_m < NCOL
    cid = tl.load(ids_ptr + offs_m, mask=mok, other=0)
    e = (my_id[:, None] == cid[None, :]) & rok[:, None] & mok[None, :]
    return offs_m, mok, e


@triton.jit
def _scene_count(ids_ptr, my_id, rok, NCOL, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """R_i: how many of the NCOL columns hold row i's scene id (itself included)."""
    r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(0, tl.cdiv(NCOL, BLOCK_M)):
        _, _, e = _same_scene(ids_ptr, my_id, rok, t, NCOL, BLOCK_N, BLOCK_M)
        r += tl.sum(e.to(tl.float32), 1)
    return r


@triton.jit
def _any(x):
    """Whether any entry of a 1-D boolean block is set (a scalar: a uniform branch)."""
    return tl.max(x.to(tl.int32), 0) > 0


@triton.jit
def _any2(x):
    """Whether any entry of a 2-D boolean block is set."""
    return tl.max(tl.max(x.to(tl.int32), 1), 0) > 0


@triton.jit
def _scene_sums_fwd(
    v_ptr, u_ptr, ids_ptr, my_id, rok, offs_d, dok, s_v, s_u, N, M, D, NEED_COL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """For a feature chunk: sum of v_j over the M columns of row i's scene, and (NEED_COL) of
    u_j over the N batch rows of it, in column order (fp32). A column tile is compared as a
    whole first and skipped without a match; in a matching tile each matching column's row
    chunk is added where the ids match (a select, not a product: no tl.dot, whose fp32 operand
    staging spills registers here)."""
    sv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    su = sv
    for t in range(0, tl.cdiv(M, BLOCK_M)):
        _, _, e = _same_scene(ids_ptr, my_id, rok, t, M, BLOCK_N, BLOCK_M)
        if _any2(e):  # a tile without the block's scenes adds nothing
            for jj in range(0, BLOCK_M):
                j = t * BLOCK_M + jj
                if j < M:
                    hit = (my_id == tl.load(ids_ptr + j)) & rok
                    if _any(hit):
                        col = j.to(tl.int64)
                        x = tl.load(v_ptr + col * s_v + offs_d, mask=dok, other=0.0).to(tl.float32)
                        sv += tl.where(hit[:, None], x[None, :], 0.0)
                        if NEED_COL:
                            if j < N:
                                y = tl.load(u_ptr + col * s_u + offs_d, mask=dok, other=0.0).to(tl.float32)
                                su += tl.where(hit[:, None], y[None, :], 0.0)
    return sv, su


@triton.jit
def _scene_sums_bwd(
    uk_ptr, vk_ptr, ids_ptr, g_ptr, r_ptr, my_id, rok, offs_d, dok, N, M, D, SIGMOID: tl.constexpr,
    NEED_COL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """For a feature chunk, sums over the columns j of row i's scene: of v_j (all M columns,
    batch then queue), and over the batch rows of w_j u_j, (NEED_COL) w_j v_j and u_j, with w_j =
    g_j / R_j (softmax) or g_j (sigmoid): the scene form of the projections [v, w u, w v, u].
    Tiles and columns as in ``_scene_sums_fwd``."""
    s0 = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    s1 = s0
    s2 = s0
    s3 = s0
    for t in range(0, tl.cdiv(M, BLOCK_M)):
        _, _, e = _same_scene(ids_ptr, my_id, rok, t, M, BLOCK_N, BLOCK_M)
        if _any2(e):
            for jj in range(0, BLOCK_M):
                j = t * BLOCK_M + jj
                if j < M:
                    hit = (my_id == tl.load(ids_ptr + j)) & rok
                    if _any(hit):
                        idx = j.to(tl.int64) * D + offs_d
                        v = tl.load(vk_ptr + idx, mask=dok, other=0.0).to(tl.float32)
                        s0 += tl.where(hit[:, None], v[None, :], 0.0)
                        if j < N:
                            u = tl.load(uk_ptr + idx, mask=dok, other=0.0).to(tl.float32)
                            wj = tl.load(g_ptr + j)
                            if not SIGMOID:
                                wj = wj / tl.load(r_ptr + j)
                            s1 += tl.where(hit[:, None], (wj * u)[None, :], 0.0)
                            if NEED_COL:
                                s2 += tl.where(hit[:, None], (wj * v)[None, :], 0.0)
                                s3 += tl.where(hit[:, None], u[None, :], 0.0)
    return s0, s1, s2, s3


@triton.jit
def _last_block(counter_ptr, NBLK):
    """True in the one program that finishes last: its partials and every other program's are
    stored (the barrier orders this program's stores before the acq_rel atomic)."""
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1.0, sem="acq_rel")
    return done == NBLK - 1


@triton.jit
def _sum_parts(part_ptr, NBLK, STRIDE: tl.constexpr, AT: tl.constexpr, BLOCK: tl.constexpr):
    """sum_b part[STRIDE * b + AT] in block order, float64 (loads bypass L1: written by others)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for b0 in range(0, NBLK, BLOCK):
        ob = b0 + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + STRIDE * ob + AT, mask=ob < NBLK, other=0.0, cache_modifier=".cg").to(tl.float64)
    return tl.sum(acc, 0)


@triton.jit
def _lift(lab_ptr, p_ptr, rows, rok, linv, offs_d, dok, s_lab, C, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_c lhat_ic P[c, d] for the block's rows and the chunk's columns (fp32)."""
    q = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for c in range(0, C):
        lh = tl.load(lab_ptr + rows * s_lab + c, mask=rok, other=0).to(tl.float32) * linv
        q += lh[:, None] * tl.load(p_ptr + c * D + offs_d, mask=dok, other=0.0)[None, :]
    return q


@triton.jit
def _grad_chunk(
    uk_ptr, vk_ptr, lab_ptr, p_ptr, gu_ptr, gv_ptr, rows, rok, offs_d, g, w, nn, linv, hw,
    N, D, C, s_lab, ids_ptr, g_ptr, r_ptr, my_id, M,
    SPLIT: tl.constexpr, SIGMOID: tl.constexpr, NEED_COL: tl.constexpr, HAS_LABELS: tl.constexpr,
    SCENES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(u, v, GU, GV) of a feature chunk: the tile pass's softmax / sigmoid part (splits merged)
    minus the target part (SPEC section 5, the low-rank sums)."""
    dok = offs_d < D
    if SCENES:  # first, while nothing else of the chunk is live (registers)
        s0, s1, s2, s3 = _scene_sums_bwd(
            uk_ptr, vk_ptr, ids_ptr, g_ptr, r_ptr, my_id, rok, offs_d, dok, N, M, D, SIGMOID, NEED_COL,
            BLOCK_N, SCENE_BLOCK_M, BLOCK_D,
        )  # fmt: skip
    m = rok[:, None] & dok[None, :]
    idx = rows[:, None] * D + offs_d[None, :]
    u = tl.load(uk_ptr + idx, mask=m, other=0.0).to(tl.float32)
    v = tl.load(vk_ptr + idx, mask=m, other=0.0).to(tl.float32)
    gu = tl.load(gu_ptr + idx, mask=m, other=0.0)
    gv = tl.load(gv_ptr + idx, mask=m, other=0.0)
    for s in range(1, SPLIT):
        gu += tl.load(gu_ptr + s * N * D + idx, mask=m, other=0.0)
        gv += tl.load(gv_ptr + s * N * D + idx, mask=m, other=0.0)
    keep = 1.0 - nn
    lu0 = keep[:, None] * v
    lv1 = keep[:, None] * (w[:, None] * u)
    if HAS_LABELS:
        CD = C * D
        lu0 += _lift(lab_ptr, p_ptr, rows, rok, linv, offs_d, dok, s_lab, C, D, BLOCK_N, BLOCK_D)
        lv1 += _lift(lab_ptr, p_ptr + CD, rows, rok, linv, offs_d, dok, s_lab, C, D, BLOCK_N, BLOCK_D)
    if SCENES:  # keep = 0 (T~_ii = 1): the per-scene sums alone
        lu0 += s0
        lv1 += s1
    gu -= (1.0 - hw) * w[:, None] * lu0 + hw * g[:, None] * v
    gv -= (1.0 - hw) * lv1 + hw * g[:, None] * u
    if NEED_COL:  # h = g: the column half's targets (column sums R_j as T is symmetric)
        lu2 = keep[:, None] * (w[:, None] * v)
        lv3 = keep[:, None] * u
        if HAS_LABELS:
            lu2 += _lift(lab_ptr, p_ptr + 2 * CD, rows, rok, linv, offs_d, dok, s_lab, C, D, BLOCK_N, BLOCK_D)
            lv3 += _lift(lab_ptr, p_ptr + 3 * CD, rows, rok, linv, offs_d, dok, s_lab, C, D, BLOCK_N, BLOCK_D)
        if SCENES:
            lu2 += s2
            lv3 += s3
        gu -= (1.0 - hw) * lu2 + hw * g[:, None] * v
        gv -= (1.0 - hw) * w[:, None] * lv3 + hw * g[:, None] * u
    return u, v, gu, gv


@triton.jit
def _bwd_epilogue_kernel(
    uk_ptr, vk_ptr, lab_ptr, p_ptr, g_ptr, r_ptr, gu_ptr, gv_ptr, wsum_ptr, n1_ptr, n2_ptr, tau_ptr, hw,
    dz1_ptr, dz2_ptr, spart_ptr, counter_ptr, dtau_ptr, dbias_ptr, ids_ptr,
    N, M, D, C, s_lab, NBLK, NEED_TAU: tl.constexpr,
    SPLIT: tl.constexpr, SIGMOID: tl.constexpr, NEED_COL: tl.constexpr, HAS_LABELS: tl.constexpr,
    NORMALIZE: tl.constexpr, NEED_Z1: tl.constexpr, NEED_Z2: tl.constexpr, NEED_BIAS: tl.constexpr,
    SCENES: tl.constexpr, HAS_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dz1, dz2 (target part subtracted, through the normalisation) and per-block partials of
    sum_i u_i . GU_i (temperature) and sum_ij G_ij (bias); the block that finishes last sums
    them in block order: d tau = -scale^2 sum_i u_i . GU_i, d bias. SCENES: the target part from
    per-scene sums (``_scene_sums_bwd``; vk_ptr holds the M columns). HAS_R: R saved (else 1:
    scene_mode "ignore", whose target is the positive alone)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rok = offs_n < N
    rows = offs_n.to(tl.int64)
    scale64 = _scale64(tau_ptr)
    scale = scale64.to(tl.float32)
    g = tl.load(g_ptr + offs_n, mask=rok, other=0.0)
    r = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    if HAS_R:
        r = tl.load(r_ptr + offs_n, mask=rok, other=1.0)
    w = g if SIGMOID else g / r
    nn = tl.zeros((BLOCK_N,), dtype=tl.float32)
    linv = nn
    my_id = offs_n
    if SCENES:
        nn = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
        my_id = tl.load(ids_ptr + offs_n, mask=rok, other=0)
    if HAS_LABELS:
        linv = _lhat_inv(lab_ptr, rows, rok, s_lab, C, BLOCK_N, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):  # ||lhat||^2 as rounded (not exactly 1), as the forward
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mc = rok[:, None] & (offs_c[None, :] < C)
            lh = tl.load(lab_ptr + rows[:, None] * s_lab + offs_c[None, :], mask=mc, other=0).to(tl.float32)
            lh = lh * linv[:, None]
            nn += tl.sum(lh * lh, 1)
    pu = tl.zeros((BLOCK_N,), dtype=tl.float32)
    pv = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        u, v, gu, gv = _grad_chunk(
            uk_ptr, vk_ptr, lab_ptr, p_ptr, gu_ptr, gv_ptr, rows, rok, offs_d, g, w, nn, linv, hw,
            N, D, C, s_lab, ids_ptr, g_ptr, r_ptr, my_id, M, SPLIT, SIGMOID, NEED_COL, HAS_LABELS, SCENES,
            BLOCK_N, BLOCK_D,
        )  # fmt: skip
        pu += tl.sum(u * gu, 1)
        pv += tl.sum(v * gv, 1)
    if NEED_TAU or NEED_BIAS:
        tl.store(spart_ptr + 2 * pid, tl.sum(tl.where(rok, pu, 0.0), 0))
        if NEED_BIAS:
            wsum = _merge(wsum_ptr, offs_n, rok, N, SPLIT, True)
            db = tl.where(rok, wsum - g * (hw + (1.0 - hw) * r), 0.0)
            tl.store(spart_ptr + 2 * pid + 1, tl.sum(db, 0))
        if _last_block(counter_ptr, NBLK):
            if NEED_TAU:
                total = _sum_parts(spart_ptr, NBLK, 2, 0, BLOCK_N)
                tl.store(dtau_ptr, (-(total * scale64) * scale64).to(dtau_ptr.dtype.element_ty))
            if NEED_BIAS:
                tl.store(dbias_ptr, _sum_parts(spart_ptr, NBLK, 2, 1, BLOCK_N).to(dbias_ptr.dtype.element_ty))
    if NEED_Z1 or NEED_Z2:
        if NORMALIZE:
            n1 = tl.load(n1_ptr + offs_n, mask=rok, other=1.0)
            n2 = tl.load(n2_ptr + offs_n, mask=rok, other=1.0)
            pu = tl.where(n1 <= 1e-12, 0.0, pu)
            pv = tl.where(n2 <= 1e-12, 0.0, pv)
            c1 = 1.0 / (n1 / scale)
            c2 = 1.0 / (n2 / scale)
        else:
            c1 = tl.zeros((BLOCK_N,), dtype=tl.float32) + scale
            c2 = c1
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m = rok[:, None] & (offs_d[None, :] < D)
            u, v, gu, gv = _grad_chunk(
                uk_ptr, vk_ptr, lab_ptr, p_ptr, gu_ptr, gv_ptr, rows, rok, offs_d, g, w, nn, linv, hw,
                N, D, C, s_lab, ids_ptr, g_ptr, r_ptr, my_id, M, SPLIT, SIGMOID, NEED_COL, HAS_LABELS, SCENES,
                BLOCK_N, BLOCK_D,
            )  # fmt: skip
            idx = rows[:, None] * D + offs_d[None, :]
            if NEED_Z1:
                if NORMALIZE:
                    gu = gu - u * pu[:, None]
                tl.store(dz1_ptr + idx, (gu * c1[:, None]).to(dz1_ptr.dtype.element_ty), mask=m)
            if NEED_Z2:
                if NORMALIZE:
                    gv = gv - v * pv[:, None]
                tl.store(dz2_ptr + idx, (gv * c2[:, None]).to(dz2_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# launchers


def _rne_bf16(z: torch.Tensor) -> bool:
    return sc.INTERPRET and z.dtype == torch.bfloat16


def _rows(z: torch.Tensor) -> torch.Tensor:
    """z row-major and dense (the epilogues index the rows, and the gradients made like them,
    as (N, D) with row stride D): a copy only for other layouts."""
    return z if z.is_contiguous() else z.contiguous()


def _workspace(sizes: dict, f32: dict):
    """One fp32 allocation cut into the named parts (one split op for all the views; a part of
    size 0 is the whole buffer, passed where a kernel takes a pointer it never reads)."""
    total = sum(sizes.values())
    ws = torch.empty(total + 1, **f32)
    parts = ws.split([*sizes.values(), 1])
    return ws, {k: (p if sizes[k] else ws) for k, p in zip(sizes, parts)}


def _split(core, n: int, device) -> int:
    return core._num_splits(n, n, device, sc.MAX_SPLITS)


def _tile_forward(core, uk, cols, ids, n, m, pos, scale, bias, normalize, mode, need_col, bufs, col_sum, split, spare):
    """The existing tile kernel, row-owned (the n rows against the m columns: batch, then queue)
    and (symmetric softmax, no queue) column-owned, into the split buffers bufs = (row, col).
    spare: a buffer written later (never read here) for the column-sum pointer when there are
    none: the autotuner zeroes that argument when it benchmarks configs. ids: the int64 scene ids
    of the m columns (the rows' are the first n; scene_mode "ignore"), else None."""
    d = uk.shape[1]
    fixed = col_sum is not None
    common = dict(
        MODE=int(mode), BOUNDED=bool(normalize), HAS_BIAS=bias is not None, HAS_POS=True,
        UPCAST=sc.INTERPRET and uk.dtype == torch.bfloat16, PRECISION=core._precision(uk.dtype),
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), 1, split)  # noqa: E731
    b = scale if bias is None else bias
    i = pos if ids is None else ids
    _launch(
        sc._sc_forward_kernel, grid, uk, cols, i, i, pos, bufs[0], col_sum if fixed else spare, pos, scale, b,
        n, m, d, uk.stride(0), cols.stride(0), 0, split, sc._bucket(n), sc._bucket(m), sc._bucket(d),
        FIXED_COL=fixed, COL_OF_FIXED=False, **common,
    )  # fmt: skip
    if need_col:  # no queue here: m == n
        _launch(
            sc._sc_forward_kernel, grid, cols, uk, i, i, pos, bufs[1], spare, col_sum if fixed else pos, scale, b,
            n, n, d, cols.stride(0), uk.stride(0), 0, split, sc._bucket(n), sc._bucket(n), sc._bucket(d),
            FIXED_COL=False, COL_OF_FIXED=fixed, **common,
        )  # fmt: skip


def _labels(labels, ws):
    """(multi-label vectors as the kernels read them, row stride, is float, is bool); ws stands
    in for None."""
    if labels is None:
        return ws, 0, False, False
    lab = labels if labels.stride(1) == 1 else labels.contiguous()
    return lab, lab.stride(0), lab.dtype.is_floating_point, lab.dtype == torch.bool


def _on(x, dev):
    """A 0-dim temperature / bias on the kernels' device (a copy only when it is elsewhere)."""
    return x if x is None or x.device == dev else x.to(dev)


class _Plan:
    """What both directions derive from the label kind and the queue (no tensor op but the
    allocations of the ids and the columns): the multi-label vectors of the rows and the queue,
    the scene ids (read by the prologue in their own dtype and stride, written as int64 into
    ``ids``: N + K entries), the columns (``cols``: z2's rows, then the queue's keys, one (M, D)
    matrix written by the prologue; z2 itself without a queue and without normalisation)."""

    def __init__(self, z1, z2, labels, queue, queue_labels, scene_ignore, normalize, ws):
        n, d = z1.shape
        self.n = n
        self.k = 0 if queue is None else queue.shape[0]
        self.m = n + self.k
        self.scenes = labels is not None and labels.dim() == 1
        self.ignore = bool(scene_ignore)
        self.scene_pos = self.scenes and not self.ignore  # per-scene target sums in the epilogues
        self.multi = labels is not None and labels.dim() == 2
        self.c = labels.shape[1] if self.multi else 0
        self.qblk = triton.cdiv(self.k, BLOCK_N)
        self.has_queue = queue is not None
        self.lab, self.s_lab, self.lab_float, self.lab_bool = _labels(labels if self.multi else None, ws)
        self.qlab, self.s_qlab, self.qlab_float, self.qlab_bool = _labels(
            queue_labels if self.multi and self.has_queue else None, ws
        )
        self.q = ws
        self.s_q = 0
        if self.has_queue:
            self.q = queue if queue.stride(1) == 1 else queue.contiguous()
            self.s_q = self.q.stride(0)
        self.ids = None
        self.ids_in, self.s_ids, self.qids_in, self.s_qids = ws, 0, ws, 0
        if self.scenes:
            self.ids = torch.empty(self.m, dtype=torch.int64, device=z1.device)
            self.ids_in, self.s_ids = labels, labels.stride(0)
            if self.has_queue:
                self.qids_in, self.s_qids = queue_labels, queue_labels.stride(0)
        if self.has_queue:
            self.cols = torch.empty((self.m, d), dtype=z2.dtype, device=z2.device)
        else:
            self.cols = torch.empty_like(z2) if normalize else z2
        self.uk = torch.empty_like(z1) if normalize else z1

    def prologue_args(self, ws):
        """The prologue's queue / ids arguments (pointers, then sizes, then constexprs)."""
        ptrs = (self.q, self.qlab, self.ids_in, self.qids_in, ws if self.ids is None else self.ids)
        sizes = (self.k, self.s_q, self.s_qlab, self.s_ids, self.s_qids, self.qblk)
        flags = dict(HAS_QUEUE=self.has_queue, QLAB_FLOAT=self.qlab_float, QLAB_BOOL=self.qlab_bool,
                     IDS=self.scenes)  # fmt: skip
        return ptrs, sizes, flags

    def mode(self, sigmoid: bool) -> int:
        return MODE_SIGMOID if sigmoid else (MODE_SOFTMAX_IGNORE if self.ignore else MODE_SOFTMAX)


def forward(z1, z2, temperature, bias, labels, loss, symmetric, hw, normalize, reduction, messages, core=None,
            queue=None, queue_labels=None, scene_ignore=False):  # fmt: skip
    """(loss, row statistics, column statistics or (0,), R (N,) ((0,) for scene_mode "ignore"),
    n1, n2 (or (0,) each)), the outputs of ``fastcon_loss::fused_forward``. temperature, bias:
    0-dim tensors (bias None: 0), read by the kernels on the device (the scale 1 / tau is computed
    there). messages: the value checks' messages (temperature, bias, labels finite, labels >= 0,
    and optionally queue_labels finite, >= 0), raised through ``torch._assert_async`` of flags the
    prologue computes (no host sync). queue (K, D), queue_labels: SPEC section 1b (columns batch,
    then queue; row losses only)."""
    core = sc.CORE if core is None else core
    z1, z2 = _rows(z1), _rows(z2)
    n, d = z1.shape
    dev = z1.device
    temperature, bias = _on(temperature, dev), _on(bias, dev)
    sigmoid = loss == "sigmoid"
    need_col = not sigmoid and symmetric and queue is None
    has_labels = labels is not None and labels.dim() == 2
    c = labels.shape[1] if has_labels else 0
    nproj = 2 if need_col else 1
    part_len = nproj * c * d + c if has_labels else 0
    nblk = triton.cdiv(n, BLOCK_N)
    nprog = min(nblk, PROLOGUE_PROGRAMS)
    split = _split(core, n, dev)
    fixed = need_col and bool(normalize) and core._use_atomics()
    f32 = dict(dtype=torch.float32, device=dev)
    qblk = 0 if queue is None else triton.cdiv(queue.shape[0], BLOCK_N)
    # one fp32 workspace, cut into views by one split: the logit scale, the epilogue's block
    # counter, the check flags (ok_fin, ok_qfin and ok_neg, ok_qneg adjacent: the reduction writes
    # the queue's after the rows'), positive logits, column sums, split buffers, partial
    # projections, the projections, per-block loss sums and label flags (rows, then queue)
    sizes = dict(scale=1, counter=1, ok_tau=1, ok_bias=1, ok_fin=1, ok_qfin=1, ok_neg=1, ok_qneg=1, pos=n,
                 col_sum=n if fixed else 0, rowbuf=split * n, colbuf=split * n if need_col else 0,
                 part=nprog * part_len, proj=part_len, lpart=nblk,
                 lflag=2 * (nblk + qblk) if has_labels else 0)  # fmt: skip
    ws, v = _workspace(sizes, f32)
    plan = _Plan(z1, z2, labels, queue, queue_labels, scene_ignore, normalize, ws)
    uk, cols, m = plan.uk, plan.cols, plan.m
    if normalize:
        n1, n2 = torch.empty(n, **f32), torch.empty(n, **f32)
    else:
        n1, n2 = ws.new_empty(0), ws.new_empty(0)
    lab, s_lab = plan.lab, plan.s_lab
    b = ws if bias is None else bias
    qptrs, qsizes, qflags = plan.prologue_args(ws)
    with core._device_ctx(z1):
        _launch(
            _prologue_kernel, (nprog,), z1, z2, lab, temperature, b, ws, ws, uk, cols, n1 if normalize else ws,
            n2 if normalize else ws, v["pos"], ws, v["part"], ws, v["col_sum"],
            v["scale"], v["counter"], v["ok_tau"], v["ok_bias"], v["lflag"], ws, *qptrs,
            n, d, c, z1.stride(0), z2.stride(0), s_lab, part_len, 1.0, nblk, nprog, *qsizes,
            BACKWARD=False, NORMALIZE=bool(normalize), HAS_LABELS=has_labels, NPROJ=nproj, SIGMOID=sigmoid,
            GO_VECTOR=False, ZERO=fixed, RNE_BF16=_rne_bf16(z1), CHECK=True, HAS_BIAS=bias is not None,
            LAB_FLOAT=plan.lab_float, LAB_BOOL=plan.lab_bool, GMAX_DIRECT=False, **qflags,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_C=BLOCK_C, **PROLOGUE_OPTIONS,
        )  # fmt: skip
        if has_labels:
            _launch(
                _reduce_kernel, (max(1, triton.cdiv(part_len, REDUCE_BLOCK)),), v["part"], v["proj"], ws, ws,
                v["lflag"], v["ok_fin"], v["ok_neg"], nprog, part_len, part_len, nblk, qblk,
                HAS_MAX=False, HAS_FLAGS=True, BLOCK=REDUCE_BLOCK,
            )  # fmt: skip
        # the value checks, before the tile pass (device asserts: no host synchronisation)
        torch._assert_async(v["ok_tau"], messages[0])
        if bias is not None:
            torch._assert_async(v["ok_bias"], messages[1])
        if plan.lab_float:
            torch._assert_async(v["ok_fin"], messages[2])
        if has_labels and not plan.lab_bool:
            torch._assert_async(v["ok_neg"], messages[3])
        if has_labels and queue is not None:
            q_messages = messages[4:6] if len(messages) >= 6 else _label_value_messages("queue_labels")
            if plan.qlab_float:
                torch._assert_async(v["ok_qfin"], q_messages[0])
            if not plan.qlab_bool:
                torch._assert_async(v["ok_qneg"], q_messages[1])
        row = torch.empty(n, **f32)
        mode = plan.mode(sigmoid)
        _tile_forward(
            core, uk, cols, plan.ids if plan.ignore else None, n, m, v["pos"], v["scale"], bias, normalize, mode,
            need_col, (v["rowbuf"], v["colbuf"]), v["col_sum"] if fixed else None, split, row,
        )  # fmt: skip
        col = torch.empty(n, **f32) if need_col else ws.new_empty(0)
        r_sum = ws.new_empty(0) if plan.ignore else torch.empty(n, **f32)
        store_per = reduction == "none"
        out = torch.empty(n, **f32) if store_per else torch.empty((), **f32)
        factor = 1.0 / n if reduction == "mean" else 1.0
        _launch(
            _fwd_epilogue_kernel, (nblk,), uk, cols, lab, v["proj"], v["rowbuf"], v["colbuf"], temperature, b,
            float(hw), row, col if need_col else ws, ws if plan.ignore else r_sum, out, v["lpart"], v["counter"], out,
            factor, ws if plan.ids is None else plan.ids, n, m, d, c, s_lab, uk.stride(0), cols.stride(0), nblk,
            SPLIT=split, SIGMOID=sigmoid, NEED_COL=need_col, HAS_LABELS=has_labels, HAS_BIAS=bias is not None,
            STORE_PER=store_per, SCENES=plan.scene_pos, HAS_R=not plan.ignore,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_C=BLOCK_C, **(SCENE_OPTIONS if plan.scene_pos else {}),
        )  # fmt: skip
    return out, row, col, r_sum, n1, n2


def backward(grad_out, z1, z2, temperature, bias, labels, row, col, r_sum, n1, n2, loss, symmetric, hw,
             normalize, reduction, needs, core=None, queue=None, queue_labels=None, scene_ignore=False):  # fmt: skip
    """(d z1, d z2, d tau, d bias), an empty tensor for each one ``needs`` says is not wanted;
    the outputs of ``fastcon_loss::fused_backward`` (gradients of the temperature and bias in
    their dtypes and on their devices; the queue gets none)."""
    core = sc.CORE if core is None else core
    z1, z2 = _rows(z1), _rows(z2)
    n, d = z1.shape
    dev = z1.device
    tau_dev, bias_dev = _on(temperature, dev), _on(bias, dev)
    sigmoid = loss == "sigmoid"
    need_col = not sigmoid and symmetric and queue is None
    has_labels = labels is not None and labels.dim() == 2
    c = labels.shape[1] if has_labels else 0
    nproj = 4 if need_col else 2
    part_len = nproj * c * d if has_labels else 0
    nblk = triton.cdiv(n, BLOCK_N)
    nprog = min(nblk, PROLOGUE_PROGRAMS)
    split = _split(core, n, dev)
    need_tau = bool(needs[2])
    need_bias = bool(needs[3]) and sigmoid and bias is not None
    f32 = dict(dtype=torch.float32, device=dev)
    g_factor = (1.0 / n if reduction == "mean" else 1.0) * (0.5 if need_col else 1.0)
    g_vector = grad_out.dim() == 1
    sizes = dict(scale=1, counter=1, gmax_all=1, pos=n, g=n, gmax=nblk, part=nprog * part_len, proj=part_len,
                 wsum=split * n if sigmoid else 0, spart=2 * nblk, gu=split * n * d, gv=split * n * d)  # fmt: skip
    ws, v = _workspace(sizes, f32)
    plan = _Plan(z1, z2, labels, queue, queue_labels, scene_ignore, normalize, ws)
    uk, cols, m = plan.uk, plan.cols, plan.m
    lab, s_lab = plan.lab, plan.s_lab
    r_ptr = ws if plan.ignore else r_sum
    go = grad_out if not g_vector or grad_out.stride(0) == 1 else grad_out.contiguous()
    b = ws if bias is None else bias_dev
    pos, g, gmax = v["pos"], v["g"], v["gmax_all"]
    qptrs, qsizes, qflags = plan.prologue_args(ws)
    with core._device_ctx(z1):
        _launch(
            _prologue_kernel, (nprog,), z1, z2, lab, tau_dev, b, go, r_ptr, uk, cols, n1 if normalize else ws,
            n2 if normalize else ws, pos, g, v["part"], v["gmax"], ws,
            v["scale"], v["counter"], ws, ws, ws, gmax, *qptrs,
            n, d, c, z1.stride(0), z2.stride(0), s_lab, part_len, g_factor, nblk, nprog, *qsizes,
            BACKWARD=True, NORMALIZE=bool(normalize), HAS_LABELS=has_labels, NPROJ=nproj, SIGMOID=sigmoid,
            GO_VECTOR=g_vector, ZERO=False, RNE_BF16=_rne_bf16(z1), CHECK=False, HAS_BIAS=False,
            LAB_FLOAT=False, LAB_BOOL=False, GMAX_DIRECT=not g_vector, **qflags,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_C=BLOCK_C, **PROLOGUE_OPTIONS,
        )  # fmt: skip
        if has_labels or g_vector:
            _launch(
                _reduce_kernel, (max(1, triton.cdiv(part_len, REDUCE_BLOCK)),), v["part"], v["proj"], v["gmax"],
                gmax, ws, ws, ws, nprog, part_len, part_len, nblk, 0, HAS_MAX=g_vector, HAS_FLAGS=False,
                BLOCK=REDUCE_BLOCK,
            )  # fmt: skip
        gu_buf, gv_buf = v["gu"], v["gv"]  # (split, n, d) each, flat
        prec = core._precision(uk.dtype)
        mode = plan.mode(sigmoid)
        common = dict(
            MODE=int(mode), BOUNDED=bool(normalize) and not sigmoid, HAS_BIAS=bias is not None, HAS_POS=True,
            UPCAST=sc.INTERPRET and uk.dtype == torch.bfloat16, PRECISION=prec, W_PRECISION=prec,
        )  # fmt: skip
        scale = v["scale"]
        ids = pos if not plan.ignore else plan.ids

        def grid(meta):
            chunks = triton.cdiv(triton.cdiv(d, meta["CHUNK"]), meta["N_CHUNK"])
            return (triton.cdiv(n, meta["BLOCK_N"]), chunks, split)

        # rows: W v and W 1 over the m columns, with W_ij = g_i p_ij + h_j q_ij (or g_i sigmoid(x_ij))
        a_stat, b_stat = (pos, pos) if sigmoid else (row, col if need_col else pos)
        wsum = v["wsum"]
        _launch(
            sc._sc_backward_kernel, grid, uk, cols, ids, ids, pos, a_stat, b_stat, g, g, gmax, gu_buf, wsum,
            scale, b, n, m, d, uk.stride(0), cols.stride(0), 0, split, sc._bucket(n), sc._bucket(m), sc._bucket(d),
            HAS_AW=True, HAS_BW=need_col, NEED_WSUM=sigmoid, **common,
        )  # fmt: skip
        # columns: W^T u for the n batch columns (the queue's keys get no gradient)
        if sigmoid:
            cargs, flags = (pos, pos, g, g), dict(HAS_AW=False, HAS_BW=True)
        else:
            cargs = (col if need_col else pos, row, g, g)
            flags = dict(HAS_AW=need_col, HAS_BW=True)
        _launch(
            sc._sc_backward_kernel, grid, cols, uk, ids, ids, pos, *cargs, gmax, gv_buf, gv_buf,
            scale, b, n, n, d, cols.stride(0), uk.stride(0), 0, split, sc._bucket(n), sc._bucket(n), sc._bucket(d),
            NEED_WSUM=False, **flags, **common,
        )  # fmt: skip
        dz1 = torch.empty_like(z1) if needs[0] else z1.new_empty(0)
        dz2 = torch.empty_like(z2) if needs[1] else z1.new_empty(0)
        d_tau = torch.empty((), dtype=temperature.dtype, device=dev) if need_tau else z1.new_empty(0)
        d_bias = torch.empty((), dtype=bias.dtype, device=dev) if need_bias else z1.new_empty(0)
        _launch(
            _bwd_epilogue_kernel, (nblk,), uk, cols, lab, v["proj"], g, r_ptr, gu_buf, gv_buf, wsum,
            n1 if normalize else ws, n2 if normalize else ws, tau_dev, float(hw), dz1 if needs[0] else ws,
            dz2 if needs[1] else ws, v["spart"], v["counter"], d_tau if need_tau else ws,
            d_bias if need_bias else ws, ws if plan.ids is None else plan.ids, n, m, d, c, s_lab, nblk,
            NEED_TAU=need_tau, SPLIT=split, SIGMOID=sigmoid, NEED_COL=need_col, HAS_LABELS=has_labels,
            NORMALIZE=bool(normalize), NEED_Z1=bool(needs[0]), NEED_Z2=bool(needs[1]), NEED_BIAS=need_bias,
            SCENES=plan.scene_pos, HAS_R=not plan.ignore, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_C=BLOCK_C,
            **(SCENE_OPTIONS if plan.scene_pos else {}),
        )  # fmt: skip
    if need_tau and temperature.device != dev:
        d_tau = d_tau.to(temperature.device)
    if need_bias and bias.device != dev:
        d_bias = d_bias.to(bias.device)
    return dz1, dz2, d_tau, d_bias
