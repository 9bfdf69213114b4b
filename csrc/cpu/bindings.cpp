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

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <limits>
#include <optional>

#include "cpu/masking.h"

namespace fastcon::masking_cpu {

// The public API (fastcon/masking.py) checks everything with messages that name the argument;
// these checks keep direct torch.ops calls memory safe.
void check_rows(const at::Tensor& x, const char* name, int64_t dims) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == dims, name, " must be ", dims, "-D, got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, " must be floating point, got ", x.scalar_type());
}

// ids_keep (B, K) int64, rows strictly increasing in [0, L). Returns a contiguous copy or view.
at::Tensor checked_ids(const at::Tensor& ids_keep, int64_t B, int64_t L) {
  TORCH_CHECK(ids_keep.device().is_cpu(), "ids_keep must be a CPU tensor");
  TORCH_CHECK(ids_keep.scalar_type() == at::kLong, "ids_keep must be int64, got ", ids_keep.scalar_type());
  TORCH_CHECK(ids_keep.dim() == 2 && ids_keep.size(0) == B, "ids_keep must have shape (", B, ", K), got ",
              ids_keep.sizes());
  TORCH_CHECK(L <= std::numeric_limits<int32_t>::max(), "L must be < 2^31, got ", L);
  TORCH_CHECK(ids_keep.size(1) >= 1 && ids_keep.size(1) <= L, "ids_keep must have 1 <= K <= L = ", L, ", got K = ",
              ids_keep.size(1));
  at::Tensor ids = ids_keep.contiguous();
  const int64_t* p = ids.const_data_ptr<int64_t>();
  const int64_t K = ids.size(1);
  for (int64_t b = 0; b < B; ++b) {
    int64_t prev = -1;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t v = p[b * K + k];
      TORCH_CHECK(v > prev && v < L, "ids_keep rows must be strictly increasing in [0, ", L, "), row ", b,
                  " is not");
      prev = v;
    }
  }
  return ids;
}

at::Tensor mask_gather(const at::Tensor& tokens, const at::Tensor& ids_keep,
                       const std::optional<at::Tensor>& pos_embed) {
  check_rows(tokens, "tokens", 3);
  const int64_t B = tokens.size(0), L = tokens.size(1), D = tokens.size(2);
  const at::Tensor ids = checked_ids(ids_keep, B, L);
  const int64_t K = ids.size(1);
  // Any batch / row strides are fine; only D must be unit-stride (e.g. x[:, 1:] needs no copy).
  const at::Tensor tok = tokens.stride(2) == 1 ? tokens : tokens.contiguous();
  at::Tensor pos;
  if (pos_embed.has_value()) {
    pos = *pos_embed;
    check_rows(pos, "pos_embed", 3);
    TORCH_CHECK(pos.scalar_type() == tok.scalar_type(), "pos_embed must have tokens' dtype");
    TORCH_CHECK((pos.size(0) == 1 || pos.size(0) == B) && pos.size(1) == L && pos.size(2) == D,
                "pos_embed must have shape (1 or B, L, D)");
    if (pos.stride(2) != 1) pos = pos.contiguous();
  }
  at::Tensor visible = at::empty({B, K, D}, tok.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tok.scalar_type(), "mask_gather", [&] {
    cpu::mask_gather<scalar_t>(tok.const_data_ptr<scalar_t>(), tok.stride(0), tok.stride(1),
                               pos.defined() ? pos.const_data_ptr<scalar_t>() : nullptr,
                               pos.defined() && pos.size(0) > 1 ? pos.stride(0) : 0, pos.defined() ? pos.stride(1) : 0,
                               ids.const_data_ptr<int64_t>(), visible.mutable_data_ptr<scalar_t>(), B, L, K, D);
  });
  return visible;
}

std::tuple<at::Tensor, at::Tensor> mask_gather_backward(const at::Tensor& grad_visible, const at::Tensor& ids_keep,
                                                        int64_t L, bool need_tokens, int64_t pos_batch) {
  check_rows(grad_visible, "grad_visible", 3);
  const at::Tensor gv = grad_visible.contiguous();
  const int64_t B = gv.size(0), K = gv.size(1), D = gv.size(2);
  const at::Tensor ids = checked_ids(ids_keep, B, L);
  TORCH_CHECK(ids.size(1) == K, "ids_keep must have grad_visible's K = ", K, " columns");
  TORCH_CHECK(pos_batch == 0 || pos_batch == 1 || pos_batch == B, "pos_batch must be 0, 1 or B = ", B);
  at::Tensor grad_tokens = need_tokens ? at::empty({B, L, D}, gv.options()) : at::empty({0}, gv.options());
  at::Tensor grad_pos = pos_batch > 0 ? at::empty({pos_batch, L, D}, gv.options()) : at::empty({0}, gv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gv.scalar_type(), "mask_gather_backward", [&] {
    cpu::mask_gather_backward<scalar_t>(
        gv.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
        need_tokens ? grad_tokens.mutable_data_ptr<scalar_t>() : nullptr,
        pos_batch > 0 ? grad_pos.mutable_data_ptr<scalar_t>() : nullptr, pos_batch, B, L, K, D);
  });
  return {grad_tokens, grad_pos};
}

at::Tensor mask_unmask(const at::Tensor& visible, const at::Tensor& ids_keep, int64_t L, const at::Tensor& fill) {
  check_rows(visible, "visible", 3);
  const at::Tensor vis = visible.contiguous();
  const int64_t B = vis.size(0), K = vis.size(1), D = vis.size(2);
  const at::Tensor ids = checked_ids(ids_keep, B, L);
  TORCH_CHECK(ids.size(1) == K, "ids_keep must have visible's K = ", K, " columns");
  TORCH_CHECK(fill.device().is_cpu() && fill.scalar_type() == vis.scalar_type() && fill.dim() == 1 &&
                  fill.size(0) == D,
              "fill must be a (D,) CPU tensor of visible's dtype");
  const at::Tensor fil = fill.contiguous();
  at::Tensor out = at::empty({B, L, D}, vis.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vis.scalar_type(), "mask_unmask", [&] {
    cpu::mask_unmask<scalar_t>(vis.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
                               fil.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), B, L, K, D);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mask_unmask_backward(const at::Tensor& grad_out, const at::Tensor& ids_keep,
                                                        bool need_fill) {
  check_rows(grad_out, "grad_out", 3);
  const at::Tensor go = grad_out.contiguous();
  const int64_t B = go.size(0), L = go.size(1), D = go.size(2);
  const at::Tensor ids = checked_ids(ids_keep, B, L);
  const int64_t K = ids.size(1);
  const auto acc = go.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_visible = at::empty({B, K, D}, go.options());
  at::Tensor grad_fill = at::empty({need_fill ? D : 0}, go.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "mask_unmask_backward", [&] {
    cpu::mask_unmask_backward<scalar_t>(go.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
                                        grad_visible.mutable_data_ptr<scalar_t>(),
                                        need_fill ? grad_fill.mutable_data_ptr<cpu::MaskAcc<scalar_t>>() : nullptr,
                                        B, L, K, D);
  });
  return {grad_visible, grad_fill};
}

at::Tensor mask_image(const at::Tensor& images, int64_t patch, const at::Tensor& ids_keep) {
  check_rows(images, "images", 4);
  const at::Tensor img = images.contiguous();
  const int64_t B = img.size(0), C = img.size(1), H = img.size(2), W = img.size(3);
  TORCH_CHECK(patch >= 1 && H % patch == 0 && W % patch == 0, "patch must divide H = ", H, " and W = ", W);
  const at::Tensor ids = checked_ids(ids_keep, B, (H / patch) * (W / patch));
  at::Tensor out = at::empty_like(img);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, img.scalar_type(), "mask_image", [&] {
    cpu::mask_image<scalar_t>(img.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
                              out.mutable_data_ptr<scalar_t>(), B, C, H, W, patch, ids.size(1));
  });
  return out;
}

}  // namespace fastcon::masking_cpu

TORCH_LIBRARY_IMPL(fastcon, CPU, m) {
  m.impl("mask_gather", &fastcon::masking_cpu::mask_gather);
  m.impl("mask_gather_backward", &fastcon::masking_cpu::mask_gather_backward);
  m.impl("mask_unmask", &fastcon::masking_cpu::mask_unmask);
  m.impl("mask_unmask_backward", &fastcon::masking_cpu::mask_unmask_backward);
  m.impl("mask_image", &fastcon::masking_cpu::mask_image);
}

// ---- diffusion --------------------------------------------------------------------------------
