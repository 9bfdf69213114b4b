"""Learning-rate schedule: linear warmup then half-cosine decay, as a resumable torch scheduler."""

from __future__ import annotations

import math

import torch


class WarmupCosine:
    """LR multiplier at step s: ``s / warmup`` during warmup, then a half cosine from 1 down to
    ``final_ratio`` at ``total_steps`` (constant after). A callable object, not a lambda, so that
    ``LambdaLR.state_dict()`` saves it and a resumed run continues on the same curve."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, final_ratio: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if not 0.0 <= final_ratio <= 1.0:
            raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}")
        self.total_steps, self.warmup_steps, self.final_ratio = total_steps, warmup_steps, final_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # the first step already trains
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.final_ratio + (1.0 - self.final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, final_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over every parameter group with the ``WarmupCosine`` multiplier."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, final_ratio))
