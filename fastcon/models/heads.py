"""Projection / prediction heads (MoCo v3 layout) and the EMA teacher.

MoCo v3 MLPs: ``num_layers`` Linear layers without bias; every hidden layer is followed by
BatchNorm1d and ReLU; the last layer by a BatchNorm1d without affine parameters when ``last_bn``
(the projector) and by nothing otherwise (the predictor). Defaults: projector 3 layers
(hidden 4096, out 256, last_bn), predictor 2 layers (hidden 4096, out 256, no last BN).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class MLPHead(nn.Sequential):
    """MoCo v3 projector / predictor MLP: (N, in_dim) -> (N, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, num_layers: int = 3, last_bn=True):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        for i in range(num_layers):
            d_in = in_dim if i == 0 else hidden_dim
            last = i == num_layers - 1
            d_out = out_dim if last else hidden_dim
            layers.append(nn.Linear(d_in, d_out, bias=False))
            if not last:
                layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
            elif last_bn:
                # no affine: a learnable scale after the last layer would fight the loss's normalisation
                layers.append(nn.BatchNorm1d(d_out, affine=False))
        super().__init__(*layers)


def projector(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, num_layers: int = 3) -> MLPHead:
    return MLPHead(in_dim, hidden_dim, out_dim, num_layers, last_bn=True)


def predictor(dim: int = 256, hidden_dim: int = 4096, num_layers: int = 2) -> MLPHead:
    return MLPHead(dim, hidden_dim, dim, num_layers, last_bn=False)


def cosine_momentum(step: int, total_steps: int, base_momentum: float = 0.99) -> float:
    """EMA momentum rising from ``base_momentum`` at step 0 to 1 at ``total_steps`` (half cosine)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0


class EMATeacher(nn.Module):
    """An exponential moving average of a student network, updated in place without autograd.

    ``teacher = EMATeacher(student, base_momentum=0.99, total_steps=T)``; after each optimiser step
    ``teacher.update(student, step)`` sets every teacher parameter to
    ``m * teacher + (1 - m) * student`` with ``m = cosine_momentum(step, T, base_momentum)``, in one
    ``torch._foreach_lerp_`` over all parameters. Buffers (BatchNorm statistics) are copied from the
    student (``buffers="copy"``), averaged alike (``"ema"``), or left to the teacher's own forward
    passes (``"keep"``). The teacher's parameters never require grad; call it like the student.
    """

    def __init__(self, student: nn.Module, base_momentum: float = 0.99, total_steps: int = 1, buffers: str = "copy"):
        super().__init__()
        if not 0.0 <= base_momentum <= 1.0:
            raise ValueError(f"base_momentum must be in [0, 1], got {base_momentum}")
        if buffers not in ("copy", "ema", "keep"):
            raise ValueError(f"buffers must be 'copy', 'ema' or 'keep'; got {buffers!r}")
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.base_momentum = base_momentum
        self.total_steps = total_steps
        self.buffers_mode = buffers

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def momentum(self, step: int) -> float:
        return cosine_momentum(step, self.total_steps, self.base_momentum)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int | None = None, momentum: float | None = None) -> float:
        """One EMA step toward ``student``; the momentum is ``momentum`` if given, else the schedule's at ``step``."""
        if momentum is None:
            if step is None:
                raise ValueError("give step (for the cosine schedule) or momentum")
            momentum = self.momentum(step)
        t_params = list(self.module.parameters())
        s_params = list(student.parameters())
        if len(t_params) != len(s_params):
            raise ValueError(
                f"student has {len(s_params)} parameters, the teacher {len(t_params)}: not the same network"
            )
        s_params = [s.detach() for s in s_params]
        # lerp_(t, s, w) = t + w (s - t) = m t + (1 - m) s with w = 1 - m
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
        if self.buffers_mode != "keep":
            for tb, sb in zip(self.module.buffers(), student.buffers()):
                if self.buffers_mode == "ema" and tb.is_floating_point():
                    tb.lerp_(sb, 1.0 - momentum)
                else:
                    tb.copy_(sb)
        return momentum
