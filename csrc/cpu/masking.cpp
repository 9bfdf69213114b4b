// Siamese masking kernels on the CPU (declarations and contracts in masking.h).
//
// All of these ops move memory and do at most one add per element, so the design is about
// bytes: every output row is written exactly once (copied, filled or zeroed in the same pass,
// never memset first and scattered after), every input row is read once, and the few
// arithmetic rows (pos_embed add, sums over the batch) convert fp16 / bf16 in SIMD registers.
#include "cpu/masking.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/simd.h"

namespace fastcon::cpu {
namespace {

using Half = c10::Half;
using BFloat16 = c10::BFloat16;

// ---- row loops, once per instruction set (see masking_rows.h) -------------------------------

namespace scalar {
struct Lanes {
  template <class T>
  static constexpr bool kSupports = false;
  static constexpr int64_t kWidth = 1;
  static float load(const float* p) { return *p; }
  static void store(float* p, float v) { *p = v; }
  static float add(float a, float b) { return a + b; }
};
#include "cpu/masking_rows.h"
}  // namespace scalar

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
struct Lanes {
  template <class T>
  static constexpr bool kSupports = std::is_same_v<T, float> || std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>;
  static constexpr int64_t kWidth = 8;
  static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 load(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static __m256 load(const BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
  static void store(Half* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  // Round to nearest even, NaN to the canonical 0x7FC0: bit for bit what c10::BFloat16(float) does.
  static void store(BFloat16* p, __m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
};
#include "cpu/masking_rows.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12's AVX-512 headers make their "undefined" vectors by self-initialisation, which
// -Wmaybe-uninitialized reports from every intrinsic that uses one.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {
struct Lanes {
  template <class T>
  static constexpr bool kSupports = std::is_same_v<T, float> || std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>;
  static constexpr int64_t kWidth = 16;
  static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 load(const Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m512 load(const BFloat16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static void store(Half* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store(BFloat16* p, __m512 v) {  // as in avx2::Lanes
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
};
#include "cpu/masking_rows.h"
}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options

template <class T>
struct RowOps {
  void (*add)(const T*, const T*, T*, int64_t);
  void (*accumulate)(const T*, MaskAcc<T>*, int64_t);
  void (*round)(const MaskAcc<T>*, T*, int64_t);
};

// FASTCON_CPU_ISA=scalar|avx2 caps the instruction set, so that tests can run every path on
// one machine; by default the best one the CPU has.
Isa masking_isa() {
  static const Isa isa = [] {
    Isa best = detect_isa();
    const char* cap = std::getenv("FASTCON_CPU_ISA");
    if (cap != nullptr && std::string(cap) == "scalar") return Isa::kScalar;
    if (cap != nullptr && std::string(cap) == "avx2" && best == Isa::kAvx512) return Isa::kAvx2;
    return best;
  }();
  return isa;
}

template <class T>
const RowOps<T>& row_ops() {
  static const RowOps<T> ops = [] {
    switch (masking_isa()) {
      case Isa::kAvx512:
        return RowOps<T>{&avx512::add_rows<T>, &avx512::accumulate_rows<T>, &avx512::round_rows<T>};
      case Isa::kAvx2:
        return RowOps<T>{&avx2::add_rows<T>, &avx2::accumulate_rows<T>, &avx2::round_rows<T>};
      default:
        return RowOps<T>{&scalar::add_rows<T>, &scalar::accumulate_rows<T>, &scalar::round_rows<T>};
    }
  }();
  return ops;
}

// ---- helpers -------------------------------------------------------------------------------

// Rows per parallel task: at least ~32 KiB of output, so that scheduling costs nothing.
template <class T>
int64_t row_grain(int64_t row_elems) {
  return std::max<int64_t>(1, (int64_t{32} << 10) / std::max<int64_t>(1, row_elems * int64_t(sizeof(T))));
}

template <class T>
void copy_row(T* dst, const T* src, int64_t n) {
  std::memcpy(dst, src, size_t(n) * sizeof(T));
}

template <class T>
void zero_row(T* dst, int64_t n) {
  std::memset(dst, 0, size_t(n) * sizeof(T));  // all-zero bits are +0 in every float format
}

// inverse[b * L + l] = k where ids[b, k] == l, -1 for dropped positions. B * L int32: tiny next
// to the (B, L, D) tensors, and it turns every output row into an independent task.
std::vector<int32_t> inverse_ids(const int64_t* ids, int64_t B, int64_t L, int64_t K) {
  std::vector<int32_t> inverse(size_t(B * L));
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, L)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int32_t* row = inverse.data() + b * L;
      std::fill(row, row + L, -1);
      for (int64_t k = 0; k < K; ++k) row[ids[b * K + k]] = int32_t(k);
    }
  });
  return inverse;
}

// out[b, l] (and out2[b, l] when not null) = src[b, k] for kept l, the fill row (zeros when
// fill is null) for dropped l.
template <class T>
void expand_rows(const T* src, const int32_t* inverse, const T* fill, T* out, T* out2, int64_t B, int64_t L,
                 int64_t K, int64_t D) {
  at::parallel_for(0, B * L, row_grain<T>(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t k = inverse[r];
      const T* row = k >= 0 ? src + ((r / L) * K + k) * D : fill;
      for (T* dst : {out, out2}) {
        if (dst == nullptr) continue;
        if (row != nullptr) {
          copy_row(dst + r * D, row, D);
        } else {
          zero_row(dst + r * D, D);
        }
      }
    }
  });
}

}  // namespace

// ---- kernels -------------------------------------------------------------------------------

template <class T>
void mask_gather(const T* tokens, int64_t tokens_batch_stride, int64_t tokens_row_stride, const T* pos,
                 int64_t pos_batch_stride, int64_t pos_row_stride, const int64_t* ids, T* visible, int64_t B,
                 int64_t L, int64_t K, int64_t D) {
  (void)L;
  const RowOps<T>& ops = row_ops<T>();
  at::parallel_for(0, B * K, row_grain<T>(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / K, l = ids[r];
      const T* t = tokens + b * tokens_batch_stride + l * tokens_row_stride;
      if (pos != nullptr) {
        ops.add(t, pos + b * pos_batch_stride + l * pos_row_stride, visible + r * D, D);
      } else {
        copy_row(visible + r * D, t, D);
      }
    }
  });
}

template <class T>
void mask_gather_backward(const T* grad_visible, const int64_t* ids, T* grad_tokens, T* grad_pos, int64_t pos_batch,
                          int64_t B, int64_t L, int64_t K, int64_t D) {
  const std::vector<int32_t> inverse = inverse_ids(ids, B, L, K);
  if (pos_batch != 1) {
    expand_rows<T>(grad_visible, inverse.data(), nullptr, grad_tokens, pos_batch == 0 ? nullptr : grad_pos, B, L, K,
                   D);
    return;
  }
  // pos_batch == 1: grad_pos[l] = sum_b grad_tokens[b, l]. Tasks own blocks of positions l (and
  // of D when there are few positions) and walk b in order, so the sum order is fixed and no
  // two tasks write the same element: deterministic without atomics. Within a task, b-major
  // order keeps the (B, L, D) writes in long contiguous runs; the block's fp32 sums stay in L2.
  const RowOps<T>& ops = row_ops<T>();
  const int64_t tasks_wanted = 4 * int64_t(at::get_num_threads());
  const int64_t block_l = std::clamp<int64_t>(std::min<int64_t>((int64_t{16} << 10) / D, L / tasks_wanted), 1, L);
  const int64_t blocks_l = (L + block_l - 1) / block_l;
  int64_t block_d = D;
  if (blocks_l < tasks_wanted) {  // few positions: split D too, in multiples of 16 elements
    const int64_t parts = std::min((tasks_wanted + blocks_l - 1) / blocks_l, (D + 63) / 64);
    block_d = ((D + parts - 1) / parts + 15) / 16 * 16;
  }
  const int64_t blocks_d = (D + block_d - 1) / block_d;
  at::parallel_for(0, blocks_l * blocks_d, 1, [&](int64_t t0, int64_t t1) {
    std::vector<MaskAcc<T>> sums(size_t(block_l * block_d));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t l0 = (task / blocks_d) * block_l, l1 = std::min(L, l0 + block_l);
      const int64_t d0 = (task % blocks_d) * block_d, n = std::min(D, d0 + block_d) - d0;
      std::fill(sums.begin(), sums.end(), MaskAcc<T>(0));
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t l = l0; l < l1; ++l) {
          const int64_t k = inverse[b * L + l];
          T* dst = grad_tokens == nullptr ? nullptr : grad_tokens + (b * L + l) * D + d0;
          if (k >= 0) {
            const T* src = grad_visible + (b * K + k) * D + d0;
            if (dst != nullptr) copy_row(dst, src, n);
            ops.accumulate(src, sums.data() + (l - l0) * block_d, n);
          } else if (dst != nullptr) {
            zero_row(dst, n);
          }
        }
      }
      for (int64_t l = l0; l < l1; ++l) ops.round(sums.data() + (l - l0) * block_d, grad_pos + l * D + d0, n);
    }
  });
}

template <class T>
void mask_unmask(const T* visible, const int64_t* ids, const T* fill, T* out, int64_t B, int64_t L, int64_t K,
                 int64_t D) {
  const std::vector<int32_t> inverse = inverse_ids(ids, B, L, K);
  expand_rows<T>(visible, inverse.data(), fill, out, nullptr, B, L, K, D);
}

template <class T>
void mask_unmask_backward(const T* grad_out, const int64_t* ids, T* grad_visible, MaskAcc<T>* grad_fill, int64_t B,
                          int64_t L, int64_t K, int64_t D) {
  if (grad_fill == nullptr) {
    mask_gather<T>(grad_out, L * D, D, nullptr, 0, 0, ids, grad_visible, B, L, K, D);
    return;
  }
  // One pass over grad_out's rows: kept rows are copied out, dropped rows summed. The rows are
  // cut into a fixed number of chunks (not one per thread) whose partial sums are then added in
  // chunk order, so the result does not depend on the thread count.
  const std::vector<int32_t> inverse = inverse_ids(ids, B, L, K);
  const RowOps<T>& ops = row_ops<T>();
  const int64_t rows = B * L;
  const int64_t chunks = std::min<int64_t>(rows, 64);
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  std::vector<MaskAcc<T>> partial(size_t(chunks * D), MaskAcc<T>(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t r = c * chunk_rows; r < std::min(rows, (c + 1) * chunk_rows); ++r) {
        const int64_t k = inverse[r];
        if (k >= 0) {
          copy_row(grad_visible + ((r / L) * K + k) * D, grad_out + r * D, D);
        } else {
          ops.accumulate(grad_out + r * D, partial.data() + c * D, D);
        }
      }
    }
  });
  std::fill(grad_fill, grad_fill + D, MaskAcc<T>(0));
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t d = 0; d < D; ++d) grad_fill[d] += partial[c * D + d];
  }
}

template <class T>
void mask_image(const T* images, const int64_t* ids, T* out, int64_t B, int64_t C, int64_t H, int64_t W,
                int64_t patch, int64_t K) {
  const int64_t grid_w = W / patch, L = (H / patch) * grid_w;
  std::vector<uint8_t> keep(size_t(B * L), 0);
  for (int64_t r = 0; r < B * K; ++r) keep[(r / K) * L + ids[r]] = 1;
  // One task row = one image row (b, c, h); runs of equal kept / dropped patches become one
  // memcpy / memset.
  at::parallel_for(0, B * C * H, row_grain<T>(W), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (C * H), h = r % H;
      const uint8_t* kept = keep.data() + b * L + (h / patch) * grid_w;
      const T* src = images + r * W;
      T* dst = out + r * W;
      for (int64_t j = 0; j < grid_w;) {
        int64_t end = j + 1;
        while (end < grid_w && kept[end] == kept[j]) ++end;
        if (kept[j]) {
          copy_row(dst + j * patch, src + j * patch, (end - j) * patch);
        } else {
          zero_row(dst + j * patch, (end - j) * patch);
        }
        j = end;
      }
    }
  });
}

#define FASTCON_INSTANTIATE_MASKING(T)                                                                            \
  template void mask_gather<T>(const T*, int64_t, int64_t, const T*, int64_t, int64_t, const int64_t*, T*, int64_t, \
                               int64_t, int64_t, int64_t);                                                        \
  template void mask_gather_backward<T>(const T*, const int64_t*, T*, T*, int64_t, int64_t, int64_t, int64_t,      \
                                        int64_t);                                                                 \
  template void mask_unmask<T>(const T*, const int64_t*, const T*, T*, int64_t, int64_t, int64_t, int64_t);        \
  template void mask_unmask_backward<T>(const T*, const int64_t*, T*, MaskAcc<T>*, int64_t, int64_t, int64_t,      \
                                        int64_t);                                                                 \
  template void mask_image<T>(const T*, const int64_t*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);

FASTCON_INSTANTIATE_MASKING(float)
FASTCON_INSTANTIATE_MASKING(double)
FASTCON_INSTANTIATE_MASKING(c10::Half)
FASTCON_INSTANTIATE_MASKING(c10::BFloat16)
#undef FASTCON_INSTANTIATE_MASKING

}  // namespace fastcon::cpu
