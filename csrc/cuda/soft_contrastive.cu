// Soft contrastive loss: the blockwise N x M pass (contract: fastcon.reference.sc_core_forward
// and sc_core_backward). Logit tiles s = scale * u_i . v_j are recomputed, never stored.
//
// Design
// - A block (256 threads) owns BM = 64 rows of one side ("own": u rows, or v rows for column
//   work) and sweeps 64-row tiles of the other side. The own tile stays resident in dynamic
//   shared memory for the whole sweep when it fits (D <= ~1400 in bf16 on H100), so only the
//   other side is streamed. GEMM1 stages the other tile in BK-wide chunks of D (coalesced,
//   16-byte vector loads when D allows) and accumulates the 64 x 64 logit tile with warp tiles
//   (tensor cores via WMMA for fp16 / bf16, FMA for fp32 / fp64; fp32 accumulation, fp64 for
//   fp64), then writes it to shared memory, where each thread takes one row and 16
//   interleaved columns (bank-conflict free) for the element-wise work: exp, masks, row sums
//   (4 threads per row, 2 shuffles), column sums (4 x 16-row partials in shared memory).
//   Statistics stay in natural units (exp2 of FMA'd differences times log2 e), and the
//   positive pair's logit is taken in fp64 like the Function's target term, so a loss made of
//   a log-sum-exp minus its own dominant logit cancels to fp32 resolution.
// - Forward, softmax with a usable logit bound B (|s| <= B for normalised inputs; B <= 40 in
//   fp32): e = exp(s - B) can neither underflow (>= e^-80) nor overflow, so one exp per pair
//   serves row and column sums at once. Row sums stay in the block; column sums are atomicAdds
//   of per-tile partials (M atomics per row tile, nothing N x M). Few row tiles split the column
//   sweep over gridDim.y (row sums then merge by atomics too). The last block to finish (ticket
//   counter) turns sums into log-sum-exps: one launch.
// - Forward, softmax without a usable bound (tau < 0.025, normalize=False): an online max per
//   row (FlashAttention style). Column statistics would need their own running max, so
//   columns get their own blocks (grid = row tiles + column tiles): twice the GEMM work, no
//   atomics, still one launch.
// - Forward, sigmoid: sum of softplus(s + bias) per row; no max needed.
// - scale and bias are device scalars (fp64) the kernels load: the host never reads them (no
//   synchronisation, CUDA-graph capturable). So whether the bound allows the fixed max is
//   decided by every block from the scale it reads, and a bounded softmax launch has a grid
//   that fits both kinds (row tiles + column tiles by column splits): blocks of the kind not
//   taken exit at once (the fixed max's column blocks after taking their ticket).
// - Backward: W_ij = g_i exp(s_ij - r_i) + h_j exp(s_ij - c_j) (or g_i sigmoid(s_ij + b)) is
//   recomputed per tile and multiplied with the other side's tile (GEMM2; W in the storage type
//   for tensor cores, fp16 W first scaled by 1 / (max|g| + max|h|) into fp16 range). Row
//   blocks accumulate W v, column blocks W^T u, each in registers (a 64 x 256 fp32 slab, split
//   over gridDim.y when D > 256): no atomics, deterministic, one launch; the price is computing
//   every logit tile twice (as FlashAttention's separate dQ pass does). ~190-230 registers:
//   one block (8 warps) per SM.
//
// Arithmetic intensity and an H100 SXM roofline (bf16, N = M = 65536; 990 TFLOP/s dense bf16,
// 3.35 TB/s HBM, ~3.9 T exp/s on MUFU; L2 bandwidth is not published, microbenchmarks report
// ~5.5-12 TB/s, 10 assumed). 2 FLOP per multiply-add; fixed-max path.
//   pass      D    tensor          exps           HBM (ideal)         L2 -> smem staging
//   forward  256   2.2 T  2.2 ms   4.3 G  1.1 ms   68 MB  0.02 ms      34 GB   3.4 ms
//   backward 256   8.8 T  8.9 ms   8.6 G  2.2 ms  202 MB  0.06 ms     137 GB  13.7 ms
//   forward  768   6.6 T  6.7 ms   4.3 G  1.1 ms  202 MB  0.06 ms     103 GB  10.3 ms
//   backward 768  52.8 T 53.3 ms   8.6 G  2.2 ms  605 MB  0.18 ms     825 GB  82.5 ms
// HBM intensity is ~30,000 FLOP/byte (if the concurrently resident blocks, which sweep the
// other side in the same order, fetch each streamed tile from HBM about once per wave): far
// above the ridge (~300), so HBM never binds. The binding limit is the staging of streamed
// tiles from L2: 64 FLOP per byte with a resident 64-row own tile, i.e. ~1.5x the tensor bound.
// The backward at D = 768 also recomputes GEMM1 once per 256-wide output slab (3x). Expected,
// before measuring: forward ~3.5-5 ms (D = 256), backward ~14-20 ms. Next steps on a GPU:
// 128-row own tiles (128 FLOP/B), sm_90 thread-block clusters multicasting the streamed tile
// (TMA) and wgmma instead of WMMA, cp.async double buffering of the streamed chunks.
#include <stdexcept>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/warp_tile.cuh"

namespace fastcon::FASTCON_KERNEL_NS {

// Deliberate bugs for the emulator's self-check (tests/test_simt_catches_bugs.py); compiled in
// only when FASTCON_SIMT_BREAK is defined, which the GPU build never does.
#if defined(FASTCON_SIMT_BREAK)
inline int g_break_variant = FASTCON_SIMT_BREAK;
void set_break_variant(int variant) { g_break_variant = variant; }
#define FASTCON_BROKEN(k) (g_break_variant == (k))
#else
#if defined(FASTCON_SIMT)
void set_break_variant(int variant) {
  if (variant != 0) throw std::invalid_argument("this build has no deliberately broken kernels");
}
#endif
#define FASTCON_BROKEN(k) false
#endif

namespace sc_impl {
namespace {

using device::Acc;
using device::kLn2;
using device::kLog2e;
using device::kTensorCore;

constexpr int kBM = 64, kBN = 64, kThreads = 256;
constexpr int kSumExp = 0, kOnline = 1, kSoftplus = 2;  // forward kinds

// A logit bound B works as a fixed max while e^(-2B) stays a normal number.
template <class A>
constexpr double kFixedMaxLimit = std::is_same_v<A, double> ? 300.0 : 40.0;
// Blocks per SM the register budget is cut for: the forward fits two (<= 128 registers); the
// backward keeps a 64 x 256 fp32 output slab in registers (~190-220 with the operand
// fragments) and runs one 8-warp block per SM, like FlashAttention's backward. fp64 (the
// gradcheck path) gets the whole register file everywhere.
template <class T>
constexpr int kForwardBlocksPerSm = std::is_same_v<T, double> ? 1 : 2;
constexpr int kBackwardBlocksPerSm = 1;

// Per storage type: GEMM1 chunk BK (row stride LDK), GEMM2 output slab DS with K2-row chunks
// (stride LD2), logit tile stride LDS and weight tile stride LDW. Strides keep wmma pointers
// 32-byte aligned and spread rows over banks; all of it fits the 48 KiB of static smem.
template <class T>
struct Cfg;
template <>
struct Cfg<__half> {
  static constexpr int BK = 64, LDK = 72, DS = 256, K2 = 32, LD2 = 264, LDS = 68, LDW = 72;
};
template <>
struct Cfg<__nv_bfloat16> : Cfg<__half> {};
template <>
struct Cfg<float> {
  static constexpr int BK = 32, LDK = 33, DS = 256, K2 = 16, LD2 = 256, LDS = 68, LDW = 68;
};
template <>
struct Cfg<double> {
  static constexpr int BK = 8, LDK = 9, DS = 64, K2 = 8, LD2 = 64, LDS = 68, LDW = 68;
};

// The weight tile is in the storage type for tensor cores, else it reuses the logit tile.
template <class T>
using WeightT = std::conditional_t<kTensorCore<T>, T, Acc<T>>;

template <class T>
struct Smem {
  using C = Cfg<T>;
  static constexpr size_t round(size_t x) { return (x + 127) / 128 * 128; }
  static constexpr size_t kStage1 = 2 * kBM * C::LDK * sizeof(T), kStage2 = C::K2 * C::LD2 * sizeof(T);
  static constexpr size_t kStage = round(kStage1 > kStage2 ? kStage1 : kStage2);
  static constexpr size_t kS = kStage, kW = kS + round(kBM * C::LDS * sizeof(Acc<T>));
  static constexpr size_t kVa = kW + (kTensorCore<T> ? round(kBM * C::LDW * sizeof(T)) : 0);
  static constexpr size_t kVb = kVa + round(kBN * sizeof(Acc<T>));
  static constexpr size_t kIds = kVb + round(kBN * sizeof(Acc<T>));
  static constexpr size_t kRed = kIds + round(kBN * sizeof(int64_t));
  static constexpr size_t kTicket = kRed + round(4 * kBN * sizeof(Acc<T>));
  static constexpr size_t kBytes = kTicket + 128;  // the ticket, then 3 scalars at kTicket + 16
  static_assert(kBytes <= 48 * 1024, "static shared memory is limited to 48 KiB");

  T* xs;          // GEMM1: own rows, a BK-wide chunk of D
  T* ys;          // GEMM1: other rows, same chunk
  T* y2;          // GEMM2: K2 other rows x a DS-wide slab of D (aliases xs / ys)
  Acc<T>* s;      // logit tile (kBM x LDS)
  WeightT<T>* w;  // weight tile (kBM x LDW)
  Acc<T>* va;     // per other row of the tile: weights / factors
  Acc<T>* vb;
  int64_t* ids;   // per other row of the tile: scene id (mode 1)
  Acc<T>* red;    // 4 x kBN column partial sums
  unsigned* ticket;
  Acc<T>* scal;   // forward: scale, bias, bound of the launch (read from shared memory where used)

  __device__ explicit Smem(unsigned char* raw)
      : xs(reinterpret_cast<T*>(raw)),
        ys(reinterpret_cast<T*>(raw) + kBM * C::LDK),
        y2(reinterpret_cast<T*>(raw)),
        s(reinterpret_cast<Acc<T>*>(raw + kS)),
        w(reinterpret_cast<WeightT<T>*>(raw + (kTensorCore<T> ? kW : kS))),
        va(reinterpret_cast<Acc<T>*>(raw + kVa)),
        vb(reinterpret_cast<Acc<T>*>(raw + kVb)),
        ids(reinterpret_cast<int64_t*>(raw + kIds)),
        red(reinterpret_cast<Acc<T>*>(raw + kRed)),
        ticket(reinterpret_cast<unsigned*>(raw + kTicket)),
        scal(reinterpret_cast<Acc<T>*>(raw + kTicket + 16)) {}
};

template <class T>
struct alignas(16) Vec {
  T v[16 / sizeof(T)];
};

// Rows [r0, r0 + R) x columns [c0, c0 + C) of the row-major (count x d) matrix src into dst
// (row stride ld), zeros outside the matrix. Consecutive threads read consecutive 16-byte
// vectors of a row when vec_ok (d a multiple of the vector and src 16-byte aligned).
template <class T, int R, int C>
__device__ __forceinline__ void stage_tile(T* dst, int ld, const T* __restrict__ src, int64_t r0, int64_t count,
                                           int64_t c0, int64_t d, bool vec_ok, int tid) {
  const T zero = device::from_acc<T>(Acc<T>(0));
  if (vec_ok) {
    constexpr int V = 16 / sizeof(T), CV = C / V;
    static_assert(C % V == 0, "chunk widths are whole vectors");
    for (int e = tid; e < R * CV; e += kThreads) {
      const int r = e / CV, cv = e % CV;
      const int64_t gr = r0 + r, gc = c0 + cv * V;
      Vec<T> val;
      if (gr < count && gc < d) {
        val = *reinterpret_cast<const Vec<T>*>(src + gr * d + gc);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) val.v[q] = zero;
      }
#pragma unroll
      for (int q = 0; q < V; ++q) dst[r * ld + cv * V + q] = val.v[q];
    }
  } else {
    for (int e = tid; e < R * C; e += kThreads) {
      const int r = e / C, c = e % C;
      const int64_t gr = r0 + r, gc = c0 + c;
      dst[r * ld + c] = (gr < count && gc < d) ? src[gr * d + gc] : zero;
    }
  }
}

// The own tile, resident in dynamic shared memory for the whole sweep when it fits: rows
// [i0, i0 + 64) x all of D (zero-padded to whole BK chunks; row stride ldx), so that GEMM1
// streams only the other side's tiles (64 FLOP per staged byte instead of 32).
template <class T>
__device__ __forceinline__ void stage_resident(T* xres, int ldx, const T* x, int64_t i0, int64_t nx, int64_t d,
                                               bool vec_ok, int tid) {
  for (int64_t k0 = 0; k0 < d; k0 += Cfg<T>::BK)
    stage_tile<T, kBM, Cfg<T>::BK>(xres + k0, ldx, x, i0, nx, k0, d, vec_ok, tid);
}

// GEMM1: the logit tile (unscaled dot products) of own rows [i0, i0 + 64) and other rows
// [j0, j0 + 64) into sm.s. Warp w owns rows 16 (w % 4) and columns 32 (w / 4) of it. The own
// rows come from xres (resident, stride ldx) when given, else are staged chunk by chunk.
template <class T>
__device__ __forceinline__ void logit_tile(const Smem<T>& sm, const T* xres, int ldx, const T* x, int64_t i0,
                                           int64_t nx, const T* y, int64_t j0, int64_t ny, int64_t d, bool vec_ok,
                                           int tid) {
  using C = Cfg<T>;
  const int warp = tid >> 5, lane = tid & 31, wr = warp & 3, wc = warp >> 2;
  device::WarpTile<T, 2> acc;
  device::tile_zero(acc);
  for (int64_t k0 = 0; k0 < d; k0 += C::BK) {
    if (!xres) stage_tile<T, kBM, C::BK>(sm.xs, C::LDK, x, i0, nx, k0, d, vec_ok, tid);
    stage_tile<T, kBN, C::BK>(sm.ys, C::LDK, y, j0, ny, k0, d, vec_ok, tid);
    if (!FASTCON_BROKEN(1)) __syncthreads();  // chunk staged by all threads before any warp reads it
    const T* a = xres ? xres + wr * 16 * ldx + k0 : sm.xs + wr * 16 * C::LDK;
    device::tile_mma_abt(acc, a, xres ? ldx : C::LDK, sm.ys + wc * 32 * C::LDK, C::LDK, C::BK, lane);
    if (!FASTCON_BROKEN(3)) __syncthreads();  // every warp done with the chunk before it is overwritten
  }
  device::tile_store(acc, sm.s + wr * 16 * C::LDS + wc * 32, C::LDS, lane);
  __syncthreads();
}

// The positive pair's logit enters the loss twice: inside the log-sum-exps (here) and as the
// target term (the Function's _logit_dot). Both take it accumulated in fp64 and rounded once,
// so that it cancels exactly when the loss is small. Each of the 4 threads of a row sums every
// 4th feature; all 32 lanes must call this (shuffles).
template <class T>
__device__ __forceinline__ Acc<T> positive_logit(const T* x, int64_t i, const T* y, int64_t j, int64_t d,
                                                 double scale, bool valid, int ec) {
  double dot = 0;
  if (valid)
    for (int64_t k = ec; k < d; k += 4) dot += double(device::to_acc(x[i * d + k])) * double(device::to_acc(y[j * d + k]));
  dot += __shfl_xor_sync(0xffffffffu, dot, 1);
  dot += __shfl_xor_sync(0xffffffffu, dot, 2);
  return static_cast<Acc<T>>(scale * dot);
}

// s - shift for a pair, in natural units: the fp64 positive logit, else dot * scale - shift
// in one rounding (FMA).
template <class A>
__device__ __forceinline__ A logit_minus(A dot, bool is_positive, A positive_logit, A scale, A shift) {
  return is_positive ? positive_logit - shift : device::fma_acc(dot, scale, -shift);
}

template <class T>
struct ProblemArgs {
  using A = Acc<T>;
  const T* u;
  const T* v;
  const int64_t* row_ids;
  const int64_t* col_ids;
  int64_t n, m, d, offset;
  const double* scale;  // device scalars: the host never reads them (no synchronisation)
  const double* bias;   // null: 0
  bool bounded;         // |s| <= scale (unit rows): scale is a logit bound B
  int mode;
  bool vec_ok;
  int ldx;  // row stride of the resident own tile in dynamic shared memory, 0 when streamed
  int row_tiles, col_tiles;
};

// The scalars of a launch, read from device memory by every block: the logit scale (also in
// fp64 for the positive logit), the sigmoid bias, the logit bound B (scale when bounded, else
// 0) and whether the softmax modes use B as a fixed max (while e^(-2B) stays normal). Decided
// on the device because scale lives there: the grids fit both choices (see the launchers).
template <class A>
struct Scalars {
  double scale_d;
  A scale, bias, bound;
  bool fixed;
};

template <class T>
__device__ __forceinline__ Scalars<Acc<T>> load_scalars(const ProblemArgs<T>& a) {
  using A = Acc<T>;
  Scalars<A> c;
  c.scale_d = *a.scale;
  c.scale = static_cast<A>(c.scale_d);
  c.bias = a.bias ? static_cast<A>(*a.bias) : A(0);
  c.bound = a.bounded ? c.scale : A(0);
  c.fixed = a.mode != 2 && a.bounded && c.scale_d > 0 && c.scale_d <= kFixedMaxLimit<A>;
  return c;
}

template <class T>
struct FwdArgs : ProblemArgs<T> {
  using A = Acc<T>;
  int kind;
  bool need_col;
  int tiles_per_split;
  A* row;
  A* col;
  unsigned* counter;
};

template <class T>
__global__ void __launch_bounds__(kThreads, kForwardBlocksPerSm<T>) sc_forward_kernel(const FwdArgs<T> a) {
  using A = Acc<T>;
  using C = Cfg<T>;
  __shared__ __align__(128) unsigned char smem[Smem<T>::kBytes];
  FASTCON_SHARED_POISON(smem);
  FASTCON_DYNAMIC_SHARED(dyn_smem);
  T* const xres = a.ldx ? reinterpret_cast<T*>(dyn_smem) : nullptr;
  const Smem<T> sm(smem);
  const int tid = threadIdx.x;
  int kind;
  {
    const Scalars<A> sc = load_scalars(a);
    // the kind: softplus (sigmoid), else the fixed max when the bound allows it, else online
    kind = a.kind == kSoftplus ? kSoftplus : (sc.fixed ? kSumExp : kOnline);
    if (tid == 0) {  // kept in shared memory, not registers (the loop's register budget is full)
      sm.scal[0] = sc.scale;
      sm.scal[1] = sc.bias;
      sm.scal[2] = sc.bound;
    }
  }
  if (kind == kOnline && blockIdx.y > 0) return;  // the online kind does not split the sweep
  __syncthreads();  // the scalars

  // column blocks (online kind only) do the row work with u and v swapped; under the fixed
  // max they only take their ticket (idle)
  const bool col_role = static_cast<int>(blockIdx.x) >= a.row_tiles;
  const bool idle = col_role && kind != kOnline;
  const int tile = col_role ? blockIdx.x - a.row_tiles : blockIdx.x;
  const T* x = col_role ? a.v : a.u;
  const T* y = col_role ? a.u : a.v;
  const int64_t nx = col_role ? a.m : a.n, ny = col_role ? a.n : a.m;
  const int64_t* x_ids = col_role ? a.col_ids : a.row_ids;
  const int64_t* y_ids = col_role ? a.row_ids : a.col_ids;
  const int y_tiles = col_role ? a.row_tiles : a.col_tiles;
  const int64_t i0 = static_cast<int64_t>(tile) * kBM;

  // this thread's row of the logit tile and its columns ec, ec + 4, ..., ec + 60
  const int er = tid >> 2, ec = tid & 3;
  const int64_t own = i0 + er;
  const bool own_ok = !idle && own < nx;
  const bool masked = a.mode == 1;
  const int64_t own_id = masked && own_ok ? x_ids[own] : 0;
  const int64_t positive = own + (col_role ? -a.offset : a.offset);
  const A pos_logit = positive_logit(x, own, y, positive, a.d, *a.scale, own_ok && positive >= 0 && positive < ny, ec);
  const bool col_sums = kind == kSumExp && a.need_col;
  if (xres && !idle) stage_resident(xres, a.ldx, x, i0, nx, a.d, a.vec_ok, tid);  // read after GEMM1's first barrier

  A run_max = device::neg_inf<A>(), run_sum = 0;  // run_max in natural units
  const int per_split = kind == kOnline ? y_tiles : a.tiles_per_split;
  const int t_begin = blockIdx.y * per_split;
  const int t_end = idle ? t_begin : (t_begin + per_split < y_tiles ? t_begin + per_split : y_tiles);
  for (int t = t_begin; t < t_end; ++t) {
    const int64_t j0 = static_cast<int64_t>(t) * kBN;
    if (masked && tid < kBN) sm.ids[tid] = j0 + tid < ny ? y_ids[j0 + tid] : 0;
    logit_tile<T>(sm, xres, a.ldx, x, i0, nx, y, j0, ny, a.d, a.vec_ok, tid);

    const int64_t y_end = FASTCON_BROKEN(2) ? ny + 1 : ny;
    A* srow = sm.s + er * C::LDS;
    if (kind == kOnline) {
      // two passes over the shared tile (max, then sum) instead of 16 registers of logits
      A tmax = device::neg_inf<A>();
#pragma unroll 4
      for (int k = 0; k < 16; ++k) {
        const int c = ec + 4 * k;
        const int64_t j = j0 + c;
        const bool ok = own_ok && j < y_end && (!masked || j == positive || sm.ids[c] != own_id);
        if (ok) tmax = device::max_acc(tmax, j == positive ? pos_logit : srow[c] * sm.scal[0]);
      }
      tmax = device::max_acc(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
      tmax = device::max_acc(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
      const A new_max = device::max_acc(run_max, tmax);
      if (new_max != device::neg_inf<A>()) {
        A sum = run_sum * device::exp2_acc((run_max - new_max) * kLog2e<A>);
#pragma unroll 4
        for (int k = 0; k < 16; ++k) {
          const int c = ec + 4 * k;
          const int64_t j = j0 + c;
          const bool ok = own_ok && j < y_end && (!masked || j == positive || sm.ids[c] != own_id);
          if (ok) sum += device::exp2_acc(logit_minus(srow[c], j == positive, pos_logit, sm.scal[0], new_max) * kLog2e<A>);
        }
        run_sum = sum;
        run_max = new_max;
      }
    } else {
      A part = 0;
#pragma unroll 4
      for (int k = 0; k < 16; ++k) {
        const int c = ec + 4 * k;
        const int64_t j = j0 + c;
        const bool ok = own_ok && j < y_end && (!masked || j == positive || sm.ids[c] != own_id);
        A val = 0;
        if (ok) {
          if (kind == kSumExp) {
            val = device::exp2_acc(logit_minus(srow[c], j == positive, pos_logit, sm.scal[0], sm.scal[2]) * kLog2e<A>);
          } else {  // softplus(x) = max(x, 0) + log1p(exp(-|x|)), x = s + bias
            const A xb = logit_minus(srow[c], j == positive, pos_logit, sm.scal[0], -sm.scal[1]);
            val = device::max_acc(xb, A(0)) + device::log1p_acc(device::exp2_acc(-(xb < 0 ? -xb : xb) * kLog2e<A>));
          }
        }
        part += val;
        if (col_sums) srow[c] = val;
      }
      run_sum += part;
      if (col_sums) {
        __syncthreads();
        const int c = tid & (kBN - 1), q = tid / kBN;
        A col_part = 0;
#pragma unroll
        for (int r = 0; r < 16; ++r) col_part += sm.s[(q * 16 + r) * C::LDS + c];
        sm.red[q * kBN + c] = col_part;
        __syncthreads();
        if (tid < kBN && j0 + tid < ny)
          atomicAdd(a.col + j0 + tid, sm.red[tid] + sm.red[kBN + tid] + sm.red[2 * kBN + tid] + sm.red[3 * kBN + tid]);
      }
    }
    __syncthreads();  // the next tile overwrites ids, logits and partials
  }

  run_sum += __shfl_xor_sync(0xffffffffu, run_sum, 1);
  run_sum += __shfl_xor_sync(0xffffffffu, run_sum, 2);
  if (kind == kOnline) {
    // log-sum-exp = max + log(sum): exactly the positive logit when it dominates alone
    if (ec == 0 && own_ok)
      (col_role ? a.col : a.row)[own] =
          run_max == device::neg_inf<A>() ? run_max : run_max + device::log2_acc(run_sum) * kLn2<A>;
    return;
  }
  if (ec == 0 && own_ok) atomicAdd(a.row + own, run_sum);
  if (kind != kSumExp) return;

  // the last block to finish turns the sums of exp(s - B) into log-sum-exps
  __threadfence();
  __syncthreads();
  if (tid == 0) *sm.ticket = atomicAdd(a.counter, 1u);
  __syncthreads();
  if (*sm.ticket + 1 != gridDim.x * gridDim.y) return;
  __threadfence();
  for (int64_t i = tid; i < a.n; i += kThreads) a.row[i] = sm.scal[2] + device::log2_acc(__ldcg(a.row + i)) * kLn2<A>;
  if (a.need_col)
    for (int64_t j = tid; j < a.m; j += kThreads) a.col[j] = sm.scal[2] + device::log2_acc(__ldcg(a.col + j)) * kLn2<A>;
}

template <class T>
struct BwdArgs : ProblemArgs<T> {
  using A = Acc<T>;
  const A* row_stat;
  const A* col_stat;
  const A* g;
  const A* h;
  const float* weight_max;
  A* grad_u;
  A* grad_v;
  A* wsum;
};

template <class T>
__global__ void __launch_bounds__(kThreads, kBackwardBlocksPerSm) sc_backward_kernel(const BwdArgs<T> a) {
  using A = Acc<T>;
  using C = Cfg<T>;
  constexpr int TN = C::DS / 32;  // warp output tile: 16 rows x DS / 2 columns
  __shared__ __align__(128) unsigned char smem[Smem<T>::kBytes];
  FASTCON_SHARED_POISON(smem);
  FASTCON_DYNAMIC_SHARED(dyn_smem);
  T* const xres = a.ldx ? reinterpret_cast<T*>(dyn_smem) : nullptr;
  const Smem<T> sm(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wr = warp & 3, wc = warp >> 2;
  const Scalars<A> sc = load_scalars(a);

  // row blocks compute W v (and W 1); column blocks W^T u, as the row work of W^T
  const bool col_role = static_cast<int>(blockIdx.x) >= a.row_tiles;
  const int tile = col_role ? blockIdx.x - a.row_tiles : blockIdx.x;
  const T* x = col_role ? a.v : a.u;
  const T* y = col_role ? a.u : a.v;
  const int64_t nx = col_role ? a.m : a.n, ny = col_role ? a.n : a.m;
  const int64_t* x_ids = col_role ? a.col_ids : a.row_ids;
  const int64_t* y_ids = col_role ? a.row_ids : a.col_ids;
  const A* own_stat = col_role ? a.col_stat : a.row_stat;
  const A* other_stat = col_role ? a.row_stat : a.col_stat;
  const A* own_w = col_role ? a.h : a.g;
  const A* other_w = col_role ? a.g : a.h;
  const bool sigmoid = a.mode == 2, masked = a.mode == 1;
  if (sigmoid) {  // W_ij = g_i sigmoid(x_ij): the weight sits on the row side
    own_w = col_role ? nullptr : a.g;
    other_w = col_role ? a.g : nullptr;
  }
  const int y_tiles = col_role ? a.row_tiles : a.col_tiles;
  const int64_t i0 = static_cast<int64_t>(tile) * kBM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * C::DS;

  const int er = tid >> 2, ec = tid & 3;
  const int64_t own = i0 + er;
  const bool own_ok = own < nx;
  const int64_t own_id = masked && own_ok ? x_ids[own] : 0;
  const int64_t positive = own + (col_role ? -a.offset : a.offset);
  const A pos_logit = positive_logit(x, own, y, positive, a.d, sc.scale_d, own_ok && positive >= 0 && positive < ny, ec);
  // own factor: fixed max: w_i exp(B - stat_i); online: w_i, with stat_i apart
  A own_a = 0, own_stat_v = 0;
  if (own_ok && own_w) {
    own_a = own_w[own];
    if (!sigmoid) {
      own_stat_v = own_stat[own];
      if (sc.fixed) own_a *= device::exp2_acc((sc.bound - own_stat_v) * kLog2e<A>);
    }
  }
  if (xres) stage_resident(xres, a.ldx, x, i0, nx, a.d, a.vec_ok, tid);  // read after GEMM1's first barrier
  const A wscale = a.weight_max ? A(1) / device::max_acc(A(*a.weight_max), A(1e-30)) : A(1);

  device::WarpTile<T, TN> out;
  device::tile_zero(out);
  A wpart = 0;
  for (int t = 0; t < y_tiles; ++t) {
    const int64_t j0 = static_cast<int64_t>(t) * kBN;
    if (tid < kBN) {
      const int64_t j = j0 + tid;
      const bool ok = j < ny;
      sm.ids[tid] = masked && ok ? y_ids[j] : 0;
      A wa = 0, sb = 0;
      if (ok && other_w) {
        wa = other_w[j];
        if (!sigmoid) {
          sb = other_stat[j];
          if (sc.fixed) wa *= device::exp2_acc((sc.bound - sb) * kLog2e<A>);
        }
      }
      sm.va[tid] = wa;
      sm.vb[tid] = sb;
    }
    logit_tile<T>(sm, xres, a.ldx, x, i0, nx, y, j0, ny, a.d, a.vec_ok, tid);

    const int64_t y_end = FASTCON_BROKEN(2) ? ny + 1 : ny;
    const A* srow = sm.s + er * C::LDS;
    WeightT<T>* wrow = sm.w + er * C::LDW;
#pragma unroll 4
    for (int k = 0; k < 16; ++k) {
      const int c = ec + 4 * k;
      const int64_t j = j0 + c;
      const bool ok = own_ok && j < y_end && (!masked || j == positive || sm.ids[c] != own_id);
      const bool is_pos = j == positive;
      A w = 0;
      if (ok) {
        const A dot = srow[c];
        if (sigmoid) {  // sigmoid(x) = 1 / (1 + exp(-x)), x = s + bias
          const A xb = logit_minus(dot, is_pos, pos_logit, sc.scale, -sc.bias);
          w = (own_a + sm.va[c]) / (A(1) + device::exp2_acc(-xb * kLog2e<A>));
        } else if (sc.fixed) {
          w = device::exp2_acc(logit_minus(dot, is_pos, pos_logit, sc.scale, sc.bound) * kLog2e<A>) * (own_a + sm.va[c]);
        } else {  // a side without weights is skipped: its stat may be unset and exp overflow
          if (own_a != A(0))
            w = own_a * device::exp2_acc(logit_minus(dot, is_pos, pos_logit, sc.scale, own_stat_v) * kLog2e<A>);
          if (sm.va[c] != A(0))
            w += sm.va[c] * device::exp2_acc(logit_minus(dot, is_pos, pos_logit, sc.scale, sm.vb[c]) * kLog2e<A>);
        }
      }
      wpart += w;
      wrow[c] = device::from_acc<WeightT<T>>(w * wscale);
    }
    __syncthreads();

    // GEMM2: out += W (64 x 64) * Y (64 x DS slab), in K2-row chunks of Y
    for (int kk = 0; kk < kBN; kk += C::K2) {
      stage_tile<T, C::K2, C::DS>(sm.y2, C::LD2, y, j0 + kk, ny, d0, a.d, a.vec_ok, tid);
      __syncthreads();
      device::tile_mma_ab(out, sm.w + wr * 16 * C::LDW + kk, C::LDW, sm.y2 + wc * (C::DS / 2), C::LD2, C::K2, lane);
      __syncthreads();
    }
  }

  A* grad = col_role ? a.grad_v : a.grad_u;
  const int64_t r0 = i0 + wr * 16, c0 = d0 + wc * (C::DS / 2);
  const int rows = nx - r0 < 16 ? static_cast<int>(nx - r0) : 16;
  const int cols = a.d - c0 < C::DS / 2 ? static_cast<int>(a.d - c0) : C::DS / 2;
  float* scratch = reinterpret_cast<float*>(sm.s) + warp * 256;  // free: the last GEMM2 barrier has passed
  device::tile_store_global(out, grad + r0 * a.d + c0, a.d, rows, cols, A(1) / wscale, scratch, lane);

  if (!col_role && blockIdx.y == 0) {
    wpart += __shfl_xor_sync(0xffffffffu, wpart, 1);
    wpart += __shfl_xor_sync(0xffffffffu, wpart, 2);
    if (ec == 0 && own_ok) a.wsum[own] = wpart;
  }
}

// ---- launchers --------------------------------------------------------------------------------

const char* launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

int multiprocessors() {
  int dev = 0, sms = 1;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 1;
  return sms;
}

// 16-byte vector loads need rows that are whole vectors and 16-byte aligned base pointers.
template <class T>
bool vectorizable(const void* u, const void* v, int64_t d) {
  const auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return d % static_cast<int64_t>(16 / sizeof(T)) == 0 && aligned(u) && aligned(v);
}

// Dynamic shared memory for the resident own tile, when the device can give it next to the
// static tiles (else 0: the own tile is staged per chunk like the other side). Sets the
// kernel's dynamic shared memory limit accordingly.
template <class T, class K>
int resident_stride(K kernel, int64_t d, size_t* bytes) {
  using C = Cfg<T>;
  const int64_t padded = (d + C::BK - 1) / C::BK * C::BK;
  const int64_t ldx = padded + (device::kTensorCore<T> ? 8 : 1);  // 16-byte rows for wmma; banks
  const size_t need = static_cast<size_t>(kBM * ldx) * sizeof(T);
  int dev = 0, optin = 0;
  *bytes = 0;
  if (d == 0 || cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      Smem<T>::kBytes + need > static_cast<size_t>(optin) ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(need)) != cudaSuccess) {
    (void)cudaGetLastError();  // a refused attribute is not an error: stream the own tile instead
    return 0;
  }
  *bytes = need;
  return static_cast<int>(ldx);
}

// The fields both passes share, from the op's parameters (ldx is set at launch).
template <class T>
void set_problem(ProblemArgs<T>& a, const kernels::ScProblem& p) {
  a.u = static_cast<const T*>(p.u);
  a.v = static_cast<const T*>(p.v);
  a.row_ids = p.row_ids;
  a.col_ids = p.col_ids;
  a.n = p.n;
  a.m = p.m;
  a.d = p.d;
  a.offset = p.row_offset;
  a.scale = p.scale;
  a.bias = p.bias;
  a.bounded = p.bounded;
  a.mode = p.mode;
  a.vec_ok = vectorizable<T>(p.u, p.v, p.d);
  a.row_tiles = device::ceil_div(p.n, kBM);
  a.col_tiles = device::ceil_div(p.m, kBN);
}

template <class T>
const char* launch_forward(const kernels::ScForward& p, cudaStream_t stream) {
  using A = Acc<T>;
  FwdArgs<T> a{};
  set_problem<T>(a, p);
  const bool softmax = p.mode != 2;
  // softmax: the fixed max or the online kind, decided by each block from the scale it reads
  // (kSumExp stands for "fixed max if the bound allows"); unbounded logits are always online
  a.kind = !softmax ? kSoftplus : (p.bounded ? kSumExp : kOnline);
  a.need_col = softmax && p.need_col;
  a.row = static_cast<A*>(p.row);
  a.col = static_cast<A*>(p.col);
  a.counter = p.counter;
  // The grid serves both kinds: x covers the row tiles, plus the column tiles when the online
  // kind may need column blocks; y splits the column sweep of the fixed max and softplus kinds
  // until there are about two blocks per multiprocessor. Blocks of the kind not taken exit at
  // once (online: y > 0; fixed max: the column blocks, after taking their ticket).
  int splits = 1;
  if (a.kind != kOnline) {
    splits = device::ceil_div(2 * multiprocessors(), a.row_tiles);
    splits = splits < 1 ? 1 : (splits > a.col_tiles ? a.col_tiles : splits);
  }
  a.tiles_per_split = device::ceil_div(a.col_tiles, splits);
  const int col_blocks = softmax && a.need_col ? a.col_tiles : 0;
  const dim3 grid(a.row_tiles + col_blocks, device::ceil_div(a.col_tiles, a.tiles_per_split));
  auto kernel = &sc_forward_kernel<T>;
  size_t dyn = 0;
  a.ldx = resident_stride<T>(kernel, p.d, &dyn);
  FASTCON_LAUNCH(kernel, grid, dim3(kThreads), dyn, stream)(a);
  return launch_error();
}

template <class T>
const char* launch_backward(const kernels::ScBackward& p, cudaStream_t stream) {
  using A = Acc<T>;
  BwdArgs<T> a{};
  set_problem<T>(a, p);
  a.row_stat = static_cast<const A*>(p.row_stat);
  a.col_stat = static_cast<const A*>(p.col_stat);
  a.g = static_cast<const A*>(p.g);
  a.h = static_cast<const A*>(p.h);
  a.weight_max = p.weight_max;
  a.grad_u = static_cast<A*>(p.grad_u);
  a.grad_v = static_cast<A*>(p.grad_v);
  a.wsum = static_cast<A*>(p.wsum);
  const int slabs = p.d > 0 ? device::ceil_div(p.d, Cfg<T>::DS) : 1;
  auto kernel = &sc_backward_kernel<T>;
  size_t dyn = 0;
  a.ldx = resident_stride<T>(kernel, p.d, &dyn);
  FASTCON_LAUNCH(kernel, dim3(a.row_tiles + a.col_tiles, slabs), dim3(kThreads), dyn, stream)(a);
  return launch_error();
}

}  // namespace
}  // namespace sc_impl

const char* sc_forward(const kernels::ScForward& p, cudaStream_t stream) {
  switch (p.dtype) {
    case kernels::DType::f16: return sc_impl::launch_forward<__half>(p, stream);
    case kernels::DType::bf16: return sc_impl::launch_forward<__nv_bfloat16>(p, stream);
    case kernels::DType::f32: return sc_impl::launch_forward<float>(p, stream);
    case kernels::DType::f64: return sc_impl::launch_forward<double>(p, stream);
  }
  return "sc_forward: unsupported dtype";
}

const char* sc_backward(const kernels::ScBackward& p, cudaStream_t stream) {
  switch (p.dtype) {
    case kernels::DType::f16: return sc_impl::launch_backward<__half>(p, stream);
    case kernels::DType::bf16: return sc_impl::launch_backward<__nv_bfloat16>(p, stream);
    case kernels::DType::f32: return sc_impl::launch_backward<float>(p, stream);
    case kernels::DType::f64: return sc_impl::launch_backward<double>(p, stream);
  }
  return "sc_backward: unsupported dtype";
}

}  // namespace fastcon::FASTCON_KERNEL_NS
