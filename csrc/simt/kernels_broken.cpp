// The loss kernels (the tile pass and the fused loss around it) once more, with deliberate bugs compiled in (selected at run time with
// torch.ops.fastcon_simt_broken.set_break_variant): tests/test_simt_catches_bugs.py checks
// that the emulated tests fail on them, i.e. that the emulator catches what it is for.
//   1: no __syncthreads between staging a GEMM chunk in shared memory and reading it
//   2: off-by-one tile bound: the zero padding column after the last one joins the sums
//   3: no __syncthreads between reading a GEMM chunk and staging the next one over it
#define FASTCON_SIMT 1
#define FASTCON_KERNEL_NS simt_broken
#ifndef FASTCON_SIMT_BREAK
#define FASTCON_SIMT_BREAK 0
#endif
#include "cuda/common.cuh"
#include "cuda/soft_contrastive.cu"
#include "cuda/soft_contrastive_loss.cu"
