"""fastcon.models ViTEncoder: equals timm's ViT unmasked, Siamese masking, packed attention, checkpointing."""

import pytest
import torch

from fastcon.models import create_encoder
from fastcon.models.vit import block_diagonal_mask

VIT = "vit_small_patch14_dinov2"


def _encoder(in_chans=13, img_size=56, **kw):
    torch.manual_seed(0)
    enc = create_encoder(VIT, in_chans=in_chans, img_size=img_size, depth=2, **kw)
    with torch.no_grad():  # LayerScale starts at 1e-5: make the blocks matter
        for blk in enc.backbone.blocks:
            blk.ls1.gamma.normal_(0, 0.5)
            blk.ls2.gamma.normal_(0, 0.5)
        enc.backbone.pos_embed.normal_(0, 0.5)
    return enc.eval()


def test_unmasked_equals_timm_vit():
    enc = _encoder()
    x = torch.randn(2, 13, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), enc.backbone.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc(x), enc.backbone(x), rtol=1e-5, atol=1e-5)


def test_dynamic_img_size_resamples_pos_embed():
    enc = _encoder(dynamic_img_size=True)
    x = torch.randn(2, 13, 42, 70)  # any multiple of 14
    with torch.no_grad():
        out = enc.forward_features(x)
        torch.testing.assert_close(out, enc.backbone.forward_features(x), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 1 + 3 * 5, 384)


def test_packed_attention_equals_per_sample():
    """Batches with different token counts packed into one sequence, block-diagonal SDPA mask on CPU."""
    enc = _encoder(dynamic_img_size=True)
    xs = [torch.randn(2, 13, 56, 56), torch.randn(3, 13, 28, 42)]
    with torch.no_grad():
        packed, ids = enc.forward_features_packed(xs)
        for x, out in zip(xs, packed):
            torch.testing.assert_close(out, enc.forward_features(x), rtol=1e-5, atol=1e-5)
    assert ids == [None, None]


def test_block_diagonal_mask():
    m = block_diagonal_mask([2, 1, 3], "cpu")
    want = torch.block_diag(torch.ones(2, 2), torch.ones(1, 1), torch.ones(3, 3)).bool()
    assert torch.equal(m, want)


def test_grad_checkpointing_same_values_and_grads():
    enc = _encoder()
    x = torch.randn(2, 13, 56, 56)
    enc.forward_features(x).square().mean().backward()
    want = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    enc.set_grad_checkpointing(True)
    enc.forward_features(x).square().mean().backward()
    for a, b in zip(want, [p.grad for p in enc.parameters()]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_bad_input_shape():
    enc = _encoder()
    with pytest.raises(ValueError, match=r"x must be \(B, 13, H, W\)"):
        enc.forward_features(torch.randn(2, 3, 56, 56))
