// The diffusion kernels' loops, written once over a lane type `V` and compiled once per SIMD
// level: csrc/cpu/diffusion.cpp includes this file inside namespace isa_<level>, right after
// that level's `struct V`, under that level's target pragma. No include guard on purpose.
//
// Work is split into chunks of kChunk elements of one sample; chunks are independent, so the
// results do not depend on the thread count. Each element's noise depends only on its flat
// index, so full vectors and tails (staged through small buffers) give the same bits.

using F = V::F;
using U = V::U;
constexpr int L = V::kLanes;

// ---- Philox4x32-10 and the normal transform on L lanes -------------------------------------
// The scalar level calls csrc/common/philox.h directly; the SIMD levels repeat its operations
// lane-wise, in the same order and without fused multiply-adds, so that all agree bit for bit.
//
// Philox runs on W: the L counters' words in 64-bit lanes (value in the low half, the high half
// is don't-care). A 32 x 32 -> 64-bit multiply then yields lo in place and hi one shuffle away,
// with no blends: 6 instructions per round per register, 4 of them off the multiplier port.

using W = V::W;

FI void philox_rounds(W c[4], const RoundKeys& k) {
  const U m0 = V::set1u(philox::kMul0), m1 = V::set1u(philox::kMul1);
  for (int r = 0; r < philox::kRounds; ++r) {
    const W p0 = V::mul(c[0], m0), p1 = V::mul(c[2], m1);
    c[0] = V::xor3(V::high(p1), c[1], k.k0[r]);
    c[1] = p1;
    c[2] = V::xor3(V::high(p0), c[3], k.k1[r]);
    c[3] = p0;
  }
}

// Words 0 and 1 of the blocks of counters (idx lo, idx hi, 0, 0): the first round multiplies a
// zero word and the last needs only one product. kN independent vectors are interleaved
// instruction by instruction: one vector's 10 dependent rounds alone leave the ports idle.
template <int kN>
FI void philox_words01(const W* idx, const RoundKeys& k, U* w0, U* w1) {
  const U m0 = V::set1u(philox::kMul0), m1 = V::set1u(philox::kMul1);
  W c0[kN], c1[kN], c2[kN], c3[kN];
  for (int j = 0; j < kN; ++j) {
    const W p0 = V::mul(idx[j], m0);
    c0[j] = V::xor2(V::high(idx[j]), k.k0[0]);
    c1[j] = V::zero();
    c2[j] = V::xor2(V::high(p0), k.k1[0]);
    c3[j] = p0;
  }
  for (int r = 1; r < philox::kRounds - 1; ++r) {
    for (int j = 0; j < kN; ++j) {
      const W p0 = V::mul(c0[j], m0), p1 = V::mul(c2[j], m1);
      c0[j] = V::xor3(V::high(p1), c1[j], k.k0[r]);
      c1[j] = p1;
      c2[j] = V::xor3(V::high(p0), c3[j], k.k1[r]);
      c3[j] = p0;
    }
  }
  for (int j = 0; j < kN; ++j) {
    const W p1 = V::mul(c2[j], m1);
    w0[j] = V::pack(V::xor3(V::high(p1), c1[j], k.k0[philox::kRounds - 1]));
    w1[j] = V::pack(p1);
  }
}

FI F uniform_lanes(U w) {
  return V::add(V::mul(V::u32_to_f(V::template srl<9>(w)), V::set1(1.1920928955078125e-07f)),
                V::set1(5.9604644775390625e-08f));
}

FI F minus_two_log_lanes(F u) {  // philox::minus_two_log
  using namespace philox::coef;
  const U bits = V::as_u(u);
  const U mant = V::andu(bits, V::set1u(0x007FFFFFu));
  const U big = V::template srl<23>(V::addu(mant, V::set1u(0x00800000u - 0x003504F4u)));
  const F m = V::as_f(V::oru(mant, V::subu(V::set1u(0x3F800000u), V::template sll<23>(big))));
  const F e = V::sub(V::u32_to_f(V::addu(V::template srl<23>(bits), big)), V::set1(127.0f));
  const F f = V::sub(m, V::set1(1.0f));
  const F f2 = V::mul(f, f);
  F p = V::set1(kLog7);
  for (const float c : {kLog6, kLog5, kLog4, kLog3, kLog2, kLog1, kLog0}) p = V::add(V::mul(p, f), V::set1(c));
  const F ln_m = V::add(f, V::add(V::mul(f2, V::set1(-0.5f)), V::mul(V::mul(f2, f), p)));
  const F ln_u = V::add(V::mul(e, V::set1(kLn2Hi)), V::add(V::mul(e, V::set1(kLn2Lo)), ln_m));
  return V::mul(V::set1(-2.0f), ln_u);
}

FI F cos_two_pi_lanes(F u) {  // philox::cos_two_pi
  using namespace philox::coef;
  const F b = V::min(u, V::sub(V::set1(1.0f), u));
  const F x = V::mul(V::sub(V::set1(0.25f), b), V::set1(kTwoPi));
  const F x2 = V::mul(x, x);
  F q = V::set1(kSin4);
  for (const float c : {kSin3, kSin2, kSin1, kSin0}) q = V::add(V::mul(q, x2), V::set1(c));
  return V::add(x, V::mul(V::mul(x, x2), q));
}

// The normals of kN vectors of elements: flat indices idx[j] (lanes: 64-bit words).
// (A template on the level only so that the other level's branch is discarded, not compiled.)
template <int kN, class Z = V>
FI void normal_lanes(const typename Z::W* idx, const RoundKeys& k, F* out) {
  if constexpr (Z::kLanes == 1) {
    for (int j = 0; j < kN; ++j) out[j] = philox::normal_at(idx[j], k.seed);
  } else {
    U w0[kN], w1[kN];
    philox_words01<kN>(idx, k, w0, w1);
    F r[kN];
    for (int j = 0; j < kN; ++j) r[j] = V::sqrt(minus_two_log_lanes(uniform_lanes(w0[j])));
    for (int j = 0; j < kN; ++j) out[j] = V::mul(r[j], cos_two_pi_lanes(uniform_lanes(w1[j])));
  }
}

// Noise vectors are made kGroup at a time: elements base .. base + kGroup L - 1.
constexpr int kGroup = L == 16 ? 3 : (L == 8 ? 2 : 1);  // as many as the registers hold (measured)

FI void normals_at(uint64_t base, const RoundKeys& k, F* out) {
  W idx[kGroup];
  for (int j = 0; j < kGroup; ++j) idx[j] = V::iota(base + static_cast<uint64_t>(j) * L);
  normal_lanes<kGroup>(idx, k, out);
}

template <class Z = V>
FI void philox_block(typename Z::W c[4], const RoundKeys& k) {
  if constexpr (Z::kLanes == 1) {
    const philox::Words r = philox::philox4x32_10(
        philox::Words{{static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]), static_cast<uint32_t>(c[2]),
                       static_cast<uint32_t>(c[3])}},
        k.seed);
    for (int w = 0; w < 4; ++w) c[w] = r.w[w];
  } else {
    philox_rounds(c, k);
  }
}

// ---- storage <-> fp32 lanes, with partial vectors staged through a buffer ----------------------

template <Dtype D>
FI F load(const void* p, int64_t i, int n) {
  using T = storage_t<D>;
  const T* src = static_cast<const T*>(p) + i;
  if (n == L) return V::template load<D>(src);
  alignas(64) T buf[L] = {};
  std::memcpy(buf, src, sizeof(T) * n);
  return V::template load<D>(buf);
}

template <Dtype D>
FI void store(void* p, int64_t i, int n, F x) {
  using T = storage_t<D>;
  T* dst = static_cast<T*>(p) + i;
  if (n == L) return V::template store<D>(dst, x);
  alignas(64) T buf[L];
  V::template store<D>(buf, x);
  std::memcpy(dst, buf, sizeof(T) * n);
}

FI F keep_first(F x, int n) {  // lanes n .. L-1 set to zero
  if (n == L) return x;
  alignas(64) float buf[L];
  V::template store<Dtype::kFloat32>(buf, x);
  for (int j = n; j < L; ++j) buf[j] = 0.0f;
  return V::template load<Dtype::kFloat32>(buf);
}

// ---- the chunked, parallel loops ---------------------------------------------------------------

constexpr int64_t kChunk = 6144;  // a multiple of every level's group of vectors (48, 16, 1)

// Dynamic scheduling: on a shared machine a thread that loses its core holds up a static split.
template <class Body>
void for_each_chunk(const Batch& bt, Body body) {
  const int64_t chunks = (bt.per_sample + kChunk - 1) / kChunk;
  const int64_t items = bt.batch * chunks;
#pragma omp parallel for schedule(dynamic, 4) num_threads(bt.num_threads) if (items > 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / chunks, i0 = (item % chunks) * kChunk;
    body(item, b, i0, std::min(bt.per_sample, i0 + kChunk));
  }
}

// One vector of the regression target (accumulation fp32), given x0 and eps lanes.
template <Target kTarget>
FI F target_lanes(F a, F s, F x, F e) {
  if constexpr (kTarget == Target::kEpsilon) return e;
  if constexpr (kTarget == Target::kX0) return x;
  return V::sub(V::mul(a, e), V::mul(s, x));  // v = a eps - s x0
}

// Walks elements i0 .. i1-1 of one sample (row = its first flat index) a group of kGroup
// vectors at a time, calling step(flat index, lanes in use, eps) per vector; eps is seeded,
// loaded, or unused (kNoise false: the x0 target).
template <Dtype D, bool kNoise, bool kSeeded, class Step>
FI void for_each_vector(const Batch& bt, const RoundKeys& k, int64_t row, int64_t i0, int64_t i1, Step step) {
  for (int64_t i = i0; i < i1; i += kGroup * L) {
    F e[kGroup];
    if constexpr (kNoise && kSeeded) normals_at(static_cast<uint64_t>(row + i), k, e);
    for (int j = 0; j < kGroup; ++j) {
      const int64_t at = i + j * L;
      if (at >= i1) break;
      const int n = static_cast<int>(std::min<int64_t>(L, i1 - at));
      if constexpr (kNoise && !kSeeded) e[j] = load<D>(bt.noise, row + at, n);
      if constexpr (!kNoise) e[j] = V::set1(0.0f);
      step(row + at, n, e[j]);
    }
  }
}

template <Dtype D, bool kSeeded>
void q_sample_lanes(const Batch& bt, const RoundKeys& k, void* out) {
  const float* ca = static_cast<const float*>(bt.coef_x0);
  const float* cs = static_cast<const float*>(bt.coef_noise);
  for_each_chunk(bt, [&](int64_t, int64_t b, int64_t i0, int64_t i1) {
    const F a = V::set1(ca[b]), s = V::set1(cs[b]);
    for_each_vector<D, true, kSeeded>(bt, k, b * bt.per_sample, i0, i1, [&](int64_t at, int n, F e) {
      const F x = load<D>(bt.x0, at, n);
      store<D>(out, at, n, V::add(V::mul(a, x), V::mul(s, e)));
    });
  });
}

template <Dtype D, bool kSeeded, Target kTarget>
void loss_lanes(const Batch& bt, const RoundKeys& k, const void* pred, float* sse) {
  const float* ca = static_cast<const float*>(bt.coef_x0);
  const float* cs = static_cast<const float*>(bt.coef_noise);
  const int64_t chunks = (bt.per_sample + kChunk - 1) / kChunk;
  std::vector<float> partial(bt.batch * chunks);
  for_each_chunk(bt, [&](int64_t item, int64_t b, int64_t i0, int64_t i1) {
    const F a = V::set1(ca[b]), s = V::set1(cs[b]);
    F acc = V::set1(0.0f);
    constexpr bool kNoise = kTarget != Target::kX0;
    for_each_vector<D, kNoise, kSeeded>(bt, k, b * bt.per_sample, i0, i1, [&](int64_t at, int n, F e) {
      const F x = kTarget == Target::kEpsilon ? V::set1(0.0f) : load<D>(bt.x0, at, n);
      const F d = keep_first(V::sub(load<D>(pred, at, n), target_lanes<kTarget>(a, s, x, e)), n);
      acc = V::add(acc, V::mul(d, d));
    });
    partial[item] = V::hsum(acc);
  });
  for (int64_t b = 0; b < bt.batch; ++b) {  // chunk partials in a fixed order, in double
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += partial[b * chunks + c];
    sse[b] = static_cast<float>(total);
  }
}

template <Dtype D, bool kSeeded, Target kTarget>
void loss_backward_lanes(const Batch& bt, const RoundKeys& k, const void* pred, const float* grad_sse,
                         void* grad_pred) {
  const float* ca = static_cast<const float*>(bt.coef_x0);
  const float* cs = static_cast<const float*>(bt.coef_noise);
  for_each_chunk(bt, [&](int64_t, int64_t b, int64_t i0, int64_t i1) {
    const F a = V::set1(ca[b]), s = V::set1(cs[b]);
    const F two_w = V::set1(2.0f * grad_sse[b]);
    constexpr bool kNoise = kTarget != Target::kX0;
    for_each_vector<D, kNoise, kSeeded>(bt, k, b * bt.per_sample, i0, i1, [&](int64_t at, int n, F e) {
      const F x = kTarget == Target::kEpsilon ? V::set1(0.0f) : load<D>(bt.x0, at, n);
      const F d = V::sub(load<D>(pred, at, n), target_lanes<kTarget>(a, s, x, e));
      store<D>(grad_pred, at, n, V::mul(two_w, d));
    });
  });
}

// ---- float64 (gradcheck): scalar double arithmetic on the same fp32 noise ----------------------

constexpr int kGroupElems = kGroup * L;

// eps of elements idx .. idx + n - 1 (n <= kGroupElems) as doubles.
FI void noise_f64(const Batch& bt, const RoundKeys& k, int64_t idx, int n, double* out) {
  if (bt.noise != nullptr) {
    for (int j = 0; j < n; ++j) out[j] = static_cast<const double*>(bt.noise)[idx + j];
    return;
  }
  F e[kGroup];
  normals_at(static_cast<uint64_t>(idx), k, e);
  alignas(64) float buf[kGroupElems];
  for (int j = 0; j < kGroup; ++j) V::template store<Dtype::kFloat32>(buf + j * L, e[j]);
  for (int j = 0; j < n; ++j) out[j] = buf[j];
}

FI double target_f64(Target target, double a, double s, double x, double e) {
  if (target == Target::kEpsilon) return e;
  if (target == Target::kX0) return x;
  return a * e - s * x;
}

void q_sample_f64(const Batch& bt, const RoundKeys& k, double* out) {
  const double* x0 = static_cast<const double*>(bt.x0);
  const double* ca = static_cast<const double*>(bt.coef_x0);
  const double* cs = static_cast<const double*>(bt.coef_noise);
  for_each_chunk(bt, [&](int64_t, int64_t b, int64_t i0, int64_t i1) {
    const int64_t row = b * bt.per_sample;
    for (int64_t i = i0; i < i1; i += kGroupElems) {
      const int n = static_cast<int>(std::min<int64_t>(kGroupElems, i1 - i));
      double e[kGroupElems];
      noise_f64(bt, k, row + i, n, e);
      for (int j = 0; j < n; ++j) out[row + i + j] = ca[b] * x0[row + i + j] + cs[b] * e[j];
    }
  });
}

void loss_f64(const Batch& bt, const RoundKeys& k, const double* pred, Target target, double* sse) {
  const double* x0 = static_cast<const double*>(bt.x0);
  const double* ca = static_cast<const double*>(bt.coef_x0);
  const double* cs = static_cast<const double*>(bt.coef_noise);
  const int64_t chunks = (bt.per_sample + kChunk - 1) / kChunk;
  std::vector<double> partial(bt.batch * chunks);
  for_each_chunk(bt, [&](int64_t item, int64_t b, int64_t i0, int64_t i1) {
    const int64_t row = b * bt.per_sample;
    double acc = 0.0;
    for (int64_t i = i0; i < i1; i += kGroupElems) {
      const int n = static_cast<int>(std::min<int64_t>(kGroupElems, i1 - i));
      double e[kGroupElems] = {};
      if (target != Target::kX0) noise_f64(bt, k, row + i, n, e);
      for (int j = 0; j < n; ++j) {
        const double d = pred[row + i + j] - target_f64(target, ca[b], cs[b], x0[row + i + j], e[j]);
        acc += d * d;
      }
    }
    partial[item] = acc;
  });
  for (int64_t b = 0; b < bt.batch; ++b) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += partial[b * chunks + c];
    sse[b] = total;
  }
}

void loss_backward_f64(const Batch& bt, const RoundKeys& k, const double* pred, const double* grad_sse,
                       Target target, double* grad_pred) {
  const double* x0 = static_cast<const double*>(bt.x0);
  const double* ca = static_cast<const double*>(bt.coef_x0);
  const double* cs = static_cast<const double*>(bt.coef_noise);
  for_each_chunk(bt, [&](int64_t, int64_t b, int64_t i0, int64_t i1) {
    const int64_t row = b * bt.per_sample;
    for (int64_t i = i0; i < i1; i += kGroupElems) {
      const int n = static_cast<int>(std::min<int64_t>(kGroupElems, i1 - i));
      double e[kGroupElems] = {};
      if (target != Target::kX0) noise_f64(bt, k, row + i, n, e);
      for (int j = 0; j < n; ++j) {
        const double d = pred[row + i + j] - target_f64(target, ca[b], cs[b], x0[row + i + j], e[j]);
        grad_pred[row + i + j] = 2.0 * grad_sse[b] * d;
      }
    }
  });
}

// ---- dispatch on dtype, noise source and target -------------------------------------------------

template <Dtype D>
void q_sample_typed(const Batch& bt, const RoundKeys& k, void* out) {
  if (bt.noise == nullptr) return q_sample_lanes<D, true>(bt, k, out);
  return q_sample_lanes<D, false>(bt, k, out);
}

template <Dtype D, bool kSeeded>
void loss_typed(const Batch& bt, const RoundKeys& k, const void* pred, Target target, float* sse) {
  switch (target) {
    case Target::kEpsilon: return loss_lanes<D, kSeeded, Target::kEpsilon>(bt, k, pred, sse);
    case Target::kX0: return loss_lanes<D, kSeeded, Target::kX0>(bt, k, pred, sse);
    default: return loss_lanes<D, kSeeded, Target::kV>(bt, k, pred, sse);
  }
}

template <Dtype D, bool kSeeded>
void loss_backward_typed(const Batch& bt, const RoundKeys& k, const void* pred, const float* g, Target target,
                         void* out) {
  switch (target) {
    case Target::kEpsilon: return loss_backward_lanes<D, kSeeded, Target::kEpsilon>(bt, k, pred, g, out);
    case Target::kX0: return loss_backward_lanes<D, kSeeded, Target::kX0>(bt, k, pred, g, out);
    default: return loss_backward_lanes<D, kSeeded, Target::kV>(bt, k, pred, g, out);
  }
}

void run_q_sample(const Batch& bt, void* out) {
  const RoundKeys k(bt.seed);
  switch (bt.dtype) {
    case Dtype::kFloat32: return q_sample_typed<Dtype::kFloat32>(bt, k, out);
    case Dtype::kFloat16: return q_sample_typed<Dtype::kFloat16>(bt, k, out);
    case Dtype::kBFloat16: return q_sample_typed<Dtype::kBFloat16>(bt, k, out);
    case Dtype::kFloat64: return q_sample_f64(bt, k, static_cast<double*>(out));
  }
}

template <Dtype D>
void loss_dispatch(const Batch& bt, const RoundKeys& k, const void* pred, Target target, float* sse) {
  if (bt.noise == nullptr) return loss_typed<D, true>(bt, k, pred, target, sse);
  return loss_typed<D, false>(bt, k, pred, target, sse);
}

void run_loss(const Batch& bt, const void* pred, Target target, void* sse) {
  const RoundKeys k(bt.seed);
  float* out = static_cast<float*>(sse);
  switch (bt.dtype) {
    case Dtype::kFloat32: return loss_dispatch<Dtype::kFloat32>(bt, k, pred, target, out);
    case Dtype::kFloat16: return loss_dispatch<Dtype::kFloat16>(bt, k, pred, target, out);
    case Dtype::kBFloat16: return loss_dispatch<Dtype::kBFloat16>(bt, k, pred, target, out);
    case Dtype::kFloat64:
      return loss_f64(bt, k, static_cast<const double*>(pred), target, static_cast<double*>(sse));
  }
}

template <Dtype D>
void loss_backward_dispatch(const Batch& bt, const RoundKeys& k, const void* pred, const float* g, Target target,
                            void* out) {
  if (bt.noise == nullptr) return loss_backward_typed<D, true>(bt, k, pred, g, target, out);
  return loss_backward_typed<D, false>(bt, k, pred, g, target, out);
}

void run_loss_backward(const Batch& bt, const void* pred, const void* grad_sse, Target target, void* out) {
  const RoundKeys k(bt.seed);
  const float* g = static_cast<const float*>(grad_sse);
  switch (bt.dtype) {
    case Dtype::kFloat32: return loss_backward_dispatch<Dtype::kFloat32>(bt, k, pred, g, target, out);
    case Dtype::kFloat16: return loss_backward_dispatch<Dtype::kFloat16>(bt, k, pred, g, target, out);
    case Dtype::kBFloat16: return loss_backward_dispatch<Dtype::kBFloat16>(bt, k, pred, g, target, out);
    case Dtype::kFloat64:
      return loss_backward_f64(bt, k, static_cast<const double*>(pred), static_cast<const double*>(grad_sse),
                               target, static_cast<double*>(out));
  }
}

// ---- the raw stream (tests, and materialising seeded noise) ------------------------------------

void run_philox_words(const int64_t* counter, int64_t n, const RoundKeys& k, int64_t* out, int num_threads) {
  const int64_t blocks = (n + L - 1) / L;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (blocks > 64)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i0 = blk * L;
    const int m = static_cast<int>(std::min<int64_t>(L, n - i0));
    alignas(64) uint64_t words[4][L] = {};
    for (int j = 0; j < m; ++j)
      for (int w = 0; w < 4; ++w) words[w][j] = static_cast<uint32_t>(counter[(i0 + j) * 4 + w]);
    W c[4];
    for (int w = 0; w < 4; ++w) c[w] = V::load(words[w]);
    philox_block(c, k);
    for (int w = 0; w < 4; ++w) V::store(words[w], c[w]);
    for (int j = 0; j < m; ++j)
      for (int w = 0; w < 4; ++w) out[(i0 + j) * 4 + w] = static_cast<uint32_t>(words[w][j]);
  }
}

void run_philox_normal(const int64_t* index, int64_t n, const RoundKeys& k, float* out, int num_threads) {
  const int64_t blocks = (n + L - 1) / L;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (blocks > 64)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i0 = blk * L;
    const int m = static_cast<int>(std::min<int64_t>(L, n - i0));
    alignas(64) uint64_t idx[L] = {};
    std::memcpy(idx, index + i0, sizeof(int64_t) * m);
    const W w = V::load(idx);
    F z;
    normal_lanes<1>(&w, k, &z);
    store<Dtype::kFloat32>(out, i0, m, z);
  }
}
