"""Fake (meta) kernels of the fastcon ops, so that torch.compile can trace through them."""

from __future__ import annotations

import torch


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastcon::sc_forward")
def _sc_forward(u, v, row_ids, col_ids, row_offset, scale, bias, bounded, mode, need_col):
    m = v.shape[0] if (need_col and mode != 2) else 0
    return u.new_empty(u.shape[0], dtype=_acc(u)), u.new_empty(m, dtype=_acc(u))


@torch.library.register_fake("fastcon::sc_backward")
def _sc_backward(u, v, row_ids, col_ids, row_offset, scale, bias, bounded, mode, row, col, g, h):
    a = _acc(u)
    return u.new_empty(u.shape, dtype=a), v.new_empty(v.shape, dtype=a), u.new_empty(u.shape[0], dtype=a)


@torch.library.register_fake("fastcon::sc_loss_forward")
def _sc_loss_forward(z1, z2, temperature, bias, labels, queue, queue_labels, loss, symmetric, hard_weight, normalize,
                     reduction, scene_ignore):  # fmt: skip
    a, n = _acc(z1), z1.shape[0]
    need_col = loss == "softmax" and symmetric and queue is None
    scene_pos = labels is not None and labels.dim() == 1 and not scene_ignore
    norm = n if normalize else 0
    return (
        z1.new_empty((n,) if reduction == "none" else (), dtype=a),
        z1.new_empty(n, dtype=a),
        z1.new_empty(n if need_col else 0, dtype=a),
        z1.new_empty(0 if scene_ignore else n, dtype=a),
        z1.new_empty(norm, dtype=a),
        z1.new_empty(norm, dtype=a),
        z1.new_empty(n if scene_pos else 0, dtype=torch.int64),
    )


@torch.library.register_fake("fastcon::sc_loss_backward")
def _sc_loss_backward(grad_out, z1, z2, temperature, bias, labels, queue, queue_labels, row, col, r_sum, n1, n2,
                      scenes, loss, symmetric, hard_weight, normalize, reduction, scene_ignore, need_z1, need_z2,
                      need_temperature, need_bias):  # fmt: skip
    return (
        torch.empty_like(z1) if need_z1 else z1.new_empty(0),
        torch.empty_like(z2) if need_z2 else z2.new_empty(0),
        torch.empty_like(temperature) if need_temperature else z1.new_empty(0),
        torch.empty_like(bias) if need_bias and bias is not None else z1.new_empty(0),
    )


# ---- Siamese masking -----------------------------------------------------------------------


@torch.library.register_fake("fastcon::mask_gather")
def _mask_gather(tokens, ids_keep, pos_embed):
    return tokens.new_empty(tokens.shape[0], ids_keep.shape[1], tokens.shape[2])


@torch.library.register_fake("fastcon::mask_gather_backward")
def _mask_gather_backward(grad_visible, ids_keep, L, need_tokens, pos_batch):
    b, _, d = grad_visible.shape
    grad_tokens = grad_visible.new_empty(b, L, d) if need_tokens else grad_visible.new_empty(0)
    grad_pos = grad_visible.new_empty(pos_batch, L, d) if pos_batch > 0 else grad_visible.new_empty(0)
    return grad_tokens, grad_pos


@torch.library.register_fake("fastcon::mask_unmask")
def _mask_unmask(visible, ids_keep, L, fill):
    return visible.new_empty(visible.shape[0], L, visible.shape[2])


@torch.library.register_fake("fastcon::mask_unmask_backward")
def _mask_unmask_backward(grad_out, ids_keep, need_fill):
    b, _, d = grad_out.shape
    grad_fill = grad_out.new_empty(d if need_fill else 0, dtype=_acc(grad_out))
    return grad_out.new_empty(b, ids_keep.shape[1], d), grad_fill


@torch.library.register_fake("fastcon::mask_image")
def _mask_image(images, patch, ids_keep):
    return torch.empty_like(images, memory_format=torch.contiguous_format)


# ---- diffusion -------------------------------------------------------------------------------


@torch.library.register_fake("fastcon::philox_uint32")
def _philox_uint32(counter, seed):
    return counter.new_empty(counter.shape, dtype=torch.int64)


@torch.library.register_fake("fastcon::philox_normal")
def _philox_normal(index, seed):
    return index.new_empty(index.shape, dtype=torch.float32)


@torch.library.register_fake("fastcon::diffusion_q_sample")
def _diffusion_q_sample(x0, coef_x0, coef_noise, noise, seed):
    return torch.empty_like(x0)


@torch.library.register_fake("fastcon::diffusion_loss")
def _diffusion_loss(pred, x0, coef_x0, coef_noise, noise, seed, target):
    return x0.new_empty(x0.shape[0], dtype=_acc(x0))


@torch.library.register_fake("fastcon::diffusion_loss_backward")
def _diffusion_loss_backward(grad_sse, pred, x0, coef_x0, coef_noise, noise, seed, target):
    return torch.empty_like(pred)
