// fastcon._C_simt: the csrc/cuda kernels on the SIMT emulator, as torch ops on CPU tensors.
//
// Namespaces (created when the module is imported, after fastcon._C, whose schemas they copy):
// - fastcon_simt: every op csrc/cuda/bindings.cpp implements, with fastcon's schema, through
//   the same argument checks and launchers; plus simt_selftest(name) and simt_round(x, dtype)
//   for tests/test_simt.py;
// - fastcon_simt_broken: the loss ops once more, built from kernels with deliberate bugs
//   (csrc/simt/kernels_broken.cpp), plus set_break_variant(variant).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/library.h>

#include <memory>
#include <sstream>
#include <string>
#include <vector>

#define FASTCON_SIMT 1

#define FASTCON_KERNEL_NS simt_gpu
#include "cuda/bindings.cpp"
#undef FASTCON_KERNEL_NS

#define FASTCON_KERNEL_NS simt_broken
#define FASTCON_BINDINGS_LOSS_ONLY 1
#include "cuda/bindings.cpp"
#undef FASTCON_BINDINGS_LOSS_ONLY
#undef FASTCON_KERNEL_NS

#include "simt/fp16.h"

namespace simt {
int64_t launch_count();  // csrc/simt/simt.h (not included here: its CUDA keyword macros)
}

namespace fastcon::simt_selftest {
std::string run(const std::string& name);
}

namespace {

std::vector<std::unique_ptr<torch::Library>>& libraries() {
  static std::vector<std::unique_ptr<torch::Library>> libs;
  return libs;
}

// Defines ns::<op> with fastcon::<op>'s schema for each op, so the mirror cannot drift from
// csrc/ops.cpp, and returns the library for further definitions.
torch::Library& mirror_schemas(const char* ns, const std::vector<const char*>& ops) {
  auto lib = std::make_unique<torch::Library>(torch::Library::DEF, ns, std::nullopt, __FILE__, __LINE__);
  for (const char* op : ops) {
    const auto handle = c10::Dispatcher::singleton().findSchema({std::string("fastcon::") + op, ""});
    TORCH_CHECK(handle.has_value(), "fastcon::", op, " has no schema: fastcon._C is out of date");
    std::ostringstream text;
    text << handle->schema();
    std::string schema = text.str();
    const std::string prefix = "fastcon::";
    if (schema.rfind(prefix, 0) == 0) schema = schema.substr(prefix.size());
    lib->def(schema.c_str());
  }
  libraries().push_back(std::move(lib));
  return *libraries().back();
}

void register_cpu(const char* ns, void (*reg)(torch::Library&)) {
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, ns, c10::DispatchKey::CPU, __FILE__, __LINE__);
  reg(*lib);
  libraries().push_back(std::move(lib));
}

std::string selftest(std::string name) { return fastcon::simt_selftest::run(name); }

// Kernel launches of the emulator since the process started (tests count an op's launches).
int64_t launch_count() { return ::simt::launch_count(); }

// float32 -> float16 / bfloat16 -> float32 with the emulator's conversions (tests compare
// them with torch's).
at::Tensor round_trip(const at::Tensor& x, std::string dtype) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && x.device().is_cpu(), "simt_round: x must be a CPU float32 tensor");
  TORCH_CHECK_VALUE(dtype == "float16" || dtype == "bfloat16", "simt_round: dtype must be float16 or bfloat16");
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i)
    dst[i] = dtype == "float16" ? simt::fp16::half_to_float(simt::fp16::float_to_half(src[i]))
                                : simt::fp16::bfloat16_to_float(simt::fp16::float_to_bfloat16(src[i]));
  return out;
}

void set_break_variant(int64_t variant) { fastcon::simt_broken::set_break_variant(static_cast<int>(variant)); }

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C_simt(void) {
  PyObject* base = PyImport_ImportModule("fastcon._C");  // defines the fastcon schemas
  if (!base) return nullptr;
  Py_DECREF(base);
  try {
    torch::Library& simt = mirror_schemas("fastcon_simt", fastcon::simt_gpu::op_names());
    simt.def("simt_selftest(str name) -> str", &selftest);
    simt.def("simt_round(Tensor x, str dtype) -> Tensor", &round_trip);
    simt.def("simt_launch_count() -> int", &launch_count);
    register_cpu("fastcon_simt", &fastcon::simt_gpu::register_ops);
    torch::Library& broken = mirror_schemas("fastcon_simt_broken", fastcon::simt_broken::op_names());
    broken.def("set_break_variant(int variant) -> ()", &set_break_variant);
    register_cpu("fastcon_simt_broken", &fastcon::simt_broken::register_ops);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_simt", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
