// Fused CPU kernels of the soft contrastive loss: the blockwise N x M pass (SPEC section 1;
// contract in fastcon/reference.py sc_core_forward / sc_core_backward). Raw pointers, row-major,
// contiguous; T is float (fp16/bf16 inputs are upcast by the caller) or double.
#pragma once

#include <cstdint>

namespace fastcon::cpu {

enum ScMode : int { kScSoftmax = 0, kScSoftmaxIgnore = 1, kScSigmoid = 2 };

struct ScProblem {
  int64_t n = 0;  // rows of u
  int64_t m = 0;  // rows of v (columns of the logit matrix)
  int64_t d = 0;  // features
  const int64_t* row_ids = nullptr;  // (n,), mode kScSoftmaxIgnore only
  const int64_t* col_ids = nullptr;  // (m,), mode kScSoftmaxIgnore only
  int64_t row_offset = 0;            // the positive of row i is column i + row_offset (may lie outside [0, m))
  double scale = 1.0;                // s_ij = scale * u_i . v_j
  double bias = 0.0;                 // sigmoid: x_ij = s_ij + bias
  double logit_bound = 0.0;          // > 0: the caller promises |s_ij| <= logit_bound
  int mode = kScSoftmax;
};

// row (n,): logsumexp_j s_ij (softmax modes; masked pairs left out) or sum_j softplus(x_ij)
// (sigmoid). col (m,): logsumexp_i s_ij, written when col != nullptr (softmax modes only).
template <typename T>
void sc_forward(const T* u, const T* v, const ScProblem& p, T* row, T* col);

// W_ij = g_i exp(s_ij - row_i) + h_j exp(s_ij - col_j) (softmax modes; h == nullptr means 0, then
// col is not read) or g_i sigmoid(x_ij) (sigmoid). Writes grad_u = W v (n, d), grad_v = W^T u
// (m, d) and row_wsum = W 1 (n,).
template <typename T>
void sc_backward(const T* u, const T* v, const ScProblem& p, const T* row, const T* col, const T* g, const T* h,
                 T* grad_u, T* grad_v, T* row_wsum);

// Whether (p, T) takes the one-exp fixed-max path (SPEC section 5) rather than running maxima.
template <typename T>
bool sc_uses_fixed_max(const ScProblem& p);

}  // namespace fastcon::cpu
