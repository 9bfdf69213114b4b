// SIMT emulation layer: compiles CUDA C++ kernels with a host C++ compiler and runs them on
// the CPU, so that the numerics and the synchronisation of the csrc/cuda kernels are tested on
// machines without a GPU. It is test infrastructure, not a backend for users.
//
// How it runs a launch FASTCON_LAUNCH(kernel, grid, block, smem, stream)(args...):
// - blocks run one after another, in blockIdx order (x fastest);
// - the threads of a block are fibers (user-space contexts on their own 64 KiB stacks; an
//   x86-64 assembly switch, ucontext elsewhere) that run one at a time, each until it blocks:
//   at __syncthreads, at a warp collective (__shfl*_sync, __ballot_sync, __syncwarp, wmma
//   load/store/mma) or at its end. Between two block-wide barriers the threads run in
//   ascending order in even phases and in descending order in odd phases, so a missing
//   __syncthreads lets one thread read shared data another has not written yet (or has
//   already overwritten), and the result comes out wrong.
// - warp collectives complete when every lane named in the mask has arrived; the last lane
//   to arrive computes the result for all of them (so shuffles exchange the values every lane
//   had at the call, as on the GPU).
// - misuse that is undefined behaviour on a GPU is an error here, raised from the launch as a
//   C++ exception: __syncthreads not reached by every thread of the block (e.g. after an early
//   return), lanes of a warp disagreeing on a collective's mask or arguments, masks naming
//   lanes that do not exist or have exited, shuffles reading a lane outside the mask, wmma
//   pointers not 256-bit aligned or strides that are not a multiple of 16 bytes, deadlocks.
// - nvcuda::wmma (m16n16k16, __half / __nv_bfloat16 inputs, float accumulators) is
//   emulated with fragments spread over the 32 lanes in a deliberately scrambled element
//   order, so code that assumes a fragment layout computes garbage, as it would on a GPU.
//
// Limits (what it does not catch or model):
// - no preemption inside a phase: races between two threads that both run before the next
//   barrier are only caught when the interleaving order exposes them (the alternating order
//   catches read-before-write and write-before-read across threads, not every race);
// - blocks never run concurrently: inter-block races and missing __threadfence are invisible;
//   atomics are trivially atomic; memory fences are no-ops;
// - static __shared__ variables are function statics, shared by every block of a launch and
//   not cleared between blocks (kernels that want poisoning call FASTCON_SHARED_POISON on
//   their shared buffer; it fills it with 0xff bytes, NaN for floats, at each block start);
// - one launch at a time per process (a global mutex), always synchronous; streams are
//   ignored; no dynamic parallelism, cooperative groups, clusters, TMA, cp.async or
//   warp-level intrinsics beyond the ones defined below; no device memory: pointers are host
//   pointers;
// - math is the host libm's (expf, exp2f, log1pf, ...), not the GPU's approximate MUFU
//   versions, and float arithmetic is not contracted into FMAs as nvcc does: results agree
//   with the GPU to rounding, not bit for bit;
// - the emulated device reports 4 multiprocessors and a 64 KiB shared-memory opt-in limit
//   (kEmulated* below), so that launch heuristics take their multi-block and low-memory paths
//   on test-sized problems; dynamic shared memory is 128-byte aligned and 0xff-poisoned per block;
// - Linux only (mmap'd stacks with guard pages; the fast context switch is x86-64 assembly,
//   other architectures use ucontext);
// - it is slow (a fiber switch per thread per barrier): keep test shapes small.
//
// Tests: tests/test_simt.py (this layer), tests/test_simt_catches_bugs.py (the emulated suite
// fails on deliberately broken kernels), and every op suite's "cuda_simt" backend.
#pragma once

#ifndef FASTCON_SIMT
#define FASTCON_SIMT 1
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "simt/fp16.h"

// ---- CUDA keywords ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define warpSize 32

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

// ---- CUDA runtime stand-ins ------------------------------------------------------------------
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace simt {
// What cudaDeviceGetAttribute reports for the emulated device: few multiprocessors and little
// shared memory, so that launch heuristics take their multi-block and low-memory paths on the
// small shapes of tests.
constexpr int kEmulatedMultiprocessors = 4;
constexpr int kEmulatedSharedMemoryOptin = 64 * 1024;
}  // namespace simt

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "error"; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount            ? simt::kEmulatedMultiprocessors
           : attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? simt::kEmulatedSharedMemoryOptin
                                                             : 1024;
  return cudaSuccess;
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

// ---- the runtime (csrc/simt/simt.cpp) ------------------------------------------------------------
namespace simt {
namespace detail {
// The calling thread's indices; the scheduler updates them at every fiber switch.
inline dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;
inline unsigned g_linear_tid = 0;

using CollectiveFn = void (*)(void* const* posts, unsigned mask);
// Blocks the calling lane until every lane in `mask` of its warp has called collective()
// with the same `what`; the last one to arrive runs fn over all lanes' posts.
void collective(unsigned mask, const char* what, void* post, CollectiveFn fn);
void syncthreads();
void* dynamic_shared_memory();
void poison_shared(void* p, size_t bytes);
}  // namespace detail

// Raises a launch error from inside a kernel (the launch throws std::runtime_error(msg)).
[[noreturn]] void fail(const char* msg);
// Kernel launches (calls of run) since the process started: tests count the launches of an op.
int64_t launch_count();
// Runs thunk(ctx) as every thread of every block of the grid (one launch).
void run(dim3 grid, dim3 block, size_t dynamic_smem, void (*thunk)(void*), void* ctx);

template <class... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... args) const {
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    struct Ctx {
      void (*k)(P...);
      std::tuple<std::decay_t<P>...>* p;
    } ctx{kernel, &params};
    // every thread gets its own copy of the parameters, as kernel parameters are by value
    run(grid, block, smem, [](void* c) { auto* x = static_cast<Ctx*>(c); std::apply(x->k, *x->p); }, &ctx);
  }
};

template <class... P>
Launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return Launcher<P...>{kernel, grid, block, smem};
}
}  // namespace simt

#define threadIdx (static_cast<const ::dim3&>(::simt::detail::g_thread_idx))
#define blockIdx (static_cast<const ::dim3&>(::simt::detail::g_block_idx))
#define blockDim (static_cast<const ::dim3&>(::simt::detail::g_block_dim))
#define gridDim (static_cast<const ::dim3&>(::simt::detail::g_grid_dim))

inline void __syncthreads() { ::simt::detail::syncthreads(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---- atomics: fibers of a block never run in parallel and blocks run one after another, so
// a plain read-modify-write is atomic.
template <class T>
inline T simt_atomic_rmw_(T* p, T v, int op) {
  T old = *p;
  switch (op) {
    case 0: *p = old + v; break;
    case 1: *p = old < v ? v : old; break;
    case 2: *p = v < old ? v : old; break;
    default: *p = v; break;
  }
  return old;
}
inline float atomicAdd(float* p, float v) { return simt_atomic_rmw_(p, v, 0); }
inline double atomicAdd(double* p, double v) { return simt_atomic_rmw_(p, v, 0); }
inline int atomicAdd(int* p, int v) { return simt_atomic_rmw_(p, v, 0); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return simt_atomic_rmw_(p, v, 0); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return simt_atomic_rmw_(p, v, 0); }
inline int atomicMax(int* p, int v) { return simt_atomic_rmw_(p, v, 1); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return simt_atomic_rmw_(p, v, 1); }
inline int atomicMin(int* p, int v) { return simt_atomic_rmw_(p, v, 2); }
inline unsigned atomicMin(unsigned* p, unsigned v) { return simt_atomic_rmw_(p, v, 2); }
inline int atomicExch(int* p, int v) { return simt_atomic_rmw_(p, v, 3); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return simt_atomic_rmw_(p, v, 3); }
inline float atomicExch(float* p, float v) { return simt_atomic_rmw_(p, v, 3); }
template <class T>
inline T atomicCAS(T* p, T compare, T v) {
  static_assert(std::is_integral_v<T> && (sizeof(T) == 4 || sizeof(T) == 8), "atomicCAS takes 32/64-bit integers");
  T old = *p;
  if (old == compare) *p = v;
  return old;
}

// ---- loads with cache hints: plain loads on the host
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}

// ---- math that CUDA has and the host libm lacks, or names differently
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline unsigned __float_as_uint(float f) { return simt::fp16::bits_of(f); }
inline float __uint_as_float(unsigned u) { return simt::fp16::float_of(u); }
inline int __float_as_int(float f) { return static_cast<int>(simt::fp16::bits_of(f)); }
inline float __int_as_float(int i) { return simt::fp16::float_of(static_cast<uint32_t>(i)); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// ---- 16-bit float storage types (same bits as the GPU's and torch's) -------------------------
struct __half {
  uint16_t __x;
  __half() = default;
  __half(float f) : __x(simt::fp16::float_to_half(f)) {}  // NOLINT: implicit, as CUDA's
  operator float() const { return simt::fp16::half_to_float(__x); }
};
struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(simt::fp16::float_to_bfloat16(f)) {}  // NOLINT
  operator float() const { return simt::fp16::bfloat16_to_float(__x); }
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit storage types");
inline float __half2float(__half h) { return simt::fp16::half_to_float(h.__x); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return simt::fp16::bfloat16_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }

// ---- warp collectives ------------------------------------------------------------------------
namespace simt::detail {
inline unsigned lane_id() { return g_linear_tid & 31u; }

template <class T>
struct ShflPost {
  T value;
  int src;
  T result;
};

[[noreturn]] void fail_shfl_source(int lane, int src, unsigned mask);

template <class T>
void shfl_fn(void* const* posts, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    auto* p = static_cast<ShflPost<T>*>(posts[l]);
    if (!(mask >> p->src & 1u)) fail_shfl_source(l, p->src, mask);
    p->result = static_cast<ShflPost<T>*>(posts[p->src])->value;
  }
}

template <class T>
T shfl(unsigned mask, T v, int src, const char* what) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move 4- or 8-byte values");
  ShflPost<T> post{v, src, v};
  collective(mask, what, &post, &shfl_fn<T>);
  return post.result;
}

struct VotePost {
  int pred;
  unsigned result;
};
void vote_fn(void* const* posts, unsigned mask);
inline void noop_fn(void* const*, unsigned) {}
}  // namespace simt::detail

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = static_cast<int>(simt::detail::lane_id());
  const int base = lane & ~(width - 1);
  return simt::detail::shfl(mask, v, base + (src_lane & (width - 1)), "__shfl_sync");
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = static_cast<int>(simt::detail::lane_id());
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return simt::detail::shfl(mask, v, src, "__shfl_xor_sync");
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(simt::detail::lane_id());
  int src = lane + static_cast<int>(delta);
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return simt::detail::shfl(mask, v, src, "__shfl_down_sync");
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(simt::detail::lane_id());
  int src = lane - static_cast<int>(delta);
  if (src < (lane & ~(width - 1))) src = lane;
  return simt::detail::shfl(mask, v, src, "__shfl_up_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  simt::detail::VotePost post{pred != 0, 0};
  simt::detail::collective(mask, "__ballot_sync", &post, &simt::detail::vote_fn);
  return post.result;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::detail::collective(mask, "__syncwarp", nullptr, &simt::detail::noop_fn);
}

// ---- nvcuda::wmma: m16n16k16, 16-bit inputs, float accumulators --------------------------------
namespace nvcuda::wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the SIMT emulator implements wmma m16n16k16 only");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float>
                                                 : (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>),
                "the SIMT emulator implements __half / __nv_bfloat16 inputs with float accumulators");
  static constexpr int num_elements = 8;  // 256 elements over 32 lanes
  using element_type = T;
  T x[num_elements];
};

namespace detail {
template <class Use>
constexpr int kind() {
  return std::is_same_v<Use, matrix_a> ? 0 : (std::is_same_v<Use, matrix_b> ? 1 : 2);
}
// Element e of lane l holds matrix entry perm(32 * 8 ... ): an odd multiplier is a bijection
// of [0, 256); different per fragment kind, so no kernel can guess it.
inline int entry(int kind, int lane, int e) {
  constexpr int mul[3] = {37, 101, 149};
  return ((lane * 8 + e) * mul[kind] + 11 * kind + 5) & 255;
}

struct LoadPost {
  void* frag;
  const void* ptr;
  unsigned ldm;
  int col_major;
};
struct MmaPost {
  float* d;
  const void* a;
  const void* b;
  const float* c;
};
void check_pointer(const void* p, unsigned ldm, size_t elem_size, const char* what);
void check_same(void* const* posts, unsigned mask, const char* what);

template <class T>
float to_f(T v) {
  return static_cast<float>(v);
}

template <class T, int Kind>
void load_fn(void* const* posts, unsigned mask) {
  check_same(posts, mask, "wmma::load_matrix_sync");
  const auto* p0 = static_cast<LoadPost*>(posts[0]);
  check_pointer(p0->ptr, p0->ldm, sizeof(T), "wmma::load_matrix_sync");
  const T* src = static_cast<const T*>(p0->ptr);
  T m[256];
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) m[r * 16 + c] = p0->col_major ? src[c * p0->ldm + r] : src[r * p0->ldm + c];
  for (int l = 0; l < 32; ++l) {
    T* x = static_cast<T*>(static_cast<LoadPost*>(posts[l])->frag);
    for (int e = 0; e < 8; ++e) x[e] = m[entry(Kind, l, e)];
  }
}

inline void store_fn(void* const* posts, unsigned mask) {
  check_same(posts, mask, "wmma::store_matrix_sync");
  const auto* p0 = static_cast<LoadPost*>(posts[0]);
  check_pointer(p0->ptr, p0->ldm, sizeof(float), "wmma::store_matrix_sync");
  float* dst = static_cast<float*>(const_cast<void*>(p0->ptr));
  for (int l = 0; l < 32; ++l) {
    const float* x = static_cast<const float*>(static_cast<LoadPost*>(posts[l])->frag);
    for (int e = 0; e < 8; ++e) {
      const int idx = entry(2, l, e), r = idx / 16, c = idx % 16;
      (p0->col_major ? dst[c * p0->ldm + r] : dst[r * p0->ldm + c]) = x[e];
    }
  }
}

template <class T>
void mma_fn(void* const* posts, unsigned) {
  float a[256], b[256], d[256];
  for (int l = 0; l < 32; ++l) {
    const auto* p = static_cast<MmaPost*>(posts[l]);
    for (int e = 0; e < 8; ++e) {
      a[entry(0, l, e)] = to_f(static_cast<const T*>(p->a)[e]);
      b[entry(1, l, e)] = to_f(static_cast<const T*>(p->b)[e]);
      d[entry(2, l, e)] = p->c[e];
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      float acc = d[r * 16 + c];
      for (int k = 0; k < 16; ++k) acc += a[r * 16 + k] * b[k * 16 + c];
      d[r * 16 + c] = acc;
    }
  for (int l = 0; l < 32; ++l) {
    float* out = static_cast<MmaPost*>(posts[l])->d;
    for (int e = 0; e < 8; ++e) out[e] = d[entry(2, l, e)];
  }
}
}  // namespace detail

template <class Use, class T, class Layout, class V>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const V& v) {
  for (int e = 0; e < fragment<Use, 16, 16, 16, T, Layout>::num_elements; ++e) f.x[e] = static_cast<T>(v);
}

template <class Use, class T, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  detail::LoadPost post{f.x, p, ldm, std::is_same_v<Layout, col_major>};
  ::simt::detail::collective(0xffffffffu, "wmma::load_matrix_sync", &post, &detail::load_fn<T, detail::kind<Use>()>);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  detail::LoadPost post{f.x, p, ldm, l == mem_col_major};
  ::simt::detail::collective(0xffffffffu, "wmma::load_matrix_sync", &post, &detail::load_fn<float, 2>);
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  detail::LoadPost post{const_cast<float*>(f.x), p, ldm, l == mem_col_major};
  ::simt::detail::collective(0xffffffffu, "wmma::store_matrix_sync", &post, &detail::store_fn);
}
template <class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  detail::MmaPost post{d.x, a.x, b.x, c.x};
  ::simt::detail::collective(0xffffffffu, "wmma::mma_sync", &post, &detail::mma_fn<T>);
}
}  // namespace nvcuda::wmma

// Dynamic shared memory (the launch's smem bytes), poisoned with 0xff at every block start.
#define FASTCON_DYNAMIC_SHARED(name) \
  unsigned char* name = static_cast<unsigned char*>(::simt::detail::dynamic_shared_memory())

// Fills a kernel's static shared buffer with 0xff bytes (NaN as floats) when a block starts,
// so that reading shared memory nobody wrote shows up in the results. No-op on the GPU.
#define FASTCON_SHARED_POISON(buffer) ::simt::detail::poison_shared((buffer), sizeof(buffer))
