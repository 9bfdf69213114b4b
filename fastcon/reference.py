"""Dense PyTorch reference implementations: ../shared/SPEC.md written as code.

Everything here materialises the full N x N matrices and relies on autograd for gradients.
It is what the tests trust, so it is written to read like the spec, not to be fast. Arguments
are assumed valid: the public functions check them before calling in here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# 1. Soft contrastive loss


def target_similarity(labels: torch.Tensor | None, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """T (N x N): label cosine, same-scene indicator, or identity; always 1 on the diagonal."""
    eye = torch.eye(n, dtype=torch.bool, device=device)
    if labels is None:
        t = torch.zeros(n, n, dtype=dtype, device=device)
    elif labels.dim() == 1:  # scene ids
        t = (labels[:, None] == labels[None, :]).to(dtype)
    else:  # multi-label vectors: cosine, 0 where either norm is 0
        l = labels.to(dtype)
        norm = l.norm(dim=1)
        lhat = torch.where(norm[:, None] > 0, l / norm.clamp_min(torch.finfo(dtype).tiny)[:, None], torch.zeros_like(l))
        t = lhat @ lhat.T
    return torch.where(eye, torch.ones_like(t), t)


def soft_contrastive_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.1,
    loss: str = "softmax",
    symmetric: bool = True,
    scene_mode: str = "positive",
    hard_weight: float = 0.0,
    bias: float | torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    n = z1.shape[0]
    # the spec's accumulation precision: at least fp32 (float64 stays float64)
    acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
    if normalize:
        u = z1 / z1.norm(dim=1, keepdim=True).clamp_min(1e-12)
        v = z2 / z2.norm(dim=1, keepdim=True).clamp_min(1e-12)
    else:
        u, v = z1, z2
    s = (u @ v.T).to(acc) / temperature  # logits s_ij
    eye = torch.eye(n, dtype=torch.bool, device=z1.device)

    if loss == "softmax":
        if scene_mode == "ignore":
            # same-scene pairs other than the positive leave the softmax; the target is the positive
            keep = (labels[:, None] != labels[None, :]) | eye
            masked = s.masked_fill(~keep, float("-inf"))
            a = torch.logsumexp(masked, dim=1) - s.diagonal()
            b = torch.logsumexp(masked, dim=0) - s.diagonal()
        else:
            t = target_similarity(labels, n, acc, z1.device)
            p = hard_weight * eye.to(acc) + (1 - hard_weight) * t / t.sum(dim=1, keepdim=True)
            q = hard_weight * eye.to(acc) + (1 - hard_weight) * t / t.sum(dim=0, keepdim=True)
            a = torch.logsumexp(s, dim=1) - (p * s).sum(dim=1)
            b = torch.logsumexp(s, dim=0) - (q * s).sum(dim=0)
        per_sample = (a + b) / 2 if symmetric else a
    elif loss == "sigmoid":
        x = s + (0.0 if bias is None else bias)
        t = target_similarity(labels, n, acc, z1.device)
        t = hard_weight * eye.to(acc) + (1 - hard_weight) * t
        per_sample = (F.softplus(x) - t * x).sum(dim=1)
    else:
        raise ValueError(f"loss must be 'softmax' or 'sigmoid', got {loss!r}")

    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def clip_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The CLIP / symmetric InfoNCE loss, which soft_contrastive_loss reduces to with labels=None."""
    u = F.normalize(z1, dim=1)
    v = F.normalize(z2, dim=1)
    logits = u @ v.T / temperature
    target = torch.arange(z1.shape[0], device=z1.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# --------------------------------------------------------------------------------------------
# 1b. The fused-kernel contract (what sc_forward / sc_backward compute), densely.
#
# The fused backends split the loss in two: the blockwise N x M pass that only a kernel can do
# without materialising N x M (log-sum-exps and softmax-weighted sums, like attention), and
# the low-rank target terms of SPEC section 5, done in torch in O(N * D * C). These functions
# state the kernel half; tests compare every backend's raw kernel outputs with them.

MODE_SOFTMAX = 0  # plain logits
MODE_SOFTMAX_IGNORE = 1  # same-id pairs other than the positive are left out
MODE_SIGMOID = 2  # x = s + bias, softplus / sigmoid


def _pair_mask(row_ids, col_ids, row_offset, n, m, device):
    """True where the pair (i, j) takes part: j is i's positive or the ids differ."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    return (j == i + row_offset) | (row_ids[:, None] != col_ids[None, :])


def sc_core_forward(u, v, row_ids, col_ids, row_offset, scale, bias, logit_bound, mode, need_col):
    """row (N,): logsumexp_j s_ij (softmax modes) or sum_j softplus(s_ij + bias) (sigmoid);
    col (M,): logsumexp_i s_ij when need_col (softmax modes), else empty. s = scale * u v^T.
    ``logit_bound`` is only a hint to kernels (|s| <= bound when > 0) and changes no result.

    Precision: the Function subtracts the positive logits s_{i, i + row_offset} (accumulated in
    float64, rounded once: soft_contrastive._logit_dot) from these statistics. Kernels take the
    positive pair's logit the same way (scale * float64 dot, rounded to the storage dtype) in
    forward and backward, so that small losses (the difference of two ~1/tau terms) cancel
    cleanly instead of carrying two independent fp32 roundings of the dot product."""
    del logit_bound
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    s = (u.to(acc) @ v.to(acc).T) * scale
    n, m = s.shape
    empty = s.new_zeros(0)
    if mode == MODE_SIGMOID:
        return F.softplus(s + bias).sum(dim=1), empty
    if mode == MODE_SOFTMAX_IGNORE:
        s = s.masked_fill(~_pair_mask(row_ids, col_ids, row_offset, n, m, s.device), float("-inf"))
    return torch.logsumexp(s, dim=1), (torch.logsumexp(s, dim=0) if need_col else empty)


def sc_core_backward(u, v, row_ids, col_ids, row_offset, scale, bias, logit_bound, mode, row, col, g, h):
    """W_ij = g_i softmax_row_ij + h_j softmax_col_ij (softmax modes; h None means 0) or
    W_ij = g_i sigmoid(s_ij + bias) (sigmoid). Returns (W v (N, D), W^T u (M, D), W 1 (N,))."""
    del logit_bound
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, v = u.to(acc), v.to(acc)
    s = (u @ v.T) * scale
    n, m = s.shape
    if mode == MODE_SIGMOID:
        w = g[:, None] * torch.sigmoid(s + bias)
    else:
        if mode == MODE_SOFTMAX_IGNORE:
            s = s.masked_fill(~_pair_mask(row_ids, col_ids, row_offset, n, m, s.device), float("-inf"))
        w = g[:, None] * torch.exp(s - row[:, None])
        if h is not None:
            w = w + h[None, :] * torch.exp(s - col[None, :])
    return w @ v, w.T @ u, w.sum(dim=1)


# --------------------------------------------------------------------------------------------
# 2. Siamese masking
#
# Shapes: tokens (B, L, D); ids_keep (B, K) int64, each row strictly increasing in [0, L) (the
# public functions check this; kernels may assume it). pos_embed (P, L, D) with P == 1 (one
# table shared by the batch) or P == B. All values are computed in the accumulation dtype
# (fp32; fp64 for fp64 inputs) and rounded once to the storage dtype. These functions are the
# op contracts of csrc/ops.cpp (mask_gather, mask_gather_backward, mask_unmask,
# mask_unmask_backward, mask_image); the reference backend differentiates mask_gather,
# mask_unmask and mask_image by autograd.


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _row_index(ids_keep: torch.Tensor, d: int) -> torch.Tensor:
    return ids_keep[:, :, None].expand(-1, -1, d)


def keep_mask(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L) bool: True at the kept positions ids_keep[b, :]."""
    mask = torch.zeros(ids_keep.shape[0], length, dtype=torch.bool, device=ids_keep.device)
    return mask.scatter_(1, ids_keep, True)


def mask_gather(tokens: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """visible (B, K, D) = tokens[b, ids_keep[b, k]] + pos_embed[b or 0, ids_keep[b, k]].

    The sum is taken in the accumulation dtype and rounded once to tokens' dtype; without
    pos_embed it is an exact copy. Backward (autograd here; ``mask_gather_backward`` for the
    kernels) scatters the gradient to tokens and sums it over b for a (1, L, D) pos_embed."""
    b, _, d = tokens.shape
    acc = _acc_dtype(tokens)
    idx = _row_index(ids_keep, d)
    visible = tokens.to(acc).gather(1, idx)
    if pos_embed is not None:
        visible = visible + pos_embed.to(acc).expand(b, -1, -1).gather(1, idx)
    return visible.to(tokens.dtype)


def mask_gather_backward(
    grad_visible: torch.Tensor, ids_keep: torch.Tensor, length: int, need_tokens: bool, pos_batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel contract of mask_gather's backward, given d visible (B, K, D):

    - grad_tokens (B, L, D): grad_visible[b, k] at row ids_keep[b, k], 0 elsewhere; an empty
      (0,) tensor when not need_tokens;
    - grad_pos: pos_batch == B: the same (B, L, D) values; pos_batch == 1: (1, L, D), its sum
      over b, accumulated in the accumulation dtype in the order b = 0, 1, ... (deterministic
      on cpu) and rounded once; pos_batch == 0: an empty (0,) tensor (no pos_embed gradient).
    Both in grad_visible's dtype."""
    b, _, d = grad_visible.shape
    acc = _acc_dtype(grad_visible)
    full = grad_visible.new_zeros(b, length, d, dtype=acc).scatter_(1, _row_index(ids_keep, d), grad_visible.to(acc))
    empty = grad_visible.new_zeros(0)
    grad_tokens = full.to(grad_visible.dtype) if need_tokens else empty
    if pos_batch == 0:
        grad_pos = empty
    elif pos_batch == 1:
        grad_pos = full.sum(dim=0, keepdim=True).to(grad_visible.dtype)
    else:
        grad_pos = full.to(grad_visible.dtype)
    return grad_tokens, grad_pos


def mask_unmask(visible: torch.Tensor, ids_keep: torch.Tensor, length: int, fill: torch.Tensor) -> torch.Tensor:
    """out (B, L, D): out[b, ids_keep[b, k]] = visible[b, k]; fill (D,) (visible's dtype) at
    every other position. An exact copy, no arithmetic."""
    b, _, d = visible.shape
    return fill.expand(b, length, d).scatter(1, _row_index(ids_keep, d), visible)


def mask_unmask_backward(
    grad_out: torch.Tensor, ids_keep: torch.Tensor, need_fill: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel contract of mask_unmask's backward, given d out (B, L, D):

    - grad_visible (B, K, D) = grad_out[b, ids_keep[b, k]] (grad_out's dtype);
    - grad_fill (D,): the sum of grad_out over every dropped (b, l), in the accumulation dtype
      (fp32; fp64 for fp64), not rounded (the caller casts to fill's dtype); an empty (0,)
      tensor when not need_fill. On cpu the summation order is fixed (deterministic)."""
    b, length, d = grad_out.shape
    acc = _acc_dtype(grad_out)
    grad_visible = grad_out.gather(1, _row_index(ids_keep, d))
    if not need_fill:
        return grad_visible, grad_out.new_zeros(0, dtype=acc)
    dropped = ~keep_mask(ids_keep, length)
    grad_fill = (grad_out.to(acc) * dropped[:, :, None]).sum(dim=(0, 1))
    return grad_visible, grad_fill


def mask_image(images: torch.Tensor, patch: int, ids_keep: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) with every pixel of a dropped patch set to 0 (exactly 0, even where
    the input is NaN or inf). Patch (i, j) of the (H / patch) x (W / patch) grid is number
    i * (W / patch) + j (row-major, like ViT patch tokens). Its backward is the same op on
    the gradient."""
    b, _, h, w = images.shape
    gh, gw = h // patch, w // patch
    keep = keep_mask(ids_keep, gh * gw).view(b, 1, gh, 1, gw, 1).expand(b, 1, gh, patch, gw, patch)
    return torch.where(keep.reshape(b, 1, h, w), images, images.new_zeros(()))


# --------------------------------------------------------------------------------------------
# 3. Diffusion noise schedule
