// The interface between csrc/cuda/bindings.cpp and the CUDA kernel files: plain parameter
// structs (raw pointers, sizes, options) and one launcher per op. Free of CUDA and torch
// headers, so that the binding file compiles with any host compiler.
#ifndef FASTCON_CUDA_KERNELS_H_TYPES
#define FASTCON_CUDA_KERNELS_H_TYPES

#include <cstdint>

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;  // as the CUDA runtime declares it

namespace fastcon::kernels {

enum class DType { f16, bf16, f32, f64 };

// Soft contrastive loss: what both blockwise passes score. u (n, d), v (m, d) row-major in
// `dtype`; ids int64 (mode 1 only). scale and bias (null: 0) point to fp64 scalars in device
// memory, read by the kernels (never by the host: no synchronisation); bounded: |s| <= scale.
struct ScProblem {
  DType dtype;
  const void* u;
  const void* v;
  const int64_t* row_ids;
  const int64_t* col_ids;
  int64_t n, m, d, row_offset;
  const double* scale;
  const double* bias;
  bool bounded;
  int mode;
};

// Forward blockwise pass (contract: fastcon.reference.sc_core_forward). Outputs in the
// accumulation type (fp32, fp64 for f64): row (n,), col (m,) when need_col and mode != 2.
// row, col and counter must be zero-filled by the caller.
struct ScForward : ScProblem {
  bool need_col;
  void* row;
  void* col;
  unsigned* counter;
};

// Backward blockwise pass (contract: fastcon.reference.sc_core_backward). row_stat, g (n,);
// col_stat, h (m,) or null; outputs grad_u (n, d), grad_v (m, d), wsum (n,) in the accumulation
// type. weight_max: for f16 only, a device scalar >= max|g| + max|h| that scales the weight
// tile into the fp16 range before its tensor-core product (null elsewhere).
struct ScBackward : ScProblem {
  const void* row_stat;
  const void* col_stat;
  const void* g;
  const void* h;
  const float* weight_max;
  void* grad_u;
  void* grad_v;
  void* wsum;
};

// The whole fused loss, one op per direction (csrc/cuda/soft_contrastive_loss.cu; the math of
// csrc/cpu/soft_contrastive_loss.cpp). Inputs any layout (element strides s0, s1); labels and ids
// of any real / integer dtype (ElemType). Workspaces and outputs are allocated by the binding,
// contiguous, in the dtypes named; nothing needs zero-filling (the prologue zeroes what the
// later launches accumulate into).
enum class ElemType { f64, f32, f16, bf16, i64, i32, i16, i8, u8, b8 };
struct ScTensor {
  const void* p = nullptr;  // null: absent
  ElemType t = ElemType::f32;
  int64_t s0 = 0, s1 = 0;
};
struct ScLoss {
  DType dtype;                 // z1, z2, queue and the kernel's storage type T; A = fp32 (fp64 for f64)
  int64_t n, k, d, c;          // rows, queue keys, features, label classes (kind 1)
  int kind;                    // 0 no labels, 1 multi-label (N, C), 2 scene ids as positives, 3 ignored
  int mode;                    // the tile pass's mode (0 softmax, 1 same ids masked, 2 sigmoid)
  bool need_col;               // symmetric softmax without a queue
  double hw;                   // hard_weight
  bool normalize;
  int reduction;               // 0 mean, 1 sum, 2 none
  ScTensor z1, z2, queue, labels, qlabels, temperature, bias, grad_out;
  void* uk;                    // T (n, d): unit rows of z1
  void* cols;                  // T (n + k, d): unit rows of z2, then the queue's
  void* n1;                    // A (n,) row norms (forward: out; backward: saved)
  void* n2;
  double* scal;                // (2,): 1 / tau, bias
  uint8_t* checks;             // (6,) 1 = ok: temperature, bias, labels finite / >= 0, queue_labels finite / >= 0
  int64_t* ids;                // (n + k,) scene ids (kinds 2, 3)
  int64_t* leader;             // (n,) scene leaders (kind 2; forward: out, backward: saved)
  double* lhat;                // (n + k, c) unit label rows (kind 1)
  uint8_t* rowflag;            // (n + k,) label value flags (kind 1, forward)
  double* partial;             // (blocks of 128 rows, sources, c, d + 1) (kind 1)
  double* proj;                // (sources, c, d + 1) (kind 1)
  double* ssum;                // (sources, n, d + 1) per-scene sums at the leader rows (kind 2)
  void* row;                   // A (n,) row statistics (forward: out; backward: saved)
  void* col;                   // A (n,) column statistics (need_col)
  unsigned* counter;           // (2,): the tile pass's ticket, the epilogue's ticket
  double* per;                 // (2 n,) per-row float64 values summed by the epilogue's last block
  void* out;                   // A: the loss, () or (n,)
  void* r_sum;                 // A (n,) target row sums (not kind 3; forward: out, backward: saved)
  // backward only
  void* g;                     // A (n,) upstream weights of the rows (h = g when need_col)
  double* wu;                  // (n,) g / R (sigmoid: g)
  double* wv;                  // (n,) h / R (need_col)
  float* weight_max;           // f16 only (see ScBackward)
  void* gu;                    // A (n, d), (n + k, d), (n,): the tile pass's outputs
  void* gv;
  void* wsum;
  void* dz1;                   // T (n, d) gradients; d tau / d bias in temperature's / bias's dtype
  void* dz2;
  void* dtau;
  void* dbias;
  bool need_z1, need_z2, need_tau, need_bias;
};

// ---- Siamese masking (contract: fastcon.reference.mask_*) -------------------------------------
// ids (B, K) int64 contiguous, rows sorted ascending (checked by the public API; the kernels stay
// in bounds whatever they hold). Row-major tensors of `dtype`.

// out (B, K, D) = tokens[b, ids[b, k]] (+ pos[b or 0, ids[b, k]]), tokens / pos with row strides
// (stride0, stride1, 1); pos_stride0 = 0 for a table shared by the batch.
struct MaskGather {
  DType dtype;
  const void* tokens;
  int64_t tokens_stride0, tokens_stride1;
  const void* pos;
  int64_t pos_stride0, pos_stride1;
  const int64_t* ids;
  void* out;
  int64_t b, l, k, d;
};

// Scatter: out (B, L, D)[b, l] = src (B, K, D)[b, k] where ids[b, k] == l, else fill (D,) or 0;
// out2 (optional) gets the same values. Batch sum: out (optional) as above with zeros, out2
// (1, L, D) = its sum over b.
struct MaskScatter {
  DType dtype;
  const void* src;
  const void* fill;
  const int64_t* ids;
  void* out;
  void* out2;
  int64_t b, l, k, d;
};

// out (D,) accumulation type = sum of grad_out (B, L, D) over the rows not in ids; workspace
// holds mask_fill_chunks(B, L) x D accumulation-type partial sums.
struct MaskFillSum {
  DType dtype;
  const void* grad_out;
  const int64_t* ids;
  void* workspace;
  void* out;
  int64_t b, l, k, d;
};
constexpr int64_t kMaskFillRows = 64;
inline int64_t mask_fill_chunks(int64_t b, int64_t l) { return (b * l + kMaskFillRows - 1) / kMaskFillRows; }

// out (B, C, H, W) = images with the pixels of patches not in ids set to 0.
struct MaskImage {
  DType dtype;
  const void* images;
  void* out;
  const int64_t* ids;
  int64_t b, c, h, w, patch, k;
};

// ---- diffusion (contract: fastcon.reference.diffusion_*, philox_*) -------------------------------
// x0 (and noise, pred, outputs): batch x per_sample contiguous elements of `dtype`; coef_x0 /
// coef_noise (batch,) in the accumulation type; noise null = seeded (Philox, counter = flat index).
struct DiffusionBatch {
  DType dtype;
  int64_t batch, per_sample;
  const void* x0;
  const void* noise;
  const void* coef_x0;
  const void* coef_noise;
  uint64_t seed;
};
// diffusion_loss: per sample, loss_chunks(per_sample) partial sums (workspace, accumulation
// type) and one zero-filled ticket counter (unsigned) per sample.
constexpr int64_t kDiffusionChunk = 4096;
inline int64_t diffusion_loss_chunks(int64_t per_sample) { return (per_sample + kDiffusionChunk - 1) / kDiffusionChunk; }

}  // namespace fastcon::kernels

#endif  // FASTCON_CUDA_KERNELS_H_TYPES

// Launcher declarations, deliberately outside the include guard: the SIMT module declares them
// for two kernel namespaces (the emulated kernels and their deliberately broken test build).
// Each returns nullptr on success, else the CUDA error string of the launch.
#ifndef FASTCON_KERNEL_NS
#define FASTCON_KERNEL_NS gpu
#endif

namespace fastcon::FASTCON_KERNEL_NS {
const char* sc_forward(const kernels::ScForward& p, cudaStream_t stream);
const char* sc_backward(const kernels::ScBackward& p, cudaStream_t stream);
const char* sc_loss_forward(const kernels::ScLoss& p, cudaStream_t stream);
const char* sc_loss_backward(const kernels::ScLoss& p, cudaStream_t stream);
#if !defined(FASTCON_BINDINGS_LOSS_ONLY)
const char* mask_gather_rows(const kernels::MaskGather& p, cudaStream_t stream);
const char* mask_scatter_rows(const kernels::MaskScatter& p, cudaStream_t stream);
const char* mask_batch_sum(const kernels::MaskScatter& p, cudaStream_t stream);
const char* mask_fill_sum(const kernels::MaskFillSum& p, cudaStream_t stream);
const char* mask_image(const kernels::MaskImage& p, cudaStream_t stream);
const char* philox_words(const int64_t* counter, int64_t n, uint64_t seed, int64_t* out, cudaStream_t stream);
const char* philox_normals(const int64_t* index, int64_t n, uint64_t seed, float* out, cudaStream_t stream);
const char* diffusion_q_sample(const kernels::DiffusionBatch& p, void* x_t, cudaStream_t stream);
const char* diffusion_loss(const kernels::DiffusionBatch& p, const void* pred, int target, void* sse,
                           void* workspace, unsigned* tickets, cudaStream_t stream);
const char* diffusion_loss_backward(const kernels::DiffusionBatch& p, const void* pred, const void* grad_sse,
                                    int target, void* grad_pred, cudaStream_t stream);
#endif
#if defined(FASTCON_SIMT)
// Test builds only: which deliberate bug the broken kernels compile in (0 = none).
void set_break_variant(int variant);
#endif
}  // namespace fastcon::FASTCON_KERNEL_NS
