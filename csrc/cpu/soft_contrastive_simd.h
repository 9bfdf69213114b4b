// The vectorised tile passes of the soft contrastive loss (float), written once over a lane type V
// and included by csrc/cpu/soft_contrastive.cpp once per SIMD level, inside a namespace that
// defines V and under that level's `#pragma GCC target`. Each pass is the scalar pass of the same
// name (`*_scalar` there) on V::kLanes columns at a time.
//
// V provides: kLanes; F (lanes of float) and M (a lane mask); zero, set1, load, store, add, sub,
// mul, div, min, max, abs, fmadd(a, b, c) = a b + c, fnmadd(a, b, c) = c - a b, round (to nearest
// integer), scale2(p, n) = p 2^n (IEEE overflow, gradual underflow), hsum, hmax; tail(bc, j)
// (lanes j.. inside the tile), keep(t, r, j, tail) (lanes of tile row r that take part: different
// ids or the positive pair), zero_unless(k, x), where(k, x, other) and load_tail(p, tail) (lanes
// outside tail read as 0; for the per-column arrays that are not padded).
//
// Tile rows (stride kLds) and the col_out scratch are padded past the tile's last column, so full
// vectors are loaded and stored there; lanes past bc are masked out of every sum.
// No include guard: included once per level on purpose.

// exp with Cephes' range reduction and polynomial (about 1 ulp); 0 below -104, inf above 88.7,
// NaN for NaN: x is the second operand of the clamps, whose max / min return it when it is NaN
// (a NaN logit must reach the sums, SPEC section 1, not be clamped to 0 or inf)
FI V::F exp_v(V::F x) {
  x = V::min(V::set1(89.0f), V::max(V::set1(-104.0f), x));
  const V::F n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  V::F r = V::fnmadd(n, V::set1(0.693359375f), x);
  r = V::fnmadd(n, V::set1(-2.12194440e-4f), r);
  V::F p = V::set1(1.9875691500e-4f);
  p = V::fmadd(p, r, V::set1(1.3981999507e-3f));
  p = V::fmadd(p, r, V::set1(8.3334519073e-3f));
  p = V::fmadd(p, r, V::set1(4.1665795894e-2f));
  p = V::fmadd(p, r, V::set1(1.6666665459e-1f));
  p = V::fmadd(p, r, V::set1(5.0000001201e-1f));
  p = V::fmadd(p, V::mul(r, r), V::add(r, V::set1(1.0f)));
  return V::scale2(p, n);
}

// softplus(x) = max(x, 0) + log1p(y), y = exp(-|x|) in (0, 1]. log1p(y) = 2 atanh(t) with
// t = y / (2 + y) <= 1/3: an odd series in t, accurate for tiny y where 1 + y would round.
FI V::F softplus_v(V::F x) {
  const V::F y = exp_v(V::sub(V::zero(), V::abs(x)));
  const V::F t = V::div(y, V::add(y, V::set1(2.0f)));
  const V::F z = V::mul(t, t);
  V::F q = V::set1(1.0f / 13);
  q = V::fmadd(q, z, V::set1(1.0f / 11));
  q = V::fmadd(q, z, V::set1(1.0f / 9));
  q = V::fmadd(q, z, V::set1(1.0f / 7));
  q = V::fmadd(q, z, V::set1(1.0f / 5));
  q = V::fmadd(q, z, V::set1(1.0f / 3));
  q = V::fmadd(q, z, V::set1(1.0f));
  const V::F log1p_y = V::mul(V::add(t, t), q);
  return V::add(V::max(x, V::zero()), log1p_y);
}

FI V::M lanes(const Tile<float>& t, int64_t r, int64_t j, V::M tail, bool masked) {
  return masked ? V::keep(t, r, j, tail) : tail;
}

template <bool Masked>
void fwd_fixed(const Tile<float>& t, float shift, float* row_out, float* col_out) {
  for (int64_t j = 0; j < t.bc; j += V::kLanes) V::store(col_out + j, V::zero());
  const V::F vshift = V::set1(shift);
  for (int64_t r = 0; r < t.br; ++r) {
    const float* s = t.s + r * kLds;
    V::F acc = V::zero();
    for (int64_t j = 0; j < t.bc; j += V::kLanes) {
      const V::M k = lanes(t, r, j, V::tail(t.bc, j), Masked);
      const V::F e = V::zero_unless(k, exp_v(V::sub(V::load(s + j), vshift)));
      acc = V::add(acc, e);
      V::store(col_out + j, V::add(V::load(col_out + j), e));
    }
    row_out[r] = V::hsum(acc);
  }
}

template <bool Masked>
void tile_max(const Tile<float>& t, float* row_out, float* col_out) {
  const V::F ninf = V::set1(kNegInf<float>);
  for (int64_t j = 0; j < t.bc; j += V::kLanes) V::store(col_out + j, ninf);
  for (int64_t r = 0; r < t.br; ++r) {
    const float* s = t.s + r * kLds;
    V::F mx = ninf;
    for (int64_t j = 0; j < t.bc; j += V::kLanes) {
      const V::M k = lanes(t, r, j, V::tail(t.bc, j), Masked);
      const V::F x = V::where(k, V::load(s + j), ninf);
      mx = V::max(mx, x);
      V::store(col_out + j, V::max(V::load(col_out + j), x));
    }
    row_out[r] = V::hmax(mx);
  }
}

template <bool Masked>
void fwd_running(const Tile<float>& t, const float* row_max, const float* col_max, float* row_out, float* col_out) {
  if (col_max)
    for (int64_t j = 0; j < t.bc; j += V::kLanes) V::store(col_out + j, V::zero());
  for (int64_t r = 0; r < t.br; ++r) {
    const float* s = t.s + r * kLds;
    const V::F rm = V::set1(row_max[r]);
    V::F acc = V::zero();
    for (int64_t j = 0; j < t.bc; j += V::kLanes) {
      const V::M tail = V::tail(t.bc, j);
      const V::M k = lanes(t, r, j, tail, Masked);
      const V::F x = V::load(s + j);
      acc = V::add(acc, V::zero_unless(k, exp_v(V::sub(x, rm))));
      if (col_max) {
        const V::F ec = V::zero_unless(k, exp_v(V::sub(x, V::load_tail(col_max + j, tail))));
        V::store(col_out + j, V::add(V::load(col_out + j), ec));
      }
    }
    row_out[r] = V::hsum(acc);
  }
}

inline void fwd_sigmoid(const Tile<float>& t, float bias, float* row_out) {
  const V::F vb = V::set1(bias);
  for (int64_t r = 0; r < t.br; ++r) {
    const float* s = t.s + r * kLds;
    V::F acc = V::zero();
    for (int64_t j = 0; j < t.bc; j += V::kLanes) {
      const V::F sp = softplus_v(V::add(V::load(s + j), vb));
      acc = V::add(acc, V::zero_unless(V::tail(t.bc, j), sp));
    }
    row_out[r] = V::hsum(acc);
  }
}

// W = exp(s - shift) * (a_r + b_j) on kept pairs (b may be nullptr: 0), written over s
template <bool Masked>
void bwd_fixed(const Tile<float>& t, float shift, const float* a, const float* b, float* wsum_out) {
  const V::F vshift = V::set1(shift);
  for (int64_t r = 0; r < t.br; ++r) {
    float* s = t.s + r * kLds;
    const V::F va = V::set1(a[r]);
    V::F acc = V::zero();
    for (int64_t j = 0; j < t.bc; j += V::kLanes) {
      const V::M tail = V::tail(t.bc, j);
      const V::M k = lanes(t, r, j, tail, Masked);
      const V::F coef = b ? V::add(va, V::load_tail(b + j, tail)) : va;
      const V::F w = V::zero_unless(k, V::mul(exp_v(V::sub(V::load(s + j), vshift)), coef));
      V::store(s + j, w);
      acc = V::add(acc, w);
    }
    wsum_out[r] = V::hsum(acc);
  }
}

// W = g_r exp(s - lse_r) + h_j exp(s - lse_j) on kept pairs (h may be nullptr: 0)
template <bool Masked>
void bwd_running(const Tile<float>& t, const float* g, const float* lse_r, const float* h, const float* lse_c,
                 float* wsum_out) {
  for (int64_t r = 0; r < t.br; ++r) {
    float* s = t.s + r * kLds;
    const V::F vg = V::set1(g[r]), vl = V::set1(lse_r[r]);
    V::F acc = V::zero();
    for (int64_t j = 0; j < t.bc; j += V::kLanes) {
      const V::M tail = V::tail(t.bc, j);
      const V::M k = lanes(t, r, j, tail, Masked);
      const V::F x = V::load(s + j);
      V::F w = V::mul(vg, exp_v(V::sub(x, vl)));
      if (h) {
        const V::F ec = exp_v(V::sub(x, V::load_tail(lse_c + j, tail)));
        w = V::fmadd(V::load_tail(h + j, tail), ec, w);
      }
      w = V::zero_unless(k, w);
      V::store(s + j, w);
      acc = V::add(acc, w);
    }
    wsum_out[r] = V::hsum(acc);
  }
}

inline void bwd_sigmoid(const Tile<float>& t, float bias, const float* g, float* wsum_out) {
  const V::F vb = V::set1(bias), one = V::set1(1.0f);
  for (int64_t r = 0; r < t.br; ++r) {
    float* s = t.s + r * kLds;
    const V::F vg = V::set1(g[r]);
    V::F acc = V::zero();
    for (int64_t j = 0; j < t.bc; j += V::kLanes) {
      const V::F x = V::add(V::load(s + j), vb);
      const V::F e = exp_v(V::sub(V::zero(), x));
      const V::F w = V::zero_unless(V::tail(t.bc, j), V::div(vg, V::add(one, e)));
      V::store(s + j, w);
      acc = V::add(acc, w);
    }
    wsum_out[r] = V::hsum(acc);
  }
}
