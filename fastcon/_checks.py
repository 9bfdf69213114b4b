"""The one argument checker: every public op validates its inputs here, before any kernel runs.

Each error names the argument and says what was expected. Nothing is silently coerced.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_NAMES = "float32, float16, bfloat16 or float64"


def tensor(name: str, x, *, dims: int | tuple[int, ...] | None = None, floating: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor ({_FLOAT_NAMES}), got {x.dtype}")
    if dims is not None:
        allowed = (dims,) if isinstance(dims, int) else dims
        if x.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    return x


def same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device ({ref.device}), got {x.device}")


def same_dtype(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype ({ref.dtype}), got {x.dtype}")


def nonempty(name: str, x: torch.Tensor, axes: str) -> None:
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)} ({axes})")


def choice(name: str, value, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def integer(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def real(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """A finite Python number within bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def scalar(name: str, value, *, positive: bool = False, device=None, read: bool = True) -> float | None:
    """A Python number or a 0-dim floating tensor; returns its value as a float.

    Reading a CUDA tensor's value synchronises once; the kernels take the value on the host.
    ``read=False``: a tensor's type, shape and device only (its value is not read; None).
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got shape {tuple(value.shape)}")
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if device is not None and value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} must be on the inputs' device ({device}) or the CPU, got {value.device}")
        if not read:
            return None
        v = float(value.detach())
    else:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number or a 0-dim tensor, got {type(value).__name__}")
        v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def inverse_finite(name: str, value: float, dtype: torch.dtype) -> None:
    """A temperature's inverse (the logit scale 1 / tau) must be a finite number in the
    accumulation dtype of ``dtype`` inputs (float32; float64 for float64)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if value < 1.0 / torch.finfo(acc).max:
        raise ValueError(
            f"{name} must be >= {1.0 / torch.finfo(acc).max:.3g} for {dtype} inputs (its inverse, the logit "
            f"scale, must be finite in {acc}), got {value:.3g}"
        )


def first_order_only(op: str) -> None:
    """Called first in the backward of a fused op whose backward is not differentiable: under
    ``create_graph=True`` (grad mode is on inside backward only then) a second-order gradient
    through ``op`` would be silently detached, so it is an error naming the op (SPEC section 1)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: second-order gradients (backward with create_graph=True through this fused op) are not "
            "implemented; use backend='reference' for higher-order gradients"
        )
