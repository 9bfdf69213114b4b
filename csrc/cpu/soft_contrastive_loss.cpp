// The fused CPU soft contrastive loss, one op per direction (see soft_contrastive_loss.h).
//
// Everything O(N * D) is a loop here, parallel over rows with at::parallel_for; the one N x M pass
// is the tile kernel (cpu::sc_forward / cpu::sc_backward). The target similarity enters only
// through low-rank sums (SPEC section 5), T~ being T off the diagonal:
// - multi-label vectors: sum_j T~_ij x_j = P^T lhat_i with P = sum_j lhat_j x_j^T (C x D), a GEMM
//   per fixed block of feature columns, lifted back by a GEMM per fixed block of rows (tile_gemm:
//   one-threaded MKL or the built-in kernel; these small C x D products are the only BLAS calls
//   besides the tile pass's own, O(N C D) each, in the accumulation dtype as the torch algebra was);
// - scene ids: rows sorted by id (a stable sort, no unique), per-scene sums (float64) run by run;
// - no labels: T~ = 0.
// Positive and target logits of the loss are float64 dots. Determinism: every row's result is
// computed by one task from the same inputs in the same order, and every sum over rows (the
// projections, the loss, the temperature and bias gradients) runs in a fixed order on fixed
// blocks, so the results are bitwise independent of the thread count (the tile kernel is too, see
// soft_contrastive.cpp). Other at:: calls inside are the small conversions named where they
// happen (labels to float64, scene ids to int64, the temperature / bias / grad_out values, a
// contiguous copy of strided inputs): O(N * C) or O(N), or none for contiguous inputs.
#include "cpu/soft_contrastive_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/sc_loss_options.h"
#include "cpu/soft_contrastive.h"
#include "cpu/tile_gemm.h"

namespace fastcon::cpu {
namespace {

constexpr double kEps = 1e-12;        // the norm floor of the spec: u = z / max(||z||, 1e-12)
constexpr int64_t kTaskWork = 1 << 16;  // multiply-adds per parallel task, at least: small batches run
                                        // on the calling thread (no fork, no wait for a descheduled one)
constexpr int64_t kProjCols = 64;       // feature columns per block of the class projections
constexpr int64_t kLiftRows = 64;       // rows per block of their lift back to the rows
constexpr int kMaxSources = 4;

// at::parallel_for's grain for items of `work` multiply-adds each
int64_t grain(int64_t work) { return std::max<int64_t>(1, kTaskWork / std::max<int64_t>(work, 1)); }

enum class Kind { kNone, kLabels, kScene };  // scene_mode="ignore" is kNone here: its ids go to the kernel

// ---- options and value checks ----------------------------------------------------------------

struct Config {
  int mode = kScSoftmax;
  bool need_col = false;  // symmetric softmax without a queue: column losses too
  double hw = 0.0;
  bool normalize = true;
  int reduction = 0;  // 0 mean, 1 sum, 2 none
  bool sigmoid() const { return mode == kScSigmoid; }
  bool ignore() const { return mode == kScSoftmaxIgnore; }
};

Config make_config(const std::string& loss, bool symmetric, double hw, bool normalize, const std::string& reduction,
                   bool scene_ignore, bool has_queue) {
  const sc_loss_options::Options o = sc_loss_options::parse(loss, symmetric, hw, reduction, scene_ignore, has_queue);
  static_assert(kScSoftmax == 0 && kScSoftmaxIgnore == 1 && kScSigmoid == 2, "the modes of sc_loss_options::parse");
  Config c;
  c.mode = o.mode;
  c.need_col = o.need_col;
  c.hw = hw;
  c.normalize = normalize;
  c.reduction = o.reduction;
  return c;
}

// Python's repr of a float (shortest round trip), for messages that match the Python checks
// word for word (its "{:.3g}": sc_loss_options::g3).
std::string repr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), x);
  return std::string(buf, res.ptr);
}

using sc_loss_options::g3;

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return c10::toString(t);
  }
}

// The value checks of fastcon.soft_contrastive_loss (soft_contrastive._check_values), same
// messages; returns 1 / temperature.
double checked_scale(const at::Tensor& temperature, at::ScalarType z_dtype) {
  const double tau = temperature.item<double>();  // a 0-dim CPU tensor: no sync
  TORCH_CHECK_VALUE(std::isfinite(tau), "temperature must be finite, got ", repr(tau));
  TORCH_CHECK_VALUE(tau > 0, "temperature must be > 0, got ", repr(tau));
  const bool f64 = z_dtype == at::kDouble;
  const double low = 1.0 / (f64 ? std::numeric_limits<double>::max() : double(std::numeric_limits<float>::max()));
  TORCH_CHECK_VALUE(tau >= low, "temperature must be >= ", g3(low), " for ", dtype_name(z_dtype),
                    " inputs (its inverse, the logit scale, must be finite in ", f64 ? "torch.float64" : "torch.float32",
                    "), got ", g3(tau));
  return 1.0 / tau;
}

double checked_bias(const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return 0.0;
  const double b = bias->item<double>();
  TORCH_CHECK_VALUE(std::isfinite(b), "bias must be finite, got ", repr(b));
  return b;
}

// ---- targets -----------------------------------------------------------------------------------

// Unit label rows lhat_i = l_i / ||l_i|| (0 for a zero row) in float64, row-major (rows, C); with
// `check`, the label value checks of soft_contrastive.check_label_values (same messages).
std::vector<double> unit_rows(const at::Tensor& labels, const char* name, bool check) {
  const at::Tensor l = labels.to(at::kDouble).contiguous();  // O(rows * C): any dtype and layout
  const double* src = l.const_data_ptr<double>();
  const int64_t rows = l.size(0), c = l.size(1);
  std::vector<double> out(src, src + rows * c);
  if (check) {
    const bool finite = std::all_of(out.begin(), out.end(), [](double x) { return std::isfinite(x); });
    TORCH_CHECK_VALUE(finite, name, " must be finite, got NaN or infinite values");
    const bool nonneg = std::all_of(out.begin(), out.end(), [](double x) { return x >= 0; });
    TORCH_CHECK_VALUE(nonneg, name, " must be >= 0 (multi-hot or class-fraction vectors), got negative values");
  }
  at::parallel_for(0, rows, grain(2 * c), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double* x = out.data() + r * c;
      double s = 0.0;
      for (int64_t k = 0; k < c; ++k) s += x[k] * x[k];
      const double norm = std::sqrt(s);
      for (int64_t k = 0; k < c; ++k) x[k] = norm > 0 ? x[k] / norm : 0.0;
    }
  });
  return out;
}

std::vector<int64_t> int64_ids(const at::Tensor& ids) {
  const at::Tensor l = ids.to(at::kLong).contiguous();  // O(n): any integer dtype and layout
  const int64_t* p = l.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + l.numel());
}

// The target similarity T through T~ (T off the positive diagonal; T~_ii = 1 - off_i).
struct Targets {
  Kind kind = Kind::kNone;
  int64_t n = 0, c = 0;
  std::vector<double> lhat, qhat, off;      // labels: (n, c) and (k, c) unit rows, 1 - |lhat_i|^2
  std::vector<int64_t> ids, order, starts;  // scenes: ids, rows sorted by id, run starts (and n)
  std::vector<int64_t> qids, qorder;        // scenes with a queue: the queue's ids sorted, their rows

  double off_of(int64_t i) const { return kind == Kind::kLabels ? off[i] : (kind == Kind::kNone ? 1.0 : 0.0); }

  // the queue keys [lo, hi) of qorder that share scene `id`
  std::pair<int64_t, int64_t> queue_run(int64_t id) const {
    const auto range = std::equal_range(qids.begin(), qids.end(), id);
    return {range.first - qids.begin(), range.second - qids.begin()};
  }
};

// `scenes`: the forward's scene order (backward), or an undefined / empty tensor (sort here).
Targets make_targets(const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& queue_labels,
                     bool scene_ignore, int64_t n, bool check, const at::Tensor& scenes) {
  Targets t;
  t.n = n;
  if (!labels.has_value() || scene_ignore) return t;
  const bool with_queue = queue_labels.has_value();
  if (labels->dim() == 2) {
    t.kind = Kind::kLabels;
    t.c = labels->size(1);
    t.lhat = unit_rows(*labels, "labels", check);
    if (with_queue) t.qhat = unit_rows(*queue_labels, "queue_labels", check);
    t.off.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      double nn = 0.0;
      for (int64_t k = 0; k < t.c; ++k) nn += t.lhat[i * t.c + k] * t.lhat[i * t.c + k];
      t.off[i] = 1.0 - nn;
    }
    return t;
  }
  t.kind = Kind::kScene;
  t.ids = int64_ids(*labels);
  if (scenes.defined() && scenes.numel() == n) {
    const int64_t* p = scenes.const_data_ptr<int64_t>();
    t.order.assign(p, p + n);
  } else {
    t.order.resize(n);
    std::iota(t.order.begin(), t.order.end(), int64_t(0));
    std::stable_sort(t.order.begin(), t.order.end(), [&](int64_t a, int64_t b) { return t.ids[a] < t.ids[b]; });
  }
  for (int64_t p = 0; p < n; ++p)
    if (p == 0 || t.ids[t.order[p]] != t.ids[t.order[p - 1]]) t.starts.push_back(p);
  t.starts.push_back(n);
  if (with_queue) {
    const std::vector<int64_t> q = int64_ids(*queue_labels);
    t.qorder.resize(q.size());
    std::iota(t.qorder.begin(), t.qorder.end(), int64_t(0));
    std::stable_sort(t.qorder.begin(), t.qorder.end(), [&](int64_t a, int64_t b) { return q[a] < q[b]; });
    t.qids.resize(q.size());
    for (size_t p = 0; p < q.size(); ++p) t.qids[p] = q[t.qorder[p]];
  }
  return t;
}

// R_i = sum_j T_ij over the batch and the queue's columns, in float64.
std::vector<double> target_row_sums(const Targets& t) {
  std::vector<double> r(t.n, 1.0);
  if (t.kind == Kind::kLabels) {
    std::vector<double> s(t.c, 0.0);  // sum_j lhat_j, in row order
    for (int64_t j = 0; j < t.n; ++j)
      for (int64_t c = 0; c < t.c; ++c) s[c] += t.lhat[j * t.c + c];
    for (int64_t q = 0; q < int64_t(t.qhat.size()) / std::max<int64_t>(t.c, 1); ++q)
      for (int64_t c = 0; c < t.c; ++c) s[c] += t.qhat[q * t.c + c];
    for (int64_t i = 0; i < t.n; ++i) {
      double dot = 0.0;
      for (int64_t c = 0; c < t.c; ++c) dot += t.lhat[i * t.c + c] * s[c];
      r[i] = dot + t.off[i];
    }
  } else if (t.kind == Kind::kScene) {
    for (size_t run = 0; run + 1 < t.starts.size(); ++run) {
      const auto [lo, hi] = t.queue_run(t.ids[t.order[t.starts[run]]]);
      const double count = double(t.starts[run + 1] - t.starts[run] + (hi - lo));
      for (int64_t p = t.starts[run]; p < t.starts[run + 1]; ++p) r[t.order[p]] = count;
    }
  }
  return r;
}

// A sum over the columns: sum_j T~_ij w_j x_j over the batch rows x (n, d) with weights w (nullptr:
// 1), plus sum_q T_iq q_q over the queue's rows q (nullptr: no queue part).
template <typename A>
struct Source {
  const A* x = nullptr;
  const double* w = nullptr;
  const A* q = nullptr;
};

// The O(N * D) row loops below in float64: compiled twice, for AVX2 (4 doubles a vector) and for
// the portable baseline (2), picked once at load time (GCC's target_clones, on Linux). AVX2
// without FMA: the same operations in the same order, so both give bitwise the same results (no
// contraction into fused multiply-adds).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)  // ifunc
#define FASTCON_ROW_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define FASTCON_ROW_LOOP
#endif

// a . b accumulated in float64, in 8 interleaved partial sums combined in a fixed order: the
// compiler vectorises it (a single running sum is a serial chain it may not reorder), and the
// result depends on d only, never on threads
template <typename A, typename B>
FASTCON_ROW_LOOP double dot(const A* a, const B* b, int64_t d) {
  double p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= d; k += 8)
    for (int l = 0; l < 8; ++l) p[l] += double(a[k + l]) * double(b[k + l]);
  for (int l = 0; k < d; ++k, ++l) p[l] += double(a[k]) * double(b[k]);
  return ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
}

template <typename A>
FASTCON_ROW_LOOP void axpy(double a, const A* x, double* y, int64_t d) {
  for (int64_t k = 0; k < d; ++k) y[k] += a * double(x[k]);
}

// t -= a s + b x (s nullptr: t -= b x), in float64
template <typename A>
FASTCON_ROW_LOOP void sub(double* t, double a, const A* s, double b, const A* x, int64_t d) {
  if (s) {
    for (int64_t k = 0; k < d; ++k) t[k] -= a * s[k] + b * double(x[k]);
  } else {
    for (int64_t k = 0; k < d; ++k) t[k] -= b * double(x[k]);
  }
}

template <typename A>
FASTCON_ROW_LOOP void widen(const A* x, int64_t d, double* out) {
  for (int64_t k = 0; k < d; ++k) out[k] = double(x[k]);
}

// fn(i, sums, scratch) once for every row i, where sums[s] (d values in A, or nullptr for T~ = 0)
// is src[s]'s sum for row i and scratch is 2 d float64 values of the calling task.
// Multi-label vectors: the projections P_s = sum_j lhat_j (w_j x_j)^T (+ the queue's), C x d, and
// their lift lhat_i . P_s are GEMMs (tile_gemm: one-threaded MKL or the built-in kernel) on fixed
// blocks of feature columns / rows, so that no partial sums depend on the thread count.
template <typename A, typename Fn>
void for_rows_with_sums(const Targets& t, int64_t d, const std::vector<Source<A>>& src, const Fn& fn) {
  const int64_t ns = int64_t(src.size()), n = t.n, c = t.c;
  const A* none[kMaxSources] = {nullptr, nullptr, nullptr, nullptr};
  const int64_t row_work = d * (4 + 2 * ns * (1 + c));  // the caller's row work and the lift
  if (t.kind == Kind::kNone || ns == 0) {
    at::parallel_for(0, n, grain(row_work), [&](int64_t r0, int64_t r1) {
      std::vector<double> scratch(2 * d);
      for (int64_t i = r0; i < r1; ++i) fn(i, none, scratch.data());
    });
    return;
  }
  if (t.kind == Kind::kLabels) {
    const int64_t nq = c > 0 ? int64_t(t.qhat.size()) / c : 0;
    std::vector<A> lh(n * c), lw(ns * n * c), lq(nq * c);  // lhat, w_j lhat_j per source, the queue's
    for (int64_t j = 0; j < n; ++j)
      for (int64_t cc = 0; cc < c; ++cc) {
        const double l = t.lhat[j * c + cc];
        lh[j * c + cc] = A(l);
        for (int64_t s = 0; s < ns; ++s) lw[(s * n + j) * c + cc] = A(src[s].w ? l * src[s].w[j] : l);
      }
    for (int64_t q = 0; q < nq * c; ++q) lq[q] = A(t.qhat[q]);
    std::vector<A> proj(ns * c * d);
    at::parallel_for(0, (d + kProjCols - 1) / kProjCols, grain((n + nq) * c * ns * kProjCols),
                     [&](int64_t b0, int64_t b1) {
                       SingleThreadedBlas one_blas_thread;
                       for (int64_t b = b0; b < b1; ++b) {
                         const int64_t k0 = b * kProjCols, w = std::min(kProjCols, d - k0);
                         for (int64_t s = 0; s < ns; ++s) {
                           A* p = proj.data() + s * c * d + k0;
                           tile_gemm<A>(true, false, c, w, n, A(1), lw.data() + s * n * c, c, src[s].x + k0, d, A(0),
                                        p, d);
                           if (src[s].q && nq > 0)
                             tile_gemm<A>(true, false, c, w, nq, A(1), lq.data(), c, src[s].q + k0, d, A(1), p, d);
                         }
                       }
                     });
    at::parallel_for(0, (n + kLiftRows - 1) / kLiftRows, grain(kLiftRows * row_work), [&](int64_t b0, int64_t b1) {
      SingleThreadedBlas one_blas_thread;
      std::vector<A> buf(ns * kLiftRows * d);
      std::vector<double> scratch(2 * d);
      const A* sums[kMaxSources];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kLiftRows, br = std::min(kLiftRows, n - i0);
        for (int64_t s = 0; s < ns; ++s)
          tile_gemm<A>(false, false, br, d, c, A(1), lh.data() + i0 * c, c, proj.data() + s * c * d, d, A(0),
                       buf.data() + s * kLiftRows * d, d);
        for (int64_t r = 0; r < br; ++r) {
          for (int64_t s = 0; s < ns; ++s) sums[s] = buf.data() + (s * kLiftRows + r) * d;
          fn(i0 + r, sums, scratch.data());
        }
      }
    });
    return;
  }
  // scenes: per-scene sums (float64), one run (scene) at a time, members in sorted order
  const int64_t runs = int64_t(t.starts.size()) - 1;
  at::parallel_for(0, runs, grain(row_work * n / std::max<int64_t>(runs, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<double> buf(ns * d), scratch(2 * d);
    std::vector<A> sbuf(ns * d);
    const A* sums[kMaxSources];
    for (int64_t s = 0; s < ns; ++s) sums[s] = sbuf.data() + s * d;
    for (int64_t run = r0; run < r1; ++run) {
      std::fill(buf.begin(), buf.end(), 0.0);
      for (int64_t p = t.starts[run]; p < t.starts[run + 1]; ++p) {
        const int64_t j = t.order[p];
        for (int64_t s = 0; s < ns; ++s) axpy(src[s].w ? src[s].w[j] : 1.0, src[s].x + j * d, buf.data() + s * d, d);
      }
      const auto [lo, hi] = t.queue_run(t.ids[t.order[t.starts[run]]]);
      for (int64_t p = lo; p < hi; ++p)
        for (int64_t s = 0; s < ns; ++s)
          if (src[s].q) axpy(1.0, src[s].q + t.qorder[p] * d, buf.data() + s * d, d);
      for (int64_t k = 0; k < ns * d; ++k) sbuf[k] = A(buf[k]);
      for (int64_t p = t.starts[run]; p < t.starts[run + 1]; ++p) fn(t.order[p], sums, scratch.data());
    }
  });
}

// ---- embeddings ------------------------------------------------------------------------------

// out = z / norm in A
template <typename In, typename A>
FASTCON_ROW_LOOP void divide_row(const In* z, A norm, int64_t d, A* out) {
  for (int64_t k = 0; k < d; ++k) out[k] = A(z[k]) / norm;
}

// out = z / max(||z||, eps) row by row in A (or z in A without normalisation); the norms are
// taken from norms_in when given (backward), else computed (float64 sums) into norms_out.
template <typename In, typename A>
void unit_embeddings(const In* z, int64_t rows, int64_t d, bool normalize, const A* norms_in, A* norms_out, A* out) {
  at::parallel_for(0, rows, grain(3 * d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const In* zr = z + r * d;
      A* o = out + r * d;
      if (!normalize) {
        for (int64_t k = 0; k < d; ++k) o[k] = A(zr[k]);
        continue;
      }
      A norm;
      if (norms_in) {
        norm = norms_in[r];
      } else {
        const double s = dot(zr, zr, d);
        norm = std::max(A(std::sqrt(s)), A(kEps));  // std::max(NaN, eps) keeps the NaN
        if (norms_out) norms_out[r] = norm;
      }
      divide_row(zr, norm, d, o);
    }
  });
}

// The normalisation's backward of one row: scale (t - u (u . t)) / ||z|| (scale t / eps for a
// norm at the floor; scale t without normalisation), written in the input dtype.
template <typename In, typename A>
FASTCON_ROW_LOOP void norm_backward_row(const double* t, const A* u, const A* norm, double scale, int64_t d, In* out) {
  if (!norm) {
    for (int64_t k = 0; k < d; ++k) out[k] = In(A(scale * t[k]));
    return;
  }
  const double proj = double(*norm) <= kEps ? 0.0 : dot(u, t, d);
  const double factor = scale / double(*norm);
  for (int64_t k = 0; k < d; ++k) out[k] = In(A((t[k] - double(u[k]) * proj) * factor));
}

// The embeddings both directions hand to the kernel: u (n, d) and the columns [v; queue] (m, d)
// in A, unit rows when normalising.
template <typename In, typename A>
struct Embeddings {
  at::Tensor u, cols;
  int64_t n, k, m, d;
  Embeddings(const at::Tensor& z1, const at::Tensor& z2, const std::optional<at::Tensor>& queue, bool normalize,
             A* n1_out, A* n2_out, const A* n1_in, const A* n2_in, at::ScalarType acc) {
    n = z1.size(0), d = z1.size(1), k = queue.has_value() ? queue->size(0) : 0, m = n + k;
    const at::Tensor z1c = z1.contiguous(), z2c = z2.contiguous();  // copies only for strided inputs
    u = at::empty({n, d}, z1.options().dtype(acc));
    cols = at::empty({m, d}, z1.options().dtype(acc));
    unit_embeddings<In, A>(z1c.const_data_ptr<In>(), n, d, normalize, n1_in, n1_out, u.mutable_data_ptr<A>());
    unit_embeddings<In, A>(z2c.const_data_ptr<In>(), n, d, normalize, n2_in, n2_out, cols.mutable_data_ptr<A>());
    if (k > 0) {
      const at::Tensor qc = queue->contiguous();
      unit_embeddings<In, A>(qc.const_data_ptr<In>(), k, d, normalize, nullptr, nullptr,
                             cols.mutable_data_ptr<A>() + n * d);
    }
  }
  const A* up() const { return u.const_data_ptr<A>(); }
  const A* vp() const { return cols.const_data_ptr<A>(); }
  const A* qp() const { return k > 0 ? cols.const_data_ptr<A>() + n * d : nullptr; }
};

// The kernel problem; ids: (n,) row and (m,) column scene ids for scene_mode="ignore".
ScProblem make_problem(int64_t n, int64_t m, int64_t d, const Config& cfg, double scale, double bias,
                       const std::vector<int64_t>& ids) {
  ScProblem p;
  p.n = n, p.m = m, p.d = d;
  p.scale = scale;
  p.bias = bias;
  p.logit_bound = cfg.normalize ? scale : 0.0;  // |s_ij| <= 1 / tau for unit rows
  p.mode = cfg.mode;
  if (cfg.ignore()) p.row_ids = p.col_ids = ids.data();  // the batch's ids, then the queue's
  return p;
}

std::vector<int64_t> kernel_ids(const Config& cfg, const std::optional<at::Tensor>& labels,
                                const std::optional<at::Tensor>& queue_labels) {
  if (!cfg.ignore()) return {};
  std::vector<int64_t> ids = int64_ids(*labels);
  if (queue_labels.has_value()) {
    const std::vector<int64_t> q = int64_ids(*queue_labels);
    ids.insert(ids.end(), q.begin(), q.end());
  }
  return ids;
}

at::ScalarType acc_type(const at::Tensor& z) { return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// ---- forward -----------------------------------------------------------------------------------

using ForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename In, typename A>
ForwardOut forward_impl(const at::Tensor& z1, const at::Tensor& z2, double scale, double bias,
                        const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& queue,
                        const std::optional<at::Tensor>& queue_labels, const Config& cfg, bool scene_ignore) {
  const at::ScalarType acc = acc_type(z1);
  const auto opts = z1.options().dtype(acc);
  const int64_t n = z1.size(0);
  const bool scene_pos = labels.has_value() && labels->dim() == 1 && !scene_ignore;
  Targets t = make_targets(labels, queue_labels, scene_ignore, n, true, at::Tensor());
  at::Tensor n1 = at::empty({cfg.normalize ? n : 0}, opts), n2 = at::empty({cfg.normalize ? n : 0}, opts);
  const Embeddings<In, A> e(z1, z2, queue, cfg.normalize, cfg.normalize ? n1.mutable_data_ptr<A>() : nullptr,
                            cfg.normalize ? n2.mutable_data_ptr<A>() : nullptr, nullptr, nullptr, acc);
  const int64_t d = e.d;
  const std::vector<int64_t> ids = kernel_ids(cfg, labels, queue_labels);
  const ScProblem p = make_problem(n, e.m, d, cfg, scale, bias, ids);
  at::Tensor row = at::empty({n}, opts), col = at::empty({cfg.need_col ? n : 0}, opts);
  sc_forward<A>(e.up(), e.vp(), p, row.mutable_data_ptr<A>(), cfg.need_col ? col.mutable_data_ptr<A>() : nullptr);

  const std::vector<double> r = cfg.ignore() ? std::vector<double>() : target_row_sums(t);
  std::vector<Source<A>> src;
  if (!cfg.ignore()) {
    src.push_back({e.vp(), nullptr, e.qp()});               // sum_j T~_ij v_j: the row targets
    if (cfg.need_col) src.push_back({e.up(), nullptr, nullptr});  // sum_i T~_ij u_i: the column targets
  }
  std::vector<double> per(n);
  const A* rw = row.const_data_ptr<A>();
  const A* cl = cfg.need_col ? col.const_data_ptr<A>() : nullptr;
  const double hw = cfg.hw;
  for_rows_with_sums<A>(t, d, src, [&](int64_t i, const A* const* sums, double*) {
    const A* ui = e.up() + i * d;
    const A* vi = e.vp() + i * d;
    // the positive logit, accumulated in float64 as in the kernel (so that it cancels)
    const double sd = scale * dot(ui, vi, d);
    double a, b = 0.0;
    if (cfg.ignore()) {
      a = double(rw[i]) - sd;
      if (cfg.need_col) b = double(cl[i]) - sd;
    } else {
      const double off = t.off_of(i);
      const double ts = off * sd + (sums[0] ? scale * dot(ui, sums[0], d) : 0.0);  // sum_j T_ij s_ij
      if (cfg.sigmoid()) {
        a = double(rw[i]) - hw * (sd + bias) - (1 - hw) * (ts + bias * r[i]);
      } else {
        a = double(rw[i]) - hw * sd - (1 - hw) * ts / r[i];
        if (cfg.need_col) {  // T is symmetric here: column target sums equal row sums
          const double tsc = off * sd + (sums[1] ? scale * dot(vi, sums[1], d) : 0.0);
          b = double(cl[i]) - hw * sd - (1 - hw) * tsc / r[i];
        }
      }
    }
    per[i] = cfg.need_col ? (a + b) / 2 : a;
  });

  at::Tensor out;
  if (cfg.reduction == 2) {
    out = at::empty({n}, opts);
    A* o = out.mutable_data_ptr<A>();
    for (int64_t i = 0; i < n; ++i) o[i] = A(per[i]);
  } else {
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) total += per[i];
    out = at::scalar_tensor(cfg.reduction == 0 ? total / double(n) : total, opts);
  }
  at::Tensor r_sum = at::empty({cfg.ignore() ? 0 : n}, opts);
  if (!cfg.ignore()) {
    A* rs = r_sum.mutable_data_ptr<A>();
    for (int64_t i = 0; i < n; ++i) rs[i] = A(r[i]);
  }
  at::Tensor scenes = at::empty({scene_pos ? n : 0}, z1.options().dtype(at::kLong));
  if (scene_pos) std::copy(t.order.begin(), t.order.end(), scenes.mutable_data_ptr<int64_t>());
  return {out, row, col, r_sum, n1, n2, scenes};
}

// ---- backward ----------------------------------------------------------------------------------

using BackwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename In, typename A>
BackwardOut backward_impl(const at::Tensor& grad_out, const at::Tensor& z1, const at::Tensor& z2,
                          const at::Tensor& temperature, const std::optional<at::Tensor>& bias_t, double scale,
                          double bias, const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& queue,
                          const std::optional<at::Tensor>& queue_labels, const at::Tensor& row_stat,
                          const at::Tensor& col_stat, const at::Tensor& r_sum, const at::Tensor& n1,
                          const at::Tensor& n2, const at::Tensor& scenes, const Config& cfg, bool scene_ignore,
                          const bool needs[4]) {
  const at::ScalarType acc = acc_type(z1);
  const int64_t n = z1.size(0);
  Targets t = make_targets(labels, queue_labels, scene_ignore, n, false, scenes);
  const A* n1p = cfg.normalize ? n1.const_data_ptr<A>() : nullptr;
  const A* n2p = cfg.normalize ? n2.const_data_ptr<A>() : nullptr;
  const Embeddings<In, A> e(z1, z2, queue, cfg.normalize, nullptr, nullptr, n1p, n2p, acc);
  const int64_t d = e.d, m = e.m;

  // upstream weights of the per-sample losses, halved for the symmetric softmax's two halves
  const at::Tensor go = grad_out.to(at::kDouble).contiguous();  // O(n) at most
  const double* gop = go.const_data_ptr<double>();
  std::vector<A> g(n);
  for (int64_t i = 0; i < n; ++i) {
    const double w = cfg.reduction == 2 ? gop[i] : (cfg.reduction == 0 ? A(gop[0] / double(n)) : gop[0]);
    g[i] = A(cfg.need_col ? A(w) / 2 : w);
  }
  const A* h = cfg.need_col ? g.data() : nullptr;

  // the kernel's W v and W^T u, written into the gradient buffers when their dtype is A
  const bool direct1 = std::is_same_v<In, A> && needs[0];
  const bool direct2 = std::is_same_v<In, A> && needs[1] && e.k == 0;
  at::Tensor d_z1 = needs[0] ? at::empty({n, d}, z1.options()) : z1.new_empty({0});
  at::Tensor d_z2 = needs[1] ? at::empty({n, d}, z2.options()) : z2.new_empty({0});
  at::Tensor gu_buf = direct1 ? d_z1 : at::empty({n, d}, z1.options().dtype(acc));
  at::Tensor gv_buf = direct2 ? d_z2 : at::empty({m, d}, z1.options().dtype(acc));
  at::Tensor wsum_t = at::empty({n}, z1.options().dtype(acc));
  A* gu = gu_buf.mutable_data_ptr<A>();
  A* gv = gv_buf.mutable_data_ptr<A>();
  A* wsum = wsum_t.mutable_data_ptr<A>();
  const std::vector<int64_t> ids = kernel_ids(cfg, labels, queue_labels);
  const ScProblem p = make_problem(n, m, d, cfg, scale, bias, ids);
  sc_backward<A>(e.up(), e.vp(), p, row_stat.const_data_ptr<A>(), cfg.need_col ? col_stat.const_data_ptr<A>() : nullptr,
                 g.data(), h, gu, gv, wsum);

  // the target part of G = dL/ds, subtracted row by row, then the normalisation's backward
  const A* rs = cfg.ignore() ? nullptr : r_sum.const_data_ptr<A>();
  const double hw = cfg.hw;
  std::vector<double> wu(n), wv(h ? n : 0);  // g_j / R_j (softmax) or g_j (sigmoid); h_j / R_j
  for (int64_t i = 0; i < n && !cfg.ignore(); ++i) {
    wu[i] = cfg.sigmoid() ? double(g[i]) : double(g[i]) / double(rs[i]);
    if (h) wv[i] = double(h[i]) / double(rs[i]);
  }
  std::vector<Source<A>> src;
  if (!cfg.ignore()) {
    src.push_back({e.vp(), nullptr, e.qp()});   // sum_j T~_ij v_j (and the queue's)
    src.push_back({e.up(), wu.data(), nullptr});  // sum_i T~_ij wu_i u_i
    if (h) {
      src.push_back({e.vp(), wv.data(), nullptr});  // sum_j T~_ij (h_j / R_j) v_j
      src.push_back({e.up(), nullptr, nullptr});    // sum_i T~_ij u_i
    }
  }
  std::vector<double> pu(n);  // u_i . GU_i: the temperature gradient's rows
  In* o1 = needs[0] ? d_z1.mutable_data_ptr<In>() : nullptr;
  In* o2 = needs[1] ? d_z2.mutable_data_ptr<In>() : nullptr;
  for_rows_with_sums<A>(t, d, src, [&](int64_t i, const A* const* sums, double* scratch) {
    const A* ui = e.up() + i * d;
    const A* vi = e.vp() + i * d;
    double* tu = scratch;
    double* tv = scratch + d;
    widen(gu + i * d, d, tu);
    widen(gv + i * d, d, tv);
    const double gi = double(g[i]), hi = h ? double(h[i]) : 0.0;
    if (cfg.ignore()) {  // the target is the positive alone
      sub<A>(tu, 0.0, nullptr, gi + hi, vi, d);
      sub<A>(tv, 0.0, nullptr, gi + hi, ui, d);
    } else {
      const double off = t.off_of(i);
      // GU_i -= g_i sum_j P'_ij v_j ; GV_i -= sum_j g_j P'_ji u_j  (sigmoid: T' for P', R = 1); the
      // soft part is left out for hard_weight 1 (not multiplied by 0: a NaN there stays out)
      const bool soft = hw != 1;
      const double a = (1 - hw) * (cfg.sigmoid() ? gi : gi / double(rs[i]));
      sub(tu, a, soft ? sums[0] : nullptr, (soft ? a * off : 0.0) + hw * gi, vi, d);
      sub(tv, 1 - hw, soft ? sums[1] : nullptr, (soft ? (1 - hw) * off * wu[i] : 0.0) + hw * gi, ui, d);
      if (h) {  // the column half: - sum_j h_j Q'_ij v_j and - h_i sum_j Q'_ji u_j (C_j = R_j)
        const double b = (1 - hw) * hi / double(rs[i]);
        sub(tu, 1 - hw, soft ? sums[2] : nullptr, (soft ? (1 - hw) * off * wv[i] : 0.0) + hw * hi, vi, d);
        sub(tv, b, soft ? sums[3] : nullptr, (soft ? b * off : 0.0) + hw * hi, ui, d);
      }
    }
    pu[i] = dot(ui, tu, d);
    if (o1) norm_backward_row<In, A>(tu, ui, n1p ? n1p + i : nullptr, scale, d, o1 + i * d);
    if (o2) norm_backward_row<In, A>(tv, vi, n2p ? n2p + i : nullptr, scale, d, o2 + i * d);
  });

  at::Tensor d_tau = z1.new_empty({0}), d_bias = z1.new_empty({0});  // (0,): not wanted
  if (needs[2]) {  // dL/dtau = -scale^2 sum_ij G_ij (u_i . v_j) = -scale^2 sum_i u_i . GU_i
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += pu[i];
    d_tau = at::scalar_tensor(-scale * scale * s, temperature.options());
  }
  if (needs[3] && bias_t.has_value()) {  // dL/dbias = sum_ij G_ij = sum_i W 1 - g_i (hw + (1 - hw) R_i)
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += double(wsum[i]) - double(g[i]) * (hw + (1 - hw) * double(rs[i]));
    d_bias = at::scalar_tensor(s, bias_t->options());
  }
  return {d_z1, d_z2, d_tau, d_bias};
}

}  // namespace

ForwardOut sc_loss_forward(const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& temperature,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& labels,
                           const std::optional<at::Tensor>& queue, const std::optional<at::Tensor>& queue_labels,
                           const std::string& loss, bool symmetric, double hard_weight, bool normalize,
                           const std::string& reduction, bool scene_ignore) {
  const Config cfg = make_config(loss, symmetric, hard_weight, normalize, reduction, scene_ignore, queue.has_value());
  const double scale = checked_scale(temperature, z1.scalar_type());
  const double b = checked_bias(bias);
  ForwardOut out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z1.scalar_type(), "sc_loss_forward", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = forward_impl<scalar_t, A>(z1, z2, scale, b, labels, queue, queue_labels, cfg, scene_ignore);
  });
  return out;
}

BackwardOut sc_loss_backward(const at::Tensor& grad_out, const at::Tensor& z1, const at::Tensor& z2,
                             const at::Tensor& temperature, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& queue,
                             const std::optional<at::Tensor>& queue_labels, const at::Tensor& row,
                             const at::Tensor& col, const at::Tensor& r_sum, const at::Tensor& n1,
                             const at::Tensor& n2, const at::Tensor& scenes, const std::string& loss, bool symmetric,
                             double hard_weight, bool normalize, const std::string& reduction, bool scene_ignore,
                             bool need_z1, bool need_z2, bool need_temperature, bool need_bias) {
  const Config cfg = make_config(loss, symmetric, hard_weight, normalize, reduction, scene_ignore, queue.has_value());
  const double scale = 1.0 / temperature.item<double>();  // checked by the forward
  const double b = bias.has_value() ? bias->item<double>() : 0.0;
  const bool needs[4] = {need_z1, need_z2, need_temperature, need_bias};
  BackwardOut out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z1.scalar_type(), "sc_loss_backward", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = backward_impl<scalar_t, A>(grad_out, z1, z2, temperature, bias, scale, b, labels, queue, queue_labels, row,
                                     col, r_sum, n1, n2, scenes, cfg, scene_ignore, needs);
  });
  return out;
}

}  // namespace fastcon::cpu
