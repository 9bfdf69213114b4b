// Siamese masking kernels on the CPU (declarations and contracts in masking.h).
//
// All of these ops move memory and do at most one add per element, so the design is about
// bytes: every output row is written exactly once (copied, filled or zeroed in the same pass,
// never memset first and scattered after), every input row is read once, and the few
// arithmetic rows (pos_embed add, sums over the batch) convert fp16 / bf16 in SIMD registers.
#include "cpu/masking.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/simd.h"

// The SIMD paths and non-temporal stores are x86-64 only; elsewhere the scalar loops run.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTCON_MASKING_X86 1
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

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
  static constexpr size_t kBytes = 0;  // no non-temporal stores: plain memcpy / memset
  static float load(const float* p) { return *p; }
  static void store(float* p, float v) { *p = v; }
  static void stream(float* p, float v) { *p = v; }
  static float add(float a, float b) { return a + b; }
  static void stream_bytes(char*, const char*) {}
  static void zero_bytes(char*) {}
};
#include "cpu/masking_rows.h"
}  // namespace scalar

#ifdef FASTCON_MASKING_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
struct Lanes {
  template <class T>
  static constexpr bool kSupports = std::is_same_v<T, float> || std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>;
  static constexpr int64_t kWidth = 8;
  static constexpr size_t kBytes = 32;
  static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 load(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static __m256 load(const BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static __m128i to_half(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
  // Round to nearest even, NaN to the canonical 0x7FC0: bit for bit what c10::BFloat16(float) does.
  static __m128i to_bf16(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  static void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
  static void store(Half* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_half(v)); }
  static void store(BFloat16* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(v)); }
  static void stream(float* p, __m256 v) { _mm256_stream_ps(p, v); }
  static void stream(Half* p, __m256 v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_half(v)); }
  static void stream(BFloat16* p, __m256 v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16(v)); }
  static __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
  static void stream_bytes(char* dst, const char* src) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  }
  static void zero_bytes(char* dst) { _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_setzero_si256()); }
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
  static constexpr size_t kBytes = 64;
  static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 load(const Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m512 load(const BFloat16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static __m256i to_half(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static __m256i to_bf16(__m512 v) {  // as in avx2::Lanes
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
  static void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static void store(Half* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_half(v)); }
  static void store(BFloat16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  static void stream(float* p, __m512 v) { _mm512_stream_ps(p, v); }
  static void stream(Half* p, __m512 v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_half(v)); }
  static void stream(BFloat16* p, __m512 v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  static __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
  static void stream_bytes(char* dst, const char* src) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_loadu_si512(src));
  }
  static void zero_bytes(char* dst) { _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_setzero_si512()); }
};
#include "cpu/masking_rows.h"
}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // FASTCON_MASKING_X86

template <class T>
struct RowOps {
  void (*add)(const T*, const T*, T*, int64_t);
  void (*add_stream)(const T*, const T*, T*, int64_t);
  void (*accumulate)(const T*, MaskAcc<T>*, int64_t);
  void (*round)(const MaskAcc<T>*, T*, int64_t);
  void (*stream_copy)(void*, const void*, size_t);
  void (*stream_zero)(void*, size_t);
};


#define FASTCON_ROW_OPS(ns)                                                                                  \
  RowOps<T> {                                                                                                \
    &ns::add_rows<T, false>, &ns::add_rows<T, true>, &ns::accumulate_rows<T>, &ns::round_rows<T>,            \
        &ns::stream_copy, &ns::stream_zero                                                                   \
  }

template <class T>
const RowOps<T>& row_ops() {
  static const RowOps<T> ops = [] {
    switch (active_isa()) {
#ifdef FASTCON_MASKING_X86
      case Isa::kAvx512: return FASTCON_ROW_OPS(avx512);
      case Isa::kAvx2: return FASTCON_ROW_OPS(avx2);
#endif
      default: return FASTCON_ROW_OPS(scalar);
    }
  }();
  return ops;
}
#undef FASTCON_ROW_OPS

// Large outputs are written with non-temporal stores when their memory is already resident:
// such outputs will not fit in the caches anyway, and skipping the read-for-ownership of every
// output line saves a third of a copy's traffic. Freshly mapped memory (glibc serves every
// allocation above 32 MiB with a new mmap) is different: each page is zeroed into the cache by
// its page fault just before the first store, and ordinary stores to those cached lines are
// the cheaper ones (measured: streaming into fresh pages is ~1.4x slower, into reused pages
// ~1.5-2x faster). One mincore() call tells the two apart.
constexpr int64_t kStreamBytes = int64_t{16} << 20;

inline bool page_resident(const void* p) {
#if defined(__linux__)
  static const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  unsigned char in_core = 0;
  void* start = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) & ~(page - 1));
  return mincore(start, 1, &in_core) == 0 && (in_core & 1) != 0;
#else
  (void)p;
  return false;
#endif
}

// FASTCON_CPU_STREAM=1 / 0 forces non-temporal stores on / off (tests run both paths on small
// tensors with it); by default they are chosen per output as below.
enum class StreamMode { kAuto, kAlways, kNever };

inline StreamMode stream_mode() {
  static const StreamMode mode = [] {
    const char* env = std::getenv("FASTCON_CPU_STREAM");
    if (env != nullptr && std::string(env) == "1") return StreamMode::kAlways;
    if (env != nullptr && std::string(env) == "0") return StreamMode::kNever;
    return StreamMode::kAuto;
  }();
  return mode;
}

// Stream into out (n elements)? Its middle and last pages tell whether the allocator handed
// back resident memory (the first page may hold the allocator's chunk header).
template <class T>
bool stream_into(const T* out, int64_t n) {
  const auto bytes = n * int64_t(sizeof(T));
  if (out == nullptr || n == 0) return false;
  switch (stream_mode()) {
    case StreamMode::kAlways: return true;
    case StreamMode::kNever: return false;
    default: return bytes >= kStreamBytes && page_resident(out + n / 2) && page_resident(out + n - 1);
  }
}

// How a kernel writes its output rows: copies, zero fills and sums, streaming or not.
template <class T>
struct RowWriter {
  const RowOps<T>& ops;
  bool stream;

  RowWriter(bool stream_stores) : ops(row_ops<T>()), stream(stream_stores) {}

  void copy(T* dst, const T* src, int64_t n) const {
    if (stream) {
      ops.stream_copy(dst, src, size_t(n) * sizeof(T));
    } else {
      std::memcpy(dst, src, size_t(n) * sizeof(T));
    }
  }
  void zero(T* dst, int64_t n) const {  // all-zero bits are +0 in every float format
    if (stream) {
      ops.stream_zero(dst, size_t(n) * sizeof(T));
    } else {
      std::memset(dst, 0, size_t(n) * sizeof(T));
    }
  }
  void add(const T* a, const T* b, T* out, int64_t n) const { (stream ? ops.add_stream : ops.add)(a, b, out, n); }
  // Non-temporal stores are weakly ordered: fence them before the task ends and others read.
  void done() const {
#ifdef FASTCON_MASKING_X86
    if (stream) _mm_sfence();
#endif
  }
};

// ---- helpers -------------------------------------------------------------------------------

// Rows per parallel task: at least ~32 KiB of output, so that scheduling costs nothing.
template <class T>
int64_t row_grain(int64_t row_elems) {
  return std::max<int64_t>(1, (int64_t{32} << 10) / std::max<int64_t>(1, row_elems * int64_t(sizeof(T))));
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
  const RowWriter<T> write(stream_into(out, B * L * D) && (out2 == nullptr || stream_into(out2, B * L * D)));
  at::parallel_for(0, B * L, row_grain<T>(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t k = inverse[r];
      const T* row = k >= 0 ? src + ((r / L) * K + k) * D : fill;
      for (T* dst : {out, out2}) {
        if (dst == nullptr) continue;
        if (row != nullptr) {
          write.copy(dst + r * D, row, D);
        } else {
          write.zero(dst + r * D, D);
        }
      }
    }
    write.done();
  });
}

}  // namespace

// ---- kernels -------------------------------------------------------------------------------

template <class T>
void mask_gather(const T* tokens, int64_t tokens_batch_stride, int64_t tokens_row_stride, const T* pos,
                 int64_t pos_batch_stride, int64_t pos_row_stride, const int64_t* ids, T* visible, int64_t B,
                 int64_t L, int64_t K, int64_t D) {
  (void)L;
  const RowWriter<T> write(stream_into(visible, B * K * D));
  at::parallel_for(0, B * K, row_grain<T>(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / K, l = ids[r];
      const T* t = tokens + b * tokens_batch_stride + l * tokens_row_stride;
      if (pos != nullptr) {
        write.add(t, pos + b * pos_batch_stride + l * pos_row_stride, visible + r * D, D);
      } else {
        write.copy(visible + r * D, t, D);
      }
    }
    write.done();
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
  const RowWriter<T> write(stream_into(grad_tokens, B * L * D));
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
            if (dst != nullptr) write.copy(dst, src, n);
            write.ops.accumulate(src, sums.data() + (l - l0) * block_d, n);
          } else if (dst != nullptr) {
            write.zero(dst, n);
          }
        }
      }
      for (int64_t l = l0; l < l1; ++l) write.ops.round(sums.data() + (l - l0) * block_d, grad_pos + l * D + d0, n);
    }
    write.done();
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
  const RowWriter<T> write(stream_into(grad_visible, B * K * D));
  const int64_t rows = B * L;
  const int64_t chunks = std::min<int64_t>(rows, 64);
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  std::vector<MaskAcc<T>> partial(size_t(chunks * D), MaskAcc<T>(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t r = c * chunk_rows; r < std::min(rows, (c + 1) * chunk_rows); ++r) {
        const int64_t k = inverse[r];
        if (k >= 0) {
          write.copy(grad_visible + ((r / L) * K + k) * D, grad_out + r * D, D);
        } else {
          write.ops.accumulate(grad_out + r * D, partial.data() + c * D, D);
        }
      }
    }
    write.done();
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
  const RowWriter<T> write(stream_into(out, B * C * H * W));
  // One task row = one image row (b, c, h); runs of equal kept / dropped patches become one
  // copy / zero fill.
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
          write.copy(dst + j * patch, src + j * patch, (end - j) * patch);
        } else {
          write.zero(dst + j * patch, (end - j) * patch);
        }
        j = end;
      }
    }
    write.done();
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
