// The whole fused soft contrastive loss on the CUDA backend, one op per direction (issue 13):
// fastcon::sc_loss_forward / sc_loss_backward for the CUDA key (csrc/cuda/bindings.cpp), and
// fastcon_simt::* through the SIMT emulation build. Same inputs, outputs, saved statistics and
// math as the cpu op (csrc/cpu/soft_contrastive_loss.cpp), except the `scenes` output: here the
// row's scene leader (the smallest row index with the same scene id), found by comparing ids, no
// sort.
//
// Launch split (K = 1 for the tile pass; at most 4 launches per direction, 8 per step):
//   forward:  1. prologue   one thread per row of [z1 | z2 | queue]: float64 norms, normalised
//                           rows into a per-call workspace (kernel storage dtype), label unit
//                           rows (float64) and their value flags, int64 scene ids and leaders,
//                           zeroed statistics / counters, scale = 1 / tau and the bias read from
//                           device memory with their checks; then, per block of 128 rows, the
//                           partial low-rank target sums sum_j lhat_j [x_j, 1]^T (C x (D + 1)).
//             2. reduce     (labels, scene ids only) the partials summed in block order into
//                           P (C x (D + 1)); per-scene sums over the members (by leader) and
//                           the queue keys of the scene.
//             3. tile pass  sc_forward (csrc/cuda/soft_contrastive.cu), unchanged.
//             4. epilogue   one thread per row: float64 positive / target logits, R_i, the
//                           per-sample loss; the last block (ticket) sums them in row order and
//                           folds the label flags.
//   backward: 1. prologue   as above from the saved norms, plus the upstream weights g, g / R,
//                           h / R and the partials of the four target sums of the gradient.
//             2. reduce     (labels, scene ids, or fp16 for the weight scale) as above.
//             3. tile pass  sc_backward, unchanged.
//             4. epilogue   one thread per row: target subtraction, normalisation backward into
//                           the gradients (input dtype); the last block sums the temperature
//                           and bias gradients in row order.
// Everything is summed in a fixed order (no float atomics outside the tile pass): bitwise
// reproducible given the tile pass. The value checks are flags in device memory the binding
// raises with at::_assert_async (no host read). The per-row threads are simple and unprofiled:
// correct, not tuned (the O(N^2) compares of the scene leaders and the serial row sums of the
// last block are the first things to parallelise on a GPU).
#include <cfloat>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace fastcon::FASTCON_KERNEL_NS {
namespace sc_loss_impl {
namespace {

using device::Acc;
using kernels::ElemType;
using kernels::ScLoss;
using kernels::ScTensor;

constexpr int kT = 128;        // threads per block (one row each)
constexpr double kEps = 1e-12;  // the norm floor of the spec
constexpr int kNone = 0, kLabels = 1, kScene = 2, kIgnore = 3;

__device__ __forceinline__ double load_real(const ScTensor& x, int64_t i, int64_t k) {
  const int64_t o = i * x.s0 + k * x.s1;
  switch (x.t) {
    case ElemType::f64: return static_cast<const double*>(x.p)[o];
    case ElemType::f32: return static_cast<const float*>(x.p)[o];
    case ElemType::f16: return device::to_acc(static_cast<const __half*>(x.p)[o]);
    case ElemType::bf16: return device::to_acc(static_cast<const __nv_bfloat16*>(x.p)[o]);
    case ElemType::i64: return static_cast<double>(static_cast<const int64_t*>(x.p)[o]);
    case ElemType::i32: return static_cast<double>(static_cast<const int32_t*>(x.p)[o]);
    case ElemType::i16: return static_cast<double>(static_cast<const int16_t*>(x.p)[o]);
    case ElemType::i8: return static_cast<double>(static_cast<const int8_t*>(x.p)[o]);
    case ElemType::u8: return static_cast<double>(static_cast<const uint8_t*>(x.p)[o]);
    case ElemType::b8: return static_cast<const uint8_t*>(x.p)[o] ? 1.0 : 0.0;
  }
  return 0.0;
}

__device__ __forceinline__ int64_t load_id(const ScTensor& x, int64_t i) {
  const int64_t o = i * x.s0;
  switch (x.t) {
    case ElemType::i64: return static_cast<const int64_t*>(x.p)[o];
    case ElemType::i32: return static_cast<const int32_t*>(x.p)[o];
    case ElemType::i16: return static_cast<const int16_t*>(x.p)[o];
    case ElemType::i8: return static_cast<const int8_t*>(x.p)[o];
    case ElemType::u8: return static_cast<const uint8_t*>(x.p)[o];
    default: return 0;
  }
}

__device__ __forceinline__ void store_real(void* p, ElemType t, double v) {
  switch (t) {
    case ElemType::f64: *static_cast<double*>(p) = v; break;
    case ElemType::f32: *static_cast<float*>(p) = static_cast<float>(v); break;
    case ElemType::f16: *static_cast<__half*>(p) = device::from_acc<__half>(static_cast<float>(v)); break;
    case ElemType::bf16:
      *static_cast<__nv_bfloat16*>(p) = device::from_acc<__nv_bfloat16>(static_cast<float>(v));
      break;
    default: break;
  }
}

template <class T>
__device__ __forceinline__ double val(const T* x, int64_t i) {
  return static_cast<double>(device::to_acc(x[i]));
}

// out = z_row / max(||z_row||, eps) in the accumulation type, stored in T (z_row in T without
// normalisation); the norm from norm_in (backward) or computed (float64 sum) into norm_out.
template <class T>
__device__ void normalise_row(const ScTensor& z, int64_t zr, int64_t d, bool normalize, const Acc<T>* norm_in,
                              Acc<T>* norm_out, T* out) {
  using A = Acc<T>;
  const T* base = static_cast<const T*>(z.p) + zr * z.s0;
  if (!normalize) {
    for (int64_t k = 0; k < d; ++k) out[k] = base[k * z.s1];
    return;
  }
  A norm;
  if (norm_in) {
    norm = norm_in[zr];
  } else {
    double s = 0;
    for (int64_t k = 0; k < d; ++k) {
      const double x = val(base, k * z.s1);
      s += x * x;
    }
    const A r = static_cast<A>(sqrt(s));
    norm = r < A(kEps) ? A(kEps) : r;  // a NaN norm stays NaN
    if (norm_out) norm_out[zr] = norm;
  }
  for (int64_t k = 0; k < d; ++k) out[k] = device::from_acc<T>(device::to_acc(base[k * z.s1]) / norm);
}

// The sources of the low-rank target sums: sum_j T~_ij w_j x_j with x the columns (batch, then
// the queue for source 0) or the u rows. forward: 0 columns, 1 u (symmetric); backward:
// 0 columns, 1 u weighted g / R (sigmoid g), 2 columns weighted h / R, 3 u (symmetric: 2, 3).
__device__ __forceinline__ int sources(const ScLoss& p, bool backward) {
  return backward ? (p.need_col ? 4 : 2) : (p.need_col ? 2 : 1);
}
__device__ __forceinline__ bool source_on_u(int s) { return s == 1 || s == 3; }
__device__ __forceinline__ const double* source_weight(const ScLoss& p, bool backward, int s) {
  if (!backward) return nullptr;
  return s == 1 ? p.wu : (s == 2 ? p.wv : nullptr);
}

template <class T>
__global__ void __launch_bounds__(kT) sc_loss_prologue(const ScLoss p, bool backward) {
  using A = Acc<T>;
  const int tid = threadIdx.x;
  const int64_t n = p.n, k = p.k, d = p.d, c = p.c, m = n + k;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kT + tid;
  T* uk = static_cast<T*>(p.uk);
  T* cols = static_cast<T*>(p.cols);
  if (blockIdx.x == 0 && tid == 0) {
    const double scale = 1.0 / load_real(p.temperature, 0, 0);
    const double amax = sizeof(A) == 8 ? DBL_MAX : static_cast<double>(FLT_MAX);
    p.scal[0] = scale;
    p.checks[0] = scale >= 4.9406564584124654e-324 && scale <= amax;  // false for NaN
    const double b = p.bias.p ? load_real(p.bias, 0, 0) : 0.0;
    p.scal[1] = b;
    p.checks[1] = b - b == 0;  // finite
    if (!backward) p.counter[0] = 0;
    p.counter[1] = 0;  // the epilogue's ticket
  }
  if (r < m) {
    const bool batch = r < n;
    A* n2_out = !backward && p.normalize ? static_cast<A*>(p.n2) : nullptr;
    const A* n2_in = backward && p.normalize ? static_cast<const A*>(p.n2) : nullptr;
    if (batch) {
      A* n1_out = !backward && p.normalize ? static_cast<A*>(p.n1) : nullptr;
      const A* n1_in = backward && p.normalize ? static_cast<const A*>(p.n1) : nullptr;
      normalise_row<T>(p.z1, r, d, p.normalize, n1_in, n1_out, uk + r * d);
      normalise_row<T>(p.z2, r, d, p.normalize, n2_in, n2_out, cols + r * d);
    } else {
      normalise_row<T>(p.queue, r - n, d, p.normalize, nullptr, nullptr, cols + r * d);
    }
    if (p.kind == kLabels) {
      const ScTensor& l = batch ? p.labels : p.qlabels;
      const int64_t lr = batch ? r : r - n;
      double* lh = p.lhat + r * c;
      double s = 0;
      unsigned flag = 0;
      for (int64_t q = 0; q < c; ++q) {
        const double x = load_real(l, lr, q);
        if (!(x - x == 0)) flag |= 1u;  // NaN or infinite
        if (x < 0) flag |= 2u;
        lh[q] = x;
        s += x * x;
      }
      const double norm = sqrt(s);
      for (int64_t q = 0; q < c; ++q) lh[q] = norm > 0 ? lh[q] / norm : 0.0;
      if (!backward) p.rowflag[r] = static_cast<uint8_t>(batch ? flag : flag << 2);
    } else if (p.kind == kScene || p.kind == kIgnore) {
      const int64_t id = batch ? load_id(p.labels, r) : load_id(p.qlabels, r - n);
      p.ids[r] = id;
      if (p.kind == kScene && batch && !backward) {
        int64_t j = 0;
        while (load_id(p.labels, j) != id) ++j;  // stops at r at the latest
        p.leader[r] = j;
      }
    }
    if (!backward && batch) {
      static_cast<A*>(p.row)[r] = A(0);
      if (p.need_col) static_cast<A*>(p.col)[r] = A(0);
    }
    if (backward && batch) {
      const A go = static_cast<A>(load_real(p.grad_out, p.reduction == 2 ? r : 0, 0));
      const A w = p.reduction == 0 ? go / static_cast<A>(n) : go;
      const A g = p.need_col ? w / A(2) : w;
      static_cast<A*>(p.g)[r] = g;
      if (p.kind != kIgnore) {
        const double rs = static_cast<double>(static_cast<const A*>(p.r_sum)[r]);
        p.wu[r] = p.mode == 2 ? static_cast<double>(g) : static_cast<double>(g) / rs;
        if (p.need_col) p.wv[r] = static_cast<double>(g) / rs;
      }
    }
  }
  if (p.kind != kLabels) return;  // uniform over the grid: no barrier is skipped by some threads only

  // the block's partial target sums, one (C, D + 1) slab per source, rows summed in order
  __syncthreads();
  const int ns = sources(p, backward);
  const int64_t w1 = d + 1, slab = c * w1, r0 = static_cast<int64_t>(blockIdx.x) * kT;
  for (int s = 0; s < ns; ++s) {
    const int64_t rows = s == 0 ? m : n;
    const int64_t r1 = r0 + kT < rows ? r0 + kT : rows;
    const T* x = source_on_u(s) ? uk : cols;
    const double* w = source_weight(p, backward, s);
    double* out = p.partial + (static_cast<int64_t>(blockIdx.x) * ns + s) * slab;
    for (int64_t e = tid; e < slab; e += kT) {
      const int64_t q = e / w1, kk = e % w1;
      double acc = 0;
      for (int64_t rr = r0; rr < r1; ++rr) {
        const double l = p.lhat[rr * c + q] * (w ? w[rr] : 1.0);
        acc += l * (kk == d ? 1.0 : val(x, rr * d + kk));
      }
      out[e] = acc;
    }
  }
}

// max |g| + max |h| (h = g) for the fp16 tile pass's weight scaling (one thread).
template <class T>
__device__ __forceinline__ void weight_scale(const ScLoss& p) {
  const Acc<T>* g = static_cast<const Acc<T>*>(p.g);
  float mx = 0;
  for (int64_t i = 0; i < p.n; ++i) {
    const float a = fabsf(static_cast<float>(g[i]));
    mx = a > mx ? a : mx;
  }
  *p.weight_max = p.need_col ? 2 * mx : mx;
}

// Labels: the prologue's per-block partials summed in block order into P (sources, C, D + 1);
// backward with fp16 (any kind but scene ids): the weight scale.
template <class T>
__global__ void __launch_bounds__(kT) sc_loss_reduce(const ScLoss p, bool backward, int blocks) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kT + threadIdx.x;
  const int64_t total = p.kind == kLabels ? sources(p, backward) * p.c * (p.d + 1) : 0;
  if (e < total) {
    double acc = 0;
    for (int b = 0; b < blocks; ++b) acc += p.partial[b * total + e];
    p.proj[e] = acc;
  }
  if (backward && p.weight_max && blockIdx.x == 0 && threadIdx.x == 0) weight_scale<T>(p);
}

// Scene ids: the per-scene sums (sources, leader rows, D + 1) over the members in row order
// (found by their leader) and, for source 0, the queue keys of the scene; one thread per leader.
// Backward with fp16: the weight scale.
// (no __launch_bounds__: with it, ptxas for sm_90 spills a few bytes at 48 registers)
template <class T>
__global__ void sc_loss_scene_sums(const ScLoss p, bool backward) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kT + threadIdx.x;
  const int64_t n = p.n, d = p.d, w1 = d + 1;
  const int64_t* leader = p.leader;
  if (e < n && leader[e] == e) {
    const int ns = sources(p, backward);
    const int64_t id = p.ids[e], queue_end = n + p.k;
    for (int s = 0; s < ns; ++s) {
      const T* x = static_cast<const T*>(source_on_u(s) ? p.uk : p.cols);
      const double* w = source_weight(p, backward, s);
      double* o = p.ssum + (s * n + e) * w1;
      for (int64_t kk = 0; kk < w1; ++kk) o[kk] = 0;
      // the members in row order (none before the leader), then (source 0) the scene's queue keys
      const int64_t end = s == 0 ? queue_end : n;
      for (int64_t j = e; j < end; ++j) {
        if (j < n ? leader[j] != e : p.ids[j] != id) continue;
        const double wj = w && j < n ? w[j] : 1.0;
        const T* xj = x + j * d;
        for (int64_t kk = 0; kk < d; ++kk) o[kk] += wj * val(xj, kk);
        o[d] += wj;
      }
    }
  }
  if (backward && p.weight_max && blockIdx.x == 0 && threadIdx.x == 0) weight_scale<T>(p);
}

// sum_j T~_ij x_j of source s at feature kk (labels: lhat_i . P_s[:, kk]; scenes: the scene's sum).
__device__ __forceinline__ double target_sum(const ScLoss& p, int s, int64_t i, int64_t kk) {
  const int64_t w1 = p.d + 1;
  if (p.kind == kLabels) {
    const double* lh = p.lhat + i * p.c;
    const double* proj = p.proj + s * p.c * w1 + kk;
    double acc = 0;
    for (int64_t q = 0; q < p.c; ++q) acc += lh[q] * proj[q * w1];
    return acc;
  }
  if (p.kind == kScene) return p.ssum[(s * p.n + p.leader[i]) * w1 + kk];
  return 0.0;
}

// T~_ii: 1 - |lhat_i|^2 (labels), 0 (scenes), 1 (no labels)
__device__ __forceinline__ double off_diagonal(const ScLoss& p, int64_t i) {
  if (p.kind == kLabels) {
    double s = 0;
    for (int64_t q = 0; q < p.c; ++q) s += p.lhat[i * p.c + q] * p.lhat[i * p.c + q];
    return 1.0 - s;
  }
  return p.kind == kScene ? 0.0 : 1.0;
}

// Whether this block is the last of the launch to finish (all threads call it).
__device__ __forceinline__ bool last_block(unsigned* ticket) {
  __shared__ unsigned s_ticket;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_ticket = atomicAdd(ticket, 1u);
  __syncthreads();
  const bool last = s_ticket + 1 == gridDim.x;
  __syncthreads();  // s_ticket read by all before any block could reuse it
  if (last) __threadfence();
  return last;
}

template <class T>
__global__ void __launch_bounds__(kT) sc_loss_forward_epilogue(const ScLoss p) {
  using A = Acc<T>;
  const int64_t n = p.n, d = p.d;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kT + threadIdx.x;
  const double scale = p.scal[0], bias = p.scal[1], hw = p.hw;
  const bool sigmoid = p.mode == 2;
  if (i < n) {
    const T* u = static_cast<const T*>(p.uk) + i * d;
    const T* v = static_cast<const T*>(p.cols) + i * d;
    double sd = 0;
    for (int64_t kk = 0; kk < d; ++kk) sd += val(u, kk) * val(v, kk);
    sd *= scale;  // the positive logit, float64 as in the tile pass
    const double row = static_cast<double>(static_cast<const A*>(p.row)[i]);
    const double col = p.need_col ? static_cast<double>(static_cast<const A*>(p.col)[i]) : 0.0;
    double a, b = 0;
    if (p.kind == kIgnore) {
      a = row - sd;
      if (p.need_col) b = col - sd;
    } else {
      const double off = off_diagonal(p, i);
      double t0 = 0, t1 = 0, r = 1;  // u_i . sum_j T~_ij v_j, v_i . sum_j T~_ij u_j, R_i
      if (p.kind != kNone) {
        for (int64_t kk = 0; kk < d; ++kk) {
          t0 += val(u, kk) * target_sum(p, 0, i, kk);
          if (p.need_col) t1 += val(v, kk) * target_sum(p, 1, i, kk);
        }
        r = target_sum(p, 0, i, d) + (p.kind == kLabels ? off : 0.0);
      }
      const double ts = off * sd + scale * t0;
      if (sigmoid) {
        a = row - hw * (sd + bias) - (1 - hw) * (ts + bias * r);
      } else {
        a = row - hw * sd - (1 - hw) * ts / r;
        if (p.need_col) b = col - hw * sd - (1 - hw) * (off * sd + scale * t1) / r;
      }
      static_cast<A*>(p.r_sum)[i] = static_cast<A>(r);
    }
    const double per = p.need_col ? (a + b) / 2 : a;
    if (p.reduction == 2) {
      static_cast<A*>(p.out)[i] = static_cast<A>(per);
    } else {
      p.per[i] = per;
    }
  }
  if (!last_block(p.counter + 1) || threadIdx.x != 0) return;
  if (p.reduction != 2) {
    double total = 0;
    for (int64_t j = 0; j < n; ++j) total += __ldcg(p.per + j);
    static_cast<A*>(p.out)[0] = static_cast<A>(p.reduction == 0 ? total / static_cast<double>(n) : total);
  }
  unsigned flags = 0;
  if (p.kind == kLabels) {
    const volatile uint8_t* rf = p.rowflag;
    for (int64_t r = 0; r < n + p.k; ++r) flags |= rf[r];
  }
  for (int q = 0; q < 4; ++q) p.checks[2 + q] = !(flags >> q & 1u);
}

template <class T>
__global__ void __launch_bounds__(kT) sc_loss_backward_epilogue(const ScLoss p) {
  using A = Acc<T>;
  const int64_t n = p.n, d = p.d;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kT + threadIdx.x;
  const double scale = p.scal[0], hw = p.hw;
  const bool sigmoid = p.mode == 2;
  if (i < n) {
    const T* u = static_cast<const T*>(p.uk) + i * d;
    const T* v = static_cast<const T*>(p.cols) + i * d;
    const A* gu = static_cast<const A*>(p.gu) + i * d;
    const A* gv = static_cast<const A*>(p.gv) + i * d;
    const double gi = static_cast<double>(static_cast<const A*>(p.g)[i]), hi = p.need_col ? gi : 0.0;
    const double r = p.kind == kIgnore ? 1.0 : static_cast<double>(static_cast<const A*>(p.r_sum)[i]);
    // tu = gu - a0 S0 - b0 v - a2 S2 - b2 v ; tv = gv - a1 S1 - b1 u - a3 S3 - b3 u (S_s: the target
    // sums of source s); the soft parts are left out for hard_weight 1 (a NaN there stays out)
    double a0 = 0, b0 = 0, a1 = 0, b1 = 0, a2 = 0, b2 = 0, a3 = 0, b3 = 0;
    const bool soft = p.kind != kIgnore && p.kind != kNone && hw != 1;
    if (p.kind == kIgnore) {
      b0 = b1 = gi + hi;
    } else {
      const double off = off_diagonal(p, i), sf = hw != 1 ? 1.0 : 0.0;
      const double a = (1 - hw) * (sigmoid ? gi : gi / r);
      a0 = a;
      b0 = sf * a * off + hw * gi;
      a1 = 1 - hw;
      b1 = sf * (1 - hw) * off * p.wu[i] + hw * gi;
      if (p.need_col) {
        const double bb = (1 - hw) * hi / r;
        a2 = 1 - hw;
        b2 = sf * (1 - hw) * off * p.wv[i] + hw * hi;
        a3 = bb;
        b3 = sf * bb * off + hw * hi;
      }
    }
    const auto tu = [&](int64_t kk) {
      double t = static_cast<double>(gu[kk]) - (b0 + b2) * val(v, kk);
      if (soft) t -= a0 * target_sum(p, 0, i, kk) + (p.need_col ? a2 * target_sum(p, 2, i, kk) : 0.0);
      return t;
    };
    const auto tv = [&](int64_t kk) {
      double t = static_cast<double>(gv[kk]) - (b1 + b3) * val(u, kk);
      if (soft) t -= a1 * target_sum(p, 1, i, kk) + (p.need_col ? a3 * target_sum(p, 3, i, kk) : 0.0);
      return t;
    };
    double pu = 0, pv = 0;
    for (int64_t kk = 0; kk < d; ++kk) pu += val(u, kk) * tu(kk);
    if (p.need_z2 && p.normalize)
      for (int64_t kk = 0; kk < d; ++kk) pv += val(v, kk) * tv(kk);
    p.per[i] = pu;
    if (p.need_bias)
      p.per[n + i] = static_cast<double>(static_cast<const A*>(p.wsum)[i]) - gi * (hw + (1 - hw) * r);
    // the normalisation's backward: scale (t - u (u . t)) / ||z|| (scale t / eps at the floor)
    const auto write = [&](const auto& t, const T* x, double proj, const void* norms, void* out) {
      T* o = static_cast<T*>(out) + i * d;
      if (!p.normalize) {
        for (int64_t kk = 0; kk < d; ++kk) o[kk] = device::from_acc<T>(static_cast<A>(scale * t(kk)));
        return;
      }
      const double norm = static_cast<double>(static_cast<const A*>(norms)[i]);
      const double pr = norm <= kEps ? 0.0 : proj, f = scale / norm;
      for (int64_t kk = 0; kk < d; ++kk) o[kk] = device::from_acc<T>(static_cast<A>((t(kk) - val(x, kk) * pr) * f));
    };
    if (p.need_z1) write(tu, u, pu, p.n1, p.dz1);
    if (p.need_z2) write(tv, v, pv, p.n2, p.dz2);
  }
  if (!last_block(p.counter + 1) || threadIdx.x != 0) return;
  if (p.need_tau) {  // dL/dtau = -scale^2 sum_i u_i . GU_i
    double s = 0;
    for (int64_t j = 0; j < n; ++j) s += __ldcg(p.per + j);
    store_real(p.dtau, p.temperature.t, -scale * scale * s);
  }
  if (p.need_bias) {  // dL/dbias = sum_i (W 1)_i - g_i (hw + (1 - hw) R_i)
    double s = 0;
    for (int64_t j = 0; j < n; ++j) s += __ldcg(p.per + n + j);
    store_real(p.dbias, p.bias.t, s);
  }
}

kernels::ScProblem tile_problem(const ScLoss& p) {
  kernels::ScProblem t{};
  t.dtype = p.dtype;
  t.u = p.uk;
  t.v = p.cols;
  t.row_ids = p.kind == kIgnore ? p.ids : nullptr;
  t.col_ids = p.kind == kIgnore ? p.ids : nullptr;
  t.n = p.n;
  t.m = p.n + p.k;
  t.d = p.d;
  t.row_offset = 0;
  t.scale = p.scal;
  t.bias = p.mode == 2 && p.bias.p ? p.scal + 1 : nullptr;
  t.bounded = p.normalize;
  t.mode = p.mode;
  return t;
}

const char* launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// The reduce launch: labels, scene ids, or (backward) the fp16 weight scale; none otherwise.
template <class T>
const char* reduce(const ScLoss& p, bool backward, int blocks, cudaStream_t stream) {
  if (p.kind == kScene) {
    auto kernel = &sc_loss_scene_sums<T>;
    FASTCON_LAUNCH(kernel, dim3(device::ceil_div(p.n, kT)), dim3(kT), 0, stream)(p, backward);
  } else if (p.kind == kLabels || (backward && p.weight_max)) {
    const int64_t work = p.kind == kLabels ? (backward ? 2 : 1) * (p.need_col ? 2 : 1) * p.c * (p.d + 1) : 1;
    auto kernel = &sc_loss_reduce<T>;
    FASTCON_LAUNCH(kernel, dim3(device::ceil_div(work, kT)), dim3(kT), 0, stream)(p, backward, blocks);
  } else {
    return nullptr;
  }
  return launch_error();
}

template <class T>
const char* forward(const ScLoss& p, cudaStream_t stream) {
  const int64_t m = p.n + p.k;
  const int blocks = device::ceil_div(m, kT), rows = device::ceil_div(p.n, kT);
  auto prologue = &sc_loss_prologue<T>;
  FASTCON_LAUNCH(prologue, dim3(blocks), dim3(kT), 0, stream)(p, false);
  if (const char* e = launch_error()) return e;
  if (const char* e = reduce<T>(p, false, blocks, stream)) return e;
  kernels::ScForward f{};
  static_cast<kernels::ScProblem&>(f) = tile_problem(p);
  f.need_col = p.need_col;
  f.row = p.row;
  f.col = p.need_col ? p.col : nullptr;
  f.counter = p.counter;
  if (const char* e = sc_forward(f, stream)) return e;
  auto epilogue = &sc_loss_forward_epilogue<T>;
  FASTCON_LAUNCH(epilogue, dim3(rows), dim3(kT), 0, stream)(p);
  return launch_error();
}

template <class T>
const char* backward(const ScLoss& p, cudaStream_t stream) {
  const int64_t m = p.n + p.k;
  const int blocks = device::ceil_div(m, kT), rows = device::ceil_div(p.n, kT);
  auto prologue = &sc_loss_prologue<T>;
  FASTCON_LAUNCH(prologue, dim3(blocks), dim3(kT), 0, stream)(p, true);
  if (const char* e = launch_error()) return e;
  if (const char* e = reduce<T>(p, true, blocks, stream)) return e;
  kernels::ScBackward b{};
  static_cast<kernels::ScProblem&>(b) = tile_problem(p);
  b.row_stat = p.row;
  b.col_stat = p.need_col ? p.col : nullptr;
  b.g = p.g;
  b.h = p.need_col ? p.g : nullptr;
  b.weight_max = p.weight_max;
  b.grad_u = p.gu;
  b.grad_v = p.gv;
  b.wsum = p.wsum;
  if (const char* e = sc_backward(b, stream)) return e;
  auto epilogue = &sc_loss_backward_epilogue<T>;
  FASTCON_LAUNCH(epilogue, dim3(rows), dim3(kT), 0, stream)(p);
  return launch_error();
}

}  // namespace
}  // namespace sc_loss_impl

const char* sc_loss_forward(const kernels::ScLoss& p, cudaStream_t stream) {
  switch (p.dtype) {
    case kernels::DType::f16: return sc_loss_impl::forward<__half>(p, stream);
    case kernels::DType::bf16: return sc_loss_impl::forward<__nv_bfloat16>(p, stream);
    case kernels::DType::f32: return sc_loss_impl::forward<float>(p, stream);
    case kernels::DType::f64: return sc_loss_impl::forward<double>(p, stream);
  }
  return "sc_loss_forward: unsupported dtype";
}

const char* sc_loss_backward(const kernels::ScLoss& p, cudaStream_t stream) {
  switch (p.dtype) {
    case kernels::DType::f16: return sc_loss_impl::backward<__half>(p, stream);
    case kernels::DType::bf16: return sc_loss_impl::backward<__nv_bfloat16>(p, stream);
    case kernels::DType::f32: return sc_loss_impl::backward<float>(p, stream);
    case kernels::DType::f64: return sc_loss_impl::backward<double>(p, stream);
  }
  return "sc_loss_backward: unsupported dtype";
}

}  // namespace fastcon::FASTCON_KERNEL_NS
