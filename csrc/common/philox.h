// Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
// SC'11; the Random123 generator) and the fastcon normal transform, for one element.
//
// Shared by the CPU kernels (csrc/cpu, which also run a SIMD copy of the same operations) and
// the CUDA kernels (csrc/cuda): no torch includes, everything FASTCON_HOST_DEVICE.
// The stream and the transform are specified in fastcon/reference.py (philox_* functions):
//   counter = (idx_lo, idx_hi, 0, 0) with idx the flat element index, key = (seed_lo, seed_hi);
//   u1 = uniform(word 0), u2 = uniform(word 1), z = sqrt(-2 ln u1) cos(2 pi u2).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FASTCON_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTCON_HOST_DEVICE inline
#endif

// fp32 multiply and add that are never fused into an FMA: nvcc contracts a * b + c by default
// (-fmad=true), which would change the transform's last bits on the GPU. The _rn intrinsics are
// never contracted; elsewhere the callers compile with contraction off.
#if defined(__CUDA_ARCH__)
#define FASTCON_FMUL(a, b) __fmul_rn((a), (b))
#define FASTCON_FADD(a, b) __fadd_rn((a), (b))
#else
#define FASTCON_FMUL(a, b) ((a) * (b))
#define FASTCON_FADD(a, b) ((a) + (b))
#endif

namespace fastcon::philox {

// Round multipliers and Weyl key increments of Philox4x32 (Random123's PHILOX_M4x32_*, PHILOX_W32_*).
constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Words {
  uint32_t w[4];
};

// One Philox round: two 32 x 32 -> 64-bit products, then a Feistel-like swap with the key.
FASTCON_HOST_DEVICE Words single_round(Words c, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kMul0) * c.w[0];
  const uint64_t p1 = static_cast<uint64_t>(kMul1) * c.w[2];
  Words out;
  out.w[0] = static_cast<uint32_t>(p1 >> 32) ^ c.w[1] ^ k0;
  out.w[1] = static_cast<uint32_t>(p1);
  out.w[2] = static_cast<uint32_t>(p0 >> 32) ^ c.w[3] ^ k1;
  out.w[3] = static_cast<uint32_t>(p0);
  return out;
}

// Philox4x32-10 of a 128-bit counter under the 64-bit key `seed` (key words: low, high).
FASTCON_HOST_DEVICE Words philox4x32_10(Words counter, uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kRounds; ++r) {
    if (r > 0) k0 += kWeyl0, k1 += kWeyl1;  // the key is bumped between rounds, not before the first
    counter = single_round(counter, k0, k1);
  }
  return counter;
}

// The counter of flat element index `idx`.
FASTCON_HOST_DEVICE Words element_counter(uint64_t idx) {
  return Words{{static_cast<uint32_t>(idx), static_cast<uint32_t>(idx >> 32), 0u, 0u}};
}

// ---- the normal transform, in fp32 -------------------------------------------------------------
// Written without fused multiply-adds (compile with contraction off; FASTCON_FMUL / FASTCON_FADD
// keep nvcc from contracting) so that every ISA of the CPU backend, scalar or SIMD, and the CUDA
// kernels (IEEE sqrt, nvcc's default) give the same bits. Within 2 ulp of max(1, sqrt(-2 ln u1))
// of the exact value (fastcon/reference.py computes it in float64; 1.997 ulp measured over all
// 2^23 values of each uniform).

// u = (w >> 9) * 2^-23 + 2^-24: the top 23 bits, centred, exactly representable, in (0, 1).
FASTCON_HOST_DEVICE float uniform_open(uint32_t w) {
  return FASTCON_FADD(FASTCON_FMUL(static_cast<float>(w >> 9), 1.1920928955078125e-07f), 5.9604644775390625e-08f);
}

FASTCON_HOST_DEVICE uint32_t float_bits(float x) {
  union {
    float f;
    uint32_t u;
  } v;
  v.f = x;
  return v.u;
}

FASTCON_HOST_DEVICE float bits_float(uint32_t x) {
  union {
    uint32_t u;
    float f;
  } v;
  v.u = x;
  return v.f;
}

// Polynomial coefficients shared with the SIMD copies (csrc/cpu/diffusion_impl.h): least-squares
// fits on Chebyshev nodes, rounded to fp32 (max errors measured over all 2^23 possible u:
// -2 ln u within 0.87 ulp, cos(2 pi u) within 2^-23 absolute).
namespace coef {
constexpr float kLn2Hi = 0.693359375f;              // 9 significant bits: e * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440054690583e-4f;  // ln 2 - kLn2Hi
// ln(1 + f) = f - f^2/2 + f^3 P(f) on f in [sqrt(1/2) - 1, sqrt(2) - 1], P of degree 7
// (scalars, not arrays: CUDA device code can read constexpr scalars but not arrays)
constexpr float kLog0 = 0.3333335518836975f, kLog1 = -0.2500085234642029f, kLog2 = 0.19999825954437256f,
                kLog3 = -0.16621370613574982f, kLog4 = 0.14227114617824554f, kLog5 = -0.13202103972434998f,
                kLog6 = 0.1262032687664032f, kLog7 = -0.07362867891788483f;
// sin(x) = x + x^3 Q(x^2) on |x| <= pi/2, Q of degree 4
constexpr float kSin0 = -0.1666666716337204f, kSin1 = 0.008333330973982811f, kSin2 = -0.00019840864115394652f,
                kSin3 = 2.7525202312972397e-06f, kSin4 = -2.3886096656156042e-08f;
constexpr float kTwoPi = 6.28318530717958647692f;
}  // namespace coef

// -2 ln u for u in [2^-24, 1): u = m 2^e with m in [sqrt(1/2), sqrt(2)), then a polynomial in m - 1.
FASTCON_HOST_DEVICE float minus_two_log(float u) {
  using namespace coef;
  const uint32_t bits = float_bits(u);
  const uint32_t mant = bits & 0x007FFFFFu;
  const uint32_t big = (mant + (0x00800000u - 0x003504F4u)) >> 23;  // 1 when 1.mant > sqrt(2)
  const float m = bits_float(mant | (0x3F800000u - (big << 23)));    // 1.mant, halved when big
  const float e = static_cast<float>((bits >> 23) + big) - 127.0f;
  const float f = m - 1.0f;  // exact
  const float f2 = FASTCON_FMUL(f, f);
  float p = kLog7;
  p = FASTCON_FADD(FASTCON_FMUL(p, f), kLog6);
  p = FASTCON_FADD(FASTCON_FMUL(p, f), kLog5);
  p = FASTCON_FADD(FASTCON_FMUL(p, f), kLog4);
  p = FASTCON_FADD(FASTCON_FMUL(p, f), kLog3);
  p = FASTCON_FADD(FASTCON_FMUL(p, f), kLog2);
  p = FASTCON_FADD(FASTCON_FMUL(p, f), kLog1);
  p = FASTCON_FADD(FASTCON_FMUL(p, f), kLog0);
  const float ln_m = FASTCON_FADD(f, FASTCON_FADD(FASTCON_FMUL(f2, -0.5f), FASTCON_FMUL(FASTCON_FMUL(f2, f), p)));
  const float ln_u = FASTCON_FADD(FASTCON_FMUL(e, kLn2Hi), FASTCON_FADD(FASTCON_FMUL(e, kLn2Lo), ln_m));
  return -2.0f * ln_u;
}

// cos(2 pi u) for u in (0, 1): = cos(2 pi b) with b = min(u, 1 - u) in (0, 1/2], = sin(2 pi c)
// with c = 1/4 - b in [-1/4, 1/4]; b and c are exact (u is a multiple of 2^-24).
FASTCON_HOST_DEVICE float cos_two_pi(float u) {
  using namespace coef;
  const float one_minus = 1.0f - u;
  const float b = u < one_minus ? u : one_minus;
  const float x = FASTCON_FMUL(0.25f - b, kTwoPi);
  const float x2 = FASTCON_FMUL(x, x);
  float q = kSin4;
  q = FASTCON_FADD(FASTCON_FMUL(q, x2), kSin3);
  q = FASTCON_FADD(FASTCON_FMUL(q, x2), kSin2);
  q = FASTCON_FADD(FASTCON_FMUL(q, x2), kSin1);
  q = FASTCON_FADD(FASTCON_FMUL(q, x2), kSin0);
  return FASTCON_FADD(x, FASTCON_FMUL(FASTCON_FMUL(x, x2), q));
}

// The standard normal of one element from its Philox words 0 and 1 (Box-Muller, cosine branch).
FASTCON_HOST_DEVICE float normal_from_words(uint32_t w0, uint32_t w1) {
  const float r = sqrtf(minus_two_log(uniform_open(w0)));
  return FASTCON_FMUL(r, cos_two_pi(uniform_open(w1)));
}

FASTCON_HOST_DEVICE float normal_at(uint64_t idx, uint64_t seed) {
  const Words w = philox4x32_10(element_counter(idx), seed);
  return normal_from_words(w.w[0], w.w[1]);
}

}  // namespace fastcon::philox
