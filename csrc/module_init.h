// A bare Python module init for an extension whose API lives entirely in torch.ops
// (TORCH_LIBRARY): importing the .so runs the static op registrations, nothing else.
#pragma once
#include <Python.h>

#define FASTCON_CONCAT_(a, b) a##b
#define FASTCON_CONCAT(a, b) FASTCON_CONCAT_(a, b)

#define FASTCON_PYTHON_MODULE(name)                                                  \
  extern "C" PyMODINIT_FUNC FASTCON_CONCAT(PyInit_, name)(void) {                   \
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, #name, nullptr, -1, nullptr}; \
    return PyModule_Create(&def);                                                    \
  }
