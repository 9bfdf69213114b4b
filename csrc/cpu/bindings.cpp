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

namespace fastcon {

std::string cpu_capability() { return cpu::isa_name(cpu::detect_isa()); }

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

cpu::ScProblem sc_problem(const at::Tensor& u, const at::Tensor& v, const std::optional<at::Tensor>& row_ids,
                          const std::optional<at::Tensor>& col_ids, int64_t row_offset, double scale, double bias,
                          double logit_bound, int64_t mode) {
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
                                                  double scale, double bias, double logit_bound, int64_t mode,
                                                  bool need_col) {
  const cpu::ScProblem p = sc_problem(u, v, row_ids, col_ids, row_offset, scale, bias, logit_bound, mode);
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
    const std::optional<at::Tensor>& col_ids, int64_t row_offset, double scale, double bias, double logit_bound,
    int64_t mode, const at::Tensor& row_stat, const std::optional<at::Tensor>& col_stat, const at::Tensor& row_weight,
    const std::optional<at::Tensor>& col_weight) {
  const cpu::ScProblem p = sc_problem(u, v, row_ids, col_ids, row_offset, scale, bias, logit_bound, mode);
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

}  // namespace
}  // namespace fastcon

TORCH_LIBRARY_IMPL(fastcon, CPU, m) {
  m.impl("sc_forward", &fastcon::sc_forward_cpu);
  m.impl("sc_backward", &fastcon::sc_backward_cpu);
}


// ---- Siamese masking ------------------------------------------------------------------------

// ---- diffusion --------------------------------------------------------------------------------
