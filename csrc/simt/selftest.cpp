// Self-tests of the SIMT emulator: small kernels whose right answers (or expected launch
// errors) are known, run by tests/test_simt.py through torch.ops.fastcon_simt.simt_selftest.
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "simt/simt.h"

#define FASTCON_LAUNCH(kernel, grid, block, smem, stream) ::simt::launch(kernel, grid, block, smem, stream)

namespace fastcon::simt_selftest {
namespace {

__global__ void shuffle_kernel(int* out) {
  const int t = threadIdx.x, lane = t & 31;
  const unsigned full = 0xffffffffu;
  out[t * 6 + 0] = __shfl_xor_sync(full, t, 5);
  out[t * 6 + 1] = __shfl_down_sync(full, t, 3);
  out[t * 6 + 2] = __shfl_up_sync(full, t, 2, 8);
  out[t * 6 + 3] = __shfl_sync(full, t, 7);
  out[t * 6 + 4] = static_cast<int>(__ballot_sync(full, lane % 3 == 0));
  out[t * 6 + 5] = __shfl_sync(0x0000ffffu << (lane & 16), t * 10, lane ^ 1);  // two half-warp groups
}

std::string shuffle() {
  std::vector<int> out(64 * 6);
  auto k = &shuffle_kernel;
  FASTCON_LAUNCH(k, 1, 64, 0, nullptr)(out.data());
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (l % 3 == 0) ballot |= 1u << l;
  for (int t = 0; t < 64; ++t) {
    const int lane = t & 31, base = t - lane;
    const int want[6] = {t ^ 5,
                         lane + 3 < 32 ? t + 3 : t,
                         (lane & 7) >= 2 ? t - 2 : t,
                         base + 7,
                         static_cast<int>(ballot),
                         (t ^ 1) * 10};
    for (int i = 0; i < 6; ++i)
      if (out[t * 6 + i] != want[i]) {
        char buf[120];
        std::snprintf(buf, sizeof buf, "thread %d, result %d: got %d, want %d", t, i, out[t * 6 + i], want[i]);
        return buf;
      }
  }
  return "ok";
}

// Each thread writes its slot, then reads its neighbour's: right only with the barrier.
__global__ void neighbour_kernel(int* out, bool with_barrier) {
  __shared__ int slots[128];
  const int t = threadIdx.x;
  slots[t] = t + 1;
  if (with_barrier) __syncthreads();
  out[t] = slots[(t + 1) % 128];
  if (with_barrier) __syncthreads();
  slots[t] = -1;
}

std::string race(bool with_barrier) {
  std::vector<int> out(128);
  auto k = &neighbour_kernel;
  int wrong = 0;
  for (int rep = 0; rep < 2; ++rep) {  // the second launch sees the first's leftovers
    FASTCON_LAUNCH(k, 2, 128, 0, nullptr)(out.data(), with_barrier);
    for (int t = 0; t < 128; ++t) wrong += out[t] != (t + 1) % 128 + 1;
  }
  return "wrong " + std::to_string(wrong);
}

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x >= 16) return;  // bug: the others wait at a barrier these never reach
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_warp_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // bug: lanes 16-31 never arrive
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void mask_disagree_kernel(int* out) {
  const unsigned mask = threadIdx.x == 3 ? 0x0000ffffu : 0xffffffffu;  // bug: masks differ
  out[threadIdx.x] = __shfl_xor_sync(mask, static_cast<int>(threadIdx.x), 1);
}

__global__ void outside_mask_kernel(int* out) {
  // lanes 0-15 read from lanes 16-31, which are not in the mask
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), threadIdx.x + 16);
}

template <class K>
std::string expect_error(K kernel, unsigned threads) {
  std::vector<int> out(threads, 0);
  try {
    FASTCON_LAUNCH(kernel, 1, threads, 0, nullptr)(out.data());
  } catch (const std::runtime_error& e) {
    return std::string("error: ") + e.what();
  }
  return "no error";
}

// D = A B + C for one 16 x 16 x 16 wmma tile against a plain loop, with A row-major and B
// column-major in shared memory, C loaded from and D stored to global memory.
template <class T>
__global__ void wmma_kernel(const float* a, const float* b, float* c) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) T as[16 * 24];
  __shared__ __align__(32) T bs[16 * 24];
  for (int e = threadIdx.x; e < 256; e += 32) {
    as[(e / 16) * 24 + e % 16] = T(a[e]);
    bs[(e % 16) * 24 + e / 16] = T(b[e]);  // column-major B
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::load_matrix_sync(fa, as, 24);
  wmma::load_matrix_sync(fb, bs, 24);
  wmma::load_matrix_sync(fc, c, 16, wmma::mem_row_major);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

template <class T>
std::string wmma_check() {
  float a[256], b[256], want[256];
  alignas(32) float c[256];  // wmma pointers must be 256-bit aligned
  for (int e = 0; e < 256; ++e) {  // small integers: exact in 16-bit floats and in the sums
    a[e] = static_cast<float>((e * 7) % 11) - 5.0f;
    b[e] = static_cast<float>((e * 5) % 13) - 6.0f;
    c[e] = static_cast<float>(e % 9);
  }
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 16; ++col) {
      float s = c[r * 16 + col];
      for (int k = 0; k < 16; ++k) s += a[r * 16 + k] * b[k * 16 + col];
      want[r * 16 + col] = s;
    }
  auto k = &wmma_kernel<T>;
  FASTCON_LAUNCH(k, 1, 32, 0, nullptr)(a, b, c);
  for (int e = 0; e < 256; ++e)
    if (c[e] != want[e]) return "entry " + std::to_string(e) + ": got " + std::to_string(c[e]) + ", want " + std::to_string(want[e]);
  return "ok";
}

__global__ void misaligned_wmma_kernel(int*) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) __half tile[16 * 16 + 8];
  for (int e = threadIdx.x; e < 16 * 16 + 8; e += 32) tile[e] = __half(0.0f);
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, tile + 4, 16);  // bug: 8 bytes past a 32-byte boundary
}

__global__ void fragment_layout_kernel(int* out) {
  // Reads the element a kernel might believe it owns: lane l, element 0 = A[l / 2][(l % 2) * 8].
  // The emulator scrambles fragment layouts, so such assumptions do not hold.
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) __half tile[256];
  for (int e = threadIdx.x; e < 256; e += 32) tile[e] = __half(static_cast<float>(e));
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, tile, 16);
  const int lane = threadIdx.x;
  out[lane] = static_cast<float>(fa.x[0]) == static_cast<float>((lane / 2) * 16 + (lane % 2) * 8);
}

__global__ void poison_kernel(float* out) {
  __shared__ float buf[64];
  FASTCON_SHARED_POISON(buf);
  if (threadIdx.x < 32) buf[threadIdx.x] = 1.0f;  // the upper half is never written
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

std::string poison() {
  std::vector<float> out(64);
  auto k = &poison_kernel;
  FASTCON_LAUNCH(k, 2, 64, 0, nullptr)(out.data());
  int nan = 0, ones = 0;
  for (float v : out) {
    nan += std::isnan(v);
    ones += v == 1.0f;
  }
  return "nan " + std::to_string(nan) + " ones " + std::to_string(ones);
}

}  // namespace

std::string run(const std::string& name) {
  if (name == "shuffle") return shuffle();
  if (name == "race_without_barrier") return race(false);
  if (name == "race_with_barrier") return race(true);
  if (name == "early_exit") return expect_error(&early_exit_kernel, 64);
  if (name == "divergent_warp") return expect_error(&divergent_warp_kernel, 64);
  if (name == "mask_disagree") return expect_error(&mask_disagree_kernel, 32);
  if (name == "outside_mask") return expect_error(&outside_mask_kernel, 16);
  if (name == "wmma_half") return wmma_check<__half>();
  if (name == "wmma_bfloat16") return wmma_check<__nv_bfloat16>();
  if (name == "wmma_misaligned") return expect_error(&misaligned_wmma_kernel, 32);
  if (name == "fragment_layout") {
    std::vector<int> out(32);
    auto k = &fragment_layout_kernel;
    FASTCON_LAUNCH(k, 1, 32, 0, nullptr)(out.data());
    int matches = 0;
    for (int v : out) matches += v;
    return "matches " + std::to_string(matches);
  }
  if (name == "poison") return poison();
  throw std::invalid_argument("unknown SIMT self-test " + name);
}

}  // namespace fastcon::simt_selftest
