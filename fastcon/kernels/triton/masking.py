"""Triton kernels of the Siamese masking ops (SPEC section 2; contracts in fastcon/reference.py).

Every kernel works on 2-D tiles of whole token rows: a program owns (a batch row or a block of
positions) x (a block of D), so loads and stores run along D, the contiguous axis, and are
coalesced. Positions come from ``ids_keep`` (gathers) or from its inverse map
``inverse[b, l] = k or -1`` (scatters, built with one small torch scatter), so every output
row is written exactly once, zeros included. Sums over the batch (the gradient of a shared
pos_embed, of a fill token) loop over b inside one program in a fixed order: deterministic,
no atomics. Arithmetic is in fp32 (fp64 for fp64 tensors), rounded once on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kernel(
    src_ptr,
    ids_ptr,
    pos_ptr,
    out_ptr,
    K,
    D,
    src_batch_stride,
    src_row_stride,
    pos_batch_stride,
    pos_row_stride,
    HAS_POS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, k] = src[b, ids[b, k]] (+ pos[b or 0, ids[b, k]]); grid (B, K blocks, D blocks)."""
    b = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = ks < K
    tile_ok = k_ok[:, None] & (ds < D)[None, :]
    rows = tl.load(ids_ptr + b * K + ks, mask=k_ok, other=0)
    x = tl.load(src_ptr + b * src_batch_stride + rows[:, None] * src_row_stride + ds[None, :], mask=tile_ok, other=0)
    if HAS_POS:
        p = tl.load(
            pos_ptr + b * pos_batch_stride + rows[:, None] * pos_row_stride + ds[None, :], mask=tile_ok, other=0
        )
        x = x.to(ACC) + p.to(ACC)
    tl.store(out_ptr + (b * K + ks[:, None]) * D + ds[None, :], x.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _expand_kernel(
    src_ptr,
    inverse_ptr,
    fill_ptr,
    out_ptr,
    out2_ptr,
    L,
    K,
    D,
    HAS_FILL: tl.constexpr,
    HAS_OUT2: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, l] (and out2) = src[b, k] where inverse[b, l] = k >= 0, else fill (or 0);
    grid (B, L blocks, D blocks)."""
    b = tl.program_id(0).to(tl.int64)
    ls = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    l_ok, d_ok = ls < L, ds < D
    tile_ok = l_ok[:, None] & d_ok[None, :]
    k = tl.load(inverse_ptr + b * L + ls, mask=l_ok, other=-1).to(tl.int64)
    kept = (k >= 0)[:, None]
    x = tl.load(src_ptr + (b * K + k[:, None]) * D + ds[None, :], mask=tile_ok & kept, other=0)
    if HAS_FILL:
        f = tl.load(fill_ptr + ds, mask=d_ok, other=0)
        x = tl.where(kept, x, f[None, :])
    offs = (b * L + ls[:, None]) * D + ds[None, :]
    tl.store(out_ptr + offs, x, mask=tile_ok)
    if HAS_OUT2:
        tl.store(out2_ptr + offs, x, mask=tile_ok)


@triton.jit
def _expand_sum_kernel(
    src_ptr,
    inverse_ptr,
    out_ptr,
    sum_ptr,
    B,
    L,
    K,
    D,
    WRITE_OUT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, l] as _expand_kernel with zeros (when WRITE_OUT), and sum[l] = sum_b out[b, l]
    accumulated in b order; grid (L blocks, D blocks)."""
    ls = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    l_ok = ls < L
    tile_ok = l_ok[:, None] & (ds < D)[None, :]
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
    for b in range(0, B):
        b64 = tl.full([], b, tl.int64)
        k = tl.load(inverse_ptr + b64 * L + ls, mask=l_ok, other=-1).to(tl.int64)
        x = tl.load(src_ptr + (b64 * K + k[:, None]) * D + ds[None, :], mask=tile_ok & (k >= 0)[:, None], other=0)
        if WRITE_OUT:
            tl.store(out_ptr + (b64 * L + ls[:, None]) * D + ds[None, :], x, mask=tile_ok)
        acc += x.to(ACC)
    tl.store(sum_ptr + ls[:, None] * D + ds[None, :], acc.to(sum_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _dropped_sum_kernel(
    src_ptr,
    inverse_ptr,
    partial_ptr,
    B,
    L,
    D,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """partial[l block] = sum over b (in order) and the block's dropped l of src[b, l]; only
    dropped rows are read. Grid (L blocks, D blocks); the caller adds the partials in order."""
    lb = tl.program_id(0)
    ls = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    l_ok, d_ok = ls < L, ds < D
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for b in range(0, B):
        b64 = tl.full([], b, tl.int64)
        k = tl.load(inverse_ptr + b64 * L + ls, mask=l_ok, other=0)
        dropped = l_ok & (k < 0)
        x = tl.load(src_ptr + (b64 * L + ls[:, None]) * D + ds[None, :], mask=dropped[:, None] & d_ok[None, :], other=0)
        acc += tl.sum(x.to(ACC), axis=0)
    tl.store(partial_ptr + lb * D + ds, acc, mask=d_ok)


@triton.jit
def _image_kernel(
    src_ptr,
    keep_ptr,
    out_ptr,
    C,
    H,
    W,
    L,
    GRID_W,
    PATCH,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """out = src with the pixels of dropped patches 0; only kept pixels are read.
    Grid (B * C, H blocks, W blocks)."""
    bc = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ws = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    tile_ok = (hs < H)[:, None] & (ws < W)[None, :]
    cell = (hs // PATCH)[:, None] * GRID_W + (ws // PATCH)[None, :]
    kept = tl.load(keep_ptr + (bc // C) * L + cell, mask=tile_ok, other=0) != 0
    offs = bc * H * W + hs[:, None] * W + ws[None, :]
    x = tl.load(src_ptr + offs, mask=tile_ok & kept, other=0)
    tl.store(out_ptr + offs, x, mask=tile_ok)


# --------------------------------------------------------------------------------------------
# launchers


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(d: int) -> int:
    return min(128, triton.next_power_of_2(d))


def _inverse(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    b, k = ids_keep.shape
    inverse = torch.full((b, length), -1, dtype=torch.int32, device=ids_keep.device)
    cols = torch.arange(k, dtype=torch.int32, device=ids_keep.device).expand(b, k)
    return inverse.scatter_(1, ids_keep, cols)


def _rows_unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def gather(tokens, ids_keep, pos_embed=None):
    tokens = _rows_unit_stride(tokens)
    b, _, d = tokens.shape
    k = ids_keep.shape[1]
    ids = ids_keep.contiguous()
    out = torch.empty(b, k, d, dtype=tokens.dtype, device=tokens.device)
    if pos_embed is not None:
        pos = _rows_unit_stride(pos_embed)
        pos_strides = (pos.stride(0) if pos.shape[0] > 1 else 0, pos.stride(1))
    else:
        pos, pos_strides = tokens, (0, 0)  # unused
    block_k, block_d = min(16, triton.next_power_of_2(k)), _block_d(d)
    grid = (b, triton.cdiv(k, block_k), triton.cdiv(d, block_d))
    _gather_kernel[grid](
        tokens,
        ids,
        pos,
        out,
        k,
        d,
        tokens.stride(0),
        tokens.stride(1),
        *pos_strides,
        HAS_POS=pos_embed is not None,
        ACC=_acc(tokens.dtype),
        BLOCK_K=block_k,
        BLOCK_D=block_d,
    )
    return out


def _expand(src, inverse, fill, length, out, out2):
    b, k, d = src.shape
    block_l, block_d = min(16, triton.next_power_of_2(length)), _block_d(d)
    grid = (b, triton.cdiv(length, block_l), triton.cdiv(d, block_d))
    _expand_kernel[grid](
        src,
        inverse,
        src if fill is None else fill,
        out,
        out if out2 is None else out2,
        length,
        k,
        d,
        HAS_FILL=fill is not None,
        HAS_OUT2=out2 is not None,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
    )


def gather_backward(grad_visible, ids_keep, length, need_tokens, pos_batch):
    gv = grad_visible.contiguous()
    b, k, d = gv.shape
    inverse = _inverse(ids_keep, length)
    empty = gv.new_empty(0)
    grad_tokens = gv.new_empty(b, length, d) if need_tokens else empty
    grad_pos = gv.new_empty(pos_batch, length, d) if pos_batch > 0 else empty
    if pos_batch == 1:
        # a few positions per program keep many programs in flight; each loops over b
        block_l, block_d = min(4, triton.next_power_of_2(length)), _block_d(d)
        grid = (triton.cdiv(length, block_l), triton.cdiv(d, block_d))
        _expand_sum_kernel[grid](
            gv,
            inverse,
            grad_tokens if need_tokens else grad_pos,
            grad_pos,
            b,
            length,
            k,
            d,
            WRITE_OUT=need_tokens,
            ACC=_acc(gv.dtype),
            BLOCK_L=block_l,
            BLOCK_D=block_d,
        )
    elif need_tokens or pos_batch > 0:
        first = grad_tokens if need_tokens else grad_pos
        second = grad_pos if (need_tokens and pos_batch > 0) else None
        _expand(gv, inverse, None, length, first, second)
    return grad_tokens, grad_pos


def unmask(visible, ids_keep, length, fill):
    visible = visible.contiguous()
    b, _, d = visible.shape
    out = visible.new_empty(b, length, d)
    _expand(visible, _inverse(ids_keep, length), fill.contiguous(), length, out, None)
    return out


def unmask_backward(grad_out, ids_keep, need_fill):
    go = grad_out.contiguous()
    b, length, d = go.shape
    acc_dtype = torch.float64 if go.dtype == torch.float64 else torch.float32
    grad_visible = gather(go, ids_keep)
    if not need_fill:
        return grad_visible, go.new_empty(0, dtype=acc_dtype)
    block_l, block_d = min(16, triton.next_power_of_2(length)), _block_d(d)
    blocks_l = triton.cdiv(length, block_l)
    partial = torch.empty(blocks_l, d, dtype=acc_dtype, device=go.device)
    _dropped_sum_kernel[(blocks_l, triton.cdiv(d, block_d))](
        go,
        _inverse(ids_keep, length),
        partial,
        b,
        length,
        d,
        ACC=_acc(go.dtype),
        BLOCK_L=block_l,
        BLOCK_D=block_d,
    )
    return grad_visible, partial.sum(dim=0)


def image(images, patch, ids_keep):
    images = images.contiguous()
    b, c, h, w = images.shape
    grid_w = w // patch
    length = (h // patch) * grid_w
    keep = torch.zeros(b, length, dtype=torch.uint8, device=images.device).scatter_(1, ids_keep, 1)
    out = torch.empty_like(images)
    block_h, block_w = min(16, triton.next_power_of_2(h)), min(64, triton.next_power_of_2(w))
    grid = (b * c, triton.cdiv(h, block_h), triton.cdiv(w, block_w))
    _image_kernel[grid](images, keep, out, c, h, w, length, grid_w, patch, BLOCK_H=block_h, BLOCK_W=block_w)
    return out


class _Impl:
    """The interface fastcon.masking's autograd Functions call (see masking._OpsImpl)."""

    gather = staticmethod(gather)
    gather_backward = staticmethod(gather_backward)
    unmask = staticmethod(unmask)
    unmask_backward = staticmethod(unmask_backward)
    image = staticmethod(image)


IMPL = _Impl()
