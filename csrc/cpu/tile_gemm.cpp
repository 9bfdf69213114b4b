// Tile GEMM: MKL from libtorch when present, else a packed, register-blocked built-in kernel.
// GCC 12 reports false "may be used uninitialized" warnings inside its own AVX-512 intrinsic
// headers (their undefined-vector idiom); the pragma has to precede every include to reach them.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu/tile_gemm.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTCON_HAVE_AVX512_PATH 1
#define FASTCON_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma,avx2,bmi2")))
#else
#define FASTCON_HAVE_AVX512_PATH 0
#endif

namespace fastcon::cpu {
namespace {

// ---- MKL, looked up at run time ------------------------------------------------------------
// torch wheels for x86-64 link MKL into libtorch_cpu and export its Fortran BLAS symbols. A
// run-time lookup keeps the extension loadable against torch builds without MKL.

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*, const int*);
using set_threads_fn = int (*)(int);  // the C entry point; the lower-case symbol is Fortran (int*)

struct Blas {
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
  set_threads_fn set_num_threads_local = nullptr;
};

const Blas& blas() {
  static const Blas table = [] {
    Blas t;
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    void* scope = lib ? lib : RTLD_DEFAULT;
    t.sgemm = reinterpret_cast<sgemm_fn>(dlsym(scope, "sgemm_"));
    t.dgemm = reinterpret_cast<dgemm_fn>(dlsym(scope, "dgemm_"));
    t.set_num_threads_local = reinterpret_cast<set_threads_fn>(dlsym(scope, "MKL_Set_Num_Threads_Local"));
    if (!t.set_num_threads_local) t.sgemm = nullptr, t.dgemm = nullptr;  // cannot keep it single-threaded
    return t;
  }();
  return table;
}

bool builtin_forced() {
  const char* env = std::getenv("FASTCON_CPU_GEMM");
  return env && std::strcmp(env, "builtin") == 0;
}

// ---- built-in kernel -------------------------------------------------------------------------
// Goto-style: pack a KC-deep slice of op(B) into NR-wide column panels and of op(A) into MR-tall
// row panels, then a register-resident MR x NR micro-tile accumulates over the slice.

constexpr int64_t kKc = 256;
constexpr int64_t kMc = 120;
constexpr int64_t kNc = 1024;

template <typename T>
struct Operand {
  const T* p;
  int64_t ld;
  bool trans;
  T at(int64_t row, int64_t col) const { return trans ? p[col * ld + row] : p[row * ld + col]; }
};

// panel[kk * MR + r] = A(i0 + r, p0 + kk), zero beyond the matrix
template <typename T, int MR>
void pack_a(const Operand<T>& a, int64_t i0, int64_t mr, int64_t p0, int64_t kc, T* panel) {
  for (int64_t kk = 0; kk < kc; ++kk) {
    for (int r = 0; r < MR; ++r) panel[kk * MR + r] = r < mr ? a.at(i0 + r, p0 + kk) : T(0);
  }
}

// panel[kk * NR + c] = B(p0 + kk, j0 + c), zero beyond the matrix
template <typename T, int NR>
void pack_b(const Operand<T>& b, int64_t p0, int64_t kc, int64_t j0, int64_t nr, T* panel) {
  if (!b.trans && nr == NR) {
    for (int64_t kk = 0; kk < kc; ++kk) std::memcpy(panel + kk * NR, b.p + (p0 + kk) * b.ld + j0, NR * sizeof(T));
    return;
  }
  for (int64_t kk = 0; kk < kc; ++kk) {
    for (int c = 0; c < NR; ++c) panel[kk * NR + c] = c < nr ? b.at(p0 + kk, j0 + c) : T(0);
  }
}

// portable micro-kernel: C[0:mr, 0:nr] = alpha * Ap Bp + beta * C (beta == 0 never reads C)
template <typename T, int MR, int NR>
void micro_portable(int64_t kc, const T* ap, const T* bp, T* c, int64_t ldc, int64_t mr, int64_t nr, T alpha,
                    T beta) {
  T acc[MR][NR] = {};
  for (int64_t kk = 0; kk < kc; ++kk) {
    for (int r = 0; r < MR; ++r) {
      const T av = ap[kk * MR + r];
      for (int q = 0; q < NR; ++q) acc[r][q] += av * bp[kk * NR + q];
    }
  }
  for (int64_t r = 0; r < mr; ++r) {
    for (int64_t q = 0; q < nr; ++q) {
      T out = alpha * acc[r][q];
      c[r * ldc + q] = beta == T(0) ? out : out + beta * c[r * ldc + q];
    }
  }
}

#if FASTCON_HAVE_AVX512_PATH
constexpr int kMr512 = 12;  // 12 x 32 floats: 24 accumulators + 2 B vectors + 1 broadcast
constexpr int kNr512 = 32;

FASTCON_AVX512 void micro_avx512(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, int64_t mr,
                                 int64_t nr, float alpha, float beta) {
  __m512 acc[kMr512][2];
#pragma GCC unroll 12
  for (int r = 0; r < kMr512; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m512 b0 = _mm512_load_ps(bp);
    const __m512 b1 = _mm512_load_ps(bp + 16);
#pragma GCC unroll 12
    for (int r = 0; r < kMr512; ++r) {
      const __m512 a = _mm512_set1_ps(ap[r]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
    }
    ap += kMr512;
    bp += kNr512;
  }
  const __mmask16 m0 = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1);
  const __mmask16 m1 = nr >= 32 ? __mmask16(0xFFFF) : (nr > 16 ? __mmask16((1u << (nr - 16)) - 1) : __mmask16(0));
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 12
  for (int r = 0; r < kMr512; ++r) {
    if (r < mr) {
      float* row = c + r * ldc;
      __m512 o0 = _mm512_mul_ps(va, acc[r][0]), o1 = _mm512_mul_ps(va, acc[r][1]);
      if (beta != 0.0f) {
        o0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, row), o0);
        o1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, row + 16), o1);
      }
      _mm512_mask_storeu_ps(row, m0, o0);
      _mm512_mask_storeu_ps(row + 16, m1, o1);
    }
  }
}
#endif

template <typename T, int MR, int NR, typename Micro>
void gemm_packed(const Operand<T>& a, const Operand<T>& b, int64_t m, int64_t n, int64_t k, T alpha, T beta, T* c,
                 int64_t ldc, Micro micro) {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  // per-thread packing buffers, 64-byte aligned for aligned vector loads
  thread_local std::unique_ptr<T[], Free> abuf, bbuf;
  thread_local int64_t acap = 0, bcap = 0;
  const int64_t asize = ((kMc + MR - 1) / MR) * MR * kKc;
  const int64_t bsize = ((kNc + NR - 1) / NR) * NR * kKc;
  if (acap < asize) abuf.reset(static_cast<T*>(std::aligned_alloc(64, asize * sizeof(T)))), acap = asize;
  if (bcap < bsize) bbuf.reset(static_cast<T*>(std::aligned_alloc(64, bsize * sizeof(T)))), bcap = bsize;

  if (k == 0) {  // C = beta * C
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  for (int64_t j0 = 0; j0 < n; j0 += kNc) {
    const int64_t nc = std::min(kNc, n - j0);
    for (int64_t p0 = 0; p0 < k; p0 += kKc) {
      const int64_t kc = std::min(kKc, k - p0);
      const T beta_here = p0 == 0 ? beta : T(1);
      for (int64_t jr = 0; jr < nc; jr += NR) pack_b<T, NR>(b, p0, kc, j0 + jr, std::min<int64_t>(NR, nc - jr), bbuf.get() + jr * kc);
      for (int64_t i0 = 0; i0 < m; i0 += kMc) {
        const int64_t mc = std::min(kMc, m - i0);
        for (int64_t ir = 0; ir < mc; ir += MR)
          pack_a<T, MR>(a, i0 + ir, std::min<int64_t>(MR, mc - ir), p0, kc, abuf.get() + ir * kc);
        for (int64_t jr = 0; jr < nc; jr += NR) {
          for (int64_t ir = 0; ir < mc; ir += MR) {
            micro(kc, abuf.get() + ir * kc, bbuf.get() + jr * kc, c + (i0 + ir) * ldc + j0 + jr, ldc,
                  std::min<int64_t>(MR, mc - ir), std::min<int64_t>(NR, nc - jr), alpha, beta_here);
          }
        }
      }
    }
  }
}

template <typename T>
void gemm_builtin(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                  const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const Operand<T> A{a, lda, trans_a}, B{b, ldb, trans_b};
#if FASTCON_HAVE_AVX512_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (avx512_enabled()) return gemm_packed<float, kMr512, kNr512>(A, B, m, n, k, alpha, beta, c, ldc, micro_avx512);
  }
#endif
  gemm_packed<T, 4, 16>(A, B, m, n, k, alpha, beta, c, ldc, micro_portable<T, 4, 16>);
}

}  // namespace

bool avx512_enabled() { return active_isa() == Isa::kAvx512; }

const char* tile_gemm_backend(bool is_double) {
  if (builtin_forced()) return "builtin";
  return (is_double ? blas().dgemm != nullptr : blas().sgemm != nullptr) ? "mkl" : "builtin";
}

SingleThreadedBlas::SingleThreadedBlas() : previous_(0) {
  if (blas().set_num_threads_local) previous_ = blas().set_num_threads_local(1);
}

SingleThreadedBlas::~SingleThreadedBlas() {
  if (blas().set_num_threads_local) blas().set_num_threads_local(previous_);
}

template <typename T>
void tile_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const bool forced = builtin_forced();
  // Fortran BLAS is column-major: C^T = op(B)^T op(A)^T, so B goes first.
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LDA = int(std::max<int64_t>(ldb, 1)),
            LDB = int(std::max<int64_t>(lda, 1)), LDC = int(std::max<int64_t>(ldc, 1));
  if constexpr (std::is_same_v<T, float>) {
    if (blas().sgemm && !forced) return blas().sgemm(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  } else {
    if (blas().dgemm && !forced) return blas().dgemm(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  }
  gemm_builtin<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template void tile_gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                               int64_t, float, float*, int64_t);
template void tile_gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                                int64_t, double, double*, int64_t);

}  // namespace fastcon::cpu
