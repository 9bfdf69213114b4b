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
