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

// The SIMD level the CPU kernels use on this machine (chosen at run time).
std::string cpu_capability();

}  // namespace fastcon

TORCH_LIBRARY(fastcon, m) {
  m.def("build_info() -> str", &fastcon::build_info);
  m.def("cpu_capability() -> str", &fastcon::cpu_capability);

  // Soft contrastive loss, blockwise pass (SPEC section 1; contract in reference.sc_core_*).
  // mode: 0 softmax, 1 softmax with same-id pairs masked (scene_mode="ignore"), 2 sigmoid.
  // Positive of row i is column i + row_offset. logit_bound > 0 promises |scale * u.v| <= it.
  m.def(
      "sc_forward(Tensor u, Tensor v, Tensor? row_ids, Tensor? col_ids, int row_offset, float scale, "
      "float bias, float logit_bound, int mode, bool need_col) -> (Tensor row_stat, Tensor col_stat)");
  m.def(
      "sc_backward(Tensor u, Tensor v, Tensor? row_ids, Tensor? col_ids, int row_offset, float scale, "
      "float bias, float logit_bound, int mode, Tensor row_stat, Tensor? col_stat, Tensor row_weight, "
      "Tensor? col_weight) -> (Tensor grad_u, Tensor grad_v, Tensor row_wsum)");
}

FASTCON_PYTHON_MODULE(_C)
