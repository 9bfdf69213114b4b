// The interface between csrc/cuda/bindings.cpp and the CUDA kernel files: plain parameter
// structs (raw pointers, sizes, options) and one launcher per op. Free of CUDA and torch
// headers, so that the binding file compiles with any host compiler.
#ifndef FASTCON_CUDA_KERNELS_H_TYPES
#define FASTCON_CUDA_KERNELS_H_TYPES

#include <cstdint>

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;  // as the CUDA runtime declares it

namespace fastcon::kernels {

enum class DType { f16, bf16, f32, f64 };

// Soft contrastive loss, forward blockwise pass (contract: fastcon.reference.sc_core_forward).
// u (n, d), v (m, d) row-major in `dtype`; ids int64 (mode 1 only). Outputs in the
// accumulation type (fp32, fp64 for f64): row (n,), col (m,) when need_col and mode != 2.
// row, col and counter must be zero-filled by the caller.
struct ScForward {
  DType dtype;
  const void* u;
  const void* v;
  const int64_t* row_ids;
  const int64_t* col_ids;
  int64_t n, m, d, row_offset;
  double scale, bias, logit_bound;
  int mode;
  bool need_col;
  void* row;
  void* col;
  unsigned* counter;
};

// Backward blockwise pass (contract: fastcon.reference.sc_core_backward). row_stat, g (n,);
// col_stat, h (m,) or null; outputs grad_u (n, d), grad_v (m, d), wsum (n,) in the accumulation
// type. weight_max: for f16 only, a device scalar >= max|g| + max|h| that scales the weight
// tile into the fp16 range before its tensor-core product (null elsewhere).
struct ScBackward {
  DType dtype;
  const void* u;
  const void* v;
  const int64_t* row_ids;
  const int64_t* col_ids;
  int64_t n, m, d, row_offset;
  double scale, bias, logit_bound;
  int mode;
  const void* row_stat;
  const void* col_stat;
  const void* g;
  const void* h;
  const float* weight_max;
  void* grad_u;
  void* grad_v;
  void* wsum;
};

}  // namespace fastcon::kernels

#endif  // FASTCON_CUDA_KERNELS_H_TYPES

// Launcher declarations, deliberately outside the include guard: the SIMT module declares them
// for two kernel namespaces (the emulated kernels and their deliberately broken test build).
// Each returns nullptr on success, else the CUDA error string of the launch.
#ifndef FASTCON_KERNEL_NS
#define FASTCON_KERNEL_NS gpu
#endif

namespace fastcon::FASTCON_KERNEL_NS {
const char* sc_forward(const kernels::ScForward& p, cudaStream_t stream);
const char* sc_backward(const kernels::ScBackward& p, cudaStream_t stream);
#if defined(FASTCON_SIMT)
// Test builds only: which deliberate bug the broken kernels compile in (0 = none).
void set_break_variant(int variant);
#endif
}  // namespace fastcon::FASTCON_KERNEL_NS
