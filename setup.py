"""Builds the ``fastcon._C`` extension (CPU kernels always, CUDA kernels when possible).

Environment:
  FASTCON_BUILD_CUDA    auto (default) | 0 | 1. auto builds the CUDA kernels when torch is a
                        CUDA build and nvcc is found; 1 makes a missing toolkit an error.
  TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default "8.0;9.0").
  CUDA_HOME             CUDA toolkit; defaults to /usr/local/cuda when nvcc lives there.
  FASTCON_DEBUG         1 builds without optimisation, with debug symbols.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
_home = _cuda_home()
if _home:
    os.environ["CUDA_HOME"] = _home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    mode = os.environ.get("FASTCON_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FASTCON_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    have = torch.version.cuda is not None and _home is not None and os.path.exists(os.path.join(_home, "bin", "nvcc"))
    if mode == "1" and not have:
        sys.exit("FASTCON_BUILD_CUDA=1 but torch is not a CUDA build or nvcc was not found (set CUDA_HOME)")
    return have and mode != "0"


def _wheel_cuda_includes():
    """Headers of the nvidia-* CUDA wheels that a CUDA build of torch depends on."""
    out = []
    for sp in sys.path:
        for d in glob.glob(os.path.join(sp, "nvidia", "cu*", "include")):
            if d not in out:
                out.append(d)
    return out


def _arch_tags():
    tags = []
    for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").split(";"):
        a = a.strip().replace("+PTX", "")
        if a:
            tags.append("sm_" + a.replace(".", ""))
    return tags


debug = os.environ.get("FASTCON_DEBUG", "0") == "1"
opt = ["-O0", "-g"] if debug else ["-O3"]
cxx_flags = ["-std=c++20", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", *opt]
# The CPU kernels pick their SIMD path at run time (see csrc/cpu/simd.h); the baseline stays
# portable so that the wheel runs on any x86-64 machine.
include_dirs = [os.path.join(ROOT, "csrc")]
cpu_sources = _rel(
    glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
)

cuda_sources = _rel(
    glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
)
with_cuda = _want_cuda() and bool(cuda_sources)
ext_modules = []
if with_cuda:
    archs = _arch_tags()
    nvcc_flags = [
        *opt,
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-Xptxas=-warn-spills",
        "-Werror=all-warnings",
    ]
    ext_modules.append(
        CUDAExtension(
            "fastcon._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs + _wheel_cuda_includes(),
            define_macros=[("FASTCON_WITH_CUDA", "1"), ("FASTCON_CUDA_ARCHS", '"' + ",".join(archs) + '"')],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    )
else:
    ext_modules.append(
        CppExtension(
            "fastcon._C",
            cpu_sources,
            include_dirs=include_dirs,
            define_macros=[("FASTCON_CUDA_ARCHS", '""')],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    )

# The SIMT emulation build: the very same csrc/cuda kernel sources compiled by g++ against
# csrc/simt/simt.h, so that CUDA numerics are tested on machines without a GPU.
simt_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "simt", "*.cpp")))
if simt_sources:
    simt_flags = list(cxx_flags)
    if os.environ.get("FASTCON_SIMT_BREAK"):
        # test-only: compile a deliberately broken kernel variant (see tests/test_simt_catches_bugs.py)
        simt_flags.append("-DFASTCON_SIMT_BREAK=" + os.environ["FASTCON_SIMT_BREAK"])
    ext_modules.append(
        CppExtension(
            "fastcon._C_simt",
            simt_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": simt_flags},
            extra_link_args=["-fopenmp"],
        )
    )

if os.environ.get("FASTCON_SKIP_EXT") == "1":
    # `make` installs the package metadata first and builds the extension in place after
    # (incrementally, with ninja), so that a fresh clone compiles the kernels only once.
    ext_modules = []

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
