"""fastcon.models ResNetEncoder: pooled features, pyramid maps, input masking with fastcon.mask_image."""

import pytest
import torch

from fastcon.models import create_encoder


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return create_encoder("resnet50", in_chans=13).eval()


def test_features_and_pyramid(encoder):
    x = torch.randn(2, 13, 64, 64)
    with torch.no_grad():
        maps = encoder.forward_pyramid(x)
        torch.testing.assert_close(encoder(x), encoder.backbone(x))
        torch.testing.assert_close(maps[-1], encoder.backbone.forward_features(x))
    assert [m.shape[1] for m in maps] == encoder.pyramid_channels == [64, 256, 512, 1024, 2048]
    assert [64 // m.shape[-1] for m in maps] == encoder.pyramid_strides == [2, 4, 8, 16, 32]


def _mask_by_hand(x, patch, ids_keep):
    b, _, h, w = x.shape
    grid_w = w // patch
    keep = torch.zeros(b, (h // patch) * grid_w).scatter_(1, ids_keep, 1.0)
    keep = keep.reshape(b, 1, h // patch, grid_w)
    return x * keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def test_masked_input_equals_masking_by_hand(encoder):
    x = torch.randn(2, 13, 64, 64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out, ids = encoder.forward_features(x, keep=0.5, generator=gen, return_ids=True)
        assert ids.shape == (2, 2)  # 4 cells of 32 x 32, half kept
        torch.testing.assert_close(out, encoder.backbone.forward_features(_mask_by_hand(x, 32, ids)))
        # the same ids mask another view alike
        torch.testing.assert_close(encoder.forward_features(x, ids_keep=ids), out)
    with pytest.raises(ValueError, match="multiples of mask_patch=32"):
        encoder.forward_features(torch.randn(1, 13, 48, 48), keep=0.5)
