// The fastcon operator registry: every op's schema, in one place.
//
// Kernels register implementations per device in one binding file per backend
// (csrc/cpu/bindings.cpp, csrc/cuda/bindings.cpp); fake (meta) kernels for torch.compile are
// registered in Python (fastcon/_fake.py). Schemas are documented in fastcon/reference.py,
// which states each kernel's contract densely in PyTorch.
#include <torch/library.h>

#include <string>

#include "module_init.h"

#ifndef FASTCON_CUDA_ARCHS
#define FASTCON_CUDA_ARCHS ""
#endif

namespace fastcon {

// GPU architectures the CUDA kernels were compiled for, comma separated ("" without CUDA).
std::string build_info() { return FASTCON_CUDA_ARCHS; }

// The SIMD level the CPU kernels run at: chosen at run time, capped by FASTCON_CPU_ISA.
std::string cpu_capability();

}  // namespace fastcon

TORCH_LIBRARY(fastcon, m) {
  m.def("build_info() -> str", &fastcon::build_info);
  m.def("cpu_capability() -> str", &fastcon::cpu_capability);

  // Soft contrastive loss, blockwise pass (SPEC section 1; contract in reference.sc_core_*).
  // mode: 0 softmax, 1 softmax with same-id pairs masked (scene_mode="ignore"), 2 sigmoid.
  // Positive of row i is column i + row_offset. scale (the logit scale 1 / tau) and bias (sigmoid;
  // None is 0) are 0-dim float64 tensors on u's device: the kernels read them there, so that no
  // call reads a value on the host (no host-device synchronisation; CUDA-graph capturable).
  // bounded promises |scale * u.v| <= scale (unit rows): the kernels may use scale as a fixed max.
  m.def(
      "sc_forward(Tensor u, Tensor v, Tensor? row_ids, Tensor? col_ids, int row_offset, Tensor scale, "
      "Tensor? bias, bool bounded, int mode, bool need_col) -> (Tensor row_stat, Tensor col_stat)");
  m.def(
      "sc_backward(Tensor u, Tensor v, Tensor? row_ids, Tensor? col_ids, int row_offset, Tensor scale, "
      "Tensor? bias, bool bounded, int mode, Tensor row_stat, Tensor? col_stat, Tensor row_weight, "
      "Tensor? col_weight) -> (Tensor grad_u, Tensor grad_v, Tensor row_wsum)");

  // The whole fused loss, one op per direction (cpu only; issue 13): z1, z2 unnormalised (N, D),
  // temperature / bias 0-dim tensors read inside, labels (N, C) / scene ids (N,) / None, the key
  // queue (SPEC 1b), the options of fastcon.soft_contrastive_loss. Returns the loss and what
  // backward needs: row / column statistics, target row sums, row norms, the scene order.
  m.def(
      "sc_loss_forward(Tensor z1, Tensor z2, Tensor temperature, Tensor? bias, Tensor? labels, Tensor? queue, "
      "Tensor? queue_labels, str loss, bool symmetric, float hard_weight, bool normalize, str reduction, "
      "bool scene_ignore) -> (Tensor loss, Tensor row_stat, Tensor col_stat, Tensor target_sum, Tensor norm1, "
      "Tensor norm2, Tensor scene_order)");
  m.def(
      "sc_loss_backward(Tensor grad_out, Tensor z1, Tensor z2, Tensor temperature, Tensor? bias, Tensor? labels, "
      "Tensor? queue, Tensor? queue_labels, Tensor row_stat, Tensor col_stat, Tensor target_sum, Tensor norm1, "
      "Tensor norm2, Tensor scene_order, str loss, bool symmetric, float hard_weight, bool normalize, "
      "str reduction, bool scene_ignore, bool need_z1, bool need_z2, bool need_temperature, bool need_bias) "
      "-> (Tensor grad_z1, Tensor grad_z2, Tensor grad_temperature, Tensor grad_bias)");

  // Siamese masking (SPEC section 2; contract in reference.mask_*).
  // visible[b, k] = tokens[b, ids[b, k]] + pos_embed[b or 0, ids[b, k]]
  m.def("mask_gather(Tensor tokens, Tensor ids_keep, Tensor? pos_embed) -> Tensor visible");
  // One pass over grad_visible: scatter into grad_tokens (B, L, D; zeros elsewhere) when
  // need_tokens, and into grad_pos (pos_batch, L, D), summed over b when pos_batch == 1
  // (pos_batch 0: no pos_embed gradient). Outputs not wanted are empty (0,) tensors.
  m.def(
      "mask_gather_backward(Tensor grad_visible, Tensor ids_keep, int L, bool need_tokens, int pos_batch) "
      "-> (Tensor grad_tokens, Tensor grad_pos)");
  // out[b, l] = visible[b, k] where ids_keep[b, k] == l, fill (D,) elsewhere.
  m.def("mask_unmask(Tensor visible, Tensor ids_keep, int L, Tensor fill) -> Tensor");
  // One pass over grad_out (B, L, D): grad_visible = its rows at ids_keep; grad_fill (D,), when
  // need_fill, = its sum over the dropped rows in the accumulation dtype (fp32; fp64 for fp64).
  m.def(
      "mask_unmask_backward(Tensor grad_out, Tensor ids_keep, bool need_fill) "
      "-> (Tensor grad_visible, Tensor grad_fill)");
  // images (B, C, H, W) with the pixels of dropped patch-grid cells set to zero.
  m.def("mask_image(Tensor images, int patch, Tensor ids_keep) -> Tensor");

  // Diffusion noise schedule (SPEC section 3; contract in reference.diffusion_* / philox_*).
  // Seeded noise: Philox4x32-10, counter = (idx mod 2^32, idx div 2^32, 0, 0) for flat element
  // index idx, key = (seed mod 2^32, seed div 2^32); `int seed` carries the unsigned 64-bit seed
  // in two's complement. The noise-taking ops use `noise` when given and the seed otherwise.
  // coef_x0 / coef_noise: per-sample coefficients (B,) in the accumulation dtype (float32;
  // float64 for float64 inputs), e.g. sqrt(alpha_bar[t]) and sqrt(1 - alpha_bar[t]).
  // target: 0 epsilon, 1 x0, 2 v (= coef_x0 * eps - coef_noise * x0).
  // (..., 4) int64 counter words in [0, 2^32) -> (..., 4) int64 output words
  m.def("philox_uint32(Tensor counter, int seed) -> Tensor");
  // int64 flat element indices (any shape) -> float32 standard normals of the same shape
  m.def("philox_normal(Tensor index, int seed) -> Tensor");
  // x_t = coef_x0[b] * x0 + coef_noise[b] * eps, in x0's dtype
  m.def(
      "diffusion_q_sample(Tensor x0, Tensor coef_x0, Tensor coef_noise, Tensor? noise, int seed) -> Tensor x_t");
  // Per-sample sums of squared errors (B,) in the accumulation dtype.
  m.def(
      "diffusion_loss(Tensor pred, Tensor x0, Tensor coef_x0, Tensor coef_noise, Tensor? noise, int seed, "
      "int target) -> Tensor sse");
  // grad_pred = 2 (pred - target) * grad_sse[b], target regenerated from the seed.
  m.def(
      "diffusion_loss_backward(Tensor grad_sse, Tensor pred, Tensor x0, Tensor coef_x0, Tensor coef_noise, "
      "Tensor? noise, int seed, int target) -> Tensor grad_pred");
}

FASTCON_PYTHON_MODULE(_C)
