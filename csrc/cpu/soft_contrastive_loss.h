// The whole fused soft contrastive loss on the CPU, one op per direction (issue 13): value checks,
// normalisation, the low-rank target sums (SPEC section 5), the blockwise tile pass
// (cpu::sc_forward / cpu::sc_backward), per-sample losses, reduction; backward the whole gradient
// (target part, normalisation backward, temperature and bias) straight into the gradient buffers.
// Argument types and shapes are checked by the caller (fastcon.soft_contrastive_loss); the values
// (temperature, bias, label values) are checked here, where they are read.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastcon::cpu {

// (loss, row statistics (n,), column statistics (n,) or (0,), target row sums (n,) or (0,), row
// norms of z1 and z2 (n,) each or (0,), scene order (n,) int64 or (0,)); schema in csrc/ops.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sc_loss_forward(
    const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& temperature, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& queue,
    const std::optional<at::Tensor>& queue_labels, const std::string& loss, bool symmetric, double hard_weight,
    bool normalize, const std::string& reduction, bool scene_ignore);

// (d z1, d z2, d temperature, d bias), each an empty (0,) tensor where its need_* is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sc_loss_backward(
    const at::Tensor& grad_out, const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& temperature,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& queue, const std::optional<at::Tensor>& queue_labels, const at::Tensor& row,
    const at::Tensor& col, const at::Tensor& r_sum, const at::Tensor& n1, const at::Tensor& n2,
    const at::Tensor& scenes, const std::string& loss, bool symmetric, double hard_weight, bool normalize,
    const std::string& reduction, bool scene_ignore, bool need_z1, bool need_z2, bool need_temperature,
    bool need_bias);

}  // namespace fastcon::cpu
