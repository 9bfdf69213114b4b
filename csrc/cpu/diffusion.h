// Diffusion noise-schedule kernels for CPU tensors (SPEC section 3; contract in
// fastcon/reference.py: diffusion_q_sample, diffusion_loss, diffusion_loss_backward, philox_*).
//
// Every kernel is one pass over a contiguous (batch, per_sample) view of its inputs; seeded
// noise is regenerated per element by Philox4x32-10 (csrc/common/philox.h) and never stored.
// The SIMD level (AVX-512, AVX2 or scalar) is chosen at run time; all levels give the same bits
// for the noise and the elementwise outputs (the loss sums differ in summation order only).
#pragma once

#include <stdint.h>

namespace fastcon::cpu::diffusion {

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
enum class Target : int { kEpsilon = 0, kX0 = 1, kV = 2 };

// One batch: x0 (and noise, pred, outputs) hold batch x per_sample contiguous elements of
// `dtype`; coef_x0 / coef_noise hold `batch` coefficients in the accumulation dtype (double for
// kFloat64, float otherwise). noise == nullptr means seeded noise.
struct Batch {
  Dtype dtype;
  int64_t batch;
  int64_t per_sample;
  const void* x0;
  const void* noise;
  const void* coef_x0;
  const void* coef_noise;
  uint64_t seed;
  int num_threads;
};

// x_t = coef_x0[b] x0 + coef_noise[b] eps, in x0's dtype.
void q_sample(const Batch& batch, void* x_t);

// sse[b] = sum_i (pred - target)^2 in the accumulation dtype.
void loss(const Batch& batch, const void* pred, Target target, void* sse);

// grad_pred = 2 (pred - target) grad_sse[b] in pred's dtype (grad_sse in the accumulation dtype).
void loss_backward(const Batch& batch, const void* pred, const void* grad_sse, Target target, void* grad_pred);

// out[i, :] = Philox4x32-10(counter[i, :], seed), n counters of 4 words held in int64.
void philox_words(const int64_t* counter, int64_t n, uint64_t seed, int64_t* out, int num_threads);

// out[i] = the seeded normal of flat element index[i].
void philox_normal(const int64_t* index, int64_t n, uint64_t seed, float* out, int num_threads);

}  // namespace fastcon::cpu::diffusion
