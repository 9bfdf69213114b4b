"""Everything the pretraining examples put on the GPU besides the loss, built on timm.

- ``create_encoder(name, in_chans=13 | bands=[...], img_size=224, weights=path, strategy="rgb")``:
  ``ViTEncoder`` (``vit_small_patch14_dinov2``, ``vit_base_patch14_dinov2``; Siamese masking of
  patch tokens with ``fastcon.siamese_mask``, packed variable-length attention) or
  ``ResNetEncoder`` (``resnet50``; input masking with ``fastcon.mask_image``).
- ``load_pretrained`` / ``save_encoder``: local ``.pth`` / ``.safetensors`` weights (Meta or timm
  layout), first-layer adaptation strategies ``rgb``, ``mean``, ``timm``, ``random``.
- ``projector`` / ``predictor`` (MoCo v3 MLPs), ``EMATeacher`` with ``cosine_momentum``.
- ``DiffusionDecoder`` and ``diffusion_loss``: SwiMDiff's denoising branch over the shared encoder.
- ``bands``: Sentinel-2 / Sentinel-1 band names and wavelengths.
"""

from fastcon.models.bands import DEFAULT_BANDS, S1_BANDS, S2_L1C_BANDS, S2_L2A_BANDS, S2_WAVELENGTHS_NM
from fastcon.models.diffusion import DiffusionDecoder, diffusion_loss, timestep_embedding
from fastcon.models.factory import MODELS, create_encoder
from fastcon.models.heads import EMATeacher, MLPHead, cosine_momentum, predictor, projector
from fastcon.models.resnet import ResNetEncoder
from fastcon.models.vit import ViTEncoder
from fastcon.models.weights import (
    STRATEGIES,
    CheckpointError,
    LoadReport,
    adapt_input_weight,
    load_pretrained,
    read_state_dict,
    save_encoder,
)

__all__ = [
    "DEFAULT_BANDS",
    "MODELS",
    "S1_BANDS",
    "S2_L1C_BANDS",
    "S2_L2A_BANDS",
    "S2_WAVELENGTHS_NM",
    "STRATEGIES",
    "CheckpointError",
    "DiffusionDecoder",
    "EMATeacher",
    "LoadReport",
    "MLPHead",
    "ResNetEncoder",
    "ViTEncoder",
    "adapt_input_weight",
    "cosine_momentum",
    "create_encoder",
    "diffusion_loss",
    "load_pretrained",
    "predictor",
    "projector",
    "read_state_dict",
    "save_encoder",
    "timestep_embedding",
]
