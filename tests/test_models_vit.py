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


# ---- Siamese masking (fastcon.siamese_mask) --------------------------------------------------


def test_keep_ratio_one_equals_unmasked():
    enc = _encoder()
    x = torch.randn(2, 13, 56, 56)
    with torch.no_grad():
        out, ids = enc.forward_features(x, keep=1.0, return_ids=True)
        torch.testing.assert_close(out, enc.forward_features(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, torch.arange(16).expand(2, -1))


def _by_hand(enc, x, ids_keep):
    """The ViT on the gathered tokens, written out with timm's own modules."""
    vit = enc.backbone
    tokens = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    kept = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    return vit.norm(vit.blocks(torch.cat([cls, kept], dim=1)))


@pytest.mark.parametrize("keep", [0.5, 3, 0.3])
def test_masked_equals_vit_on_gathered_tokens(keep):
    enc = _encoder()
    x = torch.randn(3, 13, 56, 56)
    gen = torch.Generator().manual_seed(7)
    out, ids = enc.forward_features(x, keep=keep, generator=gen, return_ids=True)
    k = keep if isinstance(keep, int) else max(1, round(16 * keep))
    assert ids.shape == (3, k)
    assert out.shape == (3, 1 + k, 384)
    torch.testing.assert_close(out, _by_hand(enc, x, ids), rtol=1e-5, atol=1e-5)
    # the same ids mask another branch alike
    again = enc.forward_features(x, ids_keep=ids)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_gradients_reach_kept_tokens_only():
    enc = _encoder()
    x = torch.randn(2, 13, 56, 56)
    tokens = enc.backbone.patch_embed(x).detach().requires_grad_(True)
    seen = {}

    def grab(module, inputs, output):  # swap in a leaf we can read the gradient of
        seen["t"] = tokens
        return tokens

    handle = enc.backbone.patch_embed.register_forward_hook(grab)
    out, ids = enc.forward_features(x, keep=0.25, return_ids=True)
    handle.remove()
    out.square().sum().backward()
    g = tokens.grad.abs().sum(-1)  # (B, L)
    kept = torch.zeros_like(g, dtype=torch.bool).scatter_(1, ids, True)
    assert (g[~kept] == 0).all()
    assert (g[kept] > 0).all()
    # the positional embedding gets gradient at kept positions (and the class position) only
    pos_g = enc.backbone.pos_embed.grad[0, 1:].abs().sum(-1)
    assert (pos_g[~kept.any(0)] == 0).all()
    assert (pos_g[kept.any(0)] > 0).all()


def test_packed_masked_batches_with_different_keep_counts():
    enc = _encoder()
    xs = [torch.randn(2, 13, 56, 56), torch.randn(3, 13, 56, 56), torch.randn(1, 13, 56, 56)]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        outs, ids = enc.forward_features_packed(xs, keeps=[0.5, 0.25, None], generator=gen)
        for x, out, i in zip(xs, outs, ids):
            torch.testing.assert_close(out, enc.forward_features(x, ids_keep=i), rtol=1e-5, atol=1e-5)
    assert [o.shape[1] for o in outs] == [9, 5, 17]
    assert ids[2] is None


def test_masked_under_autocast():
    enc = _encoder()
    x = torch.randn(2, 13, 56, 56)
    gen = torch.Generator().manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ids = enc.forward_features(x, keep=0.5, generator=gen, return_ids=True)
    want = _by_hand(enc, x, ids)
    assert (out.float() - want).abs().max() < 0.1 * want.abs().max()


def test_xformers_layout_with_a_fake_xformers(monkeypatch):
    """The xformers branch's (B, N, H, hd) plumbing, checked with a fake ``xformers.ops`` built on SDPA
    (the real one needs a CUDA device)."""
    import types

    import torch.nn.functional as F

    from fastcon.models import vit

    class FakeBlockDiagonalMask:
        def __init__(self, seqlens):
            self.seqlens = list(seqlens)

        @classmethod
        def from_seqlens(cls, seqlens):
            return cls(seqlens)

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0):
        assert q.shape[0] == 1  # (B, M, H, K) layout, one packed sequence
        mask = block_diagonal_mask(attn_bias.seqlens, q.device)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    fake = types.SimpleNamespace(
        fmha=types.SimpleNamespace(BlockDiagonalMask=FakeBlockDiagonalMask),
        memory_efficient_attention=memory_efficient_attention,
    )
    monkeypatch.setattr(vit, "_xformers_ops", lambda: fake)
    monkeypatch.setattr(vit, "_xformers_usable", lambda x: True)
    enc = _encoder()
    xs = [torch.randn(2, 13, 56, 56), torch.randn(1, 13, 56, 56)]
    with torch.no_grad():
        outs, _ = enc.forward_features_packed(xs)
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, enc.forward_features(x), rtol=1e-5, atol=1e-5)
