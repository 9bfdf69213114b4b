"""Triton kernels, one module per op. They run on CUDA tensors, or on CPU tensors under the
Triton interpreter (TRITON_INTERPRET=1 must be set before a kernel module is imported)."""
