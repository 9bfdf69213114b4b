"""Dense PyTorch reference implementations: ../shared/SPEC.md written as code.

Everything here materialises the full N x N matrices and relies on autograd for gradients.
It is what the tests trust, so it is written to read like the spec, not to be fast. Arguments
are assumed valid: the public functions check them before calling in here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# 1. Soft contrastive loss


def _unit_rows(labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """l_i / ||l_i||, and 0 for a zero row."""
    l = labels.to(dtype)
    norm = l.norm(dim=1)
    return torch.where(norm[:, None] > 0, l / norm.clamp_min(torch.finfo(dtype).tiny)[:, None], torch.zeros_like(l))


def target_similarity(
    labels: torch.Tensor | None, n: int, dtype: torch.dtype, device, col_labels: torch.Tensor | None = None, m=None
) -> torch.Tensor:
    """T (N x M): label cosine, same-scene indicator, or identity; always 1 on the positive
    diagonal (i, i). Columns are the batch's own labels, or ``col_labels`` (M entries) when given."""
    cols = labels if col_labels is None else col_labels
    m = n if m is None else m
    eye = torch.eye(n, m, dtype=torch.bool, device=device)
    if labels is None:
        t = torch.zeros(n, m, dtype=dtype, device=device)
    elif labels.dim() == 1:  # scene ids
        t = (labels[:, None] == cols[None, :]).to(dtype)
    else:  # multi-label vectors: cosine, 0 where either norm is 0
        t = _unit_rows(labels, dtype) @ _unit_rows(cols, dtype).T
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
    queue: torch.Tensor | None = None,
    queue_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPEC sections 1 and 1b. With a ``queue`` (K, D) the columns are [z2; queue] (M = N + K),
    row losses only (no symmetric form), and the queue gets no gradient."""
    n = z1.shape[0]
    # the spec's accumulation precision: at least fp32 (float64 stays float64)
    acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
    keys = z2 if queue is None else torch.cat([z2, queue.detach()])
    m = keys.shape[0]
    if normalize:
        u = z1 / z1.norm(dim=1, keepdim=True).clamp_min(1e-12)
        v = keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-12)
    else:
        u, v = z1, keys
    s = (u @ v.T).to(acc) / temperature  # logits s_ij (N x M)
    eye = torch.eye(n, m, dtype=torch.bool, device=z1.device)
    col_labels = None
    if queue is not None and labels is not None:  # ids compared as int64, label vectors in acc
        cast = torch.int64 if labels.dim() == 1 else acc
        col_labels = torch.cat([labels.to(cast), queue_labels.to(cast)])

    if loss == "softmax":
        if scene_mode == "ignore":
            # same-scene pairs other than the positive leave the softmax; the target is the positive
            cols = labels if col_labels is None else col_labels
            keep = (labels[:, None] != cols[None, :]) | eye
            masked = s.masked_fill(~keep, float("-inf"))
            a = torch.logsumexp(masked, dim=1) - s.diagonal()
            b = torch.logsumexp(masked, dim=0) - s.diagonal() if queue is None else None
        else:
            t = target_similarity(labels, n, acc, z1.device, col_labels, m)
            p = hard_weight * eye.to(acc) + (1 - hard_weight) * t / t.sum(dim=1, keepdim=True)
            a = torch.logsumexp(s, dim=1) - (p * s).sum(dim=1)
            if queue is None:
                q = hard_weight * eye.to(acc) + (1 - hard_weight) * t / t.sum(dim=0, keepdim=True)
                b = torch.logsumexp(s, dim=0) - (q * s).sum(dim=0)
        per_sample = (a + b) / 2 if symmetric and queue is None else a
    elif loss == "sigmoid":
        x = s + (0.0 if bias is None else bias)
        t = target_similarity(labels, n, acc, z1.device, col_labels, m)
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


def sc_core_forward(u, v, row_ids, col_ids, row_offset, scale, bias, bounded, mode, need_col):
    """row (N,): logsumexp_j s_ij (softmax modes) or sum_j softplus(s_ij + bias) (sigmoid);
    col (M,): logsumexp_i s_ij when need_col (softmax modes), else empty. s = scale * u v^T.
    ``scale``: the logit scale 1 / tau and ``bias``: the sigmoid bias (None: 0), 0-dim float64
    tensors on u's device (the ops read them there: no host synchronisation; numbers are
    accepted here). ``bounded`` is only a hint to kernels (|s| <= scale: unit rows, so that
    scale may serve as a fixed max) and changes no result.

    Precision: the Function subtracts the positive logits s_{i, i + row_offset} (accumulated in
    float64, rounded once: soft_contrastive._logit_dot) from these statistics. Kernels take the
    positive pair's logit the same way (scale * float64 dot, rounded to the storage dtype) in
    forward and backward, so that small losses (the difference of two ~1/tau terms) cancel
    cleanly instead of carrying two independent fp32 roundings of the dot product."""
    del bounded
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    s = (u.to(acc) @ v.to(acc).T) * scale
    n, m = s.shape
    empty = s.new_zeros(0)
    if mode == MODE_SIGMOID:
        return F.softplus(s if bias is None else s + bias).sum(dim=1), empty
    if mode == MODE_SOFTMAX_IGNORE:
        s = s.masked_fill(~_pair_mask(row_ids, col_ids, row_offset, n, m, s.device), float("-inf"))
    return torch.logsumexp(s, dim=1), (torch.logsumexp(s, dim=0) if need_col else empty)


def sc_core_backward(u, v, row_ids, col_ids, row_offset, scale, bias, bounded, mode, row, col, g, h):
    """W_ij = g_i softmax_row_ij + h_j softmax_col_ij (softmax modes; h None means 0) or
    W_ij = g_i sigmoid(s_ij + bias) (sigmoid). Returns (W v (N, D), W^T u (M, D), W 1 (N,))."""
    del bounded
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, v = u.to(acc), v.to(acc)
    s = (u @ v.T) * scale
    n, m = s.shape
    if mode == MODE_SIGMOID:
        w = g[:, None] * torch.sigmoid(s if bias is None else s + bias)
    else:
        if mode == MODE_SOFTMAX_IGNORE:
            s = s.masked_fill(~_pair_mask(row_ids, col_ids, row_offset, n, m, s.device), float("-inf"))
        w = g[:, None] * torch.exp(s - row[:, None])
        if h is not None:
            w = w + h[None, :] * torch.exp(s - col[None, :])
    return w @ v, w.T @ u, w.sum(dim=1)


class DenseCore:
    """The kernel contract above as a "core" object (kernel_dtype / forward / backward), the
    interface every fused backend provides to the loss's autograd Function: lets the Function's
    algebra run without a kernel (tests; backend="reference" on a process group)."""

    def kernel_dtype(self, dtype):
        return dtype

    def forward(self, *args):
        return sc_core_forward(*args)

    def backward(self, *args):
        return sc_core_backward(*args)


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
#
# A schedule is a table of betas (float64); the kernels take per-sample coefficients, so that
# one kernel serves every schedule: x_t = a_b x0 + s_b eps with a_b = sqrt(alpha_bar[t_b]),
# s_b = sqrt(1 - alpha_bar[t_b]) (the tables rounded to the accumulation dtype).
#
# Seeded noise: the Philox stream. Element idx of a batch (its flat row-major index in x0's
# shape) gets eps[idx] = normal(Philox4x32-10(counter, key)) with
#   counter = (idx mod 2^32, idx div 2^32, 0, 0)   (four 32-bit words)
#   key     = (seed mod 2^32, seed div 2^32)       (seed a 64-bit unsigned integer)
# and normal(w) = sqrt(-2 ln u(w0)) * cos(2 pi u(w1)), u(w) = (w >> 9) 2^-23 + 2^-24 in (0, 1)
# (Box-Muller, cosine branch, on the top 23 bits of words 0 and 1; words 2 and 3 are unused).
# Philox4x32-10 itself (Salmon et al. 2011, Random123): ten rounds of
#   (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))
# with 32 x 32 -> 64-bit products, M0 = 0xD2511F53, M1 = 0xCD9E8D57, and the key bumped by
# (0x9E3779B9, 0xBB67AE85) mod 2^32 between rounds (not before the first).
# Every backend gives the same Philox words bit for bit. eps is an fp32 number: this module
# computes the transform exactly (float64, rounded once); the kernels evaluate it in fp32 as
# csrc/common/philox.h does (normal_from_words: polynomials for ln and sin, no FMA), which is
# within 2 ulp of max(1, sqrt(-2 ln u1)) of the exact value (1.997 measured, every one of the
# 2^23 values of each uniform paired with random values of the other; the tests allow 4). The cpu and triton kernels agree bit for bit. Noise is never stored by
# the fused backends: the loss and its backward regenerate it from the seed.

PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)  # key increments between rounds
PHILOX_ROUNDS = 10
_U32 = 0xFFFFFFFF

TARGETS = ("epsilon", "x0", "v")  # index = the `target` int of the kernels
TARGET_EPSILON, TARGET_X0, TARGET_V = 0, 1, 2
SCHEDULES = ("linear", "scaled_linear", "cosine")
COSINE_S = 0.008  # the cosine schedule's offset (Nichol and Dhariwal 2021)
COSINE_MAX_BETA = 0.999


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for uint32 values held in int64 (no int64 overflow:
    m is split in 16-bit halves, every partial product stays below 2^49)."""
    low = a * (m & 0xFFFF)
    mid = a * (m >> 16) + (low >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32_10(counter: torch.Tensor, seed: int) -> torch.Tensor:
    """Philox4x32-10 of counters (..., 4) (int64 holding uint32 words) under the 64-bit key
    ``seed`` (key words: seed mod 2^32, seed div 2^32). Returns the (..., 4) output words.
    This is the kernel op ``philox_uint32(counter, seed)``."""
    seed %= 2**64  # the ops carry the seed as a signed int64
    c0, c1, c2, c3 = counter.to(torch.int64).unbind(-1)
    k0, k1 = seed & _U32, seed >> 32
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + PHILOX_WEYL[0]) & _U32, (k1 + PHILOX_WEYL[1]) & _U32
        hi0, lo0 = _mulhilo32(c0, PHILOX_MUL[0])
        hi1, lo1 = _mulhilo32(c2, PHILOX_MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), dim=-1)


def element_counters(index: torch.Tensor) -> torch.Tensor:
    """The Philox counters (..., 4) of flat element indices (int64, >= 0)."""
    idx = index.to(torch.int64)
    zero = torch.zeros_like(idx)
    return torch.stack((idx & _U32, idx >> 32, zero, zero), dim=-1)


def philox_uniform(words: torch.Tensor) -> torch.Tensor:
    """u = (w >> 9) 2^-23 + 2^-24, exactly, in float64: 2^23 values in [2^-24, 1 - 2^-24]."""
    return (words >> 9).to(torch.float64) * 2.0**-23 + 2.0**-24


def philox_normal(index: torch.Tensor, seed: int) -> torch.Tensor:
    """The seeded standard normals of flat element indices (any shape), float32. Computed in
    float64 from the exact uniforms and rounded once. This is the kernel op ``philox_normal``."""
    w = philox4x32_10(element_counters(index), seed)
    u1, u2 = philox_uniform(w[..., 0]), philox_uniform(w[..., 1])
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(torch.float32)


def seeded_noise(seed: int, shape, device=None) -> torch.Tensor:
    """eps of a batch of this shape, materialised (float32): philox_normal of 0 .. numel-1."""
    n = math.prod(shape)
    return philox_normal(torch.arange(n, device=device), seed).view(shape)


def schedule_betas(kind: str, timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """betas (T,) float64. linear: evenly spaced; scaled_linear: evenly spaced square roots,
    squared; cosine: beta_t = min(1 - f(t + 1) / f(t), 0.999), f(t) = cos((t/T + s)/(1 + s) pi/2)^2
    (beta_start / beta_end unused)."""
    f64 = torch.float64
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=f64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=f64) ** 2
    if kind == "cosine":
        f = cosine_alpha_bar(torch.arange(timesteps + 1, dtype=f64), timesteps)
        return (1 - f[1:] / f[:-1]).clamp(max=COSINE_MAX_BETA)
    raise ValueError(f"unknown schedule kind {kind!r}")


def cosine_alpha_bar(t: torch.Tensor, timesteps: int, s: float = COSINE_S) -> torch.Tensor:
    """alpha_bar(t) = f(t) / f(0) of the cosine schedule, f(t) = cos((t/T + s)/(1 + s) pi/2)^2."""

    def f(x):
        return torch.cos((x / timesteps + s) / (1 + s) * (math.pi / 2)) ** 2

    return f(t) / f(torch.zeros_like(t))


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.view(-1, *([1] * (like.dim() - 1)))


def diffusion_noise(x0: torch.Tensor, noise: torch.Tensor | None, seed: int) -> torch.Tensor:
    """eps in the accumulation dtype: the given noise, or the seeded normals of x0's elements."""
    if noise is not None:
        return noise.to(_acc(x0))
    return seeded_noise(seed, x0.shape, x0.device).to(_acc(x0))


def diffusion_q_sample(x0, coef_x0, coef_noise, noise, seed):
    """Kernel op ``diffusion_q_sample``: x_t = a_b x0 + s_b eps, computed in the accumulation
    dtype (fp32; fp64 for fp64 x0) and returned in x0's dtype. x0 (B, ...), coef_* (B,) in the
    accumulation dtype, noise None (seeded) or x0's shape and dtype."""
    eps = diffusion_noise(x0, noise, seed)
    a, s = _per_sample(coef_x0, x0), _per_sample(coef_noise, x0)
    return (a * x0.to(eps.dtype) + s * eps).to(x0.dtype)


def diffusion_target(x0, coef_x0, coef_noise, eps, target: int) -> torch.Tensor:
    """The regression target in the accumulation dtype: eps, x0 or v = a eps - s x0."""
    x = x0.to(eps.dtype)
    if target == TARGET_EPSILON:
        return eps
    if target == TARGET_X0:
        return x
    return _per_sample(coef_x0, x0) * eps - _per_sample(coef_noise, x0) * x


def diffusion_loss(pred, x0, coef_x0, coef_noise, noise, seed, target):
    """Kernel op ``diffusion_loss``: per-sample sums of squared errors sum_i (pred - target)^2,
    (B,) in the accumulation dtype. With target x0 the noise is not used (noise None, any seed)."""
    eps = diffusion_noise(x0, noise, seed) if target != TARGET_X0 else x0.to(_acc(x0))
    diff = pred.to(eps.dtype) - diffusion_target(x0, coef_x0, coef_noise, eps, target)
    return (diff * diff).flatten(1).sum(dim=1)


def diffusion_loss_backward(grad_sse, pred, x0, coef_x0, coef_noise, noise, seed, target):
    """Kernel op ``diffusion_loss_backward``: grad_pred = 2 (pred - target) grad_sse[b], computed
    in the accumulation dtype and returned in pred's dtype (grad_sse (B,) accumulation dtype)."""
    eps = diffusion_noise(x0, noise, seed) if target != TARGET_X0 else x0.to(_acc(x0))
    diff = pred.to(eps.dtype) - diffusion_target(x0, coef_x0, coef_noise, eps, target)
    return (2 * _per_sample(grad_sse, pred) * diff).to(pred.dtype)
