// The row loops of the masking kernels, written once and compiled once per instruction set.
//
// Deliberately without an include guard: csrc/cpu/masking.cpp includes this file several
// times, each time inside a namespace that defines `Lanes` (the SIMD width and the load /
// store / add of that instruction set) and under a matching `#pragma GCC target`. Lanes
// converts fp16 / bf16 to fp32 in registers, which is what makes the half-precision paths run
// at memory speed (c10's scalar conversions are several times slower than the memory).

// out[i] = T(acc(a[i]) + acc(b[i])): one rounding, like the reference's fp32 sum.
template <class T>
void add_rows(const T* a, const T* b, T* out, int64_t n) {
  int64_t i = 0;
  if constexpr (Lanes::template kSupports<T>) {
    for (; i + Lanes::kWidth <= n; i += Lanes::kWidth) {
      Lanes::store(out + i, Lanes::add(Lanes::load(a + i), Lanes::load(b + i)));
    }
  }
  for (; i < n; ++i) out[i] = static_cast<T>(static_cast<MaskAcc<T>>(a[i]) + static_cast<MaskAcc<T>>(b[i]));
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
