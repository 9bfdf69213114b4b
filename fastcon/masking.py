"""Siamese masking of patch tokens (SPEC section 2): ``siamese_mask``, ``unmask``, ``mask_image``.

Two views of an image are encoded from the same random subset of their patch tokens (SoftCon's
Siamese masking): ``siamese_mask`` draws the subset once and ``ids_keep`` carries it to the
other branch. How the fused backends work:
- the kept positions are drawn on the tokens' device from ``generator``: uniform noise per row
  (float64, so that ties, which would bias the subset, practically never happen), its K
  smallest entries by ``topk`` (O(L) per row, no full sort), then a sort of those K indices.
  Sorted ids make every gather and scatter walk memory forwards, and make validity cheap to
  check (strictly increasing rows are unique);
- the gather adds pos_embed in the same pass (one read of each kept token, one write), in
  fp32, rounded once;
- every backward is one pass that writes each output row exactly once: d tokens is never
  zero-filled first and scattered into after, and the pos_embed gradient's sum over the batch
  happens in the same pass, in a fixed order on cpu (deterministic, no atomics).
The reference backend is the dense spec (``fastcon.reference``), differentiated by autograd.
"""

from __future__ import annotations

import numbers

import torch

from fastcon import _backends, _checks, reference

OPS = ("siamese_mask", "unmask", "mask_image")


# --------------------------------------------------------------------------------------------
# argument checks


def resolve_keep(keep, length: int) -> int:
    """K from ``keep``: an int K in [1, L], or a ratio in (0, 1] (K = round(L * ratio), at least 1;
    Python's round, halves to even)."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be an int K or a float ratio, got {type(keep).__name__}")
    if isinstance(keep, numbers.Integral):
        return _checks.integer("keep", keep, low=1, high=length)
    ratio = _checks.real("keep", keep, low=0.0, high=1.0, low_open=True)
    return max(1, round(length * ratio))


def check_ids_keep(ids_keep, batch: int, length: int, ref: torch.Tensor, ref_name: str, length_from: str) -> int:
    """ids_keep (B, K) int64 on ref's device, rows strictly increasing in [0, L); returns K.

    Reading the values costs one device synchronisation on CUDA (a few B * K reductions)."""
    _checks.tensor("ids_keep", ids_keep)
    if ids_keep.dtype != torch.int64:
        raise TypeError(f"ids_keep must be an int64 tensor, got {ids_keep.dtype}")
    if ids_keep.dim() != 2:
        raise ValueError(f"ids_keep must be 2-D (B, K), got shape {tuple(ids_keep.shape)}")
    _checks.same_device("ids_keep", ids_keep, ref_name, ref)
    if ids_keep.shape[0] != batch:
        raise ValueError(
            f"ids_keep must have one row per sample (B = {batch}, from {ref_name}), got shape {tuple(ids_keep.shape)}"
        )
    k = ids_keep.shape[1]
    if not 1 <= k <= length:
        raise ValueError(f"ids_keep must have 1 <= K <= L = {length} ({length_from}) columns, got K = {k}")
    steps = ids_keep[:, 1:] - ids_keep[:, :-1]
    below, above, repeated, descending = torch.stack(
        [ids_keep.min() < 0, ids_keep.max() >= length, (steps == 0).any(), (steps < 0).any()]
    ).tolist()
    if below or above:
        raise ValueError(
            f"ids_keep must hold positions in [0, L) with L = {length} ({length_from}), "
            f"got values in [{int(ids_keep.min())}, {int(ids_keep.max())}]; was it made for another L?"
        )
    if repeated:
        raise ValueError("ids_keep rows must be unique positions, got a row with a repeated position")
    if descending:
        raise ValueError("ids_keep rows must be sorted ascending, got a row that is not")
    return k


def _check_tokens(name: str, x, dims: int, axes: str) -> None:
    _checks.tensor(name, x, dims=dims, floating=True)
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)} ({axes})")


def _check_pos_embed(pos_embed, tokens: torch.Tensor) -> None:
    _checks.tensor("pos_embed", pos_embed, dims=3, floating=True)
    _checks.same_device("pos_embed", pos_embed, "tokens", tokens)
    _checks.same_dtype("pos_embed", pos_embed, "tokens", tokens)
    b, length, d = tokens.shape
    if pos_embed.shape[0] not in (1, b) or tuple(pos_embed.shape[1:]) != (length, d):
        raise ValueError(
            f"pos_embed must have shape (1, L, D) or (B, L, D) = (1 or {b}, {length}, {d}), "
            f"got {tuple(pos_embed.shape)}"
        )


def _check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator must be on tokens' device ({device}), got a {generator.device} generator")


def _fill_row(fill, visible: torch.Tensor) -> torch.Tensor:
    """fill as a (D,) tensor of visible's dtype: a number, or a tensor of D values shaped (D,) or
    (1, ..., 1, D) (e.g. an MAE-style (1, 1, D) mask token); tensors keep their autograd graph."""
    d = visible.shape[2]
    if isinstance(fill, torch.Tensor):
        _checks.tensor("fill", fill, floating=True)
        _checks.same_device("fill", fill, "visible", visible)
        _checks.same_dtype("fill", fill, "visible", visible)
        if fill.dim() == 0 or fill.shape[-1] != d or fill.numel() != d:
            raise ValueError(f"fill must be a number or a tensor of shape (D,) = ({d},), got {tuple(fill.shape)}")
        return fill.reshape(d)
    value = _checks.real("fill", fill)
    return torch.full((d,), value, dtype=visible.dtype, device=visible.device)


# --------------------------------------------------------------------------------------------
# the random subsets


def random_ids_keep(
    batch: int, length: int, k: int, *, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """(B, K) int64: each row a uniformly random K-subset of [0, L), sorted ascending.

    Uniform because the K smallest of L i.i.d. uniforms are equally likely to sit at any K
    positions; reproducible for a seeded ``generator`` (which must live on ``device``)."""
    noise = torch.rand(batch, length, generator=generator, device=device, dtype=torch.float64)
    ids = noise.topk(k, dim=1, largest=False, sorted=False).indices
    return ids.sort(dim=1).values


# --------------------------------------------------------------------------------------------
# the autograd Functions shared by every fused backend (impl: see _OpsImpl)


class _SiameseMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, pos_embed, ids_keep, impl):
        ctx.save_for_backward(ids_keep)
        ctx.length = tokens.shape[1]
        ctx.pos_batch = 0 if pos_embed is None else pos_embed.shape[0]
        ctx.impl = impl
        return impl.gather(tokens, ids_keep, pos_embed)

    @staticmethod
    def backward(ctx, grad_visible):
        _checks.first_order_only("fastcon.siamese_mask")
        (ids_keep,) = ctx.saved_tensors
        need_tokens, need_pos = ctx.needs_input_grad[:2]
        if not (need_tokens or need_pos):
            return None, None, None, None
        grad_tokens, grad_pos = ctx.impl.gather_backward(
            grad_visible.contiguous(), ids_keep, ctx.length, need_tokens, ctx.pos_batch if need_pos else 0
        )
        return (grad_tokens if need_tokens else None), (grad_pos if need_pos else None), None, None


class _Unmask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, visible, fill, ids_keep, length, impl):
        ctx.save_for_backward(ids_keep)
        ctx.fill_dtype = fill.dtype
        ctx.impl = impl
        return impl.unmask(visible.contiguous(), ids_keep, length, fill.contiguous())

    @staticmethod
    def backward(ctx, grad_out):
        _checks.first_order_only("fastcon.unmask")
        (ids_keep,) = ctx.saved_tensors
        need_visible, need_fill = ctx.needs_input_grad[:2]
        if not (need_visible or need_fill):
            return None, None, None, None, None
        grad_visible, grad_fill = ctx.impl.unmask_backward(grad_out.contiguous(), ids_keep, need_fill)
        return (
            grad_visible if need_visible else None,
            grad_fill.to(ctx.fill_dtype) if need_fill else None,
            None,
            None,
            None,
        )


class _MaskImage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, patch, ids_keep, impl):
        ctx.save_for_backward(ids_keep)
        ctx.patch, ctx.impl = patch, impl
        return impl.image(images.contiguous(), patch, ids_keep)

    @staticmethod
    def backward(ctx, grad_out):
        (ids_keep,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        # zeroing is linear and its own adjoint: the same mask on the gradient, through this
        # Function again so that second-order gradients (create_graph=True) are exact too
        return _MaskImage.apply(grad_out, ctx.patch, ids_keep, ctx.impl), None, None, None


# --------------------------------------------------------------------------------------------
# backends: an impl has gather / gather_backward / unmask / unmask_backward / image, with the
# contracts of reference.mask_gather / mask_gather_backward / mask_unmask / mask_unmask_backward
# / mask_image


class _OpsImpl:
    """The mask_* ops registered with TORCH_LIBRARY (csrc/), dispatched by device."""

    def __init__(self, namespace: str, ext: str):
        self.namespace, self.ext = namespace, ext

    def _ops(self):
        _backends.load_extension(self.ext)
        return getattr(torch.ops, self.namespace)

    def gather(self, tokens, ids_keep, pos_embed):
        return self._ops().mask_gather(tokens, ids_keep, pos_embed)

    def gather_backward(self, grad_visible, ids_keep, length, need_tokens, pos_batch):
        return self._ops().mask_gather_backward(grad_visible, ids_keep, length, need_tokens, pos_batch)

    def unmask(self, visible, ids_keep, length, fill):
        return self._ops().mask_unmask(visible, ids_keep, length, fill)

    def unmask_backward(self, grad_out, ids_keep, need_fill):
        return self._ops().mask_unmask_backward(grad_out, ids_keep, need_fill)

    def image(self, images, patch, ids_keep):
        return self._ops().mask_image(images, patch, ids_keep)


def _triton_impl():
    from fastcon.kernels.triton import masking as k

    return k.IMPL


for _op in OPS:
    _backends.register(_op, "reference", lambda: None)
    _backends.register(_op, "cpu", lambda: _OpsImpl("fastcon", "_C"))
    _backends.register(_op, "triton", _triton_impl)
    _backends.register(_op, "cuda", lambda: _OpsImpl("fastcon", "_C"))  # csrc/cuda, CUDA tensors
    _backends.register(_op, "cuda_simt", lambda: _OpsImpl("fastcon_simt", "_C_simt"))  # tests only


# --------------------------------------------------------------------------------------------
# public API


def siamese_mask(
    tokens: torch.Tensor,
    keep: int | float | None = None,
    *,
    pos_embed: torch.Tensor | None = None,
    ids_keep: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep a random subset of K patch tokens per sample, adding positional embeddings on the way.

    Args:
        tokens: (B, L, D) patch tokens (fp32, fp16, bf16; fp64 for checks). Any batch and row
            strides (e.g. ``x[:, 1:]`` without its class token); D must be unit-stride or it is copied.
        keep: K, an int in [1, L], or the kept fraction in (0, 1] (K = round(L * keep), at least 1).
            May be None when ``ids_keep`` is given.
        pos_embed: optional (1, L, D) or (B, L, D) positional embeddings, tokens' dtype and device;
            added in fp32 in the same pass (gradient summed over the batch for a (1, L, D) table).
        ids_keep: (B, K) int64 kept positions, rows sorted ascending and unique: pass the ids of
            one branch to mask another branch alike. Drawn from ``generator`` when None.
        generator: torch.Generator on tokens' device for drawing ids_keep (reproducible masks).
        backend: "auto", "reference", "cpu", "triton" or "cuda" (see ``fastcon.backends()``).

    Returns: ``(visible, ids_keep)``: visible (B, K, D) in tokens' dtype,
    ``visible[b, k] = tokens[b, ids_keep[b, k]] + pos_embed[b or 0, ids_keep[b, k]]``; gradients
    flow to tokens and pos_embed.
    """
    _check_tokens("tokens", tokens, 3, "B, L, D")
    b, length, _ = tokens.shape
    if pos_embed is not None:
        _check_pos_embed(pos_embed, tokens)
    if ids_keep is None:
        if keep is None:
            raise ValueError("keep must be given (an int K or a ratio) unless ids_keep is")
        k = resolve_keep(keep, length)
        _check_generator(generator, tokens.device)
        ids_keep = random_ids_keep(b, length, k, generator=generator, device=tokens.device)
    else:
        if generator is not None:
            raise ValueError("generator draws ids_keep: pass either ids_keep or generator, not both")
        k = check_ids_keep(ids_keep, b, length, tokens, "tokens", "tokens.shape[1]")
        if keep is not None and resolve_keep(keep, length) != k:
            raise ValueError(
                f"keep gives K = {resolve_keep(keep, length)} kept tokens of L = {length}, "
                f"but ids_keep has K = {k} columns; pass keep=None with ids_keep"
            )
    name, impl = _backends.select("siamese_mask", backend, tokens.device)
    if name == "reference":
        return reference.mask_gather(tokens, ids_keep, pos_embed), ids_keep
    return _SiameseMask.apply(tokens, pos_embed, ids_keep, impl), ids_keep


def unmask(
    visible: torch.Tensor,
    ids_keep: torch.Tensor,
    L: int,
    fill: float | torch.Tensor = 0.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Put visible tokens back at their positions in a length-L sequence (e.g. before an MAE decoder).

    Args:
        visible: (B, K, D) tokens, as returned by ``siamese_mask`` (or encoded from them).
        ids_keep: (B, K) int64, the positions ``siamese_mask`` returned.
        L: the full sequence length (K <= L; every id < L).
        fill: what goes at the dropped positions: a number, or a learned mask token of D values,
            shape (D,) or (1, 1, D), visible's dtype and device (its gradient is returned).
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns: (B, L, D) in visible's dtype; gradients flow to visible and to a tensor fill.
    """
    _check_tokens("visible", visible, 3, "B, K, D")
    length = _checks.integer("L", L)
    if length < 1:
        raise ValueError(f"L must be >= 1, got {length}")
    check_ids_keep(ids_keep, visible.shape[0], length, visible, "visible", "the L argument")
    if ids_keep.shape[1] != visible.shape[1]:
        raise ValueError(
            f"ids_keep must have one column per visible token (K = {visible.shape[1]}), got shape {tuple(ids_keep.shape)}"
        )
    fill_row = _fill_row(fill, visible)
    name, impl = _backends.select("unmask", backend, visible.device)
    if name == "reference":
        return reference.mask_unmask(visible, ids_keep, length, fill_row)
    return _Unmask.apply(visible, fill_row, ids_keep, length, impl)


def mask_image(images: torch.Tensor, patch: int, ids_keep: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Zero the pixels of the dropped patches of an image batch (Siamese masking for CNN backbones).

    Args:
        images: (B, C, H, W) images (fp32, fp16, bf16; fp64 for checks).
        patch: the patch size; must divide H and W. Patch (i, j) of the (H / patch) x (W / patch)
            grid is position i * (W / patch) + j (row-major, as ViT patch tokens are numbered).
        ids_keep: (B, K) int64 kept positions (as returned by ``siamese_mask`` for L = number of patches).
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns: a new (B, C, H, W) tensor, dropped pixels exactly 0 (even NaN ones); the gradient is
    masked alike.
    """
    _check_tokens("images", images, 4, "B, C, H, W")
    p = _checks.integer("patch", patch)
    if p < 1:
        raise ValueError(f"patch must be >= 1, got {p}")
    h, w = images.shape[2:]
    if h % p or w % p:
        raise ValueError(f"patch must divide the image height and width (H, W) = ({h}, {w}), got patch = {p}")
    check_ids_keep(ids_keep, images.shape[0], (h // p) * (w // p), images, "images", "(H / patch) * (W / patch)")
    name, impl = _backends.select("mask_image", backend, images.device)
    if name == "reference":
        return reference.mask_image(images, p, ids_keep)
    return _MaskImage.apply(images, p, ids_keep, impl)
