// Warp-level GEMM tiles on shared-memory operands: one warp owns a 16 x (16 * TN) block of an
// output and accumulates products of shared-memory tiles into it.
//
// Two engines behind one interface, chosen by the storage type T:
// - __half / __nv_bfloat16: tensor cores through nvcuda::wmma (m16n16k16, fp32 accumulators);
// - float / double: CUDA cores (FMA), each lane owning a 4 x (2 * TN) sub-block (rows
//   ly + 4a, columns lx + 8b with ly = lane / 8, lx = lane % 8), so that the 8 lanes that
//   share a row read consecutive shared-memory words.
// WMMA fragments have an opaque register layout, so element-wise work (exp, masks, row and
// column sums) happens after `tile_store` writes the tile to shared memory.
#pragma once

#include "cuda/common.cuh"

namespace fastcon::device {

template <class T>
constexpr bool kTensorCore = false;
template <>
constexpr bool kTensorCore<__half> = true;
template <>
constexpr bool kTensorCore<__nv_bfloat16> = true;

template <class T, int TN, bool TC = kTensorCore<T>>
struct WarpTile;

template <class T, int TN>
struct WarpTile<T, TN, true> {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f[TN];
};

template <class T, int TN>
struct WarpTile<T, TN, false> {
  Acc<T> x[4][2 * TN];
};

template <class T, int TN>
__device__ __forceinline__ void tile_zero(WarpTile<T, TN>& t) {
  if constexpr (kTensorCore<T>) {
#pragma unroll
    for (int n = 0; n < TN; ++n) nvcuda::wmma::fill_fragment(t.f[n], 0.0f);
  } else {
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 2 * TN; ++b) t.x[a][b] = 0;
  }
}

// t += A * B^T with A (16 x K) and B (16 TN x K) row-major in shared memory.
// K is a multiple of 16 for the tensor-core engine.
template <class T, int TN>
__device__ __forceinline__ void tile_mma_abt(WarpTile<T, TN>& t, const T* a, int lda, const T* b, int ldb, int k_len,
                                             int lane) {
  if constexpr (kTensorCore<T>) {
    namespace wmma = nvcuda::wmma;
    for (int k = 0; k < k_len; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, a + k, lda);
#pragma unroll
      for (int n = 0; n < TN; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // B^T(k, n) = B[n][k]
        wmma::load_matrix_sync(fb, b + n * 16 * ldb + k, ldb);
        wmma::mma_sync(t.f[n], fa, fb, t.f[n]);
      }
    }
  } else {
    const int ly = lane >> 3, lx = lane & 7;
#pragma unroll 4
    for (int k = 0; k < k_len; ++k) {
      Acc<T> av[4], bv[2 * TN];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = a[(ly + 4 * i) * lda + k];
#pragma unroll
      for (int j = 0; j < 2 * TN; ++j) bv[j] = b[(lx + 8 * j) * ldb + k];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2 * TN; ++j) t.x[i][j] += av[i] * bv[j];
    }
  }
}

// t += A * B with A (16 x K) and B (K x 16 TN) row-major in shared memory.
template <class T, int TN>
__device__ __forceinline__ void tile_mma_ab(WarpTile<T, TN>& t, const T* a, int lda, const T* b, int ldb, int k_len,
                                            int lane) {
  if constexpr (kTensorCore<T>) {
    namespace wmma = nvcuda::wmma;
    for (int k = 0; k < k_len; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, a + k, lda);
#pragma unroll
      for (int n = 0; n < TN; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, b + k * ldb + n * 16, ldb);
        wmma::mma_sync(t.f[n], fa, fb, t.f[n]);
      }
    }
  } else {
    const int ly = lane >> 3, lx = lane & 7;
#pragma unroll 4
    for (int k = 0; k < k_len; ++k) {
      Acc<T> av[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = a[(ly + 4 * i) * lda + k];
#pragma unroll
      for (int j = 0; j < 2 * TN; ++j) {
        const Acc<T> bv = b[k * ldb + lx + 8 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i) t.x[i][j] += av[i] * bv;
      }
    }
  }
}

// Writes the tile row-major to shared memory (lds elements per row).
template <class T, int TN>
__device__ __forceinline__ void tile_store(const WarpTile<T, TN>& t, Acc<T>* s, int lds, int lane) {
  if constexpr (kTensorCore<T>) {
#pragma unroll
    for (int n = 0; n < TN; ++n) nvcuda::wmma::store_matrix_sync(s + n * 16, t.f[n], lds, nvcuda::wmma::mem_row_major);
  } else {
    const int ly = lane >> 3, lx = lane & 7;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2 * TN; ++j) s[(ly + 4 * i) * lds + lx + 8 * j] = t.x[i][j];
  }
}

// out[r][c] = mult * tile[r][c] for r < rows, c < cols (global memory, ld elements per row).
// The tensor-core engine goes through `scratch`, 256 floats of shared memory of this warp.
template <class T, int TN>
__device__ __forceinline__ void tile_store_global(const WarpTile<T, TN>& t, Acc<T>* out, int64_t ld, int rows, int cols,
                                                  Acc<T> mult, float* scratch, int lane) {
  if constexpr (kTensorCore<T>) {
#pragma unroll
    for (int n = 0; n < TN; ++n) {
      nvcuda::wmma::store_matrix_sync(scratch, t.f[n], 16, nvcuda::wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int r = e >> 4, c = n * 16 + (e & 15);
        if (r < rows && c < cols) out[r * ld + c] = mult * scratch[e];
      }
      __syncwarp();
    }
  } else {
    const int ly = lane >> 3, lx = lane & 7;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2 * TN; ++j) {
        const int r = ly + 4 * i, c = lx + 8 * j;
        if (r < rows && c < cols) out[r * ld + c] = mult * t.x[i][j];
      }
  }
}

}  // namespace fastcon::device
