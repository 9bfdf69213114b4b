"""Triton kernels of the diffusion noise schedule (SPEC section 3; contract in fastcon.reference).

Every kernel is one pass over a (B, per_sample) batch on a grid (blocks of a sample, B). Seeded
noise is regenerated per element: Philox4x32-10 on uint32 words (``tl.umulhi`` for the high
halves), counter = (flat index lo, hi, 0, 0), key = the seed's two words, then the same fp32
transform as the C++ kernels (csrc/common/philox.h; the polynomial coefficients below are that
header's), so that the noise agrees with the CPU backend to the last bit where both round alike
(the interpreter does; a GPU may contract multiply-adds, which stays within an ulp or two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of uint32 counter words under the uint32 key words (k0, k1)."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _uniform(w):
    return (w >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.9604644775390625e-08


# The transform's polynomials: the coefficients of csrc/common/philox.h (coef::kLog*, coef::kSin*).


@triton.jit
def _minus_two_log(u):
    bits = u.to(tl.uint32, bitcast=True)
    mant = bits & 0x007FFFFF
    big = (mant + 0x004AFB0C) >> 23  # 1 when 1.mant > sqrt(2)
    m = (mant | (0x3F800000 - (big << 23))).to(tl.float32, bitcast=True)
    e = ((bits >> 23) + big).to(tl.float32) - 127.0
    f = m - 1.0
    f2 = f * f
    p = f * -0.07362867891788483 + 0.1262032687664032
    p = p * f + -0.13202103972434998
    p = p * f + 0.14227114617824554
    p = p * f + -0.16621370613574982
    p = p * f + 0.19999825954437256
    p = p * f + -0.2500085234642029
    p = p * f + 0.3333335518836975
    ln_m = f + (f2 * -0.5 + (f2 * f) * p)
    ln_u = e * 0.693359375 + (e * -2.12194440054690583e-4 + ln_m)
    return -2.0 * ln_u


@triton.jit
def _cos_two_pi(u):
    b = tl.minimum(u, 1.0 - u)
    x = (0.25 - b) * 6.283185307179586
    x2 = x * x
    q = x2 * -2.3886096656156042e-08 + 2.7525202312972397e-06
    q = q * x2 + -0.00019840864115394652
    q = q * x2 + 0.008333330973982811
    q = q * x2 + -0.1666666716337204
    return x + (x * x2) * q


@triton.jit
def _normal(idx, k0, k1):
    """Standard normals of flat element indices idx (int64)."""
    lo = idx.to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    zero = lo * 0
    w0, w1, _, _ = _philox(lo, hi, zero, zero, k0, k1)
    r = tl.sqrt_rn(_minus_two_log(_uniform(w0)))
    return r * _cos_two_pi(_uniform(w1))


@triton.jit
def _noise(noise_ptr, idx, mask, k0, k1, SEEDED: tl.constexpr):
    """The noise at flat indices idx: Philox normals of the seed's key words, or loaded."""
    if SEEDED:
        return _normal(idx, k0.to(tl.uint32), k1.to(tl.uint32))
    else:
        return tl.load(noise_ptr + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _residual(pred_ptr, x0_ptr, noise_ptr, a, s, idx, mask, k0, k1, SEEDED: tl.constexpr, TARGET: tl.constexpr):
    """pred - target at flat indices idx, target = eps (0), x0 (1) or v = a eps - s x0 (2), in fp32."""
    p = tl.load(pred_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x0_ptr + idx, mask=mask & (TARGET != 0), other=0.0).to(tl.float32)
    if TARGET == 0:
        t = _noise(noise_ptr, idx, mask, k0, k1, SEEDED)
    elif TARGET == 1:
        t = x
    else:
        t = a * _noise(noise_ptr, idx, mask, k0, k1, SEEDED) - s * x
    return p - t


@triton.jit(do_not_specialize=["k0", "k1"])
def _philox_words_kernel(ctr_ptr, out_ptr, n, k0, k1, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c0 = tl.load(ctr_ptr + offs * 4 + 0, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(ctr_ptr + offs * 4 + 1, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(ctr_ptr + offs * 4 + 2, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(ctr_ptr + offs * 4 + 3, mask=mask, other=0).to(tl.uint32)
    w0, w1, w2, w3 = _philox(c0, c1, c2, c3, k0.to(tl.uint32), k1.to(tl.uint32))
    tl.store(out_ptr + offs * 4 + 0, w0.to(tl.int64), mask=mask)
    tl.store(out_ptr + offs * 4 + 1, w1.to(tl.int64), mask=mask)
    tl.store(out_ptr + offs * 4 + 2, w2.to(tl.int64), mask=mask)
    tl.store(out_ptr + offs * 4 + 3, w3.to(tl.int64), mask=mask)


@triton.jit(do_not_specialize=["k0", "k1"])
def _philox_normal_kernel(idx_ptr, out_ptr, n, k0, k1, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, _normal(idx, k0.to(tl.uint32), k1.to(tl.uint32)), mask=mask)


@triton.jit(do_not_specialize=["k0", "k1"])
def _q_sample_kernel(
    x0_ptr, noise_ptr, ca_ptr, cs_ptr, out_ptr, per_sample, k0, k1, SEEDED: tl.constexpr, BLOCK: tl.constexpr
):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_sample
    idx = b.to(tl.int64) * per_sample + offs
    a = tl.load(ca_ptr + b)
    s = tl.load(cs_ptr + b)
    x = tl.load(x0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    e = _noise(noise_ptr, idx, mask, k0, k1, SEEDED)
    tl.store(out_ptr + idx, (a * x + s * e).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["k0", "k1"])
def _loss_kernel(
    pred_ptr,
    x0_ptr,
    noise_ptr,
    ca_ptr,
    cs_ptr,
    partial_ptr,
    per_sample,
    k0,
    k1,
    SEEDED: tl.constexpr,
    TARGET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_sample
    idx = b.to(tl.int64) * per_sample + offs
    a = tl.load(ca_ptr + b)
    s = tl.load(cs_ptr + b)
    r = _residual(pred_ptr, x0_ptr, noise_ptr, a, s, idx, mask, k0, k1, SEEDED, TARGET)
    d = tl.where(mask, r, 0.0)
    tl.store(partial_ptr + b * tl.num_programs(0) + tl.program_id(0), tl.sum(d * d, axis=0))


@triton.jit(do_not_specialize=["k0", "k1"])
def _loss_backward_kernel(
    gsse_ptr,
    pred_ptr,
    x0_ptr,
    noise_ptr,
    ca_ptr,
    cs_ptr,
    grad_ptr,
    per_sample,
    k0,
    k1,
    SEEDED: tl.constexpr,
    TARGET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_sample
    idx = b.to(tl.int64) * per_sample + offs
    a = tl.load(ca_ptr + b)
    s = tl.load(cs_ptr + b)
    two_w = 2.0 * tl.load(gsse_ptr + b)
    g = two_w * _residual(pred_ptr, x0_ptr, noise_ptr, a, s, idx, mask, k0, k1, SEEDED, TARGET)
    tl.store(grad_ptr + idx, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _keys(seed: int) -> tuple[int, int]:
    """The two 32-bit key words of a seed given as a signed or unsigned 64-bit int."""
    seed %= 2**64
    return seed & 0xFFFFFFFF, seed >> 32


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton diffusion kernels take float32, float16 or bfloat16 tensors, got {x.dtype}")


class _Core:
    """The fused diffusion ops on Triton kernels (same contract as the torch.ops.fastcon ones)."""

    def q_sample(self, x0, coef_x0, coef_noise, noise, seed):
        _check_dtype(x0)
        per = x0[0].numel()
        out = torch.empty_like(x0)
        k0, k1 = _keys(seed)
        grid = (triton.cdiv(per, BLOCK), x0.shape[0])
        _q_sample_kernel[grid](
            x0, x0 if noise is None else noise, coef_x0, coef_noise, out, per, k0, k1, noise is None, BLOCK=BLOCK
        )
        return out

    def loss(self, pred, x0, coef_x0, coef_noise, noise, seed, target):
        _check_dtype(x0)
        per = x0[0].numel()
        blocks = triton.cdiv(per, BLOCK)
        partial = torch.empty(x0.shape[0], blocks, dtype=torch.float32, device=x0.device)
        k0, k1 = _keys(seed)
        _loss_kernel[(blocks, x0.shape[0])](
            pred,
            x0,
            x0 if noise is None else noise,
            coef_x0,
            coef_noise,
            partial,
            per,
            k0,
            k1,
            noise is None,
            target,
            BLOCK=BLOCK,
        )
        # block partials in a fixed order: the same sums on every run
        return partial.double().sum(dim=1).float()

    def loss_backward(self, grad_sse, pred, x0, coef_x0, coef_noise, noise, seed, target):
        _check_dtype(x0)
        per = x0[0].numel()
        grad = torch.empty_like(pred)
        k0, k1 = _keys(seed)
        _loss_backward_kernel[(triton.cdiv(per, BLOCK), x0.shape[0])](
            grad_sse,
            pred,
            x0,
            x0 if noise is None else noise,
            coef_x0,
            coef_noise,
            grad,
            per,
            k0,
            k1,
            noise is None,
            target,
            BLOCK=BLOCK,
        )
        return grad

    def normal(self, index, seed):
        idx = index.contiguous()
        out = torch.empty(idx.shape, dtype=torch.float32, device=idx.device)
        k0, k1 = _keys(seed)
        _philox_normal_kernel[(triton.cdiv(max(idx.numel(), 1), BLOCK),)](idx, out, idx.numel(), k0, k1, BLOCK=BLOCK)
        return out

    def philox_uint32(self, counter, seed):
        ctr = counter.contiguous()
        out = torch.empty_like(ctr)
        n = ctr.numel() // 4
        k0, k1 = _keys(seed)
        _philox_words_kernel[(triton.cdiv(max(n, 1), BLOCK),)](ctr, out, n, k0, k1, BLOCK=BLOCK)
        return out


CORE = _Core()
