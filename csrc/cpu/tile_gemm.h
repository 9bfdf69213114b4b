// Single-threaded GEMM on cache-sized tiles, for kernels that parallelise over tiles themselves.
//
// Row-major: C (m x n, ldc) = alpha * op(A) * op(B) + beta * C, op(X) = X or X^T.
// Uses the MKL that libtorch exports (sgemm_ / dgemm_, looked up at run time, forced to one
// thread) when there is one, else a built-in register-blocked kernel (AVX-512 for float when
// the CPU has it, portable loops otherwise). FASTCON_CPU_GEMM=builtin forces the built-in path
// (tests use it so that it stays correct on machines whose torch has MKL).
#pragma once

#include <cstdint>

namespace fastcon::cpu {

template <typename T>
void tile_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

// Whether the AVX-512 kernels run: the CPU has AVX-512 and FASTCON_CPU_ISA is not "scalar"
// (a hook that lets tests run the portable paths on any machine).
bool avx512_enabled();

// "mkl" or "builtin": what tile_gemm<T> uses right now.
const char* tile_gemm_backend(bool is_double);

// While alive, MKL called from this thread runs on one thread (the caller parallelises).
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

}  // namespace fastcon::cpu
