"""The one backend registry: which backends exist, which are usable here, and which one an op uses.

Backends
- ``reference``: dense PyTorch (``fastcon.reference``), the spec in code; any device.
- ``cpu``: fused C++ kernels in ``fastcon._C`` (csrc/cpu), for CPU tensors.
- ``triton``: fused Triton kernels (fastcon/kernels/triton), for CUDA tensors, or for CPU
  tensors when ``TRITON_INTERPRET=1`` (the interpreter; used by the tests).
- ``cuda``: fused CUDA C++ kernels in ``fastcon._C`` (csrc/cuda), for CUDA tensors.

``backend="auto"`` takes, per op, the first backend in ``_AUTO_ORDER[device type]`` that
implements the op and can run here: for CPU tensors ``cpu`` then ``reference``; for CUDA
tensors ``cuda`` (when ``fastcon._C`` holds machine code the device can run: a cubin of the
same major architecture and a minor version no newer than the device's, e.g. sm_80 code on
sm_86), then ``triton`` (JIT-compiled for any device, also the fallback for ops or GPUs the
CUDA kernels do not cover), then ``reference``. The environment variable ``FASTCON_BACKEND``
replaces that choice.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
# Not a user-facing backend: the CUDA kernel sources compiled for the CPU against the SIMT
# emulation layer (csrc/simt). Tests select it by name to check the CUDA kernels' numerics.
TEST_BACKENDS = ("cuda_simt",)

# auto: first available backend that implements the op, per device type (the rule is spelled out
# in the module docstring). On CUDA devices the hand-written CUDA kernels come first: they need no
# JIT warm-up and use tensor cores (WMMA) for fp16 / bf16; triton covers what they cannot run
# (a build without CUDA, a GPU architecture without cubins in the build, an op without CUDA kernels).
_AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    status: str

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.status})"


class BackendError(RuntimeError):
    """Raised when a requested backend cannot run here."""


# --------------------------------------------------------------------------------------------
# the compiled extension

_ext_cache: dict[str, object] = {}


def load_extension(name: str = "_C"):
    """Import ``fastcon.<name>``; returns (module or None, error message)."""
    if name not in _ext_cache:
        try:
            _ext_cache[name] = (importlib.import_module(f"fastcon.{name}"), "")
            if name == "_C":
                importlib.import_module("fastcon._fake")
        except ImportError as e:  # not built, or built against another torch
            _ext_cache[name] = (None, f"fastcon.{name} is not built ({e}); run `make build`")
    return _ext_cache[name]


def cuda_archs() -> list[str]:
    """GPU architectures whose machine code ``fastcon._C`` really holds ([] without CUDA kernels)."""
    mod, _ = load_extension()
    if mod is None or not torch.ops.fastcon.build_info():
        return []
    from fastcon._fatbin import cubin_archs

    return cubin_archs(mod.__file__)


def cubin_runs_on(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether one of the cubins (``sm_XY`` tags) runs on a device of compute ``capability``:
    cubins are binary compatible within a major architecture, from their minor version up."""
    for arch in archs:
        digits = arch.removeprefix("sm_").rstrip("a")
        major, minor = int(digits[:-1]), int(digits[-1])
        if major == capability[0] and minor <= capability[1]:
            return True
    return False


def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "interpreted (TRITON_INTERPRET=1, no GPU)" if not torch.cuda.is_available() else "interpreted"
    if torch.cuda.is_available():
        return True, f"compiled for {torch.cuda.get_device_name()}"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"


def _status(name: str, detail: bool = True) -> tuple[bool, str]:
    """(available, why / what). ``detail=False``: the availability alone, for the per-call path
    (``select``), without building the description (for cpu: no op call per loss call)."""
    if name == "reference":
        return True, "dense PyTorch, any device"
    if name == "cpu":
        mod, err = load_extension()
        if mod is None:
            return False, err
        if not detail:
            return True, ""
        return True, f"fused C++, {torch.get_num_threads()} threads, {torch.ops.fastcon.cpu_capability()}"
    if name == "triton":
        return _triton_status()
    if name == "cuda":
        mod, err = load_extension()
        if mod is None:
            return False, err
        archs = cuda_archs()
        if not archs:
            return False, "fastcon._C was built without CUDA kernels (FASTCON_BUILD_CUDA=0 or no nvcc)"
        where = "compiled for " + ", ".join(archs)
        if not torch.cuda.is_available():
            return False, where + "; no CUDA device"
        cap = torch.cuda.get_device_capability()
        device = f"device {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})"
        if not cubin_runs_on(archs, cap):
            return False, where + f"; {device} needs code for its own architecture (set TORCH_CUDA_ARCH_LIST)"
        return True, where + "; " + device
    if name == "cuda_simt":
        mod, err = load_extension("_C_simt")
        return (mod is not None), ("CUDA kernel sources on the SIMT emulator (tests only)" if mod else err)
    raise ValueError(f"unknown backend {name!r}")


class BackendTable(list):
    """A list of BackendInfo that prints as one line per backend."""

    def __repr__(self) -> str:
        return "\n".join(str(b) for b in self)

    def __getitem__(self, key):
        if isinstance(key, str):
            for b in self:
                if b.name == key:
                    return b
            raise KeyError(f"unknown backend {key!r}; backends are {', '.join(BACKENDS)}")
        return super().__getitem__(key)


def backends() -> BackendTable:
    """Every backend with whether it can run here and why (or why not); index by position or name."""
    return BackendTable(BackendInfo(n, *_status(n)) for n in BACKENDS)


# --------------------------------------------------------------------------------------------
# per-op implementations

_IMPLS: dict[tuple[str, str], Callable[[], object]] = {}


def register(op: str, backend: str, loader: Callable[[], object]) -> None:
    """Declare that ``backend`` implements ``op``; ``loader()`` returns the implementation lazily."""
    if backend not in BACKENDS + TEST_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _IMPLS[(op, backend)] = loader


def implemented(op: str) -> list[str]:
    return [b for b in BACKENDS + TEST_BACKENDS if (op, b) in _IMPLS]


def _device_ok(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "reference":
        return True, ""
    if name in ("cpu", "cuda_simt"):
        return device.type == "cpu", f"the {name} backend takes CPU tensors, got {device.type} tensors"
    if name == "cuda":
        return device.type == "cuda", f"the cuda backend takes CUDA tensors, got {device.type} tensors"
    if name == "triton":
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return True, ""
        return (
            False,
            f"the triton backend takes CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type} tensors",
        )
    return False, f"unknown backend {name!r}"


def _check_name(name: str, what: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS + TEST_BACKENDS + ("auto",):
        raise ValueError(f"{what} must be one of {', '.join(('auto',) + BACKENDS)}; got {name!r}")
    return name


def select(op: str, backend: str, device: torch.device) -> tuple[str, object]:
    """Resolve ``backend`` (a name or "auto") for ``op`` on ``device``; returns (name, impl)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    name = _check_name(backend, "backend")
    if name == "auto":
        env = os.environ.get("FASTCON_BACKEND", "").strip()
        if env:
            name = _check_name(env, "the environment variable FASTCON_BACKEND")
    if name == "auto":
        for cand in _AUTO_ORDER.get(device.type, ("reference",)):
            if (op, cand) in _IMPLS and _status(cand, detail=False)[0] and _device_ok(cand, device)[0]:
                name = cand
                break
        else:
            name = "reference"
    if (op, name) not in _IMPLS:
        raise BackendError(
            f"{op}: the {name} backend does not implement this op (it has: {', '.join(implemented(op))})"
        )
    ok, why = _status(name, detail=False)
    if not ok:
        raise BackendError(f"{op}: the {name} backend is unavailable here: {why}")
    ok, why = _device_ok(name, device)
    if not ok:
        raise BackendError(f"{op}: {why}")
    return name, _IMPLS[(op, name)]()
