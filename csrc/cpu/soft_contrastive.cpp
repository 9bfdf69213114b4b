// Fused CPU kernels of the soft contrastive loss (see soft_contrastive.h for the contract).
//
// Work is cut into tiles of at most kBlockRows rows x kBlockCols columns (Split: smaller, equal
// blocks for small n, m). For every tile, one GEMM
// (tile_gemm: MKL or the built-in kernel) writes the logits s = scale * U V^T into a per-thread
// buffer, then ONE vectorised pass does the exp / log-sum-exp bookkeeping (forward) or turns the
// logits into the weights W in place (backward), followed by two GEMMs W V and W^T U.
//
// Parallelism: the column blocks are grouped into a fixed number of chunks; work items (row
// block, chunk) are handed out dynamically in row-block-major order (TileQueue). A chunk's items
// run one at a time in row order, so a chunk owns its columns: column statistics and grad_v rows
// are updated without races or atomics. Row quantities are per-chunk partials reduced in chunk
// order: forward row statistics (O(chunks * n) scalars) at the end; backward grad_u rows through
// a ring of a few row-block slots, summed by whichever chunk finishes a row block last. Memory
// is O(threads * tile + slots * chunks * rows * d + chunks * (n + m)), never n x m, and the
// results are bitwise independent of the thread count (up to 4 threads; beyond, more chunks).
//
// Two ways to keep exp in range:
// - fixed max (logit_bound B > 0 with 2B inside the exp range): every |s_ij| <= B, so
//   e_ij = exp(s_ij - B) never overflows nor underflows; row and column sums share it (one exp
//   per element forward and backward: W_ij = e_ij (g_i e^{B - r_i} + h_j e^{B - c_j}));
// - running max (small temperatures, unnormalised inputs): online max per row (per chunk) and
//   per column, rescaling the sums when the max grows; two exps per element.
// GCC 12 reports false "may be used uninitialized" warnings inside its own AVX-512 intrinsic
// headers (their undefined-vector idiom); the pragma has to precede every include to reach them.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu/soft_contrastive.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "cpu/simd.h"
#include "cpu/tile_gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTCON_SC_SIMD 1
#else
#define FASTCON_SC_SIMD 0
#endif

namespace fastcon::cpu {
namespace {

constexpr int64_t kBlockRows = 256;  // tile shape: within a few % of the best on SPR for D = 128..512
constexpr int64_t kBlockCols = 256;
constexpr int64_t kRound = 16;               // block sides are multiples of this (full vectors)
constexpr int64_t kMinSplitCols = 64;         // more columns than this: at least 2 column blocks
constexpr int64_t kLds = kBlockCols + 16;  // tile row stride: room for a full last vector, no 4 KiB aliasing
constexpr int64_t kMinChunks = 8;          // column chunks per row block (more only beyond 4 threads)
constexpr double kFixedMaxRange = 80.0;    // 2B below this: exp(s - B) stays a normal fp32 number

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// 64-byte aligned scratch memory
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t count)
      : ptr_(static_cast<T*>(std::aligned_alloc(64, std::max<int64_t>(64, ((count * sizeof(T) + 63) / 64) * 64)))) {
    if (!ptr_) throw std::bad_alloc();
  }
  T* get() const { return ptr_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr_;
};

// One tile of logits, row-major with stride lds, plus what the scene-mask needs.
template <typename T>
struct Tile {
  T* s;
  int64_t br, bc;
  const int64_t* row_ids;  // ids of the tile's rows (masked mode), else nullptr
  const int64_t* col_ids;  // ids of the tile's columns
  int64_t pos;             // the positive of tile row r is tile column r + pos
  bool keep(int64_t r, int64_t j) const { return row_ids[r] != col_ids[j] || j == r + pos; }
};

// ---- scalar path (double, and float on CPUs without AVX2) ---------------------------------

template <typename T>
T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

// row_out[r] = sum_j e_rj, col_out[j] = sum_r e_rj, e = exp(s - shift) on kept pairs
template <typename T, bool Masked>
void fwd_fixed_scalar(const Tile<T>& t, T shift, T* row_out, T* col_out) {
  std::fill(col_out, col_out + t.bc, T(0));
  for (int64_t r = 0; r < t.br; ++r) {
    const T* s = t.s + r * kLds;
    T acc = 0;
    for (int64_t j = 0; j < t.bc; ++j) {
      if (Masked && !t.keep(r, j)) continue;
      const T e = std::exp(s[j] - shift);
      acc += e;
      col_out[j] += e;
    }
    row_out[r] = acc;
  }
}

// maxima of the tile's kept logits per row (row_out) and per column (col_out)
template <typename T, bool Masked>
void tile_max_scalar(const Tile<T>& t, T* row_out, T* col_out) {
  std::fill(col_out, col_out + t.bc, kNegInf<T>);
  for (int64_t r = 0; r < t.br; ++r) {
    const T* s = t.s + r * kLds;
    T mx = kNegInf<T>;
    for (int64_t j = 0; j < t.bc; ++j) {
      if (Masked && !t.keep(r, j)) continue;
      mx = std::max(mx, s[j]);
      col_out[j] = std::max(col_out[j], s[j]);
    }
    row_out[r] = mx;
  }
}

// row_out[r] = sum_j exp(s_rj - row_max[r]); col_out[j] = sum_r exp(s_rj - col_max[j]) (if col_max)
template <typename T, bool Masked>
void fwd_running_scalar(const Tile<T>& t, const T* row_max, const T* col_max, T* row_out, T* col_out) {
  if (col_max) std::fill(col_out, col_out + t.bc, T(0));
  for (int64_t r = 0; r < t.br; ++r) {
    const T* s = t.s + r * kLds;
    T acc = 0;
    for (int64_t j = 0; j < t.bc; ++j) {
      if (Masked && !t.keep(r, j)) continue;
      acc += std::exp(s[j] - row_max[r]);
      if (col_max) col_out[j] += std::exp(s[j] - col_max[j]);
    }
    row_out[r] = acc;
  }
}

template <typename T>
void fwd_sigmoid_scalar(const Tile<T>& t, T bias, T* row_out) {
  for (int64_t r = 0; r < t.br; ++r) {
    const T* s = t.s + r * kLds;
    T acc = 0;
    for (int64_t j = 0; j < t.bc; ++j) acc += softplus(s[j] + bias);
    row_out[r] = acc;
  }
}

// W = exp(s - shift) * (a_r + b_j) on kept pairs (b may be nullptr: 0), written over s
template <typename T, bool Masked>
void bwd_fixed_scalar(const Tile<T>& t, T shift, const T* a, const T* b, T* wsum_out) {
  for (int64_t r = 0; r < t.br; ++r) {
    T* s = t.s + r * kLds;
    T acc = 0;
    for (int64_t j = 0; j < t.bc; ++j) {
      T w = 0;
      if (!Masked || t.keep(r, j)) w = std::exp(s[j] - shift) * (a[r] + (b ? b[j] : T(0)));
      s[j] = w;
      acc += w;
    }
    wsum_out[r] = acc;
  }
}

// W = g_r exp(s - lse_r) + h_j exp(s - lse_j) on kept pairs (h may be nullptr: 0)
template <typename T, bool Masked>
void bwd_running_scalar(const Tile<T>& t, const T* g, const T* lse_r, const T* h, const T* lse_c, T* wsum_out) {
  for (int64_t r = 0; r < t.br; ++r) {
    T* s = t.s + r * kLds;
    T acc = 0;
    for (int64_t j = 0; j < t.bc; ++j) {
      T w = 0;
      if (!Masked || t.keep(r, j)) {
        w = g[r] * std::exp(s[j] - lse_r[r]);
        if (h) w += h[j] * std::exp(s[j] - lse_c[j]);
      }
      s[j] = w;
      acc += w;
    }
    wsum_out[r] = acc;
  }
}

template <typename T>
void bwd_sigmoid_scalar(const Tile<T>& t, T bias, const T* g, T* wsum_out) {
  for (int64_t r = 0; r < t.br; ++r) {
    T* s = t.s + r * kLds;
    T acc = 0;
    for (int64_t j = 0; j < t.bc; ++j) {
      const T w = g[r] / (T(1) + std::exp(-(s[j] + bias)));
      s[j] = w;
      acc += w;
    }
    wsum_out[r] = acc;
  }
}

// ---- SIMD paths (float) --------------------------------------------------------------------
// The passes of soft_contrastive_simd.h over a lane type V, compiled once for AVX2 + FMA (8 lanes)
// and once for AVX-512 (16 lanes), each under its own target pragma.
#if FASTCON_SC_SIMD
#define FI inline __attribute__((always_inline))

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {

// AVX2 has no mask registers and no scalef: masks are all-ones / all-zero 32-bit lanes, and 2^n
// is applied in two halves (each a normal number, so overflow gives inf and underflow is gradual).
struct V {
  static constexpr int64_t kLanes = 8;
  using F = __m256;
  using M = __m256i;
  FI static F zero() { return _mm256_setzero_ps(); }
  FI static F set1(float x) { return _mm256_set1_ps(x); }
  FI static F load(const float* p) { return _mm256_loadu_ps(p); }
  FI static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  FI static F add(F a, F b) { return _mm256_add_ps(a, b); }
  FI static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  FI static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  FI static F div(F a, F b) { return _mm256_div_ps(a, b); }
  FI static F min(F a, F b) { return _mm256_min_ps(a, b); }
  FI static F max(F a, F b) { return _mm256_max_ps(a, b); }
  FI static F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  FI static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  FI static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  FI static F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  FI static F scale2(F p, F n) {  // n integral in [-150, 128]: halves n1 = n >> 1, n2 = n - n1 in [-75, 64]
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i n1 = _mm256_srai_epi32(ni, 1);
    const __m256i n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const F f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const F f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
  }
  FI static float hsum(F v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
  FI static float hmax(F v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
  FI static M tail(int64_t bc, int64_t j) {
    const int32_t left = static_cast<int32_t>(std::min<int64_t>(bc - j, kLanes));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  FI static M keep(const Tile<float>& t, int64_t r, int64_t j, M tail) {
    const __m256i rid = _mm256_set1_epi64x(t.row_ids[r]);
    // 64-bit lane masks of the two halves, from the 32-bit tail mask
    const __m256i tail_lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(tail));
    const __m256i tail_hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(tail, 1));
    const __m256i ids_lo = _mm256_maskload_epi64(reinterpret_cast<const long long*>(t.col_ids + j), tail_lo);
    const __m256i ids_hi = _mm256_maskload_epi64(reinterpret_cast<const long long*>(t.col_ids + j + 4), tail_hi);
    // equal ids -> all-ones 64-bit lanes; take the low 32 bits of each into 8 lanes
    const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    const __m256i eq_lo = _mm256_permutevar8x32_epi32(_mm256_cmpeq_epi64(ids_lo, rid), pick);
    const __m256i eq_hi = _mm256_permutevar8x32_epi32(_mm256_cmpeq_epi64(ids_hi, rid), pick);
    M k = _mm256_andnot_si256(_mm256_blend_epi32(eq_lo, eq_hi, 0xF0), tail);
    const int64_t p = r + t.pos - j;
    if (p >= 0 && p < kLanes) {
      const __m256i lane = _mm256_cmpeq_epi32(_mm256_set1_epi32(static_cast<int32_t>(p)),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      k = _mm256_or_si256(k, _mm256_and_si256(lane, tail));
    }
    return k;
  }
  FI static F zero_unless(M k, F x) { return _mm256_and_ps(_mm256_castsi256_ps(k), x); }
  FI static F where(M k, F x, F other) { return _mm256_blendv_ps(other, x, _mm256_castsi256_ps(k)); }
  FI static F load_tail(const float* p, M tail) { return _mm256_maskload_ps(p, tail); }
};

#include "cpu/soft_contrastive_simd.h"

}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma,avx2,bmi2")
namespace isa_avx512 {

struct V {
  static constexpr int64_t kLanes = 16;
  using F = __m512;
  using M = __mmask16;
  FI static F zero() { return _mm512_setzero_ps(); }
  FI static F set1(float x) { return _mm512_set1_ps(x); }
  FI static F load(const float* p) { return _mm512_loadu_ps(p); }
  FI static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
  FI static F add(F a, F b) { return _mm512_add_ps(a, b); }
  FI static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  FI static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  FI static F div(F a, F b) { return _mm512_div_ps(a, b); }
  FI static F min(F a, F b) { return _mm512_min_ps(a, b); }
  FI static F max(F a, F b) { return _mm512_max_ps(a, b); }
  FI static F abs(F a) { return _mm512_abs_ps(a); }
  FI static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  FI static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  FI static F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  FI static F scale2(F p, F n) { return _mm512_scalef_ps(p, n); }
  FI static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  FI static float hmax(F v) { return _mm512_reduce_max_ps(v); }
  FI static M tail(int64_t bc, int64_t j) {
    return bc - j >= kLanes ? M(0xFFFF) : M((1u << (bc - j)) - 1);
  }
  FI static M keep(const Tile<float>& t, int64_t r, int64_t j, M tail) {
    const __m512i rid = _mm512_set1_epi64(t.row_ids[r]);
    const __mmask8 lo = _mm512_mask_cmpneq_epi64_mask(
        __mmask8(tail), _mm512_maskz_loadu_epi64(__mmask8(tail), t.col_ids + j), rid);
    const __mmask8 hi = _mm512_mask_cmpneq_epi64_mask(
        __mmask8(tail >> 8), _mm512_maskz_loadu_epi64(__mmask8(tail >> 8), t.col_ids + j + 8), rid);
    M k = M(lo) | M(M(hi) << 8);
    const int64_t p = r + t.pos - j;
    if (p >= 0 && p < kLanes) k |= M(1u << p);
    return k & tail;
  }
  FI static F zero_unless(M k, F x) { return _mm512_maskz_mov_ps(k, x); }
  FI static F where(M k, F x, F other) { return _mm512_mask_mov_ps(other, k, x); }
  FI static F load_tail(const float* p, M tail) { return _mm512_maskz_loadu_ps(tail, p); }
};

#include "cpu/soft_contrastive_simd.h"

}  // namespace isa_avx512
#pragma GCC pop_options

#undef FI
#endif  // FASTCON_SC_SIMD

// ---- dispatch of the tile passes -----------------------------------------------------------

// The tile passes: AVX-512 or AVX2 for float (`isa`: cpu::active_isa, decided once per call),
// else scalar.
#if FASTCON_SC_SIMD
#define FASTCON_SC_DISPATCH(masked, name, ...)                                             \
  do {                                                                                     \
    if constexpr (std::is_same_v<T, float>) {                                              \
      if (isa == Isa::kAvx512) {                                                           \
        masked ? isa_avx512::name<true>(__VA_ARGS__) : isa_avx512::name<false>(__VA_ARGS__);\
        break;                                                                             \
      }                                                                                    \
      if (isa == Isa::kAvx2) {                                                             \
        masked ? isa_avx2::name<true>(__VA_ARGS__) : isa_avx2::name<false>(__VA_ARGS__);    \
        break;                                                                             \
      }                                                                                    \
    }                                                                                      \
    masked ? name##_scalar<T, true>(__VA_ARGS__) : name##_scalar<T, false>(__VA_ARGS__);   \
  } while (0)
#define FASTCON_SC_DISPATCH_UNMASKED(name, ...)                                            \
  do {                                                                                     \
    if constexpr (std::is_same_v<T, float>) {                                              \
      if (isa == Isa::kAvx512) {                                                           \
        isa_avx512::name(__VA_ARGS__);                                                     \
        break;                                                                             \
      }                                                                                    \
      if (isa == Isa::kAvx2) {                                                             \
        isa_avx2::name(__VA_ARGS__);                                                       \
        break;                                                                             \
      }                                                                                    \
    }                                                                                      \
    name##_scalar<T>(__VA_ARGS__);                                                         \
  } while (0)
#else
#define FASTCON_SC_DISPATCH(masked, name, ...) \
  (masked ? name##_scalar<T, true>(__VA_ARGS__) : name##_scalar<T, false>(__VA_ARGS__))
#define FASTCON_SC_DISPATCH_UNMASKED(name, ...) name##_scalar<T>(__VA_ARGS__)
#endif

// ---- the blockwise drivers -----------------------------------------------------------------

// How the work is cut: row blocks of `rows`, and column blocks of `cols` grouped into `chunks`
// contiguous column chunks. Block shapes and chunks depend on n and m only (up to 4 threads), never
// on the thread count: the results are bitwise the same for any number of threads. Blocks are at
// most kBlockRows x kBlockCols; up to 2 * kBlockCols columns are cut into 2 equal blocks (so that
// a small batch still gives 2 threads an equal share, chunks owning disjoint columns), and the
// rows into equal blocks.
struct Split {
  int64_t rows, cols, row_blocks, col_blocks, chunks, threads;
  Split(int64_t n, int64_t m) {
    row_blocks = (n + kBlockRows - 1) / kBlockRows;
    rows = round_up((n + row_blocks - 1) / row_blocks, kRound);
    col_blocks = std::max<int64_t>((m + kBlockCols - 1) / kBlockCols, m > kMinSplitCols ? 2 : 1);
    cols = std::min(kBlockCols, round_up((m + col_blocks - 1) / col_blocks, kRound));
    row_blocks = (n + rows - 1) / rows;
    col_blocks = (m + cols - 1) / cols;
    threads = std::max<int64_t>(1, at::get_num_threads());
    chunks = std::min(col_blocks, std::max(kMinChunks, 2 * threads));
    threads = std::min(threads, row_blocks * chunks);
  }
  int64_t first_block(int64_t chunk) const { return chunk * col_blocks / chunks; }
  static int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }
};

void wait_until_at_least(const std::atomic<int64_t>& value, int64_t target) {
  while (value.load(std::memory_order_acquire) < target) std::this_thread::yield();
}

// Work items (row block i, chunk c), handed out in row-block-major order to whichever thread
// asks next, so a slow or descheduled thread holds up no barrier. Item (i, c) starts after
// (i - 1, c) has finished: a chunk's columns (column statistics, grad_v rows) are updated by one
// thread at a time, in row-block order. Results depend on the item partition only, never on
// which thread ran what. No item waits for one handed out after it, so nothing can deadlock,
// even when the threads run one after another.
class TileQueue {
 public:
  explicit TileQueue(const Split& split) : split_(split), chunk_done_(new std::atomic<int64_t>[split.chunks]) {
    for (int64_t c = 0; c < split.chunks; ++c) chunk_done_[c].store(-1, std::memory_order_relaxed);
  }

  // item(i, c, slot) for every item; slot indexes per-thread scratch
  template <typename F>
  void run(const F& item) {
    at::parallel_for(0, split_.threads, 1, [&](int64_t slot, int64_t) {
      SingleThreadedBlas one_blas_thread;
      for (int64_t k; (k = next_.fetch_add(1)) < split_.row_blocks * split_.chunks;) {
        const int64_t i = k / split_.chunks, c = k % split_.chunks;
        wait_until_at_least(chunk_done_[c], i - 1);
        item(i, c, slot);
        chunk_done_[c].store(i, std::memory_order_release);
      }
    });
  }

 private:
  const Split& split_;
  std::unique_ptr<std::atomic<int64_t>[]> chunk_done_;  // last row block each chunk has finished
  std::atomic<int64_t> next_{0};
};

// grad_u partials of the chunks for a few row blocks in flight: slot i % kSlots holds row block
// i's; the last chunk to finish row block i sums them (in chunk order) and frees the slot.
class RowBlockSlots {
 public:
  static constexpr int64_t kSlots = 3;
  explicit RowBlockSlots(int64_t chunks) : chunks_(chunks) {
    for (int64_t k = 0; k < kSlots; ++k) open_for_[k].store(k), finished_[k].store(0);
  }
  int64_t slot(int64_t i) const { return i % kSlots; }
  // before chunk work on row block i writes its slot
  void acquire(int64_t i) const { wait_until_at_least(open_for_[slot(i)], i); }
  // after; true for the caller that finished row block i last, which must reduce it and release
  bool finish(int64_t i) { return finished_[slot(i)].fetch_add(1, std::memory_order_acq_rel) + 1 == chunks_; }
  void release(int64_t i) {
    finished_[slot(i)].store(0, std::memory_order_relaxed);
    open_for_[slot(i)].store(i + kSlots, std::memory_order_release);
  }

 private:
  int64_t chunks_;
  std::atomic<int64_t> open_for_[kSlots];  // the row block that may use each slot next
  std::atomic<int64_t> finished_[kSlots];  // chunks done with the slot's row block
};

template <typename T>
Tile<T> make_tile(const ScProblem& p, T* s, int64_t i0, int64_t br, int64_t j0, int64_t bc) {
  const bool masked = p.mode == kScSoftmaxIgnore;
  return Tile<T>{s, br, bc, masked ? p.row_ids + i0 : nullptr, masked ? p.col_ids + j0 : nullptr,
                 i0 + p.row_offset - j0};
}

// running (max, sum) pairs: raise the max to at least `seen`, rescaling the sum
template <typename T>
void raise_max(T& mx, double& sum, T seen) {
  if (seen > mx) {
    if (mx != kNegInf<T>) sum *= std::exp(double(mx) - double(seen));
    mx = seen;
  }
}

template <typename T>
T finish_lse(T mx, double sum) {
  if (mx == kNegInf<T> || sum <= 0.0) return kNegInf<T>;
  return T(double(mx) + std::log(sum));
}

// The positive pair's logit enters the loss twice: inside the log-sum-exp (from this kernel) and
// as the target term (computed apart, in the caller). Both take it accumulated in double, so
// that it cancels when the loss is small instead of leaving two independent fp32 roundings of
// size eps / tau. pos[r] for the rows of a block whose positive column lies in [0, m).
template <typename T>
void positive_logits(const T* u, const T* v, const ScProblem& p, int64_t i0, int64_t br, T* pos) {
  for (int64_t r = 0; r < br; ++r) {
    const int64_t i = i0 + r, j = i + p.row_offset;
    if (j < 0 || j >= p.m) continue;
    // 8 interleaved partial sums in a fixed order: vectorisable (one running sum is a serial chain)
    const T* a = u + i * p.d;
    const T* b = v + j * p.d;
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= p.d; k += 8)
      for (int l = 0; l < 8; ++l) part[l] += double(a[k + l]) * double(b[k + l]);
    for (int l = 0; k < p.d; ++k, ++l) part[l] += double(a[k]) * double(b[k]);
    const double dot = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
    pos[r] = T(p.scale * dot);
  }
}

template <typename T>
std::vector<T> all_positive_logits(const T* u, const T* v, const ScProblem& p) {
  std::vector<T> pos(p.n, T(0));
  at::parallel_for(0, p.n, 256, [&](int64_t r0, int64_t r1) { positive_logits(u, v, p, r0, r1 - r0, pos.data() + r0); });
  return pos;
}

// overwrite the tile's positive-pair logits with the accurate ones
template <typename T>
void patch_positives(const Tile<T>& t, const T* pos) {
  for (int64_t r = 0; r < t.br; ++r) {
    const int64_t j = r + t.pos;
    if (j >= 0 && j < t.bc) t.s[r * kLds + j] = pos[r];
  }
}

}  // namespace

template <typename T>
bool sc_uses_fixed_max(const ScProblem& p) {
  return p.mode != kScSigmoid && p.logit_bound > 0 && 2.0 * p.logit_bound <= kFixedMaxRange;
}

template <typename T>
void sc_forward(const T* u, const T* v, const ScProblem& p, T* row, T* col) {
  const bool sigmoid = p.mode == kScSigmoid;
  const bool need_col = col != nullptr && !sigmoid;
  const bool masked = p.mode == kScSoftmaxIgnore;
  const int64_t n = p.n, m = p.m, d = p.d;
  if (m == 0) {
    std::fill(row, row + n, sigmoid ? T(0) : kNegInf<T>);  // empty sum / log-sum-exp
    return;
  }
  if (n == 0) {
    if (need_col) std::fill(col, col + m, kNegInf<T>);
    return;
  }
  const bool fixed = sc_uses_fixed_max<T>(p);
  const T shift = T(fixed ? p.logit_bound : 0.0);
  [[maybe_unused]] const Isa isa = std::is_same_v<T, float> ? active_isa() : Isa::kScalar;
  const Split split(n, m);

  Buffer<T> tiles(split.threads * split.rows * kLds);
  Buffer<T> scratch(split.threads * (split.rows + 2 * kLds));  // per thread: a tile's row / col stats
  // partial row statistics of every chunk for all n rows (O(chunks * n)), reduced at the end
  std::vector<double> part_sum(split.chunks * n, 0.0);
  std::vector<T> part_max(fixed || sigmoid ? 0 : split.chunks * n, kNegInf<T>);
  std::vector<double> col_sum(need_col ? m : 0, 0.0);              // column sums, owned by chunks
  std::vector<T> col_max(need_col && !fixed ? m : 0, kNegInf<T>);  // running column maxima
  const std::vector<T> pos = all_positive_logits(u, v, p);

  TileQueue(split).run([&](int64_t i, int64_t c, int64_t slot) {
    T* s = tiles.get() + slot * split.rows * kLds;
    T* row_tile = scratch.get() + slot * (split.rows + 2 * kLds);
    T* col_tile = row_tile + split.rows;
    T* col_tile2 = col_tile + kLds;
    const int64_t i0 = i * split.rows, br = std::min(split.rows, n - i0);
    double* psum = part_sum.data() + c * n + i0;
    T* pmax = fixed || sigmoid ? nullptr : part_max.data() + c * n + i0;
    for (int64_t b = split.first_block(c); b < split.first_block(c + 1); ++b) {
      const int64_t j0 = b * split.cols, bc = std::min(split.cols, m - j0);
      tile_gemm<T>(false, true, br, bc, d, T(p.scale), u + i0 * d, d, v + j0 * d, d, T(0), s, kLds);
      const Tile<T> t = make_tile<T>(p, s, i0, br, j0, bc);
      patch_positives(t, pos.data() + i0);
      if (sigmoid) {
        FASTCON_SC_DISPATCH_UNMASKED(fwd_sigmoid, t, T(p.bias), row_tile);
      } else if (fixed) {
        FASTCON_SC_DISPATCH(masked, fwd_fixed, t, shift, row_tile, col_tile);
        if (need_col)
          for (int64_t j = 0; j < bc; ++j) col_sum[j0 + j] += col_tile[j];
      } else {
        FASTCON_SC_DISPATCH(masked, tile_max, t, row_tile, col_tile);
        for (int64_t r = 0; r < br; ++r) raise_max(pmax[r], psum[r], row_tile[r]);
        if (need_col)
          for (int64_t j = 0; j < bc; ++j) raise_max(col_max[j0 + j], col_sum[j0 + j], col_tile[j]);
        FASTCON_SC_DISPATCH(masked, fwd_running, t, pmax, need_col ? col_max.data() + j0 : nullptr, row_tile,
                            col_tile2);
        if (need_col)
          for (int64_t j = 0; j < bc; ++j) col_sum[j0 + j] += col_tile2[j];
      }
      for (int64_t r = 0; r < br; ++r) psum[r] += row_tile[r];
    }
  });
  // reduce the chunks' partial row statistics, in chunk order
  at::parallel_for(0, n, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (sigmoid || fixed) {
        double sum = 0.0;
        for (int64_t c = 0; c < split.chunks; ++c) sum += part_sum[c * n + r];
        row[r] = sigmoid ? T(sum) : finish_lse(shift, sum);
      } else {
        T mx = kNegInf<T>;
        for (int64_t c = 0; c < split.chunks; ++c) mx = std::max(mx, part_max[c * n + r]);
        double sum = 0.0;
        for (int64_t c = 0; c < split.chunks; ++c) {
          const T cm = part_max[c * n + r];
          if (cm != kNegInf<T>) sum += part_sum[c * n + r] * std::exp(double(cm) - double(mx));
        }
        row[r] = finish_lse(mx, sum);
      }
    }
  });
  if (need_col)
    for (int64_t j = 0; j < m; ++j) col[j] = finish_lse(fixed ? shift : col_max[j], col_sum[j]);
}

template <typename T>
void sc_backward(const T* u, const T* v, const ScProblem& p, const T* row, const T* col, const T* g, const T* h,
                 T* grad_u, T* grad_v, T* row_wsum) {
  const bool sigmoid = p.mode == kScSigmoid;
  const bool masked = p.mode == kScSoftmaxIgnore;
  const bool with_h = h != nullptr && !sigmoid;
  const int64_t n = p.n, m = p.m, d = p.d;
  if (n == 0 || m == 0) {
    std::fill(grad_u, grad_u + n * d, T(0));
    std::fill(grad_v, grad_v + m * d, T(0));
    std::fill(row_wsum, row_wsum + n, T(0));
    return;
  }
  const bool fixed = sc_uses_fixed_max<T>(p);
  const double shift = fixed ? p.logit_bound : 0.0;
  [[maybe_unused]] const Isa isa = std::is_same_v<T, float> ? active_isa() : Isa::kScalar;
  const Split split(n, m);

  // Per-row / per-column coefficients of W. Fixed max: W = e (a_i + b_j), a_i = g_i e^{B - r_i};
  // running max: W = g_i exp(s - r_i) + h_j exp(s - c_j). A -inf log-sum-exp (no pair left)
  // gets weight 0 instead of a NaN.
  std::vector<T> row_coef(n), row_lse(sigmoid || fixed ? 0 : n);
  for (int64_t i = 0; i < n; ++i) {
    const bool empty = !sigmoid && row[i] == kNegInf<T>;
    if (sigmoid) {
      row_coef[i] = g[i];
    } else if (fixed) {
      row_coef[i] = empty ? T(0) : T(double(g[i]) * std::exp(shift - double(row[i])));
    } else {
      row_coef[i] = empty ? T(0) : g[i];
      row_lse[i] = empty ? T(0) : row[i];
    }
  }
  std::vector<T> col_coef(with_h ? m : 0), col_lse(with_h && !fixed ? m : 0);
  for (int64_t j = 0; with_h && j < m; ++j) {
    const bool empty = col[j] == kNegInf<T>;
    if (fixed) {
      col_coef[j] = empty ? T(0) : T(double(h[j]) * std::exp(shift - double(col[j])));
    } else {
      col_coef[j] = empty ? T(0) : h[j];
      col_lse[j] = empty ? T(0) : col[j];
    }
  }
  const std::vector<T> pos = all_positive_logits(u, v, p);

  Buffer<T> tiles(split.threads * split.rows * kLds);
  Buffer<T> scratch(split.threads * split.rows);  // per thread: a tile's row sums of W
  // grad_u partials per (slot, chunk): O(slots * chunks * rows * d), not O(n * d)
  RowBlockSlots slots(split.chunks);
  Buffer<T> part_grad(std::min(RowBlockSlots::kSlots, split.row_blocks) * split.chunks * split.rows * d);
  std::vector<double> part_wsum(split.chunks * n, 0.0);

  TileQueue(split).run([&](int64_t i, int64_t c, int64_t slot) {
    T* s = tiles.get() + slot * split.rows * kLds;
    T* wsum_tile = scratch.get() + slot * split.rows;
    const int64_t i0 = i * split.rows, br = std::min(split.rows, n - i0);
    slots.acquire(i);
    T* grad = part_grad.get() + (slots.slot(i) * split.chunks + c) * split.rows * d;
    double* wsum = part_wsum.data() + c * n + i0;
    const int64_t b0 = split.first_block(c);
    for (int64_t b = b0; b < split.first_block(c + 1); ++b) {
      const int64_t j0 = b * split.cols, bc = std::min(split.cols, m - j0);
      tile_gemm<T>(false, true, br, bc, d, T(p.scale), u + i0 * d, d, v + j0 * d, d, T(0), s, kLds);
      const Tile<T> t = make_tile<T>(p, s, i0, br, j0, bc);
      patch_positives(t, pos.data() + i0);
      if (sigmoid) {
        FASTCON_SC_DISPATCH_UNMASKED(bwd_sigmoid, t, T(p.bias), row_coef.data() + i0, wsum_tile);
      } else if (fixed) {
        FASTCON_SC_DISPATCH(masked, bwd_fixed, t, T(shift), row_coef.data() + i0,
                            with_h ? col_coef.data() + j0 : nullptr, wsum_tile);
      } else {
        FASTCON_SC_DISPATCH(masked, bwd_running, t, row_coef.data() + i0, row_lse.data() + i0,
                            with_h ? col_coef.data() + j0 : nullptr, with_h ? col_lse.data() + j0 : nullptr,
                            wsum_tile);
      }
      for (int64_t r = 0; r < br; ++r) wsum[r] += wsum_tile[r];
      // this chunk's grad_u partial += W V_b ; grad_v rows of block b += W^T U (owned: no race)
      tile_gemm<T>(false, false, br, d, bc, T(1), s, kLds, v + j0 * d, d, T(b == b0 ? 0 : 1), grad, d);
      tile_gemm<T>(true, false, bc, d, br, T(1), s, kLds, u + i0 * d, d, T(i == 0 ? 0 : 1), grad_v + j0 * d, d);
    }
    if (slots.finish(i)) {  // the last chunk of row block i: reduce its partials, in chunk order
      const T* first = part_grad.get() + slots.slot(i) * split.chunks * split.rows * d;
      for (int64_t r = 0; r < br; ++r) {
        T* out = grad_u + (i0 + r) * d;
        std::copy(first + r * d, first + (r + 1) * d, out);
        for (int64_t cc = 1; cc < split.chunks; ++cc) {
          const T* part = first + (cc * split.rows + r) * d;
          for (int64_t k = 0; k < d; ++k) out[k] += part[k];
        }
        double sum = 0.0;
        for (int64_t cc = 0; cc < split.chunks; ++cc) sum += part_wsum[cc * n + i0 + r];
        row_wsum[i0 + r] = T(sum);
      }
      slots.release(i);
    }
  });
}

template void sc_forward<float>(const float*, const float*, const ScProblem&, float*, float*);
template void sc_forward<double>(const double*, const double*, const ScProblem&, double*, double*);
template void sc_backward<float>(const float*, const float*, const ScProblem&, const float*, const float*,
                                 const float*, const float*, float*, float*, float*);
template void sc_backward<double>(const double*, const double*, const ScProblem&, const double*, const double*,
                                  const double*, const double*, double*, double*, double*);
template bool sc_uses_fixed_max<float>(const ScProblem&);
template bool sc_uses_fixed_max<double>(const ScProblem&);

}  // namespace fastcon::cpu
