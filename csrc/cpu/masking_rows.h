// The row loops of the masking kernels, written once and compiled once per instruction set.
//
// Deliberately without an include guard: csrc/cpu/masking.cpp includes this file several
// times, each time inside a namespace that defines `Lanes` (the SIMD width and the load /
// store / add of that instruction set) and under a matching `#pragma GCC target`. Lanes
// converts fp16 / bf16 to fp32 in registers, which is what makes the half-precision paths run
// at memory speed (c10's scalar conversions are several times slower than the memory).
//
// kStream selects non-temporal stores, for outputs much larger than the caches: they skip the
// read of each output line that an ordinary store does before overwriting it (a third of the
// memory traffic of a copy), and do not evict the inputs. They need aligned addresses, so the
// loops peel a short head; the caller issues the store fence (Lanes::fence) after a task.

template <class T>
MaskAcc<T> scalar_sum(T a, T b) {
  return static_cast<MaskAcc<T>>(a) + static_cast<MaskAcc<T>>(b);
}

template <class T>
bool vector_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (uintptr_t(Lanes::kWidth) * sizeof(T)) == 0;
}

// out[i] = T(acc(a[i]) + acc(b[i])): one rounding, like the reference's fp32 sum.
template <class T, bool kStream>
void add_rows(const T* a, const T* b, T* out, int64_t n) {
  int64_t i = 0;
  if constexpr (Lanes::template kSupports<T>) {
    if constexpr (kStream) {
      for (; i < n && !vector_aligned(out + i); ++i) out[i] = static_cast<T>(scalar_sum(a[i], b[i]));
    }
    for (; i + Lanes::kWidth <= n; i += Lanes::kWidth) {
      const auto v = Lanes::add(Lanes::load(a + i), Lanes::load(b + i));
      if constexpr (kStream) {
        Lanes::stream(out + i, v);
      } else {
        Lanes::store(out + i, v);
      }
    }
  }
  for (; i < n; ++i) out[i] = static_cast<T>(scalar_sum(a[i], b[i]));
}

// acc[i] += a[i]
template <class T>
void accumulate_rows(const T* a, MaskAcc<T>* acc, int64_t n) {
  int64_t i = 0;
  if constexpr (Lanes::template kSupports<T>) {
    for (; i + Lanes::kWidth <= n; i += Lanes::kWidth) {
      Lanes::store(acc + i, Lanes::add(Lanes::load(acc + i), Lanes::load(a + i)));
    }
  }
  for (; i < n; ++i) acc[i] += static_cast<MaskAcc<T>>(a[i]);
}

// out[i] = T(acc[i])
template <class T>
void round_rows(const MaskAcc<T>* acc, T* out, int64_t n) {
  int64_t i = 0;
  if constexpr (Lanes::template kSupports<T>) {
    for (; i + Lanes::kWidth <= n; i += Lanes::kWidth) Lanes::store(out + i, Lanes::load(acc + i));
  }
  for (; i < n; ++i) out[i] = static_cast<T>(acc[i]);
}

// Byte copies and zero fills with non-temporal stores (the dtype does not matter to them).
inline void stream_copy(void* dst_, const void* src_, size_t n) {
  char* dst = static_cast<char*>(dst_);
  const char* src = static_cast<const char*>(src_);
  size_t i = 0;
  if constexpr (Lanes::kBytes > 0) {
    i = std::min(n, (Lanes::kBytes - reinterpret_cast<uintptr_t>(dst) % Lanes::kBytes) % Lanes::kBytes);
    std::memcpy(dst, src, i);
    for (; i + Lanes::kBytes <= n; i += Lanes::kBytes) Lanes::stream_bytes(dst + i, src + i);
  }
  std::memcpy(dst + i, src + i, n - i);
}

inline void stream_zero(void* dst_, size_t n) {
  char* dst = static_cast<char*>(dst_);
  size_t i = 0;
  if constexpr (Lanes::kBytes > 0) {
    i = std::min(n, (Lanes::kBytes - reinterpret_cast<uintptr_t>(dst) % Lanes::kBytes) % Lanes::kBytes);
    std::memset(dst, 0, i);
    for (; i + Lanes::kBytes <= n; i += Lanes::kBytes) Lanes::zero_bytes(dst + i);
  }
  std::memset(dst + i, 0, n - i);
}
