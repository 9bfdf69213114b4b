// The string options of the whole-loss ops (fastcon::sc_loss_forward / sc_loss_backward), parsed
// and checked once for both bindings that implement them: the cpu op
// (csrc/cpu/soft_contrastive_loss.cpp) and the CUDA op (csrc/cuda/bindings.cpp, also built for
// the SIMT emulation). Host code only; the messages are those of the Python checks.
#pragma once

#include <c10/util/Exception.h>

#include <cstdio>
#include <string>

namespace fastcon::sc_loss_options {

// mode: the tile pass's (0 softmax, 1 softmax with same-id pairs left out, 2 sigmoid);
// need_col: column losses too (symmetric softmax without a queue); reduction: 0 mean, 1 sum, 2 none.
struct Options {
  int mode = 0;
  bool need_col = false;
  int reduction = 0;
};

inline Options parse(const std::string& loss, bool symmetric, double hard_weight, const std::string& reduction,
                     bool scene_ignore, bool has_queue) {
  TORCH_CHECK_VALUE(loss == "softmax" || loss == "sigmoid", "loss must be one of 'softmax', 'sigmoid'; got '", loss,
                    "'");
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none",
                    "reduction must be one of 'mean', 'sum', 'none'; got '", reduction, "'");
  TORCH_CHECK_VALUE(hard_weight >= 0.0 && hard_weight <= 1.0, "hard_weight must be in [0, 1], got ", hard_weight);
  Options o;
  o.mode = loss == "sigmoid" ? 2 : (scene_ignore ? 1 : 0);
  o.need_col = loss == "softmax" && symmetric && !has_queue;
  o.reduction = reduction == "mean" ? 0 : (reduction == "sum" ? 1 : 2);
  return o;
}

// Python's "{:.3g}" of a float, for messages that match the Python checks word for word.
inline std::string g3(double x) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.3g", x);
  return buf;
}

}  // namespace fastcon::sc_loss_options
