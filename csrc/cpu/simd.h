// Run-time SIMD detection for the CPU kernels. The extension is compiled for baseline x86-64;
// hot loops are compiled a second time with target attributes and picked here at run time.
#pragma once

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace fastcon::cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "AVX-512";
    case Isa::kAvx2: return "AVX2";
    default: return "scalar";
  }
}

// The level every CPU kernel runs at: the best this CPU has, capped by the environment variable
// FASTCON_CPU_ISA (scalar | avx2 | avx512) so that tests can run each path on one machine. Read on
// every call (getenv costs far less than any kernel), so a test can change it between calls.
inline Isa active_isa() {
  static const Isa best = detect_isa();
  const char* cap = std::getenv("FASTCON_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  const std::string c(cap);
  Isa want;
  if (c == "scalar") {
    want = Isa::kScalar;
  } else if (c == "avx2") {
    want = Isa::kAvx2;
  } else if (c == "avx512") {
    want = Isa::kAvx512;
  } else {
    throw std::invalid_argument("FASTCON_CPU_ISA must be scalar, avx2 or avx512, got '" + c + "'");
  }
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

}  // namespace fastcon::cpu
