// The CUDA backend's one binding file: argument checks, output allocation, the current torch
// stream, and registration of the csrc/cuda launchers with the fastcon operator library.
//
// The SIMT emulation module (csrc/simt/module.cpp) compiles this same file with FASTCON_SIMT
// defined and FASTCON_KERNEL_NS naming the emulated kernels: tensors are then CPU tensors, the
// "stream" is null, and the registration goes to a mirror namespace (fastcon_simt) instead of
// the CUDA dispatch key of fastcon. No include guard: the module includes it once per kernel
// namespace.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#if !defined(FASTCON_SIMT)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "common/sc_loss_options.h"
#include "cuda/kernels.h"

namespace fastcon::FASTCON_KERNEL_NS {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#if defined(FASTCON_SIMT)
constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
constexpr const char* kDeviceName = "CPU (the SIMT emulation of the CUDA kernels)";
struct DeviceScope {
  cudaStream_t stream = nullptr;
  explicit DeviceScope(const Tensor&) {}
};
#else
constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
constexpr const char* kDeviceName = "CUDA";
// Launches go to the current torch stream of the inputs' device.
struct DeviceScope {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  explicit DeviceScope(const Tensor& t) : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream(t.get_device())) {}
};
#endif

kernels::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return kernels::DType::f16;
    case at::kBFloat16: return kernels::DType::bf16;
    case at::kFloat: return kernels::DType::f32;
    default: return kernels::DType::f64;
  }
}

at::ScalarType acc_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// dtype names as Python users write them (torch.float32, not Float)
std::string dtype_name(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    default: return c10::toString(st);
  }
}

void check_device(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK_VALUE(t.device().type() == kDevice, op, ": ", name, " must be a ", kDeviceName, " tensor, got ",
                    t.device());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on u's device (", ref.device(), "), got ",
                    t.device());
}

// u (N, D) and v (M, D): floating, same dtype and device, N, M >= 1.
void check_embeddings(const char* op, const Tensor& u, const Tensor& v) {
  TORCH_CHECK_VALUE(u.dim() == 2, op, ": u must be 2-D (N, D), got shape ", u.sizes());
  TORCH_CHECK_VALUE(v.dim() == 2, op, ": v must be 2-D (M, D), got shape ", v.sizes());
  const auto st = u.scalar_type();
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble, op,
                   ": u must be float16, bfloat16, float32 or float64, got ", dtype_name(st));
  TORCH_CHECK_TYPE(v.scalar_type() == st, op, ": v must have u's dtype (", dtype_name(st), "), got ",
                   dtype_name(v.scalar_type()));
  check_device(op, "u", u, u);
  check_device(op, "v", v, u);
  TORCH_CHECK_VALUE(u.size(1) == v.size(1), op, ": u and v must have the same feature size D, got ", u.size(1),
                    " and ", v.size(1));
  TORCH_CHECK_VALUE(u.size(0) >= 1 && v.size(0) >= 1, op, ": u and v must have at least one row, got shapes ",
                    u.sizes(), " and ", v.sizes());
}

void check_mode(const char* op, int64_t mode) {
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, op, ": mode must be 0 (softmax), 1 (softmax, same ids masked) or 2 "
                    "(sigmoid), got ", mode);
}

// scale / bias: a 0-dim float64 tensor on u's device, whose value only the kernels read (on the
// device): its metadata is checked here, never its value (that would synchronise; the loss
// checks the temperature and bias it derives them from with torch._assert_async).
const double* scalar_ptr(const char* op, const char* name, const Tensor& t, const Tensor& u) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, op, ": ", name, " must be a float64 tensor, got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 0, op, ": ", name, " must be a 0-dim tensor, got shape ", t.sizes());
  check_device(op, name, t, u);
  return t.const_data_ptr<double>();
}

// Scene ids: required in mode 1, int64 (len,) on u's device.
const int64_t* ids_ptr(const char* op, const char* name, const OptTensor& ids, int64_t len, int64_t mode,
                       const Tensor& u, std::optional<Tensor>& keep) {
  if (mode != 1) return nullptr;
  TORCH_CHECK_VALUE(ids.has_value(), op, ": ", name, " is required in mode 1 (same-id pairs masked)");
  const Tensor& t = *ids;
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == len, op, ": ", name, " must have shape (", len, "), got ",
                    t.sizes());
  check_device(op, name, t, u);
  keep = t.contiguous();
  return keep->data_ptr<int64_t>();
}

// A per-row vector (len,) in the accumulation dtype on u's device.
Tensor vector_arg(const char* op, const char* name, const Tensor& t, int64_t len, const Tensor& u) {
  TORCH_CHECK_TYPE(t.scalar_type() == acc_type(u), op, ": ", name, " must be ", dtype_name(acc_type(u)),
                   " (the accumulation dtype of ", dtype_name(u.scalar_type()), " inputs), got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == len, op, ": ", name, " must have shape (", len, "), got ",
                    t.sizes());
  check_device(op, name, t, u);
  return t.contiguous();
}

// The problem both passes score (the ids are set by ids_ptr).
void set_problem(kernels::ScProblem& p, const Tensor& u, const Tensor& v, int64_t row_offset, const Tensor& scale,
                 const OptTensor& bias, bool bounded, int64_t mode, const char* op) {
  p.dtype = dtype_of(u);
  p.u = u.data_ptr();
  p.v = v.data_ptr();
  p.n = u.size(0);
  p.m = v.size(0);
  p.d = u.size(1);
  p.row_offset = row_offset;
  p.scale = scalar_ptr(op, "scale", scale, u);
  p.bias = bias.has_value() ? scalar_ptr(op, "bias", *bias, u) : nullptr;
  p.bounded = bounded;
  p.mode = static_cast<int>(mode);
}

std::tuple<Tensor, Tensor> sc_forward_op(const Tensor& u_in, const Tensor& v_in, const OptTensor& row_ids,
                                         const OptTensor& col_ids, int64_t row_offset, const Tensor& scale,
                                         const OptTensor& bias, bool bounded, int64_t mode, bool need_col) {
  constexpr const char* op = "sc_forward";
  check_embeddings(op, u_in, v_in);
  check_mode(op, mode);
  const Tensor u = u_in.contiguous(), v = v_in.contiguous();
  const int64_t n = u.size(0), m = v.size(0);
  std::optional<Tensor> keep_r, keep_c;
  kernels::ScForward p{};
  p.row_ids = ids_ptr(op, "row_ids", row_ids, n, mode, u, keep_r);
  p.col_ids = ids_ptr(op, "col_ids", col_ids, m, mode, u, keep_c);
  const auto opts = u.options().dtype(acc_type(u));
  Tensor row = at::zeros({n}, opts);
  Tensor col = at::zeros({need_col && mode != 2 ? m : 0}, opts);
  Tensor counter = at::zeros({1}, u.options().dtype(at::kInt));
  set_problem(p, u, v, row_offset, scale, bias, bounded, mode, op);
  p.need_col = need_col && mode != 2;
  p.row = row.data_ptr();
  p.col = col.numel() ? col.data_ptr() : nullptr;
  p.counter = reinterpret_cast<unsigned*>(counter.data_ptr<int>());
  DeviceScope scope(u);
  const char* err = sc_forward(p, scope.stream);
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  return {row, col};
}

std::tuple<Tensor, Tensor, Tensor> sc_backward_op(const Tensor& u_in, const Tensor& v_in, const OptTensor& row_ids,
                                                  const OptTensor& col_ids, int64_t row_offset, const Tensor& scale,
                                                  const OptTensor& bias, bool bounded, int64_t mode,
                                                  const Tensor& row_stat, const OptTensor& col_stat,
                                                  const Tensor& row_weight, const OptTensor& col_weight) {
  constexpr const char* op = "sc_backward";
  check_embeddings(op, u_in, v_in);
  check_mode(op, mode);
  const Tensor u = u_in.contiguous(), v = v_in.contiguous();
  const int64_t n = u.size(0), m = v.size(0), d = u.size(1);
  std::optional<Tensor> keep_r, keep_c;
  kernels::ScBackward p{};
  p.row_ids = ids_ptr(op, "row_ids", row_ids, n, mode, u, keep_r);
  p.col_ids = ids_ptr(op, "col_ids", col_ids, m, mode, u, keep_c);
  const Tensor g = vector_arg(op, "row_weight", row_weight, n, u);
  const Tensor r = vector_arg(op, "row_stat", row_stat, n, u);
  std::optional<Tensor> h, c;
  if (col_weight.has_value() && mode != 2) {
    TORCH_CHECK_VALUE(col_stat.has_value(), op, ": col_stat is required with col_weight (softmax modes)");
    h = vector_arg(op, "col_weight", *col_weight, m, u);
    c = vector_arg(op, "col_stat", *col_stat, m, u);
  }
  const auto opts = u.options().dtype(acc_type(u));
  Tensor grad_u = at::empty({n, d}, opts), grad_v = at::empty({m, d}, opts), wsum = at::empty({n}, opts);
  // fp16 weight tiles are scaled by 1 / (max|g| + max|h|) so that small weights stay normal
  Tensor weight_max;
  if (u.scalar_type() == at::kHalf) {
    weight_max = g.abs().max();
    if (h) weight_max = weight_max + h->abs().max();
    weight_max = weight_max.to(at::kFloat).contiguous();
  }
  set_problem(p, u, v, row_offset, scale, bias, bounded, mode, op);
  p.row_stat = r.data_ptr();
  p.col_stat = c ? c->data_ptr() : nullptr;
  p.g = g.data_ptr();
  p.h = h ? h->data_ptr() : nullptr;
  p.weight_max = weight_max.defined() ? weight_max.data_ptr<float>() : nullptr;
  p.grad_u = grad_u.data_ptr();
  p.grad_v = grad_v.data_ptr();
  p.wsum = wsum.data_ptr();
  DeviceScope scope(u);
  const char* err = sc_backward(p, scope.stream);
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  return {grad_u, grad_v, wsum};
}

// ---- the whole fused loss (csrc/cuda/soft_contrastive_loss.cu) --------------------------------
// Argument types and shapes are checked by the caller (fastcon.soft_contrastive_loss); the values
// (temperature, bias, label values) by the kernels, raised here with at::_assert_async and the
// messages of the Python checks (soft_contrastive._temperature_message, "bias must be finite",
// _sc_algebra._label_value_messages): no value is read on the host.
kernels::ElemType elem_of(const char* op, const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kDouble: return kernels::ElemType::f64;
    case at::kFloat: return kernels::ElemType::f32;
    case at::kHalf: return kernels::ElemType::f16;
    case at::kBFloat16: return kernels::ElemType::bf16;
    case at::kLong: return kernels::ElemType::i64;
    case at::kInt: return kernels::ElemType::i32;
    case at::kShort: return kernels::ElemType::i16;
    case at::kChar: return kernels::ElemType::i8;
    case at::kByte: return kernels::ElemType::u8;
    case at::kBool: return kernels::ElemType::b8;
    default: TORCH_CHECK_TYPE(false, op, ": ", name, " has an unsupported dtype ", dtype_name(t.scalar_type()));
  }
  return kernels::ElemType::f32;
}

kernels::ScTensor view_of(const char* op, const char* name, const OptTensor& t, const Tensor& z1) {
  kernels::ScTensor v;
  if (!t.has_value()) return v;
  check_device(op, name, *t, z1);
  v.p = t->data_ptr();
  v.t = elem_of(op, name, *t);
  v.s0 = t->dim() > 0 ? t->stride(0) : 0;
  v.s1 = t->dim() > 1 ? t->stride(1) : 0;
  return v;
}

std::string temperature_message(at::ScalarType z) {
  const bool f64 = z == at::kDouble;
  const double low = 1.0 / (f64 ? std::numeric_limits<double>::max() : double(std::numeric_limits<float>::max()));
  const std::string acc = f64 ? "torch.float64" : "torch.float32";
  return "temperature must be finite, > 0 and >= " + sc_loss_options::g3(low) + " for torch." + dtype_name(z) +
         " inputs (its inverse, the logit scale, must be finite in " + acc + ")";
}

struct LossConfig : sc_loss_options::Options {
  int kind = 0;  // 0 no labels, 1 multi-label vectors, 2 scene ids as positives, 3 scene ids ignored
};

LossConfig loss_config(const std::string& loss, bool symmetric, double hw, const std::string& reduction,
                       bool scene_ignore, const OptTensor& labels, const OptTensor& queue) {
  LossConfig c;
  static_cast<sc_loss_options::Options&>(c) =
      sc_loss_options::parse(loss, symmetric, hw, reduction, scene_ignore, queue.has_value());
  c.kind = !labels.has_value() ? 0 : (labels->dim() == 2 ? 1 : (scene_ignore ? 3 : 2));
  return c;
}

// The fields both directions share; the workspaces of the prologue.
kernels::ScLoss loss_problem(const char* op, const Tensor& z1, const Tensor& z2, const Tensor& temperature,
                             const OptTensor& bias, const OptTensor& labels, const OptTensor& queue,
                             const OptTensor& queue_labels, const LossConfig& c, double hw, bool normalize,
                             std::vector<Tensor>& keep) {
  check_embeddings(op, z1, z2);
  kernels::ScLoss p{};
  p.dtype = dtype_of(z1);
  p.n = z1.size(0);
  p.d = z1.size(1);
  p.k = queue.has_value() ? queue->size(0) : 0;
  p.c = c.kind == 1 ? labels->size(1) : 0;
  p.kind = c.kind;
  p.mode = c.mode;
  p.need_col = c.need_col;
  p.hw = hw;
  p.normalize = normalize;
  p.reduction = c.reduction;
  if (queue.has_value())
    TORCH_CHECK_TYPE(queue->scalar_type() == z1.scalar_type(), op, ": queue must have z1's dtype");
  p.z1 = view_of(op, "z1", z1, z1);
  p.z2 = view_of(op, "z2", z2, z1);
  p.queue = view_of(op, "queue", queue, z1);
  p.labels = view_of(op, "labels", labels, z1);
  p.qlabels = view_of(op, "queue_labels", queue_labels, z1);
  p.temperature = view_of(op, "temperature", temperature, z1);
  p.bias = view_of(op, "bias", bias, z1);
  const int64_t n = p.n, m = p.n + p.k, d = p.d;
  const auto f64 = z1.options().dtype(at::kDouble);
  const auto add = [&](Tensor t) {
    keep.push_back(t);
    return t.numel() ? keep.back().data_ptr() : nullptr;
  };
  p.uk = add(at::empty({n, d}, z1.options()));
  p.cols = add(at::empty({m, d}, z1.options()));
  p.scal = static_cast<double*>(add(at::empty({2}, f64)));
  p.ids = static_cast<int64_t*>(add(at::empty({c.kind >= 2 ? m : 0}, z1.options().dtype(at::kLong))));
  p.lhat = static_cast<double*>(add(at::empty({c.kind == 1 ? m * p.c : 0}, f64)));
  p.counter = static_cast<unsigned*>(add(at::empty({2}, z1.options().dtype(at::kInt))));
  p.per = static_cast<double*>(add(at::empty({2 * n}, f64)));
  return p;
}

// sources of the low-rank target sums (see soft_contrastive_loss.cu) and their workspaces
void target_workspaces(kernels::ScLoss& p, const Tensor& z1, int sources, std::vector<Tensor>& keep) {
  const auto f64 = z1.options().dtype(at::kDouble);
  const int64_t blocks = (p.n + p.k + 127) / 128, slab = sources * p.c * (p.d + 1);
  keep.push_back(at::empty({p.kind == 1 ? blocks * slab : 0}, f64));
  p.partial = p.kind == 1 ? keep.back().data_ptr<double>() : nullptr;
  keep.push_back(at::empty({p.kind == 1 ? slab : 0}, f64));
  p.proj = p.kind == 1 ? keep.back().data_ptr<double>() : nullptr;
  keep.push_back(at::empty({p.kind == 2 ? sources * p.n * (p.d + 1) : 0}, f64));
  p.ssum = p.kind == 2 ? keep.back().data_ptr<double>() : nullptr;
}

void raise_checks(const Tensor& checks, at::ScalarType z, bool bias, int kind, bool queue_labels) {
  at::_assert_async(checks.select(0, 0), temperature_message(z));
  if (bias) at::_assert_async(checks.select(0, 1), "bias must be finite");
  if (kind != 1) return;
  at::_assert_async(checks.select(0, 2), "labels must be finite, got NaN or infinite values");
  at::_assert_async(checks.select(0, 3),
                    "labels must be >= 0 (multi-hot or class-fraction vectors), got negative values");
  if (!queue_labels) return;
  at::_assert_async(checks.select(0, 4), "queue_labels must be finite, got NaN or infinite values");
  at::_assert_async(checks.select(0, 5),
                    "queue_labels must be >= 0 (multi-hot or class-fraction vectors), got negative values");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> sc_loss_forward_op(
    const Tensor& z1, const Tensor& z2, const Tensor& temperature, const OptTensor& bias, const OptTensor& labels,
    const OptTensor& queue, const OptTensor& queue_labels, std::string loss, bool symmetric, double hard_weight,
    bool normalize, std::string reduction, bool scene_ignore) {
  constexpr const char* op = "sc_loss_forward";
  const LossConfig c = loss_config(loss, symmetric, hard_weight, reduction, scene_ignore, labels, queue);
  std::vector<Tensor> keep;
  kernels::ScLoss p =
      loss_problem(op, z1, z2, temperature, bias, labels, queue, queue_labels, c, hard_weight, normalize, keep);
  const int64_t n = p.n, m = p.n + p.k;
  const auto acc = z1.options().dtype(acc_type(z1));
  target_workspaces(p, z1, c.need_col ? 2 : 1, keep);
  Tensor n1 = at::empty({normalize ? n : 0}, acc), n2 = at::empty({normalize ? n : 0}, acc);
  Tensor checks = at::empty({6}, z1.options().dtype(at::kBool));
  Tensor rowflag = at::empty({c.kind == 1 ? m : 0}, z1.options().dtype(at::kByte));
  Tensor scenes = at::empty({c.kind == 2 ? n : 0}, z1.options().dtype(at::kLong));
  Tensor row = at::empty({n}, acc), col = at::empty({c.need_col ? n : 0}, acc);
  Tensor out = c.reduction == 2 ? at::empty({n}, acc) : at::empty({}, acc);
  Tensor r_sum = at::empty({c.kind == 3 ? 0 : n}, acc);
  p.n1 = normalize ? n1.data_ptr() : nullptr;
  p.n2 = normalize ? n2.data_ptr() : nullptr;
  p.checks = reinterpret_cast<uint8_t*>(checks.data_ptr<bool>());
  p.rowflag = c.kind == 1 ? rowflag.data_ptr<uint8_t>() : nullptr;
  p.leader = c.kind == 2 ? scenes.data_ptr<int64_t>() : nullptr;
  p.row = row.data_ptr();
  p.col = c.need_col ? col.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.r_sum = c.kind == 3 ? nullptr : r_sum.data_ptr();
  DeviceScope scope(z1);
  const char* err = sc_loss_forward(p, scope.stream);
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  raise_checks(checks, z1.scalar_type(), bias.has_value(), c.kind, queue_labels.has_value());
  return {out, row, col, r_sum, n1, n2, scenes};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sc_loss_backward_op(
    const Tensor& grad_out, const Tensor& z1, const Tensor& z2, const Tensor& temperature, const OptTensor& bias,
    const OptTensor& labels, const OptTensor& queue, const OptTensor& queue_labels, const Tensor& row,
    const Tensor& col, const Tensor& r_sum, const Tensor& n1, const Tensor& n2, const Tensor& scenes,
    std::string loss, bool symmetric, double hard_weight, bool normalize, std::string reduction, bool scene_ignore,
    bool need_z1, bool need_z2, bool need_temperature, bool need_bias) {
  constexpr const char* op = "sc_loss_backward";
  const LossConfig c = loss_config(loss, symmetric, hard_weight, reduction, scene_ignore, labels, queue);
  std::vector<Tensor> keep;
  kernels::ScLoss p =
      loss_problem(op, z1, z2, temperature, bias, labels, queue, queue_labels, c, hard_weight, normalize, keep);
  const int64_t n = p.n, m = p.n + p.k, d = p.d;
  const auto acc = z1.options().dtype(acc_type(z1));
  target_workspaces(p, z1, c.need_col ? 4 : 2, keep);
  const auto saved = [&](const Tensor& t, const char* name, int64_t len, at::ScalarType st) -> void* {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == len && t.scalar_type() == st, op, ": ", name,
                      " must be the forward's (", len, ",) ", dtype_name(st), " tensor, got ", t.sizes(), " ",
                      dtype_name(t.scalar_type()));
    check_device(op, name, t, z1);
    keep.push_back(t.contiguous());
    return len ? keep.back().data_ptr() : nullptr;
  };
  p.row = saved(row, "row_stat", n, acc_type(z1));
  p.col = c.need_col ? saved(col, "col_stat", n, acc_type(z1)) : nullptr;
  p.r_sum = c.kind == 3 ? nullptr : saved(r_sum, "target_sum", n, acc_type(z1));
  p.n1 = normalize ? saved(n1, "norm1", n, acc_type(z1)) : nullptr;
  p.n2 = normalize ? saved(n2, "norm2", n, acc_type(z1)) : nullptr;
  p.leader = c.kind == 2 ? static_cast<int64_t*>(saved(scenes, "scene_order", n, at::kLong)) : nullptr;
  TORCH_CHECK_VALUE(grad_out.numel() == (c.reduction == 2 ? n : 1), op, ": grad_out must have the loss's shape");
  p.grad_out = view_of(op, "grad_out", grad_out, z1);
  Tensor checks = at::empty({6}, z1.options().dtype(at::kBool));
  Tensor g = at::empty({n}, acc), wu = at::empty({n}, acc.dtype(at::kDouble)), wv = at::empty({n}, acc.dtype(at::kDouble));
  Tensor gu = at::empty({n, d}, acc), gv = at::empty({m, d}, acc), wsum = at::empty({n}, acc);
  Tensor weight_max = at::empty({z1.scalar_type() == at::kHalf ? 1 : 0}, acc.dtype(at::kFloat));
  Tensor d_z1 = need_z1 ? at::empty({n, d}, z1.options()) : z1.new_empty({0});
  Tensor d_z2 = need_z2 ? at::empty({n, d}, z2.options()) : z2.new_empty({0});
  Tensor d_tau = need_temperature ? at::empty_like(temperature, at::MemoryFormat::Contiguous) : z1.new_empty({0});
  const bool want_bias = need_bias && bias.has_value();
  Tensor d_bias = want_bias ? at::empty_like(*bias, at::MemoryFormat::Contiguous) : z1.new_empty({0});
  p.checks = reinterpret_cast<uint8_t*>(checks.data_ptr<bool>());
  p.g = g.data_ptr();
  p.wu = wu.data_ptr<double>();
  p.wv = wv.data_ptr<double>();
  p.weight_max = weight_max.numel() ? weight_max.data_ptr<float>() : nullptr;
  p.gu = gu.data_ptr();
  p.gv = gv.data_ptr();
  p.wsum = wsum.data_ptr();
  p.dz1 = need_z1 ? d_z1.data_ptr() : nullptr;
  p.dz2 = need_z2 ? d_z2.data_ptr() : nullptr;
  p.dtau = need_temperature ? d_tau.data_ptr() : nullptr;
  p.dbias = want_bias ? d_bias.data_ptr() : nullptr;
  p.need_z1 = need_z1;
  p.need_z2 = need_z2;
  p.need_tau = need_temperature;
  p.need_bias = want_bias;
  DeviceScope scope(z1);
  const char* err = sc_loss_backward(p, scope.stream);
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  return {d_z1, d_z2, d_tau, d_bias};
}

#if !defined(FASTCON_BINDINGS_LOSS_ONLY)
// ---- Siamese masking ---------------------------------------------------------------------------
// The public API (fastcon/masking.py) checks everything, ids values included; these checks keep
// direct torch.ops calls memory safe. Reading ids values here would cost a device synchronisation,
// so the kernels themselves stay in bounds whatever ids hold.

void check_rows(const char* op, const Tensor& x, const char* name, int64_t dims) {
  TORCH_CHECK(x.device().type() == kDevice, op, ": ", name, " must be a ", kDeviceName, " tensor, got ", x.device());
  TORCH_CHECK(x.dim() == dims, op, ": ", name, " must be ", dims, "-D, got ", x.dim(), "-D");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble, op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", dtype_name(st));
}

// ids_keep (B, K) int64 with 1 <= K <= L, on ref's device; returns it contiguous.
Tensor checked_ids(const char* op, const Tensor& ids_keep, int64_t batch, int64_t length, const Tensor& ref) {
  TORCH_CHECK(ids_keep.device() == ref.device(), op, ": ids_keep must be on ", ref.device(), ", got ",
              ids_keep.device());
  TORCH_CHECK(ids_keep.scalar_type() == at::kLong, op, ": ids_keep must be int64, got ",
              dtype_name(ids_keep.scalar_type()));
  TORCH_CHECK(ids_keep.dim() == 2 && ids_keep.size(0) == batch, op, ": ids_keep must have shape (", batch,
              ", K), got ", ids_keep.sizes());
  TORCH_CHECK(length <= std::numeric_limits<int32_t>::max(), op, ": L must be < 2^31, got ", length);
  TORCH_CHECK(ids_keep.size(1) >= 1 && ids_keep.size(1) <= length, op, ": ids_keep must have 1 <= K <= L = ", length,
              ", got K = ", ids_keep.size(1));
  return ids_keep.contiguous();
}

void check_launch(const char* op, const char* err) { TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err); }

Tensor mask_gather_op(const Tensor& tokens, const Tensor& ids_keep, const OptTensor& pos_embed) {
  constexpr const char* op = "mask_gather";
  check_rows(op, tokens, "tokens", 3);
  const int64_t b = tokens.size(0), l = tokens.size(1), d = tokens.size(2);
  const Tensor ids = checked_ids(op, ids_keep, b, l, tokens);
  // any batch / row strides (e.g. x[:, 1:] needs no copy); D must be unit-stride
  const Tensor tok = tokens.stride(2) == 1 ? tokens : tokens.contiguous();
  Tensor pos;
  if (pos_embed.has_value()) {
    pos = *pos_embed;
    check_rows(op, pos, "pos_embed", 3);
    TORCH_CHECK(pos.device() == tok.device() && pos.scalar_type() == tok.scalar_type(), op,
                ": pos_embed must have tokens' dtype and device");
    TORCH_CHECK((pos.size(0) == 1 || pos.size(0) == b) && pos.size(1) == l && pos.size(2) == d, op,
                ": pos_embed must have shape (1 or B, L, D) = (1 or ", b, ", ", l, ", ", d, "), got ", pos.sizes());
    if (pos.stride(2) != 1) pos = pos.contiguous();
  }
  Tensor visible = at::empty({b, ids.size(1), d}, tok.options().memory_format(at::MemoryFormat::Contiguous));
  kernels::MaskGather p{};
  p.dtype = dtype_of(tok);
  p.tokens = tok.data_ptr();
  p.tokens_stride0 = tok.stride(0);
  p.tokens_stride1 = tok.stride(1);
  p.pos = pos.defined() ? pos.data_ptr() : nullptr;
  p.pos_stride0 = pos.defined() && pos.size(0) > 1 ? pos.stride(0) : 0;
  p.pos_stride1 = pos.defined() ? pos.stride(1) : 0;
  p.ids = ids.data_ptr<int64_t>();
  p.out = visible.data_ptr();
  p.b = b;
  p.l = l;
  p.k = ids.size(1);
  p.d = d;
  DeviceScope scope(tok);
  check_launch(op, mask_gather_rows(p, scope.stream));
  return visible;
}

std::tuple<Tensor, Tensor> mask_gather_backward_op(const Tensor& grad_visible, const Tensor& ids_keep, int64_t L,
                                                   bool need_tokens, int64_t pos_batch) {
  constexpr const char* op = "mask_gather_backward";
  check_rows(op, grad_visible, "grad_visible", 3);
  const Tensor gv = grad_visible.contiguous();
  const int64_t b = gv.size(0), k = gv.size(1), d = gv.size(2);
  const Tensor ids = checked_ids(op, ids_keep, b, L, gv);
  TORCH_CHECK(ids.size(1) == k, op, ": ids_keep must have grad_visible's K = ", k, " columns");
  TORCH_CHECK(pos_batch == 0 || pos_batch == 1 || pos_batch == b, op, ": pos_batch must be 0, 1 or B = ", b);
  Tensor grad_tokens = need_tokens ? at::empty({b, L, d}, gv.options()) : at::empty({0}, gv.options());
  Tensor grad_pos = pos_batch > 0 ? at::empty({pos_batch, L, d}, gv.options()) : at::empty({0}, gv.options());
  kernels::MaskScatter p{};
  p.dtype = dtype_of(gv);
  p.src = gv.data_ptr();
  p.ids = ids.data_ptr<int64_t>();
  p.b = b;
  p.l = L;
  p.k = k;
  p.d = d;
  DeviceScope scope(gv);
  if (pos_batch == 1) {  // grad_pos is the batch sum; grad_tokens comes out of the same pass
    p.out = need_tokens ? grad_tokens.data_ptr() : nullptr;
    p.out2 = grad_pos.data_ptr();
    check_launch(op, mask_batch_sum(p, scope.stream));
  } else if (need_tokens || pos_batch > 0) {  // per-sample pos_embed: the same rows as grad_tokens
    p.out = need_tokens ? grad_tokens.data_ptr() : grad_pos.data_ptr();
    p.out2 = need_tokens && pos_batch > 0 ? grad_pos.data_ptr() : nullptr;
    check_launch(op, mask_scatter_rows(p, scope.stream));
  }
  return {grad_tokens, grad_pos};
}

Tensor mask_unmask_op(const Tensor& visible, const Tensor& ids_keep, int64_t L, const Tensor& fill) {
  constexpr const char* op = "mask_unmask";
  check_rows(op, visible, "visible", 3);
  const Tensor vis = visible.contiguous();
  const int64_t b = vis.size(0), k = vis.size(1), d = vis.size(2);
  const Tensor ids = checked_ids(op, ids_keep, b, L, vis);
  TORCH_CHECK(ids.size(1) == k, op, ": ids_keep must have visible's K = ", k, " columns");
  TORCH_CHECK(fill.device() == vis.device() && fill.scalar_type() == vis.scalar_type() && fill.dim() == 1 &&
                  fill.size(0) == d,
              op, ": fill must be a (D,) tensor of visible's dtype and device");
  const Tensor fil = fill.contiguous();
  Tensor out = at::empty({b, L, d}, vis.options());
  kernels::MaskScatter p{};
  p.dtype = dtype_of(vis);
  p.src = vis.data_ptr();
  p.fill = fil.data_ptr();
  p.ids = ids.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.b = b;
  p.l = L;
  p.k = k;
  p.d = d;
  DeviceScope scope(vis);
  check_launch(op, mask_scatter_rows(p, scope.stream));
  return out;
}

std::tuple<Tensor, Tensor> mask_unmask_backward_op(const Tensor& grad_out, const Tensor& ids_keep, bool need_fill) {
  constexpr const char* op = "mask_unmask_backward";
  check_rows(op, grad_out, "grad_out", 3);
  const Tensor go = grad_out.contiguous();
  const int64_t b = go.size(0), l = go.size(1), d = go.size(2);
  const Tensor ids = checked_ids(op, ids_keep, b, l, go);
  const int64_t k = ids.size(1);
  Tensor grad_visible = at::empty({b, k, d}, go.options());
  Tensor grad_fill = at::empty({need_fill ? d : 0}, go.options().dtype(acc_type(go)));
  DeviceScope scope(go);
  kernels::MaskGather g{};
  g.dtype = dtype_of(go);
  g.tokens = go.data_ptr();
  g.tokens_stride0 = l * d;
  g.tokens_stride1 = d;
  g.ids = ids.data_ptr<int64_t>();
  g.out = grad_visible.data_ptr();
  g.b = b;
  g.l = l;
  g.k = k;
  g.d = d;
  check_launch(op, mask_gather_rows(g, scope.stream));
  if (need_fill) {
    Tensor partial = at::empty({kernels::mask_fill_chunks(b, l), d}, go.options().dtype(acc_type(go)));
    kernels::MaskFillSum f{};
    f.dtype = dtype_of(go);
    f.grad_out = go.data_ptr();
    f.ids = ids.data_ptr<int64_t>();
    f.workspace = partial.data_ptr();
    f.out = grad_fill.data_ptr();
    f.b = b;
    f.l = l;
    f.k = k;
    f.d = d;
    check_launch(op, mask_fill_sum(f, scope.stream));
  }
  return {grad_visible, grad_fill};
}

Tensor mask_image_op(const Tensor& images, int64_t patch, const Tensor& ids_keep) {
  constexpr const char* op = "mask_image";
  check_rows(op, images, "images", 4);
  const Tensor img = images.contiguous();
  const int64_t b = img.size(0), c = img.size(1), h = img.size(2), w = img.size(3);
  TORCH_CHECK(patch >= 1 && h % patch == 0 && w % patch == 0, op, ": patch must divide H = ", h, " and W = ", w);
  const Tensor ids = checked_ids(op, ids_keep, b, (h / patch) * (w / patch), img);
  Tensor out = at::empty_like(img);
  kernels::MaskImage p{};
  p.dtype = dtype_of(img);
  p.images = img.data_ptr();
  p.out = out.data_ptr();
  p.ids = ids.data_ptr<int64_t>();
  p.b = b;
  p.c = c;
  p.h = h;
  p.w = w;
  p.patch = patch;
  p.k = ids.size(1);
  DeviceScope scope(img);
  check_launch(op, mask_image(p, scope.stream));
  return out;
}

// ---- diffusion -----------------------------------------------------------------------------------
// The kernels take contiguous (batch, per_sample) views, per-sample coefficients in the
// accumulation dtype and the seed as a 64-bit unsigned key (carried by the schema's int64).

kernels::DiffusionBatch make_batch(const char* op, const Tensor& x0, const Tensor& coef_x0, const Tensor& coef_noise,
                                   const OptTensor& noise, int64_t seed) {
  TORCH_CHECK(x0.device().type() == kDevice, op, ": x0 must be a ", kDeviceName, " tensor, got ", x0.device());
  TORCH_CHECK(x0.dim() >= 1 && x0.size(0) >= 1, op, ": x0 must be (B, ...) with B >= 1, got ", x0.sizes());
  TORCH_CHECK(x0.is_contiguous(), op, ": x0 must be contiguous");
  const auto st = x0.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble, op,
              ": x0 must be float32, float16, bfloat16 or float64, got ", dtype_name(st));
  const int64_t b = x0.size(0);
  for (const Tensor* c : {&coef_x0, &coef_noise}) {
    TORCH_CHECK(c->device() == x0.device() && c->dim() == 1 && c->size(0) == b && c->scalar_type() == acc_type(x0) &&
                    c->is_contiguous(),
                op, ": coefficients must be contiguous (B,) = (", b, ",) tensors of dtype ", dtype_name(acc_type(x0)),
                " on x0's device, got ", c->sizes(), " ", dtype_name(c->scalar_type()));
  }
  if (noise.has_value())
    TORCH_CHECK(noise->sizes() == x0.sizes() && noise->scalar_type() == st && noise->device() == x0.device() &&
                    noise->is_contiguous(),
                op, ": noise must be a contiguous tensor of x0's shape, dtype and device");
  kernels::DiffusionBatch batch{};
  batch.dtype = dtype_of(x0);
  batch.batch = b;
  batch.per_sample = x0.numel() / b;
  batch.x0 = x0.data_ptr();
  batch.noise = noise.has_value() ? noise->data_ptr() : nullptr;
  batch.coef_x0 = coef_x0.data_ptr();
  batch.coef_noise = coef_noise.data_ptr();
  batch.seed = static_cast<uint64_t>(seed);
  return batch;
}

void check_target(const char* op, int64_t target) {
  TORCH_CHECK(target >= 0 && target <= 2, op, ": target must be 0 (epsilon), 1 (x0) or 2 (v), got ", target);
}

void check_like(const char* op, const Tensor& x, const char* name, const Tensor& x0) {
  TORCH_CHECK(x.sizes() == x0.sizes() && x.scalar_type() == x0.scalar_type() && x.device() == x0.device() &&
                  x.is_contiguous(),
              op, ": ", name, " must be a contiguous tensor of x0's shape, dtype and device");
}

Tensor philox_uint32_op(const Tensor& counter, int64_t seed) {
  constexpr const char* op = "philox_uint32";
  TORCH_CHECK(counter.device().type() == kDevice && counter.scalar_type() == at::kLong && counter.dim() >= 1 &&
                  counter.size(-1) == 4,
              op, ": counter must be a ", kDeviceName, " int64 tensor (..., 4) of 32-bit words");
  const Tensor c = counter.contiguous();
  Tensor out = at::empty_like(c);
  DeviceScope scope(c);
  check_launch(op, philox_words(c.data_ptr<int64_t>(), c.numel() / 4, static_cast<uint64_t>(seed),
                                out.data_ptr<int64_t>(), scope.stream));
  return out;
}

Tensor philox_normal_op(const Tensor& index, int64_t seed) {
  constexpr const char* op = "philox_normal";
  TORCH_CHECK(index.device().type() == kDevice && index.scalar_type() == at::kLong, op, ": index must be a ",
              kDeviceName, " int64 tensor");
  const Tensor i = index.contiguous();
  Tensor out = at::empty(i.sizes(), i.options().dtype(at::kFloat));
  DeviceScope scope(i);
  check_launch(op, philox_normals(i.data_ptr<int64_t>(), i.numel(), static_cast<uint64_t>(seed),
                                  out.data_ptr<float>(), scope.stream));
  return out;
}

Tensor q_sample_op(const Tensor& x0, const Tensor& coef_x0, const Tensor& coef_noise, const OptTensor& noise,
                   int64_t seed) {
  constexpr const char* op = "diffusion_q_sample";
  const kernels::DiffusionBatch batch = make_batch(op, x0, coef_x0, coef_noise, noise, seed);
  Tensor out = at::empty_like(x0);
  DeviceScope scope(x0);
  check_launch(op, diffusion_q_sample(batch, out.data_ptr(), scope.stream));
  return out;
}

Tensor diffusion_loss_op(const Tensor& pred, const Tensor& x0, const Tensor& coef_x0, const Tensor& coef_noise,
                         const OptTensor& noise, int64_t seed, int64_t target) {
  constexpr const char* op = "diffusion_loss";
  const kernels::DiffusionBatch batch = make_batch(op, x0, coef_x0, coef_noise, noise, seed);
  check_like(op, pred, "pred", x0);
  check_target(op, target);
  const auto acc = x0.options().dtype(acc_type(x0));
  Tensor sse = at::empty({batch.batch}, acc);
  Tensor partial = at::empty({batch.batch * kernels::diffusion_loss_chunks(batch.per_sample)}, acc);
  Tensor tickets = at::zeros({batch.batch}, x0.options().dtype(at::kInt));
  DeviceScope scope(x0);
  check_launch(op, diffusion_loss(batch, pred.data_ptr(), static_cast<int>(target), sse.data_ptr(),
                                  partial.data_ptr(), reinterpret_cast<unsigned*>(tickets.data_ptr<int>()),
                                  scope.stream));
  return sse;
}

Tensor diffusion_loss_backward_op(const Tensor& grad_sse, const Tensor& pred, const Tensor& x0,
                                  const Tensor& coef_x0, const Tensor& coef_noise, const OptTensor& noise,
                                  int64_t seed, int64_t target) {
  constexpr const char* op = "diffusion_loss_backward";
  const kernels::DiffusionBatch batch = make_batch(op, x0, coef_x0, coef_noise, noise, seed);
  check_like(op, pred, "pred", x0);
  check_target(op, target);
  TORCH_CHECK(grad_sse.device() == x0.device() && grad_sse.dim() == 1 && grad_sse.size(0) == batch.batch &&
                  grad_sse.scalar_type() == acc_type(x0) && grad_sse.is_contiguous(),
              op, ": grad_sse must be a contiguous (B,) tensor of dtype ", dtype_name(acc_type(x0)));
  Tensor grad = at::empty_like(pred);
  DeviceScope scope(x0);
  check_launch(op, diffusion_loss_backward(batch, pred.data_ptr(), grad_sse.data_ptr(), static_cast<int>(target),
                                           grad.data_ptr(), scope.stream));
  return grad;
}
#endif  // !FASTCON_BINDINGS_LOSS_ONLY

}  // namespace

// ---- registration -------------------------------------------------------------------------------
// FASTCON_BINDINGS_LOSS_ONLY: the deliberately broken SIMT test build has the loss kernels only.

void register_soft_contrastive(torch::Library& m) {
  m.impl("sc_forward", TORCH_FN(sc_forward_op));
  m.impl("sc_backward", TORCH_FN(sc_backward_op));
  m.impl("sc_loss_forward", TORCH_FN(sc_loss_forward_op));
  m.impl("sc_loss_backward", TORCH_FN(sc_loss_backward_op));
}

#if !defined(FASTCON_BINDINGS_LOSS_ONLY)
void register_masking(torch::Library& m) {
  m.impl("mask_gather", TORCH_FN(mask_gather_op));
  m.impl("mask_gather_backward", TORCH_FN(mask_gather_backward_op));
  m.impl("mask_unmask", TORCH_FN(mask_unmask_op));
  m.impl("mask_unmask_backward", TORCH_FN(mask_unmask_backward_op));
  m.impl("mask_image", TORCH_FN(mask_image_op));
}

void register_diffusion(torch::Library& m) {
  m.impl("philox_uint32", TORCH_FN(philox_uint32_op));
  m.impl("philox_normal", TORCH_FN(philox_normal_op));
  m.impl("diffusion_q_sample", TORCH_FN(q_sample_op));
  m.impl("diffusion_loss", TORCH_FN(diffusion_loss_op));
  m.impl("diffusion_loss_backward", TORCH_FN(diffusion_loss_backward_op));
}
#endif

// The ops `register_ops` implements (the SIMT module mirrors their fastcon schemas).
std::vector<const char*> op_names() {
  std::vector<const char*> ops = {"sc_forward", "sc_backward", "sc_loss_forward", "sc_loss_backward"};
#if !defined(FASTCON_BINDINGS_LOSS_ONLY)
  for (const char* op : {"mask_gather", "mask_gather_backward", "mask_unmask", "mask_unmask_backward", "mask_image",
                         "philox_uint32", "philox_normal", "diffusion_q_sample", "diffusion_loss",
                         "diffusion_loss_backward"})
    ops.push_back(op);
#endif
  return ops;
}

void register_ops(torch::Library& m) {
  register_soft_contrastive(m);
#if !defined(FASTCON_BINDINGS_LOSS_ONLY)
  register_masking(m);
  register_diffusion(m);
#endif
}

}  // namespace fastcon::FASTCON_KERNEL_NS

#if !defined(FASTCON_SIMT)
TORCH_LIBRARY_IMPL(fastcon, CUDA, m) { fastcon::gpu::register_ops(m); }
#endif
