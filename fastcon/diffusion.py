"""``fastcon.NoiseSchedule``: DDPM noise schedules with fused forward noising and loss (SPEC section 3).

The pixel-level diffusion branch of SwiMDiff trains a network to predict the noise added to a
batch: ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``, loss ``|pred - eps|^2``.
Done naively that is a ``torch.randn`` buffer the size of the batch, kept alive from the noising
to the loss backward, plus a few more batch-sized temporaries. The fused backends instead:
- draw eps inside the kernel from a counter-based generator (Philox4x32-10 keyed by ``seed``,
  counter = the element's flat index; see ``fastcon.reference`` for the exact stream), so the
  noise is never stored: ``q_sample`` makes it, ``loss`` and its backward regenerate the same bits;
- do each step in one pass: noising (read x0, write x_t), loss (read pred, and x0 for the x0
  and v targets), loss backward (read pred, write its gradient), with per-sample coefficients.
The reference backend is the same math in plain PyTorch (noise materialised), differentiated
by autograd.
"""

from __future__ import annotations

import math

import torch

from fastcon import _backends, _checks, reference

KINDS = reference.SCHEDULES
TARGETS = reference.TARGETS
REDUCTIONS = ("mean", "sum", "none")
DEFAULT_BETAS = (1e-4, 0.02)  # DDPM (Ho et al. 2020)
_SEED_MAX = 2**64 - 1


# --------------------------------------------------------------------------------------------
# argument checks


def _check_seed(seed) -> int | None:
    if seed is None:
        return None
    return _checks.integer("seed", seed, low=0, high=_SEED_MAX)


def _op_seed(seed: int | None) -> int:
    """The ops carry the unsigned 64-bit seed in a signed int64 (two's complement)."""
    if seed is None:
        return 0
    return seed - 2**64 if seed >= 2**63 else seed


def _check_batch(x0, t, timesteps: int) -> None:
    _checks.tensor("x0", x0, floating=True)
    if x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be a batch (B, ...) with B >= 1, got shape {tuple(x0.shape)}")
    _checks.nonempty("x0", x0, "every sample must hold at least one element")
    _checks.tensor("t", t, dims=1)
    _checks.same_device("t", t, "x0", x0)
    if t.dtype != torch.int64:
        raise TypeError(f"t must be an int64 tensor of timesteps, got {t.dtype}")
    if t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must hold one timestep per sample, shape ({x0.shape[0]},), got {tuple(t.shape)}")
    if bool(((t < 0) | (t >= timesteps)).any()):
        lo, hi = int(t.min()), int(t.max())
        raise ValueError(f"t must be in [0, {timesteps}) (the schedule's timesteps), got values in [{lo}, {hi}]")


def _check_like(name: str, x, x0: torch.Tensor) -> None:
    _checks.tensor(name, x, floating=True)
    _checks.same_device(name, x, "x0", x0)
    _checks.same_dtype(name, x, "x0", x0)
    if x.shape != x0.shape:
        raise ValueError(f"{name} must have x0's shape {tuple(x0.shape)}, got {tuple(x.shape)}")


def _check_noise_source(noise, seed, x0) -> int | None:
    if noise is not None:
        _check_like("noise", noise, x0)
        if seed is not None:
            raise ValueError("pass either noise or seed, not both (seed draws the noise inside the kernel)")
    return _check_seed(seed)


# --------------------------------------------------------------------------------------------
# the autograd Functions shared by every fused backend


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.view(-1, *([1] * (like.dim() - 1)))


def _scaled(g: torch.Tensor, coef: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """coef[b] * g in the accumulation dtype, returned in dtype."""
    return (g.to(coef.dtype) * _per_sample(coef, g)).to(dtype)


class _FusedQSample(torch.autograd.Function):
    """x_t = a_b x0 + s_b eps in one pass; d x_t / d x0 = a_b, d x_t / d noise = s_b."""

    @staticmethod
    def forward(ctx, x0, noise, coef_x0, coef_noise, seed, core):
        ctx.save_for_backward(coef_x0, coef_noise)
        ctx.dtypes = (x0.dtype, None if noise is None else noise.dtype)
        return core.q_sample(x0, coef_x0, coef_noise, noise, seed)

    @staticmethod
    def backward(ctx, grad):
        coef_x0, coef_noise = ctx.saved_tensors
        need_x0, need_noise = ctx.needs_input_grad[:2]
        g_x0 = _scaled(grad, coef_x0, ctx.dtypes[0]) if need_x0 else None
        g_noise = _scaled(grad, coef_noise, ctx.dtypes[1]) if need_noise else None
        return g_x0, g_noise, None, None, None, None


class _FusedLoss(torch.autograd.Function):
    """Per-sample sums of squared errors in one pass; backward regenerates the target (noise
    from the seed) in one more pass and stores nothing batch-sized in between."""

    @staticmethod
    def forward(ctx, pred, x0, noise, coef_x0, coef_noise, seed, target, reduction, core):
        sse = core.loss(pred, x0, coef_x0, coef_noise, noise, seed, target)
        batch, per_sample = x0.shape[0], x0[0].numel()
        ctx.save_for_backward(pred, x0, noise, coef_x0, coef_noise)
        ctx.cfg = (seed, target, reduction, core, per_sample, x0.dtype, None if noise is None else noise.dtype)
        if reduction == "mean":
            return sse.sum() / (batch * per_sample)
        if reduction == "sum":
            return sse.sum()
        return sse / per_sample

    @staticmethod
    def backward(ctx, grad_out):
        _checks.first_order_only("fastcon.NoiseSchedule.loss")
        pred, x0, noise, coef_x0, coef_noise = ctx.saved_tensors
        seed, target, reduction, core, per_sample, x0_dtype, noise_dtype = ctx.cfg
        batch = x0.shape[0]
        go = grad_out.to(coef_x0.dtype)
        # the weight of each sample's sum of squared errors in the loss
        if reduction == "mean":
            w = (go / (batch * per_sample)).expand(batch)
        elif reduction == "sum":
            w = go.expand(batch)
        else:
            w = go / per_sample
        grad_pred = core.loss_backward(w.contiguous(), pred, x0, coef_x0, coef_noise, noise, seed, target)
        need_pred, need_x0, need_noise = ctx.needs_input_grad[:3]
        # the target's derivatives: d eps/d noise = 1; d v/d noise = a, d v/d x0 = -s
        g_x0 = g_noise = None
        if need_x0 and target == reference.TARGET_X0:
            g_x0 = -grad_pred
        elif need_x0 and target == reference.TARGET_V:
            g_x0 = _scaled(grad_pred, coef_noise, x0_dtype)
        if need_noise and target == reference.TARGET_EPSILON:
            g_noise = -grad_pred
        elif need_noise and target == reference.TARGET_V:
            g_noise = _scaled(grad_pred, -coef_x0, noise_dtype)
        return grad_pred if need_pred else None, g_x0, g_noise, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# backends: each fused backend supplies a "core" with q_sample / loss / loss_backward / normal


class _OpsCore:
    """The diffusion ops registered with TORCH_LIBRARY (csrc/), dispatched by device: namespace
    fastcon of fastcon._C (cpu and cuda kernels), or fastcon_simt of fastcon._C_simt (the CUDA
    kernels on the SIMT emulator, tests only)."""

    def __init__(self, namespace: str = "fastcon", ext: str = "_C"):
        self.namespace, self.ext = namespace, ext

    def _ops(self):
        _backends.load_extension(self.ext)
        return getattr(torch.ops, self.namespace)

    def q_sample(self, x0, coef_x0, coef_noise, noise, seed):
        return self._ops().diffusion_q_sample(x0, coef_x0, coef_noise, noise, seed)

    def loss(self, pred, x0, coef_x0, coef_noise, noise, seed, target):
        return self._ops().diffusion_loss(pred, x0, coef_x0, coef_noise, noise, seed, target)

    def loss_backward(self, grad_sse, pred, x0, coef_x0, coef_noise, noise, seed, target):
        return self._ops().diffusion_loss_backward(grad_sse, pred, x0, coef_x0, coef_noise, noise, seed, target)

    def normal(self, index, seed):
        return self._ops().philox_normal(index, seed)

    def philox_uint32(self, counter, seed):
        return self._ops().philox_uint32(counter, seed)


class _ReferenceCore:
    """fastcon.reference as a core; only ``normal`` is used (the reference path is autograd)."""

    def normal(self, index, seed):
        return reference.philox_normal(index, seed)


def _triton_core():
    from fastcon.kernels.triton import diffusion as k

    return k.CORE


_backends.register("diffusion", "reference", _ReferenceCore)
_backends.register("diffusion", "cpu", _OpsCore)
_backends.register("diffusion", "triton", _triton_core)
_backends.register("diffusion", "cuda", _OpsCore)  # csrc/cuda, CUDA tensors
_backends.register("diffusion", "cuda_simt", lambda: _OpsCore("fastcon_simt", "_C_simt"))  # tests only


def seeded_noise(seed: int, shape, *, device: str | torch.device = "cpu", backend: str = "auto") -> torch.Tensor:
    """The noise that ``q_sample`` and ``loss`` draw for a batch of this shape from ``seed``,
    materialised as float32 (for inspection and tests; training never needs it)."""
    seed = _check_seed(seed)
    if seed is None:
        raise TypeError("seed must be an int, got None")
    shape = tuple(_checks.integer("shape", s, low=0) for s in shape)
    device = torch.device(device)
    _, core = _backends.select("diffusion", backend, device)
    index = torch.arange(math.prod(shape), device=device)
    return core.normal(index, _op_seed(seed)).view(shape)


# --------------------------------------------------------------------------------------------
# public API


class NoiseSchedule:
    """A DDPM noise schedule: betas and the alpha_bar tables, and the fused ops that use them.

    Args:
        kind: "linear" (betas evenly spaced from beta_start to beta_end), "scaled_linear"
            (evenly spaced in sqrt space, then squared; Stable Diffusion's) or "cosine"
            (Nichol and Dhariwal 2021: alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s) /
            (1 + s) * pi/2)^2, s = 0.008, betas clipped at 0.999; takes no beta_start/beta_end).
        timesteps: T >= 1; timesteps are the integers 0 .. T-1.
        beta_start, beta_end: first and last beta, 0 < beta_start <= beta_end < 1
            (default 1e-4 and 0.02, DDPM's).

    Tables (float64, on the CPU; copied once per device on first use): ``betas``,
    ``alphas_cumprod`` (alpha_bar_t = prod_{s<=t} (1 - beta_s)), ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``.
    """

    def __init__(
        self,
        kind: str = "linear",
        timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
    ):
        _checks.choice("kind", kind, KINDS)
        self.timesteps = _checks.integer("timesteps", timesteps, low=1)
        if kind == "cosine":
            if beta_start is not None or beta_end is not None:
                raise ValueError("the cosine schedule is fixed by its formula; pass no beta_start / beta_end")
        else:
            beta_start = DEFAULT_BETAS[0] if beta_start is None else beta_start
            beta_end = DEFAULT_BETAS[1] if beta_end is None else beta_end
            beta_start = _checks.real("beta_start", beta_start, low=0.0, high=1.0, low_open=True, high_open=True)
            beta_end = _checks.real("beta_end", beta_end, low=0.0, high=1.0, low_open=True, high_open=True)
            if beta_start > beta_end:
                raise ValueError(f"beta_start must be <= beta_end, got {beta_start} > {beta_end}")
        self.kind, self.beta_start, self.beta_end = kind, beta_start, beta_end

        self.betas = reference.schedule_betas(kind, self.timesteps, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self._device_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        betas = "" if self.kind == "cosine" else f", beta_start={self.beta_start}, beta_end={self.beta_end}"
        return f"NoiseSchedule(kind={self.kind!r}, timesteps={self.timesteps}{betas})"

    def coefficients(self, t: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar[t]), sqrt(1 - alpha_bar[t])) as (B,) tensors of ``dtype`` on t's device."""
        tables = self._device_tables.get(t.device)
        if tables is None:
            tables = (self.sqrt_alphas_cumprod.to(t.device), self.sqrt_one_minus_alphas_cumprod.to(t.device))
            self._device_tables[t.device] = tables
        return tables[0][t].to(dtype), tables[1][t].to(dtype)

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """(batch,) int64 timesteps drawn uniformly from [0, T), on ``device`` (default: the
        generator's device, else the CPU)."""
        batch = _checks.integer("batch", batch, low=1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(0, self.timesteps, (batch,), generator=generator, device=device, dtype=torch.int64)

    def q_sample(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        *,
        seed: int | None = None,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Noise a clean batch to timesteps t: ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``.

        Args:
            x0: (B, ...) clean batch (fp32, fp16, bf16; fp64 for checks).
            t: (B,) int64 timesteps in [0, T).
            noise: eps of x0's shape and dtype, or None.
            seed: int in [0, 2^64): eps is drawn inside the kernel from the Philox stream of
                this seed (element = flat row-major index in x0's shape) and never stored.
                Use a fresh seed per step (and per rank). Not together with noise.
            backend: "auto", "reference", "cpu", "triton" or "cuda".

        Returns: (x_t, noise): with ``seed``, noise is None (``loss(..., seed=seed)`` regenerates
        it); with ``noise``, that tensor; with neither, eps is drawn by ``torch.randn_like(x0)``
        (torch's global generator) and returned, so that it can be passed to ``loss``.
        Gradients flow to x0 and noise.
        """
        _check_batch(x0, t, self.timesteps)
        seed = _check_noise_source(noise, seed, x0)
        name, core = _backends.select("diffusion", backend, x0.device)
        if noise is None and seed is None:
            noise = torch.randn_like(x0)
        coef_x0, coef_noise = self.coefficients(t, _acc(x0))
        if name == "reference":
            return reference.diffusion_q_sample(x0, coef_x0, coef_noise, noise, seed), noise
        x0c = x0.contiguous()
        nc = None if noise is None else noise.contiguous()
        return _FusedQSample.apply(x0c, nc, coef_x0, coef_noise, _op_seed(seed), core), noise

    def loss(
        self,
        pred: torch.Tensor,
        x0: torch.Tensor,
        t: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        target: str = "epsilon",
        reduction: str = "mean",
        backend: str = "auto",
    ) -> torch.Tensor:
        """Mean squared error between ``pred`` and the regression target, fused.

        Args:
            pred: (B, ...) the network's prediction, x0's shape and dtype.
            x0, t: the clean batch and timesteps given to ``q_sample``.
            noise / seed: the eps of ``q_sample`` (the same seed regenerates the same bits).
                One of them is needed unless target == "x0"; not both.
            target: "epsilon" (eps), "x0" (the clean batch) or "v" (sqrt(alpha_bar) eps -
                sqrt(1 - alpha_bar) x0, Salimans and Ho 2022).
            reduction: "mean" (over all elements), "sum", or "none": per-sample means (B,).
            backend: "auto", "reference", "cpu", "triton" or "cuda".

        Returns: the loss in fp32 (fp64 for fp64 inputs). Gradients flow to pred (and to x0 /
        noise through the target when they require grad).
        """
        _check_batch(x0, t, self.timesteps)
        _check_like("pred", pred, x0)
        _checks.choice("target", target, TARGETS)
        _checks.choice("reduction", reduction, REDUCTIONS)
        seed = _check_noise_source(noise, seed, x0)
        if noise is None and seed is None and target != "x0":
            raise ValueError(f"target={target!r} needs the noise of q_sample: pass noise=... or seed=...")
        name, core = _backends.select("diffusion", backend, x0.device)
        tgt = TARGETS.index(target)
        coef_x0, coef_noise = self.coefficients(t, _acc(x0))
        if name == "reference":
            sse = reference.diffusion_loss(pred, x0, coef_x0, coef_noise, noise, seed, tgt)
            if reduction == "mean":
                return sse.sum() / x0.numel()
            return sse.sum() if reduction == "sum" else sse / x0[0].numel()
        nc = None if noise is None else noise.contiguous()
        return _FusedLoss.apply(
            pred.contiguous(), x0.contiguous(), nc, coef_x0, coef_noise, _op_seed(seed), tgt, reduction, core
        )
