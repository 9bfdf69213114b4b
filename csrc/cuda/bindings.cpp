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
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#if !defined(FASTCON_SIMT)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

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

void check_mode(const char* op, int64_t mode, double scale, double bias, double logit_bound) {
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, op, ": mode must be 0 (softmax), 1 (softmax, same ids masked) or 2 "
                    "(sigmoid), got ", mode);
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::isfinite(bias), op, ": scale and bias must be finite");
  TORCH_CHECK_VALUE(std::isfinite(logit_bound) && logit_bound >= 0, op, ": logit_bound must be >= 0, got ",
                    logit_bound);
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

std::tuple<Tensor, Tensor> sc_forward_op(const Tensor& u_in, const Tensor& v_in, const OptTensor& row_ids,
                                         const OptTensor& col_ids, int64_t row_offset, double scale, double bias,
                                         double logit_bound, int64_t mode, bool need_col) {
  constexpr const char* op = "sc_forward";
  check_embeddings(op, u_in, v_in);
  check_mode(op, mode, scale, bias, logit_bound);
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
  p.dtype = dtype_of(u);
  p.u = u.data_ptr();
  p.v = v.data_ptr();
  p.n = n;
  p.m = m;
  p.d = u.size(1);
  p.row_offset = row_offset;
  p.scale = scale;
  p.bias = bias;
  p.logit_bound = logit_bound;
  p.mode = static_cast<int>(mode);
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
                                                  const OptTensor& col_ids, int64_t row_offset, double scale,
                                                  double bias, double logit_bound, int64_t mode,
                                                  const Tensor& row_stat, const OptTensor& col_stat,
                                                  const Tensor& row_weight, const OptTensor& col_weight) {
  constexpr const char* op = "sc_backward";
  check_embeddings(op, u_in, v_in);
  check_mode(op, mode, scale, bias, logit_bound);
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
  p.dtype = dtype_of(u);
  p.u = u.data_ptr();
  p.v = v.data_ptr();
  p.n = n;
  p.m = m;
  p.d = d;
  p.row_offset = row_offset;
  p.scale = scale;
  p.bias = bias;
  p.logit_bound = logit_bound;
  p.mode = static_cast<int>(mode);
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

}  // namespace

// ---- registration -------------------------------------------------------------------------------
// FASTCON_BINDINGS_LOSS_ONLY: the deliberately broken SIMT test build has the loss kernels only.

void register_soft_contrastive(torch::Library& m) {
  m.impl("sc_forward", TORCH_FN(sc_forward_op));
  m.impl("sc_backward", TORCH_FN(sc_backward_op));
}

// The ops `register_ops` implements (the SIMT module mirrors their fastcon schemas).
std::vector<const char*> op_names() {
  std::vector<const char*> ops = {"sc_forward", "sc_backward"};
  return ops;
}

void register_ops(torch::Library& m) { register_soft_contrastive(m); }

}  // namespace fastcon::FASTCON_KERNEL_NS

#if !defined(FASTCON_SIMT)
TORCH_LIBRARY_IMPL(fastcon, CUDA, m) { fastcon::gpu::register_ops(m); }
#endif
