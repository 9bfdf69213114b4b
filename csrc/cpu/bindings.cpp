// The CPU backend's one binding file: argument checks, output allocation and registration of
// the csrc/cpu kernels with the fastcon operator library. Kernels themselves take raw pointers.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "cpu/simd.h"
#include "cpu/soft_contrastive.h"
#include "cpu/soft_contrastive_loss.h"

namespace fastcon {

std::string cpu_capability() { return cpu::isa_name(cpu::active_isa()); }

}  // namespace fastcon

// ---- soft contrastive loss --------------------------------------------------------------

namespace fastcon {
namespace {

void sc_check_matrix(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastcon::sc (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastcon::sc (cpu): ", name,
                   " must be float32 or float64 (upcast fp16 / bf16 first), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, "fastcon::sc (cpu): ", name, " must be 2-D (rows, d), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "fastcon::sc (cpu): ", name, " must be contiguous");
}

// a 1-D contiguous vector of `len` entries of dtype `dtype` on the CPU
void sc_check_vector(const char* name, const at::Tensor& t, int64_t len, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastcon::sc (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "fastcon::sc (cpu): ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == len, "fastcon::sc (cpu): ", name, " must have shape (", len,
                    ",), got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "fastcon::sc (cpu): ", name, " must be contiguous");
}

// A 0-dim float64 scalar argument (scale, bias) on the CPU: read here (on the CPU, reading a
// value costs no synchronisation; the GPU kernels read theirs on the device).
double sc_scalar(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastcon::sc (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, "fastcon::sc (cpu): ", name, " must be float64, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 0, "fastcon::sc (cpu): ", name, " must be a 0-dim tensor, got shape ", t.sizes());
  return *t.const_data_ptr<double>();
}

cpu::ScProblem sc_problem(const at::Tensor& u, const at::Tensor& v, const std::optional<at::Tensor>& row_ids,
                          const std::optional<at::Tensor>& col_ids, int64_t row_offset, const at::Tensor& scale_t,
                          const std::optional<at::Tensor>& bias_t, bool bounded, int64_t mode) {
  const double scale = sc_scalar("scale", scale_t);
  const double bias = bias_t.has_value() ? sc_scalar("bias", *bias_t) : 0.0;
  const double logit_bound = bounded ? scale : 0.0;  // |s_ij| <= scale for unit rows
  sc_check_matrix("u", u);
  sc_check_matrix("v", v);
  TORCH_CHECK_TYPE(v.scalar_type() == u.scalar_type(), "fastcon::sc (cpu): v must have u's dtype ",
                   u.scalar_type(), ", got ", v.scalar_type());
  TORCH_CHECK_VALUE(v.size(1) == u.size(1), "fastcon::sc (cpu): u and v must have the same number of features, got ",
                    u.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "fastcon::sc (cpu): mode must be 0 (softmax), 1 (softmax, same-id ",
                    "pairs masked) or 2 (sigmoid), got ", mode);
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::isfinite(bias) && std::isfinite(logit_bound),
                    "fastcon::sc (cpu): scale, bias and logit_bound must be finite");
  cpu::ScProblem p;
  p.n = u.size(0);
  p.m = v.size(0);
  p.d = u.size(1);
  p.row_offset = row_offset;
  p.scale = scale;
  p.bias = bias;
  p.logit_bound = logit_bound;
  p.mode = int(mode);
  if (mode == cpu::kScSoftmaxIgnore) {
    TORCH_CHECK_VALUE(row_ids.has_value() && col_ids.has_value(),
                      "fastcon::sc (cpu): mode 1 (same-id pairs masked) needs row_ids and col_ids");
    sc_check_vector("row_ids", *row_ids, p.n, at::kLong);
    sc_check_vector("col_ids", *col_ids, p.m, at::kLong);
    p.row_ids = row_ids->data_ptr<int64_t>();
    p.col_ids = col_ids->data_ptr<int64_t>();
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor> sc_forward_cpu(const at::Tensor& u, const at::Tensor& v,
                                                  const std::optional<at::Tensor>& row_ids,
                                                  const std::optional<at::Tensor>& col_ids, int64_t row_offset,
                                                  const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                                                  bool bounded, int64_t mode, bool need_col) {
  const cpu::ScProblem p = sc_problem(u, v, row_ids, col_ids, row_offset, scale, bias, bounded, mode);
  const bool with_col = need_col && mode != cpu::kScSigmoid;
  at::Tensor row = at::empty({p.n}, u.options());
  at::Tensor col = at::empty({with_col ? p.m : 0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "sc_forward_cpu", [&] {
    cpu::sc_forward<scalar_t>(u.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), p, row.data_ptr<scalar_t>(),
                              with_col ? col.data_ptr<scalar_t>() : nullptr);
  });
  return {row, col};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sc_backward_cpu(
    const at::Tensor& u, const at::Tensor& v, const std::optional<at::Tensor>& row_ids,
    const std::optional<at::Tensor>& col_ids, int64_t row_offset, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, bool bounded, int64_t mode, const at::Tensor& row_stat,
    const std::optional<at::Tensor>& col_stat, const at::Tensor& row_weight,
    const std::optional<at::Tensor>& col_weight) {
  const cpu::ScProblem p = sc_problem(u, v, row_ids, col_ids, row_offset, scale, bias, bounded, mode);
  const auto acc = u.scalar_type();
  sc_check_vector("row_stat", row_stat, p.n, acc);
  sc_check_vector("row_weight", row_weight, p.n, acc);
  const bool with_h = col_weight.has_value() && mode != cpu::kScSigmoid;
  if (with_h) {
    TORCH_CHECK_VALUE(col_stat.has_value(), "fastcon::sc (cpu): col_weight needs col_stat (the column log-sum-exps)");
    sc_check_vector("col_stat", *col_stat, p.m, acc);
    sc_check_vector("col_weight", *col_weight, p.m, acc);
  }
  at::Tensor grad_u = at::empty({p.n, p.d}, u.options());
  at::Tensor grad_v = at::empty({p.m, p.d}, u.options());
  at::Tensor row_wsum = at::empty({p.n}, u.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "sc_backward_cpu", [&] {
    cpu::sc_backward<scalar_t>(u.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), p, row_stat.data_ptr<scalar_t>(),
                               with_h ? col_stat->data_ptr<scalar_t>() : nullptr, row_weight.data_ptr<scalar_t>(),
                               with_h ? col_weight->data_ptr<scalar_t>() : nullptr, grad_u.data_ptr<scalar_t>(),
                               grad_v.data_ptr<scalar_t>(), row_wsum.data_ptr<scalar_t>());
  });
  return {grad_u, grad_v, row_wsum};
}

// the fused loss ops: type and shape checks here (fastcon.soft_contrastive_loss makes them first,
// with its own messages), value checks inside (cpu/soft_contrastive_loss.cpp)
void sc_loss_check_inputs(const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& temperature,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& labels,
                          const std::optional<at::Tensor>& queue, const std::optional<at::Tensor>& queue_labels) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"z1", &z1}, {"z2", &z2}}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "fastcon::sc_loss (cpu): ", name, " must be a CPU tensor");
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "fastcon::sc_loss (cpu): ", name,
                     " must be floating point, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) > 0 && t->size(1) > 0, "fastcon::sc_loss (cpu): ", name,
                      " must be a non-empty (N, D) matrix, got shape ", t->sizes());
  }
  TORCH_CHECK_TYPE(z2.scalar_type() == z1.scalar_type(), "fastcon::sc_loss (cpu): z2 must have z1's dtype");
  TORCH_CHECK_VALUE(z2.sizes() == z1.sizes(), "fastcon::sc_loss (cpu): z2 must have z1's shape ", z1.sizes());
  TORCH_CHECK_VALUE(temperature.dim() == 0, "fastcon::sc_loss (cpu): temperature must be a 0-dim tensor");
  TORCH_CHECK_VALUE(!bias.has_value() || bias->dim() == 0, "fastcon::sc_loss (cpu): bias must be a 0-dim tensor");
  const int64_t n = z1.size(0);
  if (labels.has_value()) {
    TORCH_CHECK_VALUE((labels->dim() == 1 || labels->dim() == 2) && labels->size(0) == n,
                      "fastcon::sc_loss (cpu): labels must be (N,) scene ids or (N, C) vectors, got shape ",
                      labels->sizes());
  }
  TORCH_CHECK_VALUE(queue_labels.has_value() <= queue.has_value(), "fastcon::sc_loss (cpu): queue_labels needs queue");
  if (queue.has_value()) {
    TORCH_CHECK_VALUE(queue->dim() == 2 && queue->size(1) == z1.size(1) && queue->scalar_type() == z1.scalar_type(),
                      "fastcon::sc_loss (cpu): queue must be (K, D) in z1's dtype, got shape ", queue->sizes());
    TORCH_CHECK_VALUE(labels.has_value() == queue_labels.has_value(),
                      "fastcon::sc_loss (cpu): queue_labels must be given exactly when labels are");
    if (queue_labels.has_value()) {
      TORCH_CHECK_VALUE(queue_labels->dim() == labels->dim() && queue_labels->size(0) == queue->size(0) &&
                            (labels->dim() == 1 || queue_labels->size(1) == labels->size(1)),
                        "fastcon::sc_loss (cpu): queue_labels must be labels' kind with K rows, got shape ",
                        queue_labels->sizes());
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sc_loss_forward_cpu(
    const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& temperature, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& queue,
    const std::optional<at::Tensor>& queue_labels, std::string loss, bool symmetric, double hard_weight,
    bool normalize, std::string reduction, bool scene_ignore) {
  sc_loss_check_inputs(z1, z2, temperature, bias, labels, queue, queue_labels);
  TORCH_CHECK_VALUE(!scene_ignore || (labels.has_value() && labels->dim() == 1),
                    "fastcon::sc_loss (cpu): scene_ignore needs (N,) scene ids");
  return cpu::sc_loss_forward(z1, z2, temperature, bias, labels, queue, queue_labels, loss, symmetric, hard_weight,
                              normalize, reduction, scene_ignore);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sc_loss_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& temperature,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& queue, const std::optional<at::Tensor>& queue_labels, const at::Tensor& row_stat,
    const at::Tensor& col_stat, const at::Tensor& target_sum, const at::Tensor& norm1, const at::Tensor& norm2,
    const at::Tensor& scene_order, std::string loss, bool symmetric, double hard_weight, bool normalize,
    std::string reduction, bool scene_ignore, bool need_z1, bool need_z2, bool need_temperature, bool need_bias) {
  sc_loss_check_inputs(z1, z2, temperature, bias, labels, queue, queue_labels);
  const int64_t n = z1.size(0);
  const auto acc = z1.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool need_col = loss == "softmax" && symmetric && !queue.has_value();
  TORCH_CHECK_VALUE(grad_out.numel() == (reduction == "none" ? n : 1),
                    "fastcon::sc_loss (cpu): grad_out must have one entry per loss value, got shape ", grad_out.sizes());
  sc_check_vector("row_stat", row_stat, n, acc);
  sc_check_vector("col_stat", col_stat, need_col ? n : 0, acc);
  sc_check_vector("target_sum", target_sum, scene_ignore ? 0 : n, acc);
  sc_check_vector("norm1", norm1, normalize ? n : 0, acc);
  sc_check_vector("norm2", norm2, normalize ? n : 0, acc);
  const bool scene_pos = labels.has_value() && labels->dim() == 1 && !scene_ignore;
  sc_check_vector("scene_order", scene_order, scene_pos ? n : 0, at::kLong);
  return cpu::sc_loss_backward(grad_out, z1, z2, temperature, bias, labels, queue, queue_labels, row_stat, col_stat,
                               target_sum, norm1, norm2, scene_order, loss, symmetric, hard_weight, normalize,
                               reduction, scene_ignore, need_z1, need_z2, need_temperature, need_bias);
}

}  // namespace
}  // namespace fastcon

TORCH_LIBRARY_IMPL(fastcon, CPU, m) {
  m.impl("sc_forward", &fastcon::sc_forward_cpu);
  m.impl("sc_backward", &fastcon::sc_backward_cpu);
  m.impl("sc_loss_forward", &fastcon::sc_loss_forward_cpu);
  m.impl("sc_loss_backward", &fastcon::sc_loss_backward_cpu);
}


// ---- Siamese masking ------------------------------------------------------------------------

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <limits>
#include <optional>

#include "cpu/masking.h"

namespace fastcon::masking_cpu {

// The public API (fastcon/masking.py) checks everything with messages that name the argument;
// these checks keep direct torch.ops calls memory safe.
void check_rows(const at::Tensor& x, const char* name, int64_t dims) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == dims, name, " must be ", dims, "-D, got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, " must be floating point, got ", x.scalar_type());
}

// ids_keep (B, K) int64, rows strictly increasing in [0, L). Returns a contiguous copy or view.
at::Tensor checked_ids(const at::Tensor& ids_keep, int64_t B, int64_t L) {
  TORCH_CHECK(ids_keep.device().is_cpu(), "ids_keep must be a CPU tensor");
  TORCH_CHECK(ids_keep.scalar_type() == at::kLong, "ids_keep must be int64, got ", ids_keep.scalar_type());
  TORCH_CHECK(ids_keep.dim() == 2 && ids_keep.size(0) == B, "ids_keep must have shape (", B, ", K), got ",
              ids_keep.sizes());
  TORCH_CHECK(L <= std::numeric_limits<int32_t>::max(), "L must be < 2^31, got ", L);
  TORCH_CHECK(ids_keep.size(1) >= 1 && ids_keep.size(1) <= L, "ids_keep must have 1 <= K <= L = ", L, ", got K = ",
              ids_keep.size(1));
  at::Tensor ids = ids_keep.contiguous();
  const int64_t* p = ids.const_data_ptr<int64_t>();
  const int64_t K = ids.size(1);
  for (int64_t b = 0; b < B; ++b) {
    int64_t prev = -1;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t v = p[b * K + k];
      TORCH_CHECK(v > prev && v < L, "ids_keep rows must be strictly increasing in [0, ", L, "), row ", b,
                  " is not");
      prev = v;
    }
  }
  return ids;
}

at::Tensor mask_gather(const at::Tensor& tokens, const at::Tensor& ids_keep,
                       const std::optional<at::Tensor>& pos_embed) {
  check_rows(tokens, "tokens", 3);
  const int64_t B = tokens.size(0), L = tokens.size(1), D = tokens.size(2);
  const at::Tensor ids = checked_ids(ids_keep, B, L);
  const int64_t K = ids.size(1);
  // Any batch / row strides are fine; only D must be unit-stride (e.g. x[:, 1:] needs no copy).
  const at::Tensor tok = tokens.stride(2) == 1 ? tokens : tokens.contiguous();
  at::Tensor pos;
  if (pos_embed.has_value()) {
    pos = *pos_embed;
    check_rows(pos, "pos_embed", 3);
    TORCH_CHECK(pos.scalar_type() == tok.scalar_type(), "pos_embed must have tokens' dtype");
    TORCH_CHECK((pos.size(0) == 1 || pos.size(0) == B) && pos.size(1) == L && pos.size(2) == D,
                "pos_embed must have shape (1 or B, L, D)");
    if (pos.stride(2) != 1) pos = pos.contiguous();
  }
  at::Tensor visible = at::empty({B, K, D}, tok.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tok.scalar_type(), "mask_gather", [&] {
    cpu::mask_gather<scalar_t>(tok.const_data_ptr<scalar_t>(), tok.stride(0), tok.stride(1),
                               pos.defined() ? pos.const_data_ptr<scalar_t>() : nullptr,
                               pos.defined() && pos.size(0) > 1 ? pos.stride(0) : 0, pos.defined() ? pos.stride(1) : 0,
                               ids.const_data_ptr<int64_t>(), visible.mutable_data_ptr<scalar_t>(), B, L, K, D);
  });
  return visible;
}

std::tuple<at::Tensor, at::Tensor> mask_gather_backward(const at::Tensor& grad_visible, const at::Tensor& ids_keep,
                                                        int64_t L, bool need_tokens, int64_t pos_batch) {
  check_rows(grad_visible, "grad_visible", 3);
  const at::Tensor gv = grad_visible.contiguous();
  const int64_t B = gv.size(0), K = gv.size(1), D = gv.size(2);
  const at::Tensor ids = checked_ids(ids_keep, B, L);
  TORCH_CHECK(ids.size(1) == K, "ids_keep must have grad_visible's K = ", K, " columns");
  TORCH_CHECK(pos_batch == 0 || pos_batch == 1 || pos_batch == B, "pos_batch must be 0, 1 or B = ", B);
  at::Tensor grad_tokens = need_tokens ? at::empty({B, L, D}, gv.options()) : at::empty({0}, gv.options());
  at::Tensor grad_pos = pos_batch > 0 ? at::empty({pos_batch, L, D}, gv.options()) : at::empty({0}, gv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gv.scalar_type(), "mask_gather_backward", [&] {
    cpu::mask_gather_backward<scalar_t>(
        gv.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
        need_tokens ? grad_tokens.mutable_data_ptr<scalar_t>() : nullptr,
        pos_batch > 0 ? grad_pos.mutable_data_ptr<scalar_t>() : nullptr, pos_batch, B, L, K, D);
  });
  return {grad_tokens, grad_pos};
}

at::Tensor mask_unmask(const at::Tensor& visible, const at::Tensor& ids_keep, int64_t L, const at::Tensor& fill) {
  check_rows(visible, "visible", 3);
  const at::Tensor vis = visible.contiguous();
  const int64_t B = vis.size(0), K = vis.size(1), D = vis.size(2);
  const at::Tensor ids = checked_ids(ids_keep, B, L);
  TORCH_CHECK(ids.size(1) == K, "ids_keep must have visible's K = ", K, " columns");
  TORCH_CHECK(fill.device().is_cpu() && fill.scalar_type() == vis.scalar_type() && fill.dim() == 1 &&
                  fill.size(0) == D,
              "fill must be a (D,) CPU tensor of visible's dtype");
  const at::Tensor fil = fill.contiguous();
  at::Tensor out = at::empty({B, L, D}, vis.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vis.scalar_type(), "mask_unmask", [&] {
    cpu::mask_unmask<scalar_t>(vis.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
                               fil.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), B, L, K, D);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mask_unmask_backward(const at::Tensor& grad_out, const at::Tensor& ids_keep,
                                                        bool need_fill) {
  check_rows(grad_out, "grad_out", 3);
  const at::Tensor go = grad_out.contiguous();
  const int64_t B = go.size(0), L = go.size(1), D = go.size(2);
  const at::Tensor ids = checked_ids(ids_keep, B, L);
  const int64_t K = ids.size(1);
  const auto acc = go.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_visible = at::empty({B, K, D}, go.options());
  at::Tensor grad_fill = at::empty({need_fill ? D : 0}, go.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "mask_unmask_backward", [&] {
    cpu::mask_unmask_backward<scalar_t>(go.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
                                        grad_visible.mutable_data_ptr<scalar_t>(),
                                        need_fill ? grad_fill.mutable_data_ptr<cpu::MaskAcc<scalar_t>>() : nullptr,
                                        B, L, K, D);
  });
  return {grad_visible, grad_fill};
}

at::Tensor mask_image(const at::Tensor& images, int64_t patch, const at::Tensor& ids_keep) {
  check_rows(images, "images", 4);
  const at::Tensor img = images.contiguous();
  const int64_t B = img.size(0), C = img.size(1), H = img.size(2), W = img.size(3);
  TORCH_CHECK(patch >= 1 && H % patch == 0 && W % patch == 0, "patch must divide H = ", H, " and W = ", W);
  const at::Tensor ids = checked_ids(ids_keep, B, (H / patch) * (W / patch));
  at::Tensor out = at::empty_like(img);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, img.scalar_type(), "mask_image", [&] {
    cpu::mask_image<scalar_t>(img.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
                              out.mutable_data_ptr<scalar_t>(), B, C, H, W, patch, ids.size(1));
  });
  return out;
}

}  // namespace fastcon::masking_cpu

TORCH_LIBRARY_IMPL(fastcon, CPU, m) {
  m.impl("mask_gather", &fastcon::masking_cpu::mask_gather);
  m.impl("mask_gather_backward", &fastcon::masking_cpu::mask_gather_backward);
  m.impl("mask_unmask", &fastcon::masking_cpu::mask_unmask);
  m.impl("mask_unmask_backward", &fastcon::masking_cpu::mask_unmask_backward);
  m.impl("mask_image", &fastcon::masking_cpu::mask_image);
}

// ---- diffusion --------------------------------------------------------------------------------
// Checks, output allocation and registration of csrc/cpu/diffusion.*; the kernels take contiguous
// (batch, per_sample) views, per-sample coefficients and the seed as a 64-bit unsigned key.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "cpu/diffusion.h"

namespace fastcon::diffusion_cpu {

namespace dk = fastcon::cpu::diffusion;

static dk::Dtype storage_dtype(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return dk::Dtype::kFloat32;
    case at::kHalf: return dk::Dtype::kFloat16;
    case at::kBFloat16: return dk::Dtype::kBFloat16;
    case at::kDouble: return dk::Dtype::kFloat64;
    default: TORCH_CHECK(false, name, " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  }
}

static at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The batch of x0 with coefficients and noise checked against it.
static dk::Batch make_batch(const at::Tensor& x0, const at::Tensor& coef_x0, const at::Tensor& coef_noise,
                            const std::optional<at::Tensor>& noise, int64_t seed) {
  TORCH_CHECK(x0.device().is_cpu(), "x0 must be a CPU tensor");
  TORCH_CHECK(x0.dim() >= 1 && x0.size(0) >= 1, "x0 must be (B, ...) with B >= 1, got ", x0.sizes());
  TORCH_CHECK(x0.is_contiguous(), "x0 must be contiguous");
  const int64_t b = x0.size(0);
  for (const auto* c : {&coef_x0, &coef_noise}) {
    TORCH_CHECK(c->device().is_cpu() && c->dim() == 1 && c->size(0) == b && c->scalar_type() == acc_dtype(x0) &&
                    c->is_contiguous(),
                "coefficients must be contiguous (B,) = (", b, ",) CPU tensors of dtype ", acc_dtype(x0),
                ", got ", c->sizes(), " ", c->scalar_type());
  }
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == x0.sizes() && noise->scalar_type() == x0.scalar_type() &&
                    noise->device().is_cpu() && noise->is_contiguous(),
                "noise must be a contiguous CPU tensor of x0's shape and dtype");
  }
  dk::Batch batch;
  batch.dtype = storage_dtype(x0, "x0");
  batch.batch = b;
  batch.per_sample = x0.numel() / b;
  batch.x0 = x0.data_ptr();
  batch.noise = noise.has_value() ? noise->data_ptr() : nullptr;
  batch.coef_x0 = coef_x0.data_ptr();
  batch.coef_noise = coef_noise.data_ptr();
  batch.seed = static_cast<uint64_t>(seed);  // the schema's int64 carries the 64-bit key
  batch.num_threads = at::get_num_threads();
  return batch;
}

static dk::Target target_of(int64_t target) {
  TORCH_CHECK(target >= 0 && target <= 2, "target must be 0 (epsilon), 1 (x0) or 2 (v), got ", target);
  return static_cast<dk::Target>(target);
}

static void check_like(const at::Tensor& x, const char* name, const at::Tensor& x0) {
  TORCH_CHECK(x.sizes() == x0.sizes() && x.scalar_type() == x0.scalar_type() && x.device().is_cpu() &&
                  x.is_contiguous(),
              name, " must be a contiguous CPU tensor of x0's shape and dtype");
}

at::Tensor philox_uint32(const at::Tensor& counter, int64_t seed) {
  TORCH_CHECK(counter.device().is_cpu() && counter.scalar_type() == at::kLong && counter.dim() >= 1 &&
                  counter.size(-1) == 4,
              "counter must be a CPU int64 tensor (..., 4) of 32-bit words");
  const at::Tensor c = counter.contiguous();
  at::Tensor out = at::empty_like(c);
  dk::philox_words(c.data_ptr<int64_t>(), c.numel() / 4, static_cast<uint64_t>(seed), out.data_ptr<int64_t>(),
                   at::get_num_threads());
  return out;
}

at::Tensor philox_normal(const at::Tensor& index, int64_t seed) {
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong, "index must be a CPU int64 tensor");
  const at::Tensor i = index.contiguous();
  at::Tensor out = at::empty(i.sizes(), i.options().dtype(at::kFloat));
  dk::philox_normal(i.data_ptr<int64_t>(), i.numel(), static_cast<uint64_t>(seed), out.data_ptr<float>(),
                    at::get_num_threads());
  return out;
}

at::Tensor q_sample(const at::Tensor& x0, const at::Tensor& coef_x0, const at::Tensor& coef_noise,
                    const std::optional<at::Tensor>& noise, int64_t seed) {
  const dk::Batch batch = make_batch(x0, coef_x0, coef_noise, noise, seed);
  at::Tensor out = at::empty_like(x0);
  dk::q_sample(batch, out.data_ptr());
  return out;
}

at::Tensor loss(const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& coef_x0,
                const at::Tensor& coef_noise, const std::optional<at::Tensor>& noise, int64_t seed, int64_t target) {
  const dk::Batch batch = make_batch(x0, coef_x0, coef_noise, noise, seed);
  check_like(pred, "pred", x0);
  at::Tensor sse = at::empty({batch.batch}, x0.options().dtype(acc_dtype(x0)));
  dk::loss(batch, pred.data_ptr(), target_of(target), sse.data_ptr());
  return sse;
}

at::Tensor loss_backward(const at::Tensor& grad_sse, const at::Tensor& pred, const at::Tensor& x0,
                         const at::Tensor& coef_x0, const at::Tensor& coef_noise,
                         const std::optional<at::Tensor>& noise, int64_t seed, int64_t target) {
  const dk::Batch batch = make_batch(x0, coef_x0, coef_noise, noise, seed);
  check_like(pred, "pred", x0);
  TORCH_CHECK(grad_sse.device().is_cpu() && grad_sse.dim() == 1 && grad_sse.size(0) == batch.batch &&
                  grad_sse.scalar_type() == acc_dtype(x0) && grad_sse.is_contiguous(),
              "grad_sse must be a contiguous (B,) CPU tensor of dtype ", acc_dtype(x0));
  at::Tensor grad = at::empty_like(pred);
  dk::loss_backward(batch, pred.data_ptr(), grad_sse.data_ptr(), target_of(target), grad.data_ptr());
  return grad;
}

}  // namespace fastcon::diffusion_cpu

namespace fastcon {
}  // namespace fastcon

TORCH_LIBRARY_IMPL(fastcon, CPU, m) {
  m.impl("philox_uint32", &fastcon::diffusion_cpu::philox_uint32);
  m.impl("philox_normal", &fastcon::diffusion_cpu::philox_normal);
  m.impl("diffusion_q_sample", &fastcon::diffusion_cpu::q_sample);
  m.impl("diffusion_loss", &fastcon::diffusion_cpu::loss);
  m.impl("diffusion_loss_backward", &fastcon::diffusion_cpu::loss_backward);
}
