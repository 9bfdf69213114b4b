"""fastcon.models: what Siamese masking and packing save in a ViT-S/14 training step.

Forward + backward of ``ViTEncoder`` (12 blocks, 112 px: 64 patch tokens) with all tokens, half
and a quarter kept; and two views (one masked to half, one whole) run as one packed sequence
against two separate calls. Timings on shared CPUs are noisy: read them as ratios within one run.
On the CPU the packed sequence goes through SDPA with a materialised (T x T) block-diagonal mask,
which computes every cross-sample score and throws it away: packing pays off on a GPU with
xformers' ``BlockDiagonalMask`` kernels, and is here for correctness and a baseline.
"""

import pytest
import torch

from fastcon._memory import PeakMemory
from fastcon.models import create_encoder

BATCH, SIZE = 4, 112


def peak_mib(fn) -> float:
    """Resident-set peak of one call, after handing freed heap memory back to the OS (otherwise
    glibc serves the activations from memory that is already resident and the peak misses them)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with PeakMemory("cpu") as m:
        fn()
    return round(m.peak_mib, 1)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return create_encoder("vit_small_patch14_dinov2", in_chans=13, img_size=SIZE).train()


def _step(encoder, x, keep):
    encoder.zero_grad(set_to_none=True)
    encoder.forward_features(x, keep=keep).float().square().mean().backward()


@pytest.mark.benchmark(group="models_vit_masking")
@pytest.mark.parametrize("keep", [None, 0.5, 0.25], ids=["all_tokens", "keep_0.5", "keep_0.25"])
def test_masked_vit_step(benchmark, record, encoder, keep):
    x = torch.randn(BATCH, 13, SIZE, SIZE)
    tokens = 64 if keep is None else round(64 * keep)
    _step(encoder, x, keep)
    benchmark.pedantic(_step, args=(encoder, x, keep), rounds=3, iterations=1)
    record(
        tokens_per_image=tokens,
        images_per_s=BATCH / benchmark.stats.stats.mean,
        peak_mib=peak_mib(lambda: _step(encoder, x, keep)),
    )


def _two_views(encoder, x1, x2, packed):
    encoder.zero_grad(set_to_none=True)
    if packed:
        outs, _ = encoder.forward_features_packed([x1, x2], keeps=[0.5, None])
    else:
        outs = [encoder.forward_features(x1, keep=0.5), encoder.forward_features(x2)]
    sum(o.float().square().mean() for o in outs).backward()


@pytest.mark.benchmark(group="models_vit_packing")
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed_sdpa_mask"])
def test_two_views_packed(benchmark, record, encoder, packed):
    x1, x2 = torch.randn(BATCH, 13, SIZE, SIZE), torch.randn(BATCH, 13, SIZE, SIZE)
    _two_views(encoder, x1, x2, packed)
    benchmark.pedantic(_two_views, args=(encoder, x1, x2, packed), rounds=3, iterations=1)
    record(peak_mib=peak_mib(lambda: _two_views(encoder, x1, x2, packed)))
