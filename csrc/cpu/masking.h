// Siamese masking kernels (SPEC section 2; contracts in fastcon/reference.py, section 2).
//
// Raw pointers, no torch types beyond the element types. Tensors are row-major with a unit
// stride along D; tokens and pos_embed may have any batch and row strides (views such as
// x[:, 1:] that drop a class token need no copy). ids_keep (B, K) is contiguous, each row
// strictly increasing in [0, L) (checked by the caller). Every function is parallel over
// at::parallel_for, and every sum runs in a fixed order, so results do not depend on the
// number of threads.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace fastcon::cpu {

// The accumulation type: float for fp32/fp16/bf16, double for fp64.
template <class T>
using MaskAcc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// visible[b, k] = tokens[b, ids[b, k]] + pos[b or 0, ids[b, k]], summed in MaskAcc<T> and rounded
// once. pos may be null; pos_batch_stride 0 shares one (1, L, D) table across the batch.
template <class T>
void mask_gather(const T* tokens, int64_t tokens_batch_stride, int64_t tokens_row_stride, const T* pos,
                 int64_t pos_batch_stride, int64_t pos_row_stride, const int64_t* ids, T* visible, int64_t B,
                 int64_t L, int64_t K, int64_t D);

// Backward of mask_gather, one pass over grad_visible (B, K, D):
// grad_tokens (B, L, D; may be null): grad_visible rows at ids, zeros elsewhere;
// grad_pos: pos_batch == B: the same values (B, L, D); pos_batch == 1: their sum over b (1, L, D),
// accumulated in MaskAcc<T> in the order b = 0, 1, ...; pos_batch == 0: not written (may be null).
template <class T>
void mask_gather_backward(const T* grad_visible, const int64_t* ids, T* grad_tokens, T* grad_pos, int64_t pos_batch,
                          int64_t B, int64_t L, int64_t K, int64_t D);

// out (B, L, D): visible[b, k] at row ids[b, k], the (D,) fill row elsewhere.
template <class T>
void mask_unmask(const T* visible, const int64_t* ids, const T* fill, T* out, int64_t B, int64_t L, int64_t K,
                 int64_t D);

// Backward of mask_unmask, one pass over grad_out (B, L, D): grad_visible[b, k] = grad_out[b, ids[b, k]];
// grad_fill (D,; may be null) = sum of grad_out over the dropped rows, in MaskAcc<T>, summed in
// fixed row blocks whose partial sums are added in order (deterministic).
template <class T>
void mask_unmask_backward(const T* grad_out, const int64_t* ids, T* grad_visible, MaskAcc<T>* grad_fill, int64_t B,
                          int64_t L, int64_t K, int64_t D);

// out (B, C, H, W) = images with the pixels of dropped patches set to 0; patch (i, j) of the
// (H / patch) x (W / patch) grid is number i * (W / patch) + j.
template <class T>
void mask_image(const T* images, const int64_t* ids, T* out, int64_t B, int64_t C, int64_t H, int64_t W,
                int64_t patch, int64_t K);

}  // namespace fastcon::cpu
