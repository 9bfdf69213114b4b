// Diffusion noise schedule (contract: fastcon.reference.diffusion_* and philox_*): noising, the
// per-sample squared error and its gradient, with the noise drawn in the kernel.
//
// Design
// - Seeded noise is regenerated per element from Philox4x32-10 (csrc/common/philox.h, shared
//   with the CPU kernels): counter = the element's flat index, key = seed, so every backend
//   draws the same words bit for bit; the fp32 transform is evaluated without FMA contraction
//   (FASTCON_FMUL / FASTCON_FADD), giving the CPU kernels' bits too. Nothing is stored.
// - A block owns a 4096-element chunk of one sample (blockIdx.x = sample * chunks + chunk): the
//   per-sample coefficients are read once per block, loads and stores are coalesced, and no
//   element needs a division to find its sample.
// - The loss reduces each chunk in fp32 (fp64 for fp64) with a fixed tree, writes the partial
//   sum, and the last block of a sample to finish (ticket counter) adds that sample's partials in
//   chunk order: one launch, deterministic, no float atomics.
// - Cost per element: ~10 Philox rounds (2 wide multiplies each) + ~30 FLOP of transform against
//   4-6 bytes of traffic: these kernels are bound by integer/FP issue rate, not by HBM, on any
//   GPU (H100: ~10 G elements/s estimated, i.e. a 64 x 3 x 224 x 224 batch in ~1 ms).
#include "common/philox.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace fastcon::FASTCON_KERNEL_NS {
namespace diffusion_impl {
namespace {

using device::Acc;

constexpr int kThreads = 256;
constexpr int64_t kChunk = kernels::kDiffusionChunk;
constexpr int kTargetEpsilon = 0, kTargetX0 = 1;  // 2: v

template <class T>
struct DiffArgs {
  using A = Acc<T>;
  const T* x0;
  const T* noise;
  const A* coef_x0;
  const A* coef_noise;
  uint64_t seed;
  int64_t per_sample, chunks;
  const T* pred;
  const A* grad_sse;
  int target;
  T* out;
  A* sse;
  A* partial;
  unsigned* tickets;
};

// eps of flat element i: the given noise or the seeded normal.
template <class T>
__device__ __forceinline__ Acc<T> eps_at(const DiffArgs<T>& a, int64_t i) {
  return a.noise ? device::to_acc(a.noise[i]) : static_cast<Acc<T>>(philox::normal_at(static_cast<uint64_t>(i), a.seed));
}

// pred - target at flat element i of sample with coefficients (ca, cn).
template <class T>
__device__ __forceinline__ Acc<T> residual(const DiffArgs<T>& a, int64_t i, Acc<T> ca, Acc<T> cn) {
  const Acc<T> p = device::to_acc(a.pred[i]);
  if (a.target == kTargetX0) return p - device::to_acc(a.x0[i]);
  const Acc<T> eps = eps_at(a, i);
  if (a.target == kTargetEpsilon) return p - eps;
  return p - (ca * eps - cn * device::to_acc(a.x0[i]));  // v = a eps - s x0
}

template <class T>
__global__ void __launch_bounds__(kThreads) q_sample_kernel(const DiffArgs<T> a) {
  const int64_t b = blockIdx.x / a.chunks, start = (blockIdx.x % a.chunks) * kChunk;
  const int64_t end = start + kChunk < a.per_sample ? start + kChunk : a.per_sample;
  const Acc<T> ca = a.coef_x0[b], cn = a.coef_noise[b];
  for (int64_t j = start + threadIdx.x; j < end; j += kThreads) {
    const int64_t i = b * a.per_sample + j;
    a.out[i] = device::from_acc<T>(ca * device::to_acc(a.x0[i]) + cn * eps_at(a, i));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) loss_backward_kernel(const DiffArgs<T> a) {
  const int64_t b = blockIdx.x / a.chunks, start = (blockIdx.x % a.chunks) * kChunk;
  const int64_t end = start + kChunk < a.per_sample ? start + kChunk : a.per_sample;
  const Acc<T> ca = a.coef_x0[b], cn = a.coef_noise[b], g = 2 * a.grad_sse[b];
  for (int64_t j = start + threadIdx.x; j < end; j += kThreads) {
    const int64_t i = b * a.per_sample + j;
    a.out[i] = device::from_acc<T>(g * residual(a, i, ca, cn));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) loss_kernel(const DiffArgs<T> a) {
  using A = Acc<T>;
  __shared__ A warp_sums[kThreads / 32];
  __shared__ unsigned ticket;
  const int64_t b = blockIdx.x / a.chunks, chunk = blockIdx.x % a.chunks, start = chunk * kChunk;
  const int64_t end = start + kChunk < a.per_sample ? start + kChunk : a.per_sample;
  const A ca = a.coef_x0[b], cn = a.coef_noise[b];
  A sum = 0;
  for (int64_t j = start + threadIdx.x; j < end; j += kThreads) {
    const A r = residual(a, b * a.per_sample + j, ca, cn);
    sum += r * r;
  }
  // fixed-order tree: within warps by shuffles, then the 8 warp sums in order
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    A block = 0;
    for (int w = 0; w < kThreads / 32; ++w) block += warp_sums[w];
    a.partial[blockIdx.x] = block;
    __threadfence();
    ticket = atomicAdd(a.tickets + b, 1u);
  }
  __syncthreads();
  if (ticket + 1 != a.chunks || threadIdx.x != 0) return;
  // the sample's last block: its partial sums in chunk order
  __threadfence();
  A total = 0;
  for (int64_t c = 0; c < a.chunks; ++c) total += __ldcg(a.partial + b * a.chunks + c);
  a.sse[b] = total;
}

__global__ void __launch_bounds__(kThreads) philox_words_kernel(const int64_t* counter, int64_t n, uint64_t seed,
                                                                int64_t* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    philox::Words c;
#pragma unroll
    for (int w = 0; w < 4; ++w) c.w[w] = static_cast<uint32_t>(counter[4 * i + w]);
    const philox::Words r = philox::philox4x32_10(c, seed);
#pragma unroll
    for (int w = 0; w < 4; ++w) out[4 * i + w] = static_cast<int64_t>(r.w[w]);
  }
}

__global__ void __launch_bounds__(kThreads) philox_normal_kernel(const int64_t* index, int64_t n, uint64_t seed,
                                                                 float* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    out[i] = philox::normal_at(static_cast<uint64_t>(index[i]), seed);
}

// ---- launchers --------------------------------------------------------------------------------

const char* launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// Grid-stride grids: enough blocks to fill the device a few times over, no more.
unsigned stride_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

template <class T>
DiffArgs<T> args_of(const kernels::DiffusionBatch& p) {
  DiffArgs<T> a{};
  a.x0 = static_cast<const T*>(p.x0);
  a.noise = static_cast<const T*>(p.noise);
  a.coef_x0 = static_cast<const Acc<T>*>(p.coef_x0);
  a.coef_noise = static_cast<const Acc<T>*>(p.coef_noise);
  a.seed = p.seed;
  a.per_sample = p.per_sample;
  a.chunks = kernels::diffusion_loss_chunks(p.per_sample);
  return a;
}

unsigned sample_blocks(const kernels::DiffusionBatch& p) {
  return static_cast<unsigned>(p.batch * kernels::diffusion_loss_chunks(p.per_sample));
}

template <class T>
struct QSample {
  static const char* run(const kernels::DiffusionBatch& p, void* x_t, cudaStream_t stream) {
    DiffArgs<T> a = args_of<T>(p);
    a.out = static_cast<T*>(x_t);
    auto kernel = &q_sample_kernel<T>;
    FASTCON_LAUNCH(kernel, sample_blocks(p), dim3(kThreads), 0, stream)(a);
    return launch_error();
  }
};

template <class T>
struct Loss {
  static const char* run(const kernels::DiffusionBatch& p, const void* pred, int target, void* sse,
                         void* workspace, unsigned* tickets, cudaStream_t stream) {
    DiffArgs<T> a = args_of<T>(p);
    a.pred = static_cast<const T*>(pred);
    a.target = target;
    a.sse = static_cast<Acc<T>*>(sse);
    a.partial = static_cast<Acc<T>*>(workspace);
    a.tickets = tickets;
    auto kernel = &loss_kernel<T>;
    FASTCON_LAUNCH(kernel, sample_blocks(p), dim3(kThreads), 0, stream)(a);
    return launch_error();
  }
};

template <class T>
struct LossBackward {
  static const char* run(const kernels::DiffusionBatch& p, const void* pred, const void* grad_sse, int target,
                         void* grad_pred, cudaStream_t stream) {
    DiffArgs<T> a = args_of<T>(p);
    a.pred = static_cast<const T*>(pred);
    a.grad_sse = static_cast<const Acc<T>*>(grad_sse);
    a.target = target;
    a.out = static_cast<T*>(grad_pred);
    auto kernel = &loss_backward_kernel<T>;
    FASTCON_LAUNCH(kernel, sample_blocks(p), dim3(kThreads), 0, stream)(a);
    return launch_error();
  }
};

template <template <class> class F, class... Args>
const char* dispatch(kernels::DType dtype, Args... args) {
  switch (dtype) {
    case kernels::DType::f16: return F<__half>::run(args...);
    case kernels::DType::bf16: return F<__nv_bfloat16>::run(args...);
    case kernels::DType::f32: return F<float>::run(args...);
    case kernels::DType::f64: return F<double>::run(args...);
  }
  return "diffusion: unsupported dtype";
}

}  // namespace
}  // namespace diffusion_impl

const char* philox_words(const int64_t* counter, int64_t n, uint64_t seed, int64_t* out, cudaStream_t stream) {
  if (n == 0) return nullptr;
  auto kernel = &diffusion_impl::philox_words_kernel;
  FASTCON_LAUNCH(kernel, diffusion_impl::stride_blocks(n), dim3(diffusion_impl::kThreads), 0, stream)(counter, n, seed, out);
  return diffusion_impl::launch_error();
}

const char* philox_normals(const int64_t* index, int64_t n, uint64_t seed, float* out, cudaStream_t stream) {
  if (n == 0) return nullptr;
  auto kernel = &diffusion_impl::philox_normal_kernel;
  FASTCON_LAUNCH(kernel, diffusion_impl::stride_blocks(n), dim3(diffusion_impl::kThreads), 0, stream)(index, n, seed, out);
  return diffusion_impl::launch_error();
}

const char* diffusion_q_sample(const kernels::DiffusionBatch& p, void* x_t, cudaStream_t stream) {
  if (p.batch * p.per_sample == 0) return nullptr;
  return diffusion_impl::dispatch<diffusion_impl::QSample>(p.dtype, p, x_t, stream);
}

const char* diffusion_loss(const kernels::DiffusionBatch& p, const void* pred, int target, void* sse,
                           void* workspace, unsigned* tickets, cudaStream_t stream) {
  if (p.batch * p.per_sample == 0) return nullptr;
  return diffusion_impl::dispatch<diffusion_impl::Loss>(p.dtype, p, pred, target, sse, workspace, tickets, stream);
}

const char* diffusion_loss_backward(const kernels::DiffusionBatch& p, const void* pred, const void* grad_sse,
                                    int target, void* grad_pred, cudaStream_t stream) {
  if (p.batch * p.per_sample == 0) return nullptr;
  return diffusion_impl::dispatch<diffusion_impl::LossBackward>(p.dtype, p, pred, grad_sse, target, grad_pred, stream);
}

}  // namespace fastcon::FASTCON_KERNEL_NS
