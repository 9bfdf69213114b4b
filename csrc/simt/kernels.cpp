// The CUDA kernel sources of csrc/cuda, compiled for the CPU against the SIMT emulator
// (fastcon._C_simt; bindings in csrc/simt/module.cpp).
#define FASTCON_SIMT 1
#define FASTCON_KERNEL_NS simt_gpu
#include "cuda/common.cuh"
// (list every csrc/cuda/*.cu kernel file here)
#include "cuda/diffusion.cu"
#include "cuda/masking.cu"
#include "cuda/soft_contrastive.cu"
#include "cuda/soft_contrastive_loss.cu"
