"""fastcon.NoiseSchedule: schedules, the Philox stream and the fused q_sample / loss on every backend.

Layers, from the inside out:
- the Philox stream: Random123's known answers, the same words on every backend and SIMD level,
  normals within a few ulp of the float64 transform and N(0, 1) by the usual statistics;
- the schedule tables against their closed forms (float64, 1e-12);
- q_sample and loss (values and gradients) of each fused backend against the reference
  evaluated in float64, across dtypes, odd shapes, schedule kinds, targets, reductions,
  seeded and explicit noise; gradcheck in float64;
- memory: the seeded path holds one batch-sized buffer fewer than the explicit-noise path;
- argument checking: one test per kind of bad input.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastcon
from fastcon import _backends, reference
from fastcon._memory import PeakMemory, rss_peak_supported
from fastcon.diffusion import NoiseSchedule, seeded_noise

FUSED = ["cpu", "triton", "cuda_simt"]
DTYPES = {  # storage dtypes each fused backend is tested with (bf16 elementwise is fine in C++;
    # the Triton interpreter has no bf16 arrays)
    "cpu": [torch.float32, torch.float16, torch.bfloat16],
    "triton": [torch.float32, torch.float16],
    "cuda_simt": [torch.float32, torch.float16, torch.bfloat16],
}
BACKEND_DTYPES = [(b, d) for b in FUSED for d in DTYPES[b]]
SHAPES = [(3, 5, 7), (2, 3, 17, 19)]  # odd sizes: partial vectors and partial blocks everywhere
U32 = 2**-23  # one fp32 ulp at 1
_backends.load_extension()  # the raw ops (torch.ops.fastcon.*) are registered on import of fastcon._C


def device_for(backend: str) -> str:
    return "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


def ops_seed(seed: int) -> int:
    return seed - 2**64 if seed >= 2**63 else seed


def core(backend: str):
    return _backends.select("diffusion", backend, torch.device(device_for(backend)))[1]


def philox_words(backend: str, counter: torch.Tensor, seed: int) -> torch.Tensor:
    if backend == "reference":
        return reference.philox4x32_10(counter, seed)
    if backend == "cpu":
        return torch.ops.fastcon.philox_uint32(counter, ops_seed(seed))
    return core("triton").philox_uint32(counter.to(device_for(backend)), ops_seed(seed)).cpu()


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def assert_like_reference(actual, exact, same_dtype_ref, what):
    """The kernel's error against the float64 evaluation is at most twice that of the dense
    reference run in the same dtype, plus a few fp32 ulps (the noise may differ in the last bits)."""
    scale = exact.detach().double().abs().max().item()
    err, ref_err = max_err(actual, exact), max_err(same_dtype_ref, exact)
    bound = 2 * ref_err + 8 * U32 * max(scale, 1e-30)
    assert err <= bound, f"{what}: error {err:.3e} > {bound:.3e} (same-dtype reference error {ref_err:.3e})"


# --------------------------------------------------------------------------------------------
# 1. the Philox stream

# Random123 tests/kat_vectors (github.com/DEShawResearch/random123 @ 9545ff6), the three
# "philox4x32 10" lines: counter words, key words, expected output words.
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_philox_known_answers(backend, counter, key, expected):
    seed = key[0] | (key[1] << 32)  # key words = (seed mod 2^32, seed div 2^32)
    out = philox_words(backend, torch.tensor([counter]), seed)
    assert out[0].tolist() == list(expected)


def test_philox_words_identical_across_backends():
    gen = torch.Generator().manual_seed(0)
    counter = torch.randint(0, 2**32, (3001, 4), generator=gen)
    for seed in [0, 1, 12345, 2**32 - 1, 2**32, 2**63 + 12345, 2**64 - 1]:
        ref = reference.philox4x32_10(counter, seed)
        for backend in FUSED:
            assert torch.equal(philox_words(backend, counter, seed), ref), (backend, seed)


def test_seeded_stream_is_counter_of_element_index():
    """eps[idx] comes from counter (idx lo, idx hi, 0, 0): the normals of a batch are the
    transform of exactly those Philox words (checked across the 2^32 boundary)."""
    idx = torch.cat([torch.arange(5), torch.arange(2**32 - 3, 2**32 + 3), torch.tensor([2**40 + 7])])
    words = reference.philox4x32_10(reference.element_counters(idx), 99)
    assert torch.equal(words, philox_words("cpu", reference.element_counters(idx), 99))
    u1, u2 = reference.philox_uniform(words[:, 0]), reference.philox_uniform(words[:, 1])
    z = (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).float()
    assert torch.equal(reference.philox_normal(idx, 99), z)
    assert bool(((u1 > 0) & (u1 < 1)).all())


@pytest.mark.parametrize("backend", FUSED)
def test_normals_match_reference_within_ulps(backend):
    """Every fused backend's fp32 transform is within 4 ulp of max(1, sqrt(-2 ln u1)) of the exact one."""
    idx = torch.cat([torch.arange(200_000), torch.arange(2**32 - 500, 2**32 + 500), torch.arange(2**50, 2**50 + 99)])
    seed = 2**63 + 77
    z = core(backend).normal(idx.to(device_for(backend)), ops_seed(seed)).cpu()
    ref = reference.philox_normal(idx, seed).double()
    w = reference.philox4x32_10(reference.element_counters(idx), seed)
    r = torch.sqrt(-2 * torch.log(reference.philox_uniform(w[:, 0])))
    ulps = ((z.double() - ref).abs() / (U32 * r.clamp(min=1))).max().item()
    assert ulps <= 4, f"{backend}: normals off by {ulps:.2f} ulp"


def test_normals_bit_identical_cpu_triton():
    idx = torch.arange(50_000)
    assert torch.equal(core("cpu").normal(idx, 5), core("triton").normal(idx.to(device_for("triton")), 5).cpu())


def test_normals_are_standard_normal():
    from scipy import stats

    n = 1 << 20
    z = seeded_noise(2024, (n,), backend="cpu").double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z[1:] * z[:-1]).mean().item()) < 5 / math.sqrt(n)  # neighbours uncorrelated
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / n)  # skewness
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # kurtosis
    assert stats.kstest(z[:200_000].numpy(), "norm").pvalue > 0.01
    other = seeded_noise(2025, (n,), backend="cpu").double()
    assert abs((z * other).mean().item()) < 5 / math.sqrt(n)  # seeds give independent streams


SIMD_LEVELS = {"scalar": "scalar", "avx2": "AVX2", "avx512": "AVX-512"}


@pytest.mark.parametrize("level", ["scalar", "avx2"])
def test_cpu_simd_levels_give_identical_bits(level, monkeypatch):
    """Scalar (the shared header itself), AVX2 and AVX-512 kernels agree bit for bit."""
    best = torch.ops.fastcon.cpu_capability()
    if level == "avx2" and best == "scalar":
        pytest.skip("this CPU has no AVX2")
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 1001, generator=gen)
    pred = torch.randn(3, 1001, generator=gen)
    a, s, w = torch.rand(3, generator=gen), torch.rand(3, generator=gen), torch.rand(3, generator=gen)
    counter = torch.randint(0, 2**32, (99, 4), generator=gen)
    idx = torch.arange(2**32 - 600, 2**32 + 600)
    ops = torch.ops.fastcon

    def run():
        outs = [ops.philox_uint32(counter, 3), ops.philox_normal(idx, -5), ops.diffusion_q_sample(x0, a, s, None, 9)]
        for target in range(3):
            outs.append(ops.diffusion_loss_backward(w, pred, x0, a, s, None, 9, target))
        for dtype in (torch.float16, torch.bfloat16):
            outs.append(ops.diffusion_q_sample(x0.to(dtype), a, s, None, 9))
        return outs

    best_out = run()
    monkeypatch.setenv("FASTCON_CPU_ISA", level)
    assert ops.cpu_capability() == SIMD_LEVELS[level]
    for i, (x, y) in enumerate(zip(run(), best_out)):
        assert torch.equal(x, y), f"output {i} differs between {level} and {best}"


# --------------------------------------------------------------------------------------------
# 2. schedule tables


def test_linear_betas_closed_form():
    s = NoiseSchedule("linear", 1000, 1e-4, 0.02)
    t = torch.arange(1000, dtype=torch.float64)
    assert s.betas.dtype == torch.float64
    assert (s.betas - (1e-4 + (0.02 - 1e-4) * t / 999)).abs().max() < 1e-12


def test_scaled_linear_betas_closed_form():
    s = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    t = torch.arange(1000, dtype=torch.float64)
    expected = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * t / 999) ** 2
    assert (s.betas - expected).abs().max() < 1e-12


def test_cosine_alpha_bar_closed_form():
    T, s0 = 1000, 0.008
    s = NoiseSchedule("cosine", T)

    def f(t):
        return math.cos((t / T + s0) / (1 + s0) * math.pi / 2) ** 2

    clipped = s.betas >= 0.999
    assert float(s.betas.max()) <= 0.999
    assert int(clipped.sum()) >= 1
    assert bool(clipped[-1])
    first_clip = int(clipped.nonzero()[0])
    for t in range(first_clip):  # alpha_bar_t = prod_{s<=t} (1 - beta_s) = f(t + 1) / f(0)
        assert abs(float(s.alphas_cumprod[t]) - f(t + 1) / f(0)) < 1e-12, t


def test_tables_are_consistent():
    for kind in fastcon.diffusion.KINDS:
        s = NoiseSchedule(kind, 257)
        ab = torch.tensor([math.prod(1 - float(b) for b in s.betas[: t + 1]) for t in range(257)], dtype=torch.float64)
        assert (s.alphas_cumprod - ab).abs().max() < 1e-12
        assert (s.sqrt_alphas_cumprod**2 - s.alphas_cumprod).abs().max() < 1e-12
        assert (s.sqrt_one_minus_alphas_cumprod**2 - (1 - s.alphas_cumprod)).abs().max() < 1e-12
        assert bool((s.betas > 0).all())
        assert bool((s.betas < 1).all())
        assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())


def test_single_timestep_schedule():
    s = NoiseSchedule("linear", 1, 0.3, 0.3)
    assert s.betas.tolist() == [0.3]
    assert abs(float(s.alphas_cumprod[0]) - 0.7) < 1e-15
    x0 = torch.randn(2, 3)
    xt, _ = s.q_sample(x0, torch.zeros(2, dtype=torch.int64), seed=1, backend="cpu")
    assert torch.isfinite(xt).all()


def test_sample_timesteps():
    s = NoiseSchedule(timesteps=10)
    t = s.sample_timesteps(10_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64
    assert t.shape == (10_000,)
    assert t.device.type == "cpu"
    assert int(t.min()) == 0
    assert int(t.max()) == 9
    assert torch.equal(t, s.sample_timesteps(10_000, generator=torch.Generator().manual_seed(0)))
    counts = torch.bincount(t, minlength=10).double()
    assert (counts / 1000 - 1).abs().max() < 0.15  # uniform


def test_coefficients_cached_per_device():
    s = NoiseSchedule("cosine", 50)
    t = torch.tensor([0, 7, 49])
    a, b = s.coefficients(t, torch.float32)
    assert a.dtype == torch.float32
    assert torch.equal(a, s.sqrt_alphas_cumprod[t].float())
    assert torch.equal(b, s.sqrt_one_minus_alphas_cumprod[t].float())
    assert list(s._device_tables) == [torch.device("cpu")]
    s.coefficients(t)
    assert len(s._device_tables) == 1
    assert "cosine" in repr(s)
    assert "beta" not in repr(s)


# --------------------------------------------------------------------------------------------
# 3. q_sample and loss against the reference


def make_batch(shape, dtype, device, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    pred = torch.randn(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 1000, (shape[0],), generator=gen)
    t[0] = 999  # the end of the schedule, where sqrt(alpha_bar) is smallest
    return x0, pred, noise, t


def cast(x, dtype, device, grad=False):
    return None if x is None else x.detach().to(device=device, dtype=dtype).requires_grad_(grad)


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
@pytest.mark.parametrize("noise_mode", ["seeded", "explicit"])
@pytest.mark.parametrize("shape", SHAPES)
def test_q_sample_matches_reference(backend, dtype, noise_mode, shape):
    dev = device_for(backend)
    sched = NoiseSchedule("linear")
    x0, _, noise, t = make_batch(shape, dtype, dev)
    seed = 2**63 + 11 if noise_mode == "seeded" else None
    noise = noise.to(dtype).double() if noise_mode == "explicit" else None  # values the kernel sees
    xt, out_noise = sched.q_sample(cast(x0, dtype, dev), t.to(dev), cast(noise, dtype, dev), seed=seed, backend=backend)
    assert xt.dtype == dtype
    assert xt.shape == x0.shape
    assert xt.device.type == dev
    assert (out_noise is None) == (noise_mode == "seeded")
    exact, _ = sched.q_sample(x0.to(dtype).double(), t, noise, seed=seed, backend="reference")
    same, _ = sched.q_sample(cast(x0, dtype, "cpu"), t, cast(noise, dtype, "cpu"), seed=seed, backend="reference")
    assert_like_reference(xt, exact, same, f"x_t {dtype}")


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
@pytest.mark.parametrize("target", fastcon.diffusion.TARGETS)
@pytest.mark.parametrize("noise_mode", ["seeded", "explicit"])
def test_loss_and_gradient_match_reference(backend, dtype, target, noise_mode):
    dev = device_for(backend)
    sched = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    x0, pred, noise, t = make_batch((2, 3, 17, 19), dtype, dev, seed=3)
    seed = 12345 if noise_mode == "seeded" else None
    noise = noise.to(dtype).double() if noise_mode == "explicit" else None

    def run(backend_, dt, device):
        p = cast(pred.to(dtype), dt, device, grad=True)
        loss = sched.loss(
            p, cast(x0.to(dtype), dt, device), t.to(device), noise=cast(noise, dt, device), seed=seed,
            target=target, backend=backend_,
        )  # fmt: skip
        loss.backward()
        return loss, p.grad

    loss, grad = run(backend, dtype, dev)
    assert loss.dtype == torch.float32
    assert loss.dim() == 0
    assert grad.dtype == dtype
    exact_loss, exact_grad = run("reference", torch.float64, "cpu")
    same_loss, same_grad = run("reference", dtype, "cpu")
    assert_like_reference(loss, exact_loss, same_loss, f"loss {dtype}")
    assert_like_reference(grad, exact_grad, same_grad, f"d pred {dtype}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", fastcon.diffusion.KINDS)
@pytest.mark.parametrize("reduction", fastcon.diffusion.REDUCTIONS)
def test_schedule_kinds_and_reductions(backend, kind, reduction):
    dev = device_for(backend)
    sched = NoiseSchedule(kind, 500)
    x0, pred, _, t = make_batch((4, 2, 9, 11), torch.float32, dev, seed=5)
    t = t % 500
    xt, _ = sched.q_sample(cast(x0, torch.float32, dev), t.to(dev), seed=7, backend=backend)
    xr, _ = sched.q_sample(x0, t, seed=7, backend="reference")
    assert max_err(xt, xr) <= 8 * U32 * xr.abs().max().item()
    up = torch.rand(4, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    grads = []
    for b, dt, device in [(backend, torch.float32, dev), ("reference", torch.float64, "cpu")]:
        p = cast(pred, dt, device, grad=True)
        loss = sched.loss(p, cast(x0, dt, device), t.to(device), seed=7, target="v", reduction=reduction, backend=b)
        assert loss.shape == ((4,) if reduction == "none" else ())
        loss.backward(up.to(device=device, dtype=loss.dtype))
        grads.append((loss, p.grad))
    (loss, grad), (r_loss, r_grad) = grads
    assert max_err(loss, r_loss) <= 1e-5 * r_loss.abs().max().item()
    assert max_err(grad, r_grad) <= 1e-5 * r_grad.abs().max().item()


@pytest.mark.parametrize("backend", FUSED)
def test_samples_spanning_many_chunks(backend):
    """Samples larger than the kernels' work chunks (cpu: 6144 elements, triton: 1024-element
    blocks), with a partial last chunk: values, per-sample sums and gradients still match."""
    dev = device_for(backend)
    sched = NoiseSchedule()
    x0, pred, _, t = make_batch((2, 13001), torch.float32, dev, seed=8)
    xt, _ = sched.q_sample(cast(x0, torch.float32, dev), t.to(dev), seed=5, backend=backend)
    xr, _ = sched.q_sample(x0, t, seed=5, backend="reference")
    assert max_err(xt, xr) <= 8 * U32 * xr.abs().max().item()
    outs = []
    for b, dt, device in [(backend, torch.float32, dev), ("reference", torch.float64, "cpu")]:
        p = cast(pred, dt, device, grad=True)
        loss = sched.loss(p, cast(x0, dt, device), t.to(device), seed=5, target="v", reduction="none", backend=b)
        loss.sum().backward()
        outs.append((loss, p.grad))
    (loss, grad), (r_loss, r_grad) = outs
    assert max_err(loss, r_loss) <= 1e-5 * r_loss.abs().max().item()
    assert max_err(grad, r_grad) <= 1e-5 * r_grad.abs().max().item()


def test_loss_none_is_per_sample_mean():
    sched = NoiseSchedule()
    x0, pred, noise, t = make_batch((3, 4, 5), torch.float32, "cpu")
    per = sched.loss(pred, x0, t, noise=noise, reduction="none", backend="cpu")
    assert per.dtype == torch.float64
    assert per.shape == (3,)
    assert torch.allclose(per, ((pred - noise) ** 2).mean(dim=(1, 2)), rtol=1e-12)
    total = sched.loss(pred, x0, t, noise=noise, reduction="sum", backend="cpu")
    assert torch.allclose(total, ((pred - noise) ** 2).sum(), rtol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_seeded_equals_explicit_materialised_noise(backend):
    """Seeded and explicit paths agree bit for bit once the seeded noise is materialised: the
    loss regenerates exactly the eps that q_sample used."""
    dev = device_for(backend)
    sched = NoiseSchedule("cosine")
    x0, pred, _, t = make_batch((3, 5, 33), torch.float32, dev, seed=9)
    x0, pred, t = x0.float().to(dev), pred.float().to(dev), t.to(dev)
    eps = seeded_noise(77, x0.shape, device=dev, backend=backend)
    xs, _ = sched.q_sample(x0, t, seed=77, backend=backend)
    xe, _ = sched.q_sample(x0, t, eps, backend=backend)
    assert torch.equal(xs, xe)
    for target in fastcon.diffusion.TARGETS:
        outs = []
        for kw in (dict(seed=77), dict(noise=eps)):
            p = pred.clone().requires_grad_(True)
            loss = sched.loss(p, x0, t, target=target, reduction="none", backend=backend, **kw)
            loss.sum().backward()
            outs.append((loss, p.grad))
        assert torch.equal(outs[0][0], outs[1][0]), target
        assert torch.equal(outs[0][1], outs[1][1]), target
    # and the reference materialises the same stream (to the last few bits)
    assert max_err(eps, seeded_noise(77, x0.shape, backend="reference")) <= 8 * U32


def test_q_sample_without_noise_or_seed_draws_and_returns_noise():
    sched = NoiseSchedule()
    x0, _, _, t = make_batch((2, 3, 4), torch.float32, "cpu")
    x0 = x0.float()
    torch.manual_seed(0)
    xt, noise = sched.q_sample(x0, t, backend="cpu")
    torch.manual_seed(0)
    assert torch.equal(noise, torch.randn_like(x0))  # torch's global generator, reproducible
    a, s = sched.coefficients(t, torch.float32)
    assert torch.allclose(xt, a[:, None, None] * x0 + s[:, None, None] * noise, rtol=1e-6, atol=1e-7)


def test_q_sample_noncontiguous_input():
    sched = NoiseSchedule()
    x0 = torch.randn(3, 8, 6).transpose(1, 2)
    t = torch.tensor([1, 500, 999])
    xt, _ = sched.q_sample(x0, t, seed=3, backend="cpu")
    assert torch.equal(xt, sched.q_sample(x0.contiguous(), t, seed=3, backend="cpu")[0])


def test_gradients_to_x0_and_noise_match_reference():
    sched = NoiseSchedule("cosine")
    x0, pred, noise, t = make_batch((2, 3, 7), torch.float32, "cpu", seed=4)
    for target in fastcon.diffusion.TARGETS:
        grads = []
        for backend in ("cpu", "reference"):
            a, n, p = (x.clone().requires_grad_(True) for x in (x0, noise, pred))
            xt, _ = sched.q_sample(a, t, n, backend=backend)
            loss = sched.loss(p, a, t, noise=n, target=target, backend=backend) + (xt * xt.detach()).sum()
            grads.append(torch.autograd.grad(loss, [a, n, p]))
        for name, g, r in zip(["x0", "noise", "pred"], *grads):
            assert max_err(g, r) <= 1e-12 * max(1.0, r.abs().max().item()), (target, name)


def test_gradcheck_float64():
    sched = NoiseSchedule("linear", 100)
    gen = torch.Generator().manual_seed(0)
    x0, pred, noise = (torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    t = torch.tensor([3, 97])
    assert torch.autograd.gradcheck(lambda a, n: sched.q_sample(a, t, n, backend="cpu")[0], (x0, noise))
    for target in fastcon.diffusion.TARGETS:
        for reduction in fastcon.diffusion.REDUCTIONS:

            def loss_explicit(p, a, n, target=target, reduction=reduction):
                return sched.loss(p, a, t, noise=n, target=target, reduction=reduction, backend="cpu")

            def loss_seeded(p, a, target=target, reduction=reduction):
                return sched.loss(p, a, t, seed=5, target=target, reduction=reduction, backend="cpu")

            assert torch.autograd.gradcheck(loss_explicit, (pred, x0, noise))
            assert torch.autograd.gradcheck(loss_seeded, (pred, x0))


def test_x0_target_needs_no_noise():
    sched = NoiseSchedule()
    x0, pred, _, t = make_batch((2, 9), torch.float32, "cpu")
    loss = sched.loss(pred, x0, t, target="x0", backend="cpu")
    assert abs(loss.item() - ((pred - x0) ** 2).mean().item()) < 1e-6


# --------------------------------------------------------------------------------------------
# 4. memory


@pytest.mark.skipif(not rss_peak_supported(), reason="needs /proc/self/clear_refs to measure peak RSS")
def test_seeded_path_saves_a_batch_buffer():
    """q_sample + loss forward/backward on a (64, 13, 128, 128) fp32 batch: the seeded path's
    peak memory is at least one batch-sized fp32 buffer below the explicit-noise path's."""
    sched = NoiseSchedule()
    x0 = torch.randn(64, 13, 128, 128)
    t = sched.sample_timesteps(64, generator=torch.Generator().manual_seed(0))
    batch_mib = x0.numel() * 4 / 2**20

    def step(seeded: bool):
        noise = None if seeded else torch.randn_like(x0)
        xt, _ = sched.q_sample(x0, t, noise, seed=3 if seeded else None, backend="cpu")
        pred = xt.detach().requires_grad_(True)  # stands for the network's output
        sched.loss(pred, x0, t, noise=noise, seed=3 if seeded else None, backend="cpu").backward()
        return pred.grad

    peaks = {}
    for seeded in (True, False, True, False):  # twice each: the first run may page in code
        with PeakMemory("cpu") as m:
            step(seeded)
        peaks[seeded] = m.peak_mib
    print(f"peak MiB: seeded {peaks[True]:.1f}, explicit {peaks[False]:.1f}, batch {batch_mib:.1f}")
    assert peaks[True] <= 2.2 * batch_mib, peaks  # x_t and the gradient, nothing else batch-sized
    assert peaks[False] - peaks[True] >= 0.95 * batch_mib, peaks


# --------------------------------------------------------------------------------------------
# 5. bad input: one test per kind


@pytest.fixture
def sched():
    return NoiseSchedule(timesteps=10)


@pytest.fixture
def batch():
    return torch.randn(2, 3, 4), torch.tensor([0, 9])


def test_bad_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        NoiseSchedule("quadratic")


def test_bad_timesteps():
    with pytest.raises(ValueError, match="timesteps"):
        NoiseSchedule(timesteps=0)
    with pytest.raises(TypeError, match="timesteps must be an int"):
        NoiseSchedule(timesteps=10.0)


def test_betas_outside_unit_interval():
    with pytest.raises(ValueError, match="beta_start must be >"):
        NoiseSchedule(beta_start=0.0)
    with pytest.raises(ValueError, match="beta_end must be <"):
        NoiseSchedule(beta_end=1.0)


def test_beta_start_above_beta_end():
    with pytest.raises(ValueError, match="beta_start must be <= beta_end"):
        NoiseSchedule(beta_start=0.02, beta_end=0.01)


def test_cosine_takes_no_betas():
    with pytest.raises(ValueError, match="cosine"):
        NoiseSchedule("cosine", beta_start=1e-4)


def test_t_out_of_range(sched, batch):
    x0, _ = batch
    for bad in ([0, 10], [-1, 3]):
        with pytest.raises(ValueError, match=r"t must be in \[0, 10\)"):
            sched.q_sample(x0, torch.tensor(bad), seed=1)


def test_t_wrong_shape(sched, batch):
    x0, t = batch
    with pytest.raises(ValueError, match="one timestep per sample"):
        sched.q_sample(x0, torch.tensor([0, 1, 2]), seed=1)
    with pytest.raises(ValueError, match="t must be 1-D"):
        sched.q_sample(x0, t[:, None], seed=1)


def test_t_wrong_dtype(sched, batch):
    x0, t = batch
    with pytest.raises(TypeError, match="t must be an int64"):
        sched.q_sample(x0, t.int(), seed=1)


def test_x0_not_floating(sched, batch):
    _, t = batch
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor"):
        sched.q_sample(torch.ones(2, 3, dtype=torch.int64), t, seed=1)


def test_x0_empty_or_scalar(sched, batch):
    _, t = batch
    with pytest.raises(ValueError, match="x0 must"):
        sched.q_sample(torch.ones(2, 0), t, seed=1)
    with pytest.raises(ValueError, match="x0 must be a batch"):
        sched.q_sample(torch.tensor(1.0), t, seed=1)


def test_mismatched_shapes(sched, batch):
    x0, t = batch
    with pytest.raises(ValueError, match="noise must have x0's shape"):
        sched.q_sample(x0, t, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="pred must have x0's shape"):
        sched.loss(torch.randn(2, 12), x0, t, seed=1)


def test_mismatched_dtypes(sched, batch):
    x0, t = batch
    with pytest.raises(TypeError, match="noise must have x0's dtype"):
        sched.q_sample(x0, t, x0.double())
    with pytest.raises(TypeError, match="pred must have x0's dtype"):
        sched.loss(x0.half(), x0, t, seed=1)


def test_mismatched_devices(sched, batch):
    x0, t = batch
    with pytest.raises(ValueError, match="t must be on x0's device"):
        sched.q_sample(x0, t.to("meta"), seed=1)
    with pytest.raises(ValueError, match="pred must be on x0's device"):
        sched.loss(x0.to("meta"), x0, t, seed=1)


def test_unknown_target(sched, batch):
    x0, t = batch
    with pytest.raises(ValueError, match="target must be one of"):
        sched.loss(x0, x0, t, seed=1, target="score")


def test_unknown_reduction(sched, batch):
    x0, t = batch
    with pytest.raises(ValueError, match="reduction must be one of"):
        sched.loss(x0, x0, t, seed=1, reduction="max")


def test_noise_and_seed_together(sched, batch):
    x0, t = batch
    with pytest.raises(ValueError, match="either noise or seed"):
        sched.q_sample(x0, t, torch.randn_like(x0), seed=1)


def test_loss_needs_noise_or_seed(sched, batch):
    x0, t = batch
    with pytest.raises(ValueError, match="pass noise=... or seed=..."):
        sched.loss(x0, x0, t)


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_seed_out_of_range(sched, batch, bad):
    x0, t = batch
    with pytest.raises(ValueError, match="seed must be in"):
        sched.q_sample(x0, t, seed=bad)


@pytest.mark.parametrize("bad", [1.0, True, "7"])
def test_seed_not_an_int(sched, batch, bad):
    x0, t = batch
    with pytest.raises(TypeError, match="seed must be an int"):
        sched.q_sample(x0, t, seed=bad)


def test_bad_batch_for_sample_timesteps(sched):
    with pytest.raises(ValueError, match="batch"):
        sched.sample_timesteps(0)


def test_triton_rejects_float64(sched, batch):
    x0, t = batch
    dev = device_for("triton")
    with pytest.raises(TypeError, match="triton diffusion kernels take float32"):
        sched.q_sample(x0.double().to(dev), t.to(dev), seed=1, backend="triton")


def test_unknown_simd_level(monkeypatch, batch):
    x0, _ = batch
    monkeypatch.setenv("FASTCON_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="FASTCON_CPU_ISA must be scalar, avx2 or avx512"):
        torch.ops.fastcon.diffusion_q_sample(x0, torch.ones(2), torch.ones(2), None, 0)


def test_kernel_ops_check_their_arguments(batch):
    """The ops themselves refuse what the public API never passes them."""
    x0, _ = batch
    ops = torch.ops.fastcon
    with pytest.raises(RuntimeError, match="coefficients must be"):
        ops.diffusion_q_sample(x0, torch.ones(3), torch.ones(2), None, 0)
    with pytest.raises(RuntimeError, match="target must be 0"):
        ops.diffusion_loss(x0, x0, torch.ones(2), torch.ones(2), None, 0, 3)
    with pytest.raises(RuntimeError, match="counter must be"):
        ops.philox_uint32(torch.zeros(3, 3, dtype=torch.int64), 0)


def test_ops_schemas_and_fake_kernels():
    """torch.library.opcheck: schemas, fake (meta) kernels and autograd registration agree with the cpu kernels."""
    gen = torch.Generator().manual_seed(0)
    x0, pred, noise = (torch.randn(2, 3, 5, generator=gen) for _ in range(3))
    a, s, w = torch.rand(2, generator=gen), torch.rand(2, generator=gen), torch.rand(2, generator=gen)
    ops = torch.ops.fastcon
    cases = [
        (ops.philox_uint32, (torch.randint(0, 2**32, (7, 4), generator=gen), -3)),
        (ops.philox_normal, (torch.arange(9).view(3, 3), 5)),
        (ops.diffusion_q_sample, (x0, a, s, None, 3)),
        (ops.diffusion_q_sample, (x0, a, s, noise, 3)),
        (ops.diffusion_loss, (pred, x0, a, s, None, 3, 2)),
        (ops.diffusion_loss_backward, (w, pred, x0, a, s, noise, 3, 1)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
