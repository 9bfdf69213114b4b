// Siamese masking (contract: fastcon.reference.mask_* in section 2): gathers and scatters of
// token rows by sorted ids, and zeroing of dropped image patches. All memory-bound.
//
// Design
// - A warp moves one D-row (16-byte vectors when D, strides and pointers allow, else scalars):
//   coalesced, no shared memory. Sums (pos_embed, batch sums) are taken in fp32 (fp64 for
//   fp64) and rounded once, as the contract says.
// - Every output row is written exactly once, by the warp that owns it: scatters run over
//   output rows and find their source by binary search in the sorted ids row (log2 K cached
//   reads), so nothing is zero-filled first and scattered into after, there are no atomics,
//   and the batch sum of the pos_embed gradient runs in the fixed order b = 0, 1, ...
//   (deterministic). The fill gradient (a sum over every dropped row) goes through per-chunk
//   partial sums and a second pass that adds them in chunk order (deterministic as well).
// - mask_image: a block per (sample, row of patches) marks its patches kept or dropped in
//   shared memory once, then streams all channels and pixel rows of that patch row.
// - Memory safety without a device synchronisation: ids are not checked on the host (the
//   public API has checked them); kernels never read or write out of bounds whatever they hold
//   (an out-of-range id gathers a zero row; binary searches stay in [0, K)).
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace fastcon::FASTCON_KERNEL_NS {
namespace masking_impl {
namespace {

using device::Acc;

constexpr int kWarps = 8;  // rows per block

template <class T>
struct alignas(16) Vec16 {
  T v[16 / sizeof(T)];
};

// First k in [0, count) with ids[k] == value, else -1 (ids sorted ascending).
__device__ __forceinline__ int find_sorted(const int64_t* ids, int count, int64_t value) {
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (ids[mid] < value)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < count && ids[lo] == value ? lo : -1;
}

// dst[0, d) = src[0, d) (+ add[0, d), summed in Acc and rounded once), zeros when src is null.
// The 32 lanes of a warp stride over the row; vec: 16-byte vectors (d and pointers allow).
template <class T>
__device__ __forceinline__ void row_copy(T* dst, const T* src, const T* add, int64_t d, bool vec, int lane) {
  const T zero = device::from_acc<T>(Acc<T>(0));
  if (vec) {
    constexpr int V = 16 / sizeof(T);
    for (int64_t q = lane; q * V < d; q += 32) {
      Vec16<T> out;
      if (!src) {
#pragma unroll
        for (int e = 0; e < V; ++e) out.v[e] = zero;
      } else {
        out = reinterpret_cast<const Vec16<T>*>(src)[q];
        if (add) {
          const Vec16<T> p = reinterpret_cast<const Vec16<T>*>(add)[q];
#pragma unroll
          for (int e = 0; e < V; ++e)
            out.v[e] = device::from_acc<T>(device::to_acc(out.v[e]) + device::to_acc(p.v[e]));
        }
      }
      reinterpret_cast<Vec16<T>*>(dst)[q] = out;
    }
  } else {
    for (int64_t i = lane; i < d; i += 32) {
      if (!src)
        dst[i] = zero;
      else if (add)
        dst[i] = device::from_acc<T>(device::to_acc(src[i]) + device::to_acc(add[i]));
      else
        dst[i] = src[i];
    }
  }
}

template <class T>
struct GatherArgs {
  const T* src;  // (B, L, D) with strides (s0, s1, 1)
  int64_t s0, s1;
  const T* pos;  // (P, L, D) with strides (p0, p1, 1), p0 = 0 when shared; or null
  int64_t p0, p1;
  const int64_t* ids;  // (B, K) contiguous
  T* out;              // (B, K, D) contiguous
  int64_t b, l, k, d;
  bool vec;
};

// out[b, k] = src[b, ids[b, k]] (+ pos[b or 0, ids[b, k]]): a warp per output row.
template <class T>
__global__ void __launch_bounds__(32 * kWarps) gather_rows_kernel(const GatherArgs<T> a) {
  const int lane = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (row >= a.b * a.k) return;  // whole warps leave together: no collective follows
  const int64_t b = row / a.k, id = a.ids[row];
  const bool ok = id >= 0 && id < a.l;
  const T* src = ok ? a.src + b * a.s0 + id * a.s1 : nullptr;
  const T* pos = ok && a.pos ? a.pos + b * a.p0 + id * a.p1 : nullptr;
  row_copy(a.out + row * a.d, src, pos, a.d, a.vec, lane);
}

template <class T>
struct ScatterArgs {
  const T* src;        // (B, K, D) contiguous
  const T* fill;       // (D,) row for positions not kept, or null for zeros
  const int64_t* ids;  // (B, K) contiguous, rows sorted
  T* out;              // (B, L, D) contiguous
  T* out2;             // a second output with the same values, or null
  int64_t b, l, k, d;
  bool vec;
};

// out[b, l] = src[b, k] where ids[b, k] == l, else fill: a warp per output row, each written once.
template <class T>
__global__ void __launch_bounds__(32 * kWarps) scatter_rows_kernel(const ScatterArgs<T> a) {
  const int lane = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (row >= a.b * a.l) return;
  const int64_t b = row / a.l, l = row % a.l;
  const int k = find_sorted(a.ids + b * a.k, static_cast<int>(a.k), l);
  const T* src = k >= 0 ? a.src + (b * a.k + k) * a.d : a.fill;
  row_copy(a.out + row * a.d, src, static_cast<const T*>(nullptr), a.d, a.vec, lane);
  if (a.out2) row_copy(a.out2 + row * a.d, src, static_cast<const T*>(nullptr), a.d, a.vec, lane);
}

template <class T>
struct BatchSumArgs {
  const T* src;        // grad_visible (B, K, D) contiguous
  const int64_t* ids;  // (B, K)
  T* tokens;           // grad_tokens (B, L, D) or null
  T* sum;              // grad_pos (1, L, D)
  int64_t b, l, k, d;
};

// For position l and 32 columns per warp: grad_tokens[b, l] for every b and their sum over b in
// the order b = 0, 1, ... (fp32, rounded once): one pass over grad_visible.
template <class T>
__global__ void __launch_bounds__(32 * kWarps) batch_sum_kernel(const BatchSumArgs<T> a) {
  const int64_t chunks = (a.d + 31) / 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (item >= a.l * chunks) return;
  const int64_t l = item / chunks, c = (item % chunks) * 32 + threadIdx.x;
  Acc<T> acc = 0;
  const T zero = device::from_acc<T>(Acc<T>(0));
  for (int64_t b = 0; b < a.b; ++b) {
    const int k = find_sorted(a.ids + b * a.k, static_cast<int>(a.k), l);  // the same for all lanes
    if (c >= a.d) continue;
    const T v = k >= 0 ? a.src[(b * a.k + k) * a.d + c] : zero;
    if (a.tokens) a.tokens[(b * a.l + l) * a.d + c] = v;
    acc += device::to_acc(v);
  }
  if (c < a.d) a.sum[l * a.d + c] = device::from_acc<T>(acc);
}

constexpr int kFillRows = static_cast<int>(kernels::kMaskFillRows);  // rows per partial sum
constexpr int kFillThreads = 256;  // columns per block

template <class T>
struct FillArgs {
  const T* src;        // grad_out (B, L, D) contiguous
  const int64_t* ids;  // (B, K)
  Acc<T>* partial;     // (chunks, D)
  Acc<T>* out;         // (D,)
  int64_t b, l, k, d, chunks;
};

// partial[chunk, c] = sum of src[row, c] over the dropped rows of the chunk, in row order.
template <class T>
__global__ void __launch_bounds__(kFillThreads) fill_partial_kernel(const FillArgs<T> a) {
  __shared__ int dropped[kFillRows];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kFillRows;
  if (threadIdx.x < kFillRows) {
    const int64_t row = row0 + threadIdx.x;
    int drop = 0;
    if (row < a.b * a.l) {
      const int64_t b = row / a.l, l = row % a.l;
      drop = find_sorted(a.ids + b * a.k, static_cast<int>(a.k), l) < 0;
    }
    dropped[threadIdx.x] = drop;
  }
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kFillThreads + threadIdx.x;
  if (c >= a.d) return;
  Acc<T> acc = 0;
  for (int r = 0; r < kFillRows; ++r)
    if (dropped[r]) acc += device::to_acc(a.src[(row0 + r) * a.d + c]);
  a.partial[blockIdx.x * a.d + c] = acc;
}

// out[c] = sum over chunks of partial[chunk, c], in chunk order.
template <class T>
__global__ void __launch_bounds__(kFillThreads) fill_final_kernel(const FillArgs<T> a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFillThreads + threadIdx.x;
  if (c >= a.d) return;
  Acc<T> acc = 0;
  for (int64_t chunk = 0; chunk < a.chunks; ++chunk) acc += a.partial[chunk * a.d + c];
  a.out[c] = acc;
}

constexpr int kImageThreads = 256;
constexpr int kMaxCells = 4096;  // patches per row marked in shared memory (else searched per pixel)

template <class T>
struct ImageArgs {
  const T* src;  // (B, C, H, W) contiguous
  T* out;
  const int64_t* ids;  // (B, K)
  int64_t b, c, h, w, patch, k;
  bool vec;  // patch and W are whole 16-byte vectors: a vector never straddles two patches
};

// Block b * (H / patch) + gy (sample b, patch row gy): marks the row's patches, then zeroes the dropped ones' pixels
// over every channel and the patch rows' pixel rows (exactly 0, even where the input is NaN).
template <class T>
__global__ void __launch_bounds__(kImageThreads) mask_image_kernel(const ImageArgs<T> a) {
  __shared__ unsigned char kept[kMaxCells];
  const int64_t gh = a.h / a.patch, gw = a.w / a.patch;
  const int64_t b = blockIdx.x / gh, gy = blockIdx.x % gh;
  const int64_t* ids = a.ids + b * a.k;
  const bool marked = gw <= kMaxCells;
  if (marked)
    for (int64_t x = threadIdx.x; x < gw; x += kImageThreads)
      kept[x] = find_sorted(ids, static_cast<int>(a.k), gy * gw + x) >= 0;
  __syncthreads();
  const T zero = device::from_acc<T>(Acc<T>(0));
  const int64_t row_len = a.w, rows = a.c * a.patch;  // pixel rows of this patch row, all channels
  constexpr int V = 16 / sizeof(T);
  const int64_t step = a.vec ? V : 1, per_row = row_len / step;
  for (int64_t e = threadIdx.x; e < rows * per_row; e += kImageThreads) {
    const int64_t r = e / per_row, x = (e % per_row) * step;
    const int64_t ch = r / a.patch, y = gy * a.patch + r % a.patch;
    const int64_t cell = x / a.patch;
    const bool keep = marked ? kept[cell] != 0 : find_sorted(ids, static_cast<int>(a.k), gy * gw + cell) >= 0;
    const int64_t offset = ((b * a.c + ch) * a.h + y) * a.w + x;
    if (a.vec) {
      Vec16<T> v;
      if (keep) {
        v = *reinterpret_cast<const Vec16<T>*>(a.src + offset);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) v.v[q] = zero;
      }
      *reinterpret_cast<Vec16<T>*>(a.out + offset) = v;
    } else {
      a.out[offset] = keep ? a.src[offset] : zero;
    }
  }
}

// ---- launchers ----------------------------------------------------------------------------------

const char* launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class T>
bool whole_vectors(int64_t n) {
  return n % static_cast<int64_t>(16 / sizeof(T)) == 0;
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>((rows + kWarps - 1) / kWarps); }

template <class T>
const char* gather_rows(const kernels::MaskGather& p, cudaStream_t stream) {
  GatherArgs<T> a{};
  a.src = static_cast<const T*>(p.tokens);
  a.s0 = p.tokens_stride0;
  a.s1 = p.tokens_stride1;
  a.pos = static_cast<const T*>(p.pos);
  a.p0 = p.pos_stride0;
  a.p1 = p.pos_stride1;
  a.ids = p.ids;
  a.out = static_cast<T*>(p.out);
  a.b = p.b;
  a.l = p.l;
  a.k = p.k;
  a.d = p.d;
  a.vec = whole_vectors<T>(a.d) && whole_vectors<T>(a.s0) && whole_vectors<T>(a.s1) && aligned16(a.src) &&
          aligned16(a.out) && (!a.pos || (whole_vectors<T>(a.p0) && whole_vectors<T>(a.p1) && aligned16(a.pos)));
  if (a.b * a.k == 0 || a.d == 0) return nullptr;
  auto kernel = &gather_rows_kernel<T>;
  FASTCON_LAUNCH(kernel, row_blocks(a.b * a.k), dim3(32, kWarps), 0, stream)(a);
  return launch_error();
}

template <class T>
const char* scatter_rows(const kernels::MaskScatter& p, cudaStream_t stream) {
  ScatterArgs<T> a{};
  a.src = static_cast<const T*>(p.src);
  a.fill = static_cast<const T*>(p.fill);
  a.ids = p.ids;
  a.out = static_cast<T*>(p.out);
  a.out2 = static_cast<T*>(p.out2);
  a.b = p.b;
  a.l = p.l;
  a.k = p.k;
  a.d = p.d;
  a.vec = whole_vectors<T>(a.d) && aligned16(a.src) && aligned16(a.out) && (!a.fill || aligned16(a.fill)) &&
          (!a.out2 || aligned16(a.out2));
  if (a.b * a.l == 0 || a.d == 0) return nullptr;
  auto kernel = &scatter_rows_kernel<T>;
  FASTCON_LAUNCH(kernel, row_blocks(a.b * a.l), dim3(32, kWarps), 0, stream)(a);
  return launch_error();
}

template <class T>
const char* batch_sum(const kernels::MaskScatter& p, cudaStream_t stream) {
  BatchSumArgs<T> a{};
  a.src = static_cast<const T*>(p.src);
  a.ids = p.ids;
  a.tokens = static_cast<T*>(p.out);
  a.sum = static_cast<T*>(p.out2);
  a.b = p.b;
  a.l = p.l;
  a.k = p.k;
  a.d = p.d;
  if (a.l == 0 || a.d == 0) return nullptr;
  auto kernel = &batch_sum_kernel<T>;
  FASTCON_LAUNCH(kernel, row_blocks(a.l * ((a.d + 31) / 32)), dim3(32, kWarps), 0, stream)(a);
  return launch_error();
}

template <class T>
const char* fill_sum(const kernels::MaskFillSum& p, cudaStream_t stream) {
  FillArgs<T> a{};
  a.src = static_cast<const T*>(p.grad_out);
  a.ids = p.ids;
  a.partial = static_cast<Acc<T>*>(p.workspace);
  a.out = static_cast<Acc<T>*>(p.out);
  a.b = p.b;
  a.l = p.l;
  a.k = p.k;
  a.d = p.d;
  a.chunks = kernels::mask_fill_chunks(p.b, p.l);
  if (a.d == 0) return nullptr;
  const unsigned col_blocks = static_cast<unsigned>((a.d + kFillThreads - 1) / kFillThreads);
  auto partial = &fill_partial_kernel<T>;
  FASTCON_LAUNCH(partial, dim3(static_cast<unsigned>(a.chunks), col_blocks), dim3(kFillThreads), 0, stream)(a);
  if (const char* err = launch_error()) return err;
  auto final_sum = &fill_final_kernel<T>;
  FASTCON_LAUNCH(final_sum, dim3(col_blocks), dim3(kFillThreads), 0, stream)(a);
  return launch_error();
}

template <class T>
const char* image(const kernels::MaskImage& p, cudaStream_t stream) {
  ImageArgs<T> a{};
  a.src = static_cast<const T*>(p.images);
  a.out = static_cast<T*>(p.out);
  a.ids = p.ids;
  a.b = p.b;
  a.c = p.c;
  a.h = p.h;
  a.w = p.w;
  a.patch = p.patch;
  a.k = p.k;
  a.vec = whole_vectors<T>(a.patch) && whole_vectors<T>(a.w) && aligned16(a.src) && aligned16(a.out);
  if (a.b == 0 || a.c == 0 || a.h == 0 || a.w == 0) return nullptr;
  auto kernel = &mask_image_kernel<T>;
  FASTCON_LAUNCH(kernel, dim3(static_cast<unsigned>(a.b * (a.h / a.patch))), dim3(kImageThreads), 0, stream)(a);
  return launch_error();
}

template <template <class> class F, class P>
const char* dispatch(kernels::DType dtype, const P& p, cudaStream_t stream) {
  switch (dtype) {
    case kernels::DType::f16: return F<__half>::run(p, stream);
    case kernels::DType::bf16: return F<__nv_bfloat16>::run(p, stream);
    case kernels::DType::f32: return F<float>::run(p, stream);
    case kernels::DType::f64: return F<double>::run(p, stream);
  }
  return "masking: unsupported dtype";
}

template <class T>
struct GatherOp {
  static const char* run(const kernels::MaskGather& p, cudaStream_t s) { return gather_rows<T>(p, s); }
};
template <class T>
struct ScatterOp {
  static const char* run(const kernels::MaskScatter& p, cudaStream_t s) { return scatter_rows<T>(p, s); }
};
template <class T>
struct BatchSumOp {
  static const char* run(const kernels::MaskScatter& p, cudaStream_t s) { return batch_sum<T>(p, s); }
};
template <class T>
struct FillSumOp {
  static const char* run(const kernels::MaskFillSum& p, cudaStream_t s) { return fill_sum<T>(p, s); }
};
template <class T>
struct ImageOp {
  static const char* run(const kernels::MaskImage& p, cudaStream_t s) { return image<T>(p, s); }
};

}  // namespace
}  // namespace masking_impl

const char* mask_gather_rows(const kernels::MaskGather& p, cudaStream_t stream) {
  return masking_impl::dispatch<masking_impl::GatherOp>(p.dtype, p, stream);
}
const char* mask_scatter_rows(const kernels::MaskScatter& p, cudaStream_t stream) {
  return masking_impl::dispatch<masking_impl::ScatterOp>(p.dtype, p, stream);
}
const char* mask_batch_sum(const kernels::MaskScatter& p, cudaStream_t stream) {
  return masking_impl::dispatch<masking_impl::BatchSumOp>(p.dtype, p, stream);
}
const char* mask_fill_sum(const kernels::MaskFillSum& p, cudaStream_t stream) {
  return masking_impl::dispatch<masking_impl::FillSumOp>(p.dtype, p, stream);
}
const char* mask_image(const kernels::MaskImage& p, cudaStream_t stream) {
  return masking_impl::dispatch<masking_impl::ImageOp>(p.dtype, p, stream);
}

}  // namespace fastcon::FASTCON_KERNEL_NS
