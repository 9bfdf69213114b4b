"""What every pretraining method shares: the interface the training step calls, and helpers.

A method (``SoftCon``, ``SwiMDiff``) owns its networks and its loss:

- ``student``: the module the optimiser trains (DDP wraps it; ``forward`` is what is called:
  the student, its DDP wrapper or a compiled version, set by ``fastcon.train.trainer.setup``);
- ``teacher``: an ``EMATeacher`` of the student's online branch (SoftCon's teacher, SwiMDiff's
  momentum key encoder) or None; ``teacher_forward`` is what is called;
- ``encoder``: the backbone that is saved as ``encoder.safetensors``;
- ``losses(ctx)``: the losses of one micro-batch (``StepContext``): ``"loss"``, the terms named in
  ``loss_terms`` and ``"objective"``, the tensor to backpropagate (see ``ddp_objective``);
- ``after_step(step, finite)``: what follows the optimiser step (EMA update, enqueueing keys);
  returns extra log values (``{"momentum": m}``);
- ``state_dict()`` / ``load_state_dict(state)``: what a checkpoint holds besides the student.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import fastcon
from fastcon.train.config import Config
from fastcon.train.runtime import DistInfo


class Branch(nn.Module):
    """Encoder then projector: what the EMA teacher / key encoder copies."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.projector = encoder, head

    def forward(self, x, keep=None, generator=None):
        return self.projector(self.encoder(x, keep=keep, generator=generator))


def add_phase(timings: dict | None, device: torch.device, name: str, start: float) -> float:
    """Adds the time since ``start`` to ``timings[name]`` (synchronising a GPU first) when
    ``timings`` is a dict, not None; returns the time now."""
    if timings is None:
        return start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    timings[name] = timings.get(name, 0.0) + now - start
    return now


@dataclass
class StepContext:
    """One micro-batch as a method's ``losses`` sees it.

    ``view1`` / ``view2`` are on the device (channels_last for CNNs on GPUs); ``batch`` is the
    loader's dict (labels, scene ids); ``key`` = (seed, step, micro-batch, rank) fixes the random
    streams (masks, timesteps, noise) so that a resumed run draws the same ones; ``mask_gen`` is
    the mask stream's generator; ``autocast`` the precision context; ``lap(name)`` adds the time
    since the previous lap to phase ``name`` when ``timings`` is a dict (benchmarks)."""

    view1: torch.Tensor
    view2: torch.Tensor
    batch: dict
    key: tuple
    mask_gen: torch.Generator
    autocast_dtype: torch.dtype | None = None
    timings: dict | None = None
    _last: float = field(default_factory=time.perf_counter)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.view1.device.type, dtype=self.autocast_dtype)

    def lap(self, name: str) -> None:
        self._last = add_phase(self.timings, self.view1.device, name, self._last)

    def to_device(self, name: str) -> torch.Tensor:
        return self.batch[name].to(self.view1.device, non_blocking=True)


def ddp_objective(
    loss_c: torch.Tensor,
    world_size: int,
    accum_steps: int,
    loss_d: torch.Tensor | None = None,
    lambda_c: float = 1.0,
    lambda_d: float = 1.0,
) -> torch.Tensor:
    """What to backpropagate so that DDP's average over W ranks yields the global loss's gradient.

    The distributed contrastive loss gives every rank the exact gradient rows of its own samples
    (the ranks' shares sum to the global gradient; see fastcon.distributed) and DDP divides the
    sum over ranks by W, so that term is scaled by W. A local-mean term (the diffusion loss)
    becomes the global mean through DDP's average as it is. Divided by the micro-batch count."""
    if loss_d is None:
        return loss_c * (world_size / accum_steps)
    return (lambda_c * world_size * loss_c + lambda_d * loss_d) / accum_steps


class Method:
    """Base of the pretraining methods (see the module docstring for the interface)."""

    name = ""
    loss_terms: tuple[str, ...] = ("loss",)

    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.student: nn.Module
        self.encoder: nn.Module
        self.teacher: nn.Module | None = None
        self.forward: nn.Module
        self.teacher_forward: nn.Module | None = None

    def networks(self) -> list[nn.Module]:
        """The student and, if any, the teacher: what moves to a device or a memory format."""
        return [self.student] + ([self.teacher] if self.teacher is not None else [])

    def contrastive(self, z1, z2, labels, **kw) -> torch.Tensor:
        """fastcon.soft_contrastive_loss on fp32 (or wider) embeddings, over the global batch under
        torchrun (negatives from every rank)."""
        if self.info.distributed:
            kw.update(group=torch.distributed.group.WORLD, distributed=self.cfg.ops.distributed)
        z1, z2 = (z.float() if z.dtype in (torch.float16, torch.bfloat16) else z for z in (z1, z2))
        with torch.autocast(self.info.device.type, enabled=False):
            return fastcon.soft_contrastive_loss(z1, z2, labels, **kw)

    def losses(self, ctx: StepContext) -> dict:
        raise NotImplementedError

    def after_step(self, step: int, finite: bool) -> dict:
        """After the optimiser step ``step`` (1-based); ``finite``: False when the step was skipped."""
        return {}

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict() if self.teacher is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
