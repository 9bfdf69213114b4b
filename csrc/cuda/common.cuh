// What every csrc/cuda kernel file includes: the CUDA headers (or, in the SIMT emulation
// build, csrc/simt/simt.h in their place), the one launch macro, and small device helpers.
//
// Kernel files are compiled twice: by nvcc into fastcon._C, and by g++ against the SIMT
// emulator into fastcon._C_simt (csrc/simt/kernels.cpp defines FASTCON_SIMT and includes
// them). Their kernels and launchers live in namespace fastcon::FASTCON_KERNEL_NS, so the two
// builds (and the deliberately broken test build) never share a symbol.
#pragma once

#if defined(FASTCON_SIMT)
#include "simt/simt.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define FASTCON_SHARED_POISON(buffer) ((void)0)
// The launch's dynamic shared memory as a byte array `name`.
#define FASTCON_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#include <cstdint>

#ifndef FASTCON_KERNEL_NS
#define FASTCON_KERNEL_NS gpu
#endif

// FASTCON_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...): the one way kernels are
// launched. `kernel` must name a function (use a local pointer for template instances).
#if defined(FASTCON_SIMT)
#define FASTCON_LAUNCH(kernel, grid, block, smem, stream) ::simt::launch(kernel, grid, block, smem, stream)
#else
#define FASTCON_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

namespace fastcon::device {

// log2(e) and ln(2) in the accumulation precision (a float constant would cost fp64 kernels
// their precision).
template <class A>
constexpr A kLog2e = static_cast<A>(1.4426950408889634073599);
template <class A>
constexpr A kLn2 = static_cast<A>(0.6931471805599453094172);

template <class T>
struct AccOf {
  using type = float;  // fp32 accumulation for fp32 / fp16 / bf16 storage
};
template <>
struct AccOf<double> {
  using type = double;
};
template <class T>
using Acc = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <class T>
__device__ __forceinline__ T from_acc(double x) {
  return static_cast<T>(x);
}

// exp2 / log2 in the accumulation precision: MUFU ex2 / lg2 for float on the GPU.
__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }
__device__ __forceinline__ float log2_acc(float x) { return log2f(x); }
__device__ __forceinline__ double log2_acc(double x) { return log2(x); }
__device__ __forceinline__ float log1p_acc(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_acc(double x) { return log1p(x); }
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

template <class A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

__host__ __device__ __forceinline__ int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace fastcon::device
