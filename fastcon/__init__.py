"""fastcon: fused kernels for soft contrastive (SoftCon) and scene-wide matching + diffusion
(SwiMDiff) self-supervised pretraining of Earth-observation foundation models.

Public API
- ``soft_contrastive_loss`` / ``SoftContrastiveLoss``: the multi-label soft contrastive loss
- ``NoiseSchedule``: DDPM noise schedules with fused, seeded forward noising and loss (SwiMDiff)
- ``backends()``: which of reference / cpu / triton / cuda can run here, and why
- ``siamese_mask`` / ``unmask`` / ``mask_image``: Siamese masking of patch tokens (and images)
- ``distributed``: the loss over a torch.distributed process group (``group=`` argument)
"""

from fastcon import distributed
from fastcon._backends import BackendError, BackendInfo, backends
from fastcon.diffusion import NoiseSchedule
from fastcon.masking import mask_image, siamese_mask, unmask
from fastcon.soft_contrastive import SoftContrastiveLoss, soft_contrastive_loss

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendInfo",
    "NoiseSchedule",
    "SoftContrastiveLoss",
    "backends",
    "distributed",
    "mask_image",
    "siamese_mask",
    "soft_contrastive_loss",
    "unmask",
]
