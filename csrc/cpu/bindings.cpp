// The CPU backend's one binding file: argument checks, output allocation and registration of
// the csrc/cpu kernels with the fastcon operator library. Kernels themselves take raw pointers.
#include <torch/library.h>

#include <string>

#include "cpu/simd.h"

namespace fastcon {

std::string cpu_capability() { return cpu::isa_name(cpu::detect_isa()); }

}  // namespace fastcon

// ---- soft contrastive loss --------------------------------------------------------------

// ---- Siamese masking ------------------------------------------------------------------------

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
std::string diffusion_cpu_isa() { return cpu::diffusion::isa(); }
}  // namespace fastcon

TORCH_LIBRARY_IMPL(fastcon, CPU, m) {
  m.impl("philox_uint32", &fastcon::diffusion_cpu::philox_uint32);
  m.impl("philox_normal", &fastcon::diffusion_cpu::philox_normal);
  m.impl("diffusion_q_sample", &fastcon::diffusion_cpu::q_sample);
  m.impl("diffusion_loss", &fastcon::diffusion_cpu::loss);
  m.impl("diffusion_loss_backward", &fastcon::diffusion_cpu::loss_backward);
}
