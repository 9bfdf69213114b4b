// Diffusion noise-schedule kernels for CPU tensors: one fused pass each, seeded noise drawn
// in-register by Philox4x32-10 (the cost that dominates, hence 16 AVX-512 lanes of it).
//
// The loops live in diffusion_impl.h, written once over a lane type V and compiled here once per
// SIMD level: scalar (csrc/common/philox.h as is), AVX2 (8 lanes) and AVX-512 (16 lanes).
//
// Floating-point contraction is off in this file: a fused multiply-add rounds once where the
// scalar code rounds twice, and every level must give the same noise bits.
#pragma GCC optimize("fp-contract=off")
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

#include "cpu/diffusion.h"

#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/philox.h"
#include "cpu/simd.h"

#define FI inline __attribute__((always_inline))

namespace fastcon::cpu::diffusion {
namespace {

template <Dtype D>
struct Storage {
  using type = uint16_t;  // fp16 and bf16 bits
};
template <>
struct Storage<Dtype::kFloat32> {
  using type = float;
};
template <>
struct Storage<Dtype::kFloat64> {
  using type = double;
};
template <Dtype D>
using storage_t = typename Storage<D>::type;

// The ten round keys of a 64-bit seed.
struct RoundKeys {
  uint64_t seed;
  uint32_t k0[philox::kRounds], k1[philox::kRounds];
  explicit RoundKeys(uint64_t s) : seed(s) {
    uint32_t a = static_cast<uint32_t>(s), b = static_cast<uint32_t>(s >> 32);
    for (int r = 0; r < philox::kRounds; ++r) {
      if (r > 0) a += philox::kWeyl0, b += philox::kWeyl1;
      k0[r] = a, k1[r] = b;
    }
  }
};

// fp32 -> bf16 bits, round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16 does).
FI uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (x != x) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

FI float bf16_value(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

}  // namespace

// ================================================================================================
// scalar: one lane, the shared header's own functions

namespace isa_scalar {
namespace {

struct V {
  static constexpr int kLanes = 1;
  using F = float;
  using U = uint32_t;
  using W = uint64_t;
  static F set1(float x) { return x; }
  static U set1u(uint32_t x) { return x; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F min(F a, F b) { return a < b ? a : b; }
  static F sqrt(F a) { return sqrtf(a); }
  static F hsum(F a) { return a; }
  static U addu(U a, U b) { return a + b; }
  static U subu(U a, U b) { return a - b; }
  static U andu(U a, U b) { return a & b; }
  static U oru(U a, U b) { return a | b; }
  template <int N>
  static U srl(U a) {
    return a >> N;
  }
  template <int N>
  static U sll(U a) {
    return a << N;
  }
  static F u32_to_f(U a) { return static_cast<float>(a); }
  static U as_u(F a) { return philox::float_bits(a); }
  static F as_f(U a) { return philox::bits_float(a); }
  static W zero() { return 0; }
  static W mul(W a, U m) { return static_cast<uint64_t>(static_cast<uint32_t>(a)) * m; }
  static W high(W a) { return a >> 32; }
  static W xor2(W a, uint32_t k) { return a ^ k; }
  static W xor3(W a, W b, uint32_t k) { return a ^ b ^ k; }
  static U pack(W a) { return static_cast<uint32_t>(a); }
  static W iota(uint64_t base) { return base; }
  static W load(const uint64_t* p) { return *p; }
  static void store(uint64_t* p, W a) { *p = a; }
  template <Dtype D>
  static F load(const storage_t<D>* p) {
    if constexpr (D == Dtype::kFloat32) return *p;
    if constexpr (D == Dtype::kFloat16) return c10::detail::fp16_ieee_to_fp32_value(*p);
    return bf16_value(*p);
  }
  template <Dtype D>
  static void store(storage_t<D>* p, F x) {
    if constexpr (D == Dtype::kFloat32) *p = x;
    if constexpr (D == Dtype::kFloat16) *p = c10::detail::fp16_ieee_from_fp32_value(x);
    if constexpr (D == Dtype::kBFloat16) *p = bf16_bits(x);
  }
};

#include "cpu/diffusion_impl.h"

}  // namespace
}  // namespace isa_scalar

// ================================================================================================
// AVX2: 8 lanes

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace isa_avx2 {
namespace {

struct V {
  static constexpr int kLanes = 8;
  using F = __m256;
  using U = __m256i;
  struct W {
    __m256i a, b;  // lanes 0-3 and 4-7 as 64-bit words
  };
  FI static F set1(float x) { return _mm256_set1_ps(x); }
  FI static U set1u(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  FI static F add(F a, F b) { return _mm256_add_ps(a, b); }
  FI static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  FI static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  FI static F min(F a, F b) { return _mm256_min_ps(a, b); }
  FI static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  FI static float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  FI static U addu(U a, U b) { return _mm256_add_epi32(a, b); }
  FI static U subu(U a, U b) { return _mm256_sub_epi32(a, b); }
  FI static U andu(U a, U b) { return _mm256_and_si256(a, b); }
  FI static U oru(U a, U b) { return _mm256_or_si256(a, b); }
  template <int N>
  FI static U srl(U a) {
    return _mm256_srli_epi32(a, N);
  }
  template <int N>
  FI static U sll(U a) {
    return _mm256_slli_epi32(a, N);
  }
  FI static F u32_to_f(U a) { return _mm256_cvtepi32_ps(a); }  // values < 2^31
  FI static U as_u(F a) { return _mm256_castps_si256(a); }
  FI static F as_f(U a) { return _mm256_castsi256_ps(a); }
  FI static W zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
  FI static W mul(W x, U m) { return {_mm256_mul_epu32(x.a, m), _mm256_mul_epu32(x.b, m)}; }
  // the high word of each 64-bit lane moved to its low word (a shuffle: not the multiplier's port)
  FI static W high(W x) { return {_mm256_shuffle_epi32(x.a, 0xF5), _mm256_shuffle_epi32(x.b, 0xF5)}; }
  FI static W xor2(W x, uint32_t k) {
    const __m256i kk = set1u(k);
    return {_mm256_xor_si256(x.a, kk), _mm256_xor_si256(x.b, kk)};
  }
  FI static W xor3(W x, W y, uint32_t k) {
    const __m256i kk = set1u(k);
    return {_mm256_xor_si256(_mm256_xor_si256(x.a, y.a), kk), _mm256_xor_si256(_mm256_xor_si256(x.b, y.b), kk)};
  }
  FI static U pack(W x) {  // the eight low words
    const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    return _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(x.a, perm), _mm256_permutevar8x32_epi32(x.b, perm),
                                     0x20);
  }
  FI static W iota(uint64_t base) {
    const __m256i b = _mm256_set1_epi64x(static_cast<int64_t>(base));
    return {_mm256_add_epi64(b, _mm256_setr_epi64x(0, 1, 2, 3)), _mm256_add_epi64(b, _mm256_setr_epi64x(4, 5, 6, 7))};
  }
  FI static W load(const uint64_t* p) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4))};
  }
  FI static void store(uint64_t* p, W x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x.a);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 4), x.b);
  }
  template <Dtype D>
  FI static F load(const storage_t<D>* p) {
    if constexpr (D == Dtype::kFloat32) return _mm256_loadu_ps(p);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (D == Dtype::kFloat16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  template <Dtype D>
  FI static void store(storage_t<D>* p, F x) {
    if constexpr (D == Dtype::kFloat32) {
      _mm256_storeu_ps(p, x);
    } else if constexpr (D == Dtype::kFloat16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      const U u = as_u(x);
      U r = _mm256_srli_epi32(
          _mm256_add_epi32(u, _mm256_add_epi32(set1u(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16), set1u(1)))),
          16);
      r = _mm256_blendv_epi8(r, set1u(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    }
  }
};

#include "cpu/diffusion_impl.h"

}  // namespace
}  // namespace isa_avx2

#pragma GCC pop_options

// ================================================================================================
// AVX-512: 16 lanes

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")
// GCC 12 warns inside its own avx512fintrin.h (the `undefined` source vectors of unmasked
// intrinsics, GCC bug 105593); nothing in this file is uninitialised.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace isa_avx512 {
namespace {

struct V {
  static constexpr int kLanes = 16;
  using F = __m512;
  using U = __m512i;
  struct W {
    __m512i a, b;  // lanes 0-7 and 8-15 as 64-bit words
  };
  FI static F set1(float x) { return _mm512_set1_ps(x); }
  FI static U set1u(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  FI static F add(F a, F b) { return _mm512_add_ps(a, b); }
  FI static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  FI static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  FI static F min(F a, F b) { return _mm512_min_ps(a, b); }
  FI static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  FI static float hsum(F a) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  FI static U addu(U a, U b) { return _mm512_add_epi32(a, b); }
  FI static U subu(U a, U b) { return _mm512_sub_epi32(a, b); }
  FI static U andu(U a, U b) { return _mm512_and_si512(a, b); }
  FI static U oru(U a, U b) { return _mm512_or_si512(a, b); }
  template <int N>
  FI static U srl(U a) {
    return _mm512_srli_epi32(a, N);
  }
  template <int N>
  FI static U sll(U a) {
    return _mm512_slli_epi32(a, N);
  }
  FI static F u32_to_f(U a) { return _mm512_cvtepi32_ps(a); }
  FI static U as_u(F a) { return _mm512_castps_si512(a); }
  FI static F as_f(U a) { return _mm512_castsi512_ps(a); }
  FI static W zero() { return {_mm512_setzero_si512(), _mm512_setzero_si512()}; }
  FI static W mul(W x, U m) { return {_mm512_mul_epu32(x.a, m), _mm512_mul_epu32(x.b, m)}; }
  FI static W high(W x) {  // as in the AVX2 level
    return {_mm512_shuffle_epi32(x.a, _MM_PERM_DDBB), _mm512_shuffle_epi32(x.b, _MM_PERM_DDBB)};
  }
  FI static W xor2(W x, uint32_t k) {
    const __m512i kk = set1u(k);
    return {_mm512_xor_si512(x.a, kk), _mm512_xor_si512(x.b, kk)};
  }
  FI static W xor3(W x, W y, uint32_t k) {
    const __m512i kk = set1u(k);
    return {_mm512_ternarylogic_epi32(x.a, y.a, kk, 0x96), _mm512_ternarylogic_epi32(x.b, y.b, kk, 0x96)};
  }
  FI static U pack(W x) {  // the sixteen low words
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_permutex2var_epi32(x.a, even, x.b);
  }
  FI static W iota(uint64_t base) {
    const __m512i b = _mm512_set1_epi64(static_cast<int64_t>(base));
    return {_mm512_add_epi64(b, _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)),
            _mm512_add_epi64(b, _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15))};
  }
  FI static W load(const uint64_t* p) { return {_mm512_loadu_si512(p), _mm512_loadu_si512(p + 8)}; }
  FI static void store(uint64_t* p, W x) {
    _mm512_storeu_si512(p, x.a);
    _mm512_storeu_si512(p + 8, x.b);
  }
  template <Dtype D>
  FI static F load(const storage_t<D>* p) {
    if constexpr (D == Dtype::kFloat32) return _mm512_loadu_ps(p);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (D == Dtype::kFloat16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  template <Dtype D>
  FI static void store(storage_t<D>* p, F x) {
    if constexpr (D == Dtype::kFloat32) {
      _mm512_storeu_ps(p, x);
    } else if constexpr (D == Dtype::kFloat16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                          _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      const U u = as_u(x);
      U r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(set1u(0x7FFF), _mm512_and_si512(
                                                                                         _mm512_srli_epi32(u, 16),
                                                                                         set1u(1)))),
                              16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), set1u(0x7FC0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
    }
  }
};

#include "cpu/diffusion_impl.h"

}  // namespace
}  // namespace isa_avx512

#pragma GCC diagnostic pop
#pragma GCC pop_options

// ================================================================================================
// run-time choice of the level (cpu::active_isa, csrc/cpu/simd.h)



void q_sample(const Batch& batch, void* x_t) {
  switch (active_isa()) {
    case Isa::kAvx512: return isa_avx512::run_q_sample(batch, x_t);
    case Isa::kAvx2: return isa_avx2::run_q_sample(batch, x_t);
    default: return isa_scalar::run_q_sample(batch, x_t);
  }
}

void loss(const Batch& batch, const void* pred, Target target, void* sse) {
  switch (active_isa()) {
    case Isa::kAvx512: return isa_avx512::run_loss(batch, pred, target, sse);
    case Isa::kAvx2: return isa_avx2::run_loss(batch, pred, target, sse);
    default: return isa_scalar::run_loss(batch, pred, target, sse);
  }
}

void loss_backward(const Batch& batch, const void* pred, const void* grad_sse, Target target, void* grad_pred) {
  switch (active_isa()) {
    case Isa::kAvx512: return isa_avx512::run_loss_backward(batch, pred, grad_sse, target, grad_pred);
    case Isa::kAvx2: return isa_avx2::run_loss_backward(batch, pred, grad_sse, target, grad_pred);
    default: return isa_scalar::run_loss_backward(batch, pred, grad_sse, target, grad_pred);
  }
}

void philox_words(const int64_t* counter, int64_t n, uint64_t seed, int64_t* out, int num_threads) {
  const RoundKeys k(seed);
  switch (active_isa()) {
    case Isa::kAvx512: return isa_avx512::run_philox_words(counter, n, k, out, num_threads);
    case Isa::kAvx2: return isa_avx2::run_philox_words(counter, n, k, out, num_threads);
    default: return isa_scalar::run_philox_words(counter, n, k, out, num_threads);
  }
}

void philox_normal(const int64_t* index, int64_t n, uint64_t seed, float* out, int num_threads) {
  const RoundKeys k(seed);
  switch (active_isa()) {
    case Isa::kAvx512: return isa_avx512::run_philox_normal(index, n, k, out, num_threads);
    case Isa::kAvx2: return isa_avx2::run_philox_normal(index, n, k, out, num_threads);
    default: return isa_scalar::run_philox_normal(index, n, k, out, num_threads);
  }
}

}  // namespace fastcon::cpu::diffusion
