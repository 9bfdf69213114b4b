"""fastcon.models diffusion branch: decoder shapes for ResNet / ViT encoders and 2 / 13 bands."""

import math

import pytest
import torch

from fastcon.models import DiffusionDecoder, create_encoder, timestep_embedding


def _encoder(name, in_chans, size=None):
    """A small encoder and its image size (ResNet-50 at 32 px, a 2-block ViT-S/14 at 28 px)."""
    torch.manual_seed(0)
    if name == "resnet50":
        return create_encoder(name, in_chans=in_chans), size or 32
    size = size or 28
    return create_encoder(name, in_chans=in_chans, img_size=size, depth=2), size


def test_timestep_embedding():
    t = torch.tensor([0, 1, 999])
    e = timestep_embedding(t, 8)
    assert e.shape == (3, 8)
    freqs = torch.tensor([10000 ** (-k / 4) for k in range(4)])
    torch.testing.assert_close(e[2, :4], torch.cos(999 * freqs))
    torch.testing.assert_close(e[2, 4:], torch.sin(999 * freqs))
    assert timestep_embedding(t, 7).shape == (3, 7)
    assert math.isclose(e[0, 0].item(), 1.0)


@pytest.mark.parametrize("name", ["resnet50", "vit_small_patch14_dinov2"])
@pytest.mark.parametrize("in_chans", [2, 13])
def test_decoder_output_has_input_shape(name, in_chans):
    enc, size = _encoder(name, in_chans)
    dec = DiffusionDecoder.for_encoder(enc, width=16, time_dim=32)
    x_t = torch.randn(2, in_chans, size, size)
    t = torch.tensor([5, 700])
    pred = dec(enc.forward_pyramid(x_t), t, x_t)
    assert pred.shape == x_t.shape
    pred.square().mean().backward()  # gradients reach the shared encoder
    assert all(p.grad is not None for p in enc.parameters())


def test_decoder_channels_last_and_timestep_conditioning():
    enc, size = _encoder("resnet50", 13, size=64)
    enc = enc.to(memory_format=torch.channels_last).eval()
    dec = DiffusionDecoder.for_encoder(enc, width=16, time_dim=32).to(memory_format=torch.channels_last).eval()
    with torch.no_grad():  # FiLM starts at zero (identity); give it weights so t matters
        for m in dec.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.5)
    x_t = torch.randn(2, 13, size, size).to(memory_format=torch.channels_last)
    with torch.no_grad():
        feats = enc.forward_pyramid(x_t)
        a = dec(feats, torch.tensor([1, 1]), x_t)
        b = dec(feats, torch.tensor([900, 900]), x_t)
    assert a.shape == x_t.shape
    assert (a - b).abs().max() > 1e-3  # the timestep changes the prediction


def test_decoder_argument_errors():
    with pytest.raises(ValueError, match="same length"):
        DiffusionDecoder(3, [8, 16], [2])
    with pytest.raises(ValueError, match="4 maps"):
        DiffusionDecoder(3, [8, 8], [14, 14])


# ---- the loss through fastcon.NoiseSchedule ---------------------------------------------------


def test_diffusion_loss_with_explicit_noise_is_the_mse():
    import torch.nn.functional as F

    import fastcon
    from fastcon.models import diffusion_loss

    schedule = fastcon.NoiseSchedule("linear", timesteps=1000)
    enc, size = _encoder("vit_small_patch14_dinov2", 2)
    dec = DiffusionDecoder.for_encoder(enc, width=16, time_dim=32)
    x0, eps = torch.randn(2, 2, size, size), torch.randn(2, 2, size, size)
    t = torch.tensor([10, 900])
    loss = diffusion_loss(enc, dec, schedule, x0, noise=eps, t=t)
    x_t, _ = schedule.q_sample(x0, t, eps)
    want = F.mse_loss(dec(enc.forward_pyramid(x_t), t, x_t), eps)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of seed"):
        diffusion_loss(enc, dec, schedule, x0, t=t)


@pytest.mark.parametrize("name", ["resnet50", "vit_small_patch14_dinov2"])
def test_few_steps_on_a_fixed_batch_lower_the_loss(name):
    import fastcon
    from fastcon.models import diffusion_loss

    schedule = fastcon.NoiseSchedule("linear", timesteps=1000)
    enc, size = _encoder(name, 13)
    enc.eval().requires_grad_(False)  # the decoder learns; the encoder's gradients are tested above
    dec = DiffusionDecoder.for_encoder(enc, width=16, time_dim=32)
    torch.manual_seed(1)
    x0 = torch.randn(2, 13, size, size)
    t = schedule.sample_timesteps(2, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = diffusion_loss(enc, dec, schedule, x0, seed=1234, t=t)  # the same seeded noise every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    # the seeded noise is reproducible: same seed, same loss
    with torch.no_grad():
        a = diffusion_loss(enc, dec, schedule, x0, seed=7, t=t)
        b = diffusion_loss(enc, dec, schedule, x0, seed=7, t=t)
    assert a.item() == b.item()
