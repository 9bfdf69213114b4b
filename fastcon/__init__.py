"""fastcon: fused kernels for soft contrastive (SoftCon) and scene-wide matching + diffusion
(SwiMDiff) self-supervised pretraining of Earth-observation foundation models.

Public API
- ``soft_contrastive_loss`` / ``SoftContrastiveLoss``: the multi-label soft contrastive loss
- ``backends()``: which of reference / cpu / triton / cuda can run here, and why
- ``distributed``: the loss over a torch.distributed process group (``group=`` argument)
"""

from fastcon import distributed
from fastcon._backends import BackendError, BackendInfo, backends
from fastcon.soft_contrastive import SoftContrastiveLoss, soft_contrastive_loss

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendInfo",
    "SoftContrastiveLoss",
    "backends",
    "distributed",
    "soft_contrastive_loss",
]
