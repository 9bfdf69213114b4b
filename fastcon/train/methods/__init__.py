"""The pretraining methods behind one interface (``Method``, see ``base``): ``SoftCon``, ``SwiMDiff``.

``build_method(cfg, info, bands)`` creates the encoder named by ``cfg.model``, the online branch
(encoder + projector) and the method ``cfg.method`` around it, on ``info.device``.
"""

from __future__ import annotations

import torch

from fastcon.models import create_encoder, projector
from fastcon.train.config import Config
from fastcon.train.methods.base import Branch, Method, StepContext, ddp_objective
from fastcon.train.methods.softcon import SoftCon, SoftConStudent
from fastcon.train.methods.swimdiff import KeyQueue, SwiMDiff, SwiMDiffStudent, gather_ranks
from fastcon.train.runtime import DistInfo

METHODS = {"softcon": SoftCon, "swimdiff": SwiMDiff}


def is_cnn(cfg: Config) -> bool:
    return cfg.model.name.startswith("resnet")


def channels_last(cfg: Config, device: torch.device) -> bool:
    """NHWC for CNNs: tensor-core convolutions on GPUs; "auto" keeps NCHW on CPUs, where
    PyTorch's channels_last BatchNorm is several times slower."""
    if cfg.model.channels_last not in ("auto", True, False):
        raise ValueError(f"model.channels_last must be auto, true or false; got {cfg.model.channels_last!r}")
    want = device.type == "cuda" if cfg.model.channels_last == "auto" else cfg.model.channels_last
    return is_cnn(cfg) and want


def build_method(cfg: Config, info: DistInfo, bands) -> Method:
    """The method ``cfg.method`` with its networks on ``info.device`` (weights from the global RNG)."""
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {cfg.method!r}")
    m = cfg.model
    encoder = create_encoder(
        m.name, bands=list(bands), img_size=cfg.data.crop_size, weights=m.weights, strategy=m.strategy, **m.timm_kwargs
    )
    if hasattr(encoder, "mask_patch"):  # CNNs mask image cells instead of tokens
        encoder.mask_patch = cfg.mask.patch
    if m.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    online = Branch(encoder, projector(encoder.num_features, m.proj_hidden, m.proj_dim, m.proj_layers))
    keep = None if cfg.mask.keep in (None, 1.0) else cfg.mask.keep  # None: the encoder sees every token
    method = METHODS[cfg.method](cfg, info, online, keep)
    for net in method.networks():
        net.to(info.device)
        if channels_last(cfg, info.device):
            net.to(memory_format=torch.channels_last)
    method.forward, method.teacher_forward = method.student, method.teacher
    return method


__all__ = [
    "METHODS",
    "Branch",
    "KeyQueue",
    "Method",
    "SoftCon",
    "SoftConStudent",
    "StepContext",
    "SwiMDiff",
    "SwiMDiffStudent",
    "build_method",
    "channels_last",
    "ddp_objective",
    "gather_ranks",
    "is_cnn",
]
