"""fastcon.soft_contrastive_loss: every fused backend against a float64 evaluation of the reference.

Layers, from the inside out:
- the kernel contract: each backend's raw sc_forward / sc_backward against reference.sc_core_*;
- the autograd Function's low-rank target algebra, with a dense core, in float64, every option;
- the public loss on each backend: options, odd shapes, dtypes, small temperatures, gradcheck;
- argument checking: one test per kind of bad input.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fastcon
from fastcon import _backends, reference
from fastcon.reference import MODE_SIGMOID, MODE_SOFTMAX, MODE_SOFTMAX_IGNORE
from fastcon.soft_contrastive import _fused_loss

# The fused backends that run on this machine. On a CUDA machine the GPU backends run on CUDA
# tensors too (see `device_for`); without one, triton runs under the interpreter and the CUDA
# kernels through their SIMT emulation build.
FUSED = ["cpu", "triton", "cuda_simt"]
LOW_PRECISION = {  # storage dtypes each backend is tested with besides float32
    "cpu": [torch.float16, torch.bfloat16],
    "triton": [torch.float16, torch.bfloat16],  # under the interpreter the kernels upcast bf16 tiles
    "cuda_simt": [torch.float16, torch.bfloat16],
}
F64 = {"cpu", "cuda_simt"}  # backends with a float64 kernel (gradcheck)


def device_for(backend: str) -> str:
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------
# inputs and comparison

LABEL_KINDS = ["multi_hot", "fractions", "zero_rows", "scene", "none"]


def make_labels(kind: str, n: int, c: int, gen: torch.Generator):
    if kind == "multi_hot":
        lab = (torch.rand(n, c, generator=gen) < 0.35).float()
        lab[torch.arange(n), torch.randint(0, c, (n,), generator=gen)] = 1.0  # no empty rows
        return lab
    if kind == "fractions":
        lab = torch.rand(n, c, generator=gen) ** 3
        return lab / lab.sum(dim=1, keepdim=True)
    if kind == "zero_rows":
        lab = (torch.rand(n, c, generator=gen) < 0.35).float()
        lab[:: max(1, n // 3)] = 0.0  # some samples have no class at all
        return lab
    if kind == "scene":
        return torch.randint(0, max(1, n // 3), (n,), generator=gen)
    return None


def make_inputs(n: int, d: int, *, seed: int = 0, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    # correlated views, so that positives are distinguishable and the loss is not flat
    z2 = z1 + 0.7 * scale * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return z1, z2, gen


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def assert_rel(actual, expected, tol, what, atol=0.0):
    """Relative error <= tol, or (when atol > 0) absolute error <= atol."""
    err = rel_err(actual, expected)
    diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()
    assert err <= tol or diff <= atol, f"{what}: relative error {err:.3e} > {tol:.1e} (absolute {diff:.3e})"


def fp32_resolution(logit_scale: float) -> dict:
    """Absolute errors an fp32 evaluation cannot avoid, for quantities that are zero (or tiny) by
    construction: a few fp32 ulps of the terms they cancel from, the logits (about 1 / tau) for
    the loss and its z / bias gradients, and logits^2 for d loss / d tau (= -1/tau sum G s)."""
    ulp = 4 * torch.finfo(torch.float32).eps
    return {"loss": ulp * logit_scale, "grad": ulp * logit_scale, "tau": ulp * logit_scale**2}


def loss_and_grads(fn, z1, z2, labels, kw, *, dtype, device, learn_tau=False, learn_bias=False, upstream=None):
    """Run fn (a loss function) on copies of z1, z2 cast to dtype; returns loss and gradients."""
    a = z1.detach().to(device=device, dtype=dtype).requires_grad_(True)
    b = z2.detach().to(device=device, dtype=dtype).requires_grad_(True)
    kw = dict(kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = [a, b]
    if learn_tau:
        kw["temperature"] = torch.tensor(
            float(kw.get("temperature", 0.1)), dtype=acc, device=device, requires_grad=True
        )
        inputs.append(kw["temperature"])
    if learn_bias:
        kw["bias"] = torch.tensor(float(kw.get("bias", 0.0)), dtype=acc, device=device, requires_grad=True)
        inputs.append(kw["bias"])
    lab = None if labels is None else labels.to(device)
    out = fn(a, b, lab, **kw)
    go = torch.ones_like(out) if upstream is None else upstream.to(out)
    grads = torch.autograd.grad(out, inputs, go)
    return out.detach(), [g.detach() for g in grads]


def ref64(z1, z2, labels, kw, **opts):
    return loss_and_grads(
        reference.soft_contrastive_loss, z1, z2, labels, kw, dtype=torch.float64, device="cpu", **opts
    )


def fused(backend):
    def fn(a, b, lab, **kw):
        return fastcon.soft_contrastive_loss(a, b, lab, backend=backend, **kw)

    return fn


def check_backend(
    backend, z1, z2, labels, kw, *, loss_tol=1e-5, grad_tol=1e-4, upstream=None, degenerate=False, **opts
):
    """``degenerate``: the loss and gradients are zero or below fp32 resolution by construction
    (see fp32_resolution); they are then compared in absolute terms."""
    dev = device_for(backend)
    out, grads = loss_and_grads(
        fused(backend), z1, z2, labels, kw, dtype=torch.float32, device=dev, upstream=upstream, **opts
    )
    r_out, r_grads = ref64(z1, z2, labels, kw, upstream=upstream, **opts)
    assert out.dtype == torch.float32
    atol = fp32_resolution(1.0 / float(kw.get("temperature", 0.1))) if degenerate else None
    assert_rel(out, r_out, loss_tol, "loss", atol=atol["loss"] if atol else 0.0)
    names = ["dz1", "dz2", "dtau/dbias", "dbias"]
    for i, (name, g, rg) in enumerate(zip(names, grads, r_grads)):
        is_tau = i == 2 and opts.get("learn_tau")
        assert_rel(g, rg, grad_tol, name, atol=(atol["tau" if is_tau else "grad"] if atol else 0.0))


# --------------------------------------------------------------------------------------------
# 1. the kernel contract


def _core(backend):
    return _backends.select("soft_contrastive", backend, torch.device(device_for(backend)))[1]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", [MODE_SOFTMAX, MODE_SOFTMAX_IGNORE, MODE_SIGMOID])
@pytest.mark.parametrize(("n", "m", "offset"), [(37, 37, 0), (1, 1, 0), (20, 45, 10), (33, 16, -20), (9, 70, 100)])
@pytest.mark.parametrize("tau", [0.1, 0.01])
def test_kernel_contract(backend, mode, n, m, offset, tau):
    """Raw kernel outputs (log-sum-exps, weighted sums) against the dense contract, incl. row offsets."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(n * 1000 + m)
    d = 23
    u = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    v = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
    row_ids = torch.randint(0, 4, (n,), generator=gen)
    col_ids = torch.randint(0, 4, (m,), generator=gen)
    # the positive pair shares its id, as two views of one sample do
    for i in range(n):
        if 0 <= i + offset < m:
            col_ids[i + offset] = row_ids[i]
    ids = (row_ids.to(dev), col_ids.to(dev)) if mode == MODE_SOFTMAX_IGNORE else (None, None)
    if mode == MODE_SOFTMAX_IGNORE and not all(0 <= i + offset < m for i in range(n)):
        # every row needs at least one pair left: give such rows a column of another scene
        row_ids = torch.arange(n) + 100
        ids = (row_ids.to(dev), col_ids.to(dev))
    scale, bias = 1.0 / tau, -1.5
    need_col = mode != MODE_SIGMOID
    core = _core(backend)
    args = (ids[0], ids[1], offset, scale, bias, scale, mode)
    row, col = core.forward(u.to(dev), v.to(dev), *args, need_col)
    r_row, r_col = reference.sc_core_forward(u.double(), v.double(), *args, need_col)
    assert_rel(row, r_row, 1e-5, "row stat")
    if need_col:
        assert_rel(col, r_col, 1e-5, "col stat")
    g = torch.rand(n, generator=gen, dtype=torch.float64)
    h = torch.rand(m, generator=gen, dtype=torch.float64) if need_col else None
    out = core.backward(
        u.to(dev), v.to(dev), *args, r_row.float().to(dev), None if h is None else r_col.float().to(dev),
        g.float().to(dev), None if h is None else h.float().to(dev),
    )  # fmt: skip
    ref = reference.sc_core_backward(u.double(), v.double(), *args, r_row, r_col, g, h)
    for name, a, e in zip(["W v", "W^T u", "W 1"], out, ref):
        assert_rel(a, e, 2e-5, name)


@pytest.mark.parametrize("backend", FUSED)
def test_kernel_contract_without_column_weights(backend):
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(50, 17, generator=gen), dim=1).to(dev)
    v = torch.nn.functional.normalize(torch.randn(50, 17, generator=gen), dim=1).to(dev)
    core = _core(backend)
    row, col = core.forward(u, v, None, None, 0, 5.0, 0.0, 5.0, MODE_SOFTMAX, False)
    assert col.numel() == 0
    g = torch.rand(50, generator=gen).to(dev)
    out = core.backward(u, v, None, None, 0, 5.0, 0.0, 5.0, MODE_SOFTMAX, row, None, g, None)
    r_row, _ = reference.sc_core_forward(u.double().cpu(), v.double().cpu(), None, None, 0, 5.0, 0.0, 5.0, 0, False)
    ref = reference.sc_core_backward(
        u.double().cpu(), v.double().cpu(), None, None, 0, 5.0, 0.0, 5.0, 0, r_row, None, g.double().cpu(), None
    )
    for a, e in zip(out, ref):
        assert_rel(a, e, 2e-5, "backward without column weights")


# --------------------------------------------------------------------------------------------
# 2. the Function's target algebra, kernel-free


def _option_grid():
    for labels, lossconf, hw, norm, learn, red in itertools.product(
        LABEL_KINDS + ["scene_ignore"],
        ["softmax_sym", "softmax", "sigmoid"],
        [0.0, 0.3, 1.0],
        [True, False],
        [False, True],
        ["mean", "sum", "none"],
    ):
        if labels == "scene_ignore" and lossconf == "sigmoid":
            continue
        yield labels, lossconf, hw, norm, learn, red


def _kw(lossconf, labels_kind, hw, norm, red, tau=0.2):
    kw = dict(temperature=tau, hard_weight=hw, normalize=norm, reduction=red)
    kw["loss"] = "sigmoid" if lossconf == "sigmoid" else "softmax"
    kw["symmetric"] = lossconf == "softmax_sym"
    if labels_kind == "scene_ignore":
        kw["scene_mode"] = "ignore"
    if lossconf == "sigmoid":
        kw["bias"] = -0.7
    return kw


def test_function_algebra_all_options_float64():
    """Low-rank targets + kernel contract == dense spec, exactly (float64), for every option."""
    checked = 0
    for labels_kind, lossconf, hw, norm, learn, red in _option_grid():
        z1, z2, gen = make_inputs(11, 6, seed=checked)
        labels = make_labels("scene" if labels_kind == "scene_ignore" else labels_kind, 11, 5, gen)
        kw = _kw(lossconf, labels_kind, hw, norm, red)
        r_out, r_grads = ref64(z1, z2, labels, kw, learn_tau=learn, learn_bias=learn and lossconf == "sigmoid")

        def via_dense_core(a, b, lab, **k):
            tau, bias = k["temperature"], k.get("bias")
            acc = torch.float64
            tau = tau if isinstance(tau, torch.Tensor) else torch.tensor(tau, dtype=acc)
            bias = None if bias is None else (bias if isinstance(bias, torch.Tensor) else torch.tensor(bias, dtype=acc))
            cfg = (
                k["loss"],
                k["symmetric"],
                k["hard_weight"],
                k["normalize"],
                k["reduction"],
                k.get("scene_mode") == "ignore",
            )
            return _fused_loss(a, b, tau, bias, lab, cfg, "reference")  # the dense kernel contract as the core

        out, grads = loss_and_grads(
            via_dense_core, z1, z2, labels, kw, dtype=torch.float64, device="cpu",
            learn_tau=learn, learn_bias=learn and lossconf == "sigmoid",
        )  # fmt: skip
        what = f"{labels_kind}/{lossconf}/hw={hw}/normalize={norm}/learn={learn}/{red}"
        assert_rel(out, r_out, 1e-11, what + " loss")
        for g, rg in zip(grads, r_grads):
            assert_rel(g, rg, 1e-7, what + " grad")
        checked += 1
    assert checked == 6 * 3 * 3 * 2 * 2 * 3 - 3 * 2 * 2 * 3


# --------------------------------------------------------------------------------------------
# 3. the public loss on each fused backend


def _covering_cases():
    """Every labels kind x loss form x hard weight, with the remaining options cycled through."""
    cases = []
    i = 0
    for labels_kind in LABEL_KINDS + ["scene_ignore"]:
        for lossconf in ["softmax_sym", "softmax", "sigmoid"]:
            if labels_kind == "scene_ignore" and lossconf == "sigmoid":
                continue
            for hw in [0.0, 0.3, 1.0]:
                norm = i % 2 == 0
                learn = (i // 2) % 2 == 1
                red = ["mean", "sum", "none"][i % 3]
                cases.append((labels_kind, lossconf, hw, norm, learn, red))
                i += 1
    # and every normalize x learnable x reduction combination on two forms
    for lossconf, norm, learn, red in itertools.product(
        ["softmax_sym", "sigmoid"], [True, False], [False, True], ["mean", "sum", "none"]
    ):
        cases.append(("multi_hot", lossconf, 0.3, norm, learn, red))
    return cases


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(("labels_kind", "lossconf", "hw", "norm", "learn", "red"), _covering_cases())
def test_options(backend, labels_kind, lossconf, hw, norm, learn, red):
    n, d, c = 37, 19, 5
    z1, z2, gen = make_inputs(n, d, seed=n + d, scale=1.0 if norm else 0.3)
    labels = make_labels("scene" if labels_kind == "scene_ignore" else labels_kind, n, c, gen)
    kw = _kw(lossconf, labels_kind, hw, norm, red)
    upstream = torch.rand(n, generator=gen, dtype=torch.float64) if red == "none" else None
    check_backend(
        backend, z1, z2, labels, kw, learn_tau=learn, learn_bias=learn and lossconf == "sigmoid", upstream=upstream
    )


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("n", [1, 2, 3, 127, 1000])
@pytest.mark.parametrize(
    ("labels_kind", "lossconf"),
    [("multi_hot", "softmax_sym"), ("scene_ignore", "softmax_sym"), ("fractions", "sigmoid")],
)
def test_shapes(backend, n, labels_kind, lossconf):
    d, c = 67, 9  # not multiples of any block size
    z1, z2, gen = make_inputs(n, d, seed=n)
    labels = make_labels("scene" if labels_kind == "scene_ignore" else labels_kind, n, c, gen)
    kw = _kw(lossconf, labels_kind, 0.3, True, "mean", tau=0.07)
    # n = 1, or a single scene under scene_mode="ignore": every sample is its own only candidate,
    # so the softmax loss and its gradients are 0 by construction and the sigmoid loss is
    # softplus(-x_ii) ~ 1e-5, far below the fp32 resolution of the ~1/tau terms it is made of
    # (the dense fp32 reference is off by 1e-2 there): relative errors would measure noise.
    one_candidate = n == 1 or (labels_kind == "scene_ignore" and labels.unique().numel() == 1)
    check_backend(backend, z1, z2, labels, kw, learn_tau=True, degenerate=one_candidate)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("d", [1, 3, 130])
def test_feature_dims(backend, d):
    z1, z2, gen = make_inputs(50, d, seed=d)
    labels = make_labels("multi_hot", 50, 3, gen)
    # normalised D = 1 embeddings are +-1: d loss / d z is 0 by construction (float64 noise)
    kw = _kw("softmax_sym", "multi_hot", 0.0, True, "mean")
    check_backend(backend, z1, z2, labels, kw, learn_tau=True, degenerate=d == 1)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(
    ("tau", "norm", "scale"), [(0.01, True, 1.0), (0.02, True, 1.0), (1.0, False, 3.0), (0.1, False, 2.0)]
)
@pytest.mark.parametrize("lossconf", ["softmax_sym", "sigmoid"])
def test_large_logits(backend, tau, norm, scale, lossconf):
    """tau = 0.01 and unnormalised inputs: logits in the hundreds, where a fixed max would underflow."""
    n, d = 150, 32
    z1, z2, gen = make_inputs(n, d, seed=7, scale=scale)
    labels = make_labels("multi_hot", n, 6, gen)
    kw = _kw(lossconf, "multi_hot", 0.3, norm, "mean", tau=tau)
    check_backend(backend, z1, z2, labels, kw, learn_tau=True, learn_bias=lossconf == "sigmoid")


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [(b, dt) for b in FUSED for dt in LOW_PRECISION.get(b, [])],
    ids=lambda x: str(x).replace("torch.", ""),
)
@pytest.mark.parametrize(
    ("labels_kind", "lossconf"), [("multi_hot", "softmax_sym"), ("scene_ignore", "softmax"), ("fractions", "sigmoid")]
)
def test_low_precision(backend, dtype, labels_kind, lossconf):
    """fp16 / bf16: no worse than 2x the error of the dense reference run in the same dtype."""
    n, d, c = 200, 48, 7
    z1, z2, gen = make_inputs(n, d, seed=11)
    labels = make_labels("scene" if labels_kind == "scene_ignore" else labels_kind, n, c, gen)
    kw = _kw(lossconf, labels_kind, 0.3, True, "mean", tau=0.1)
    dev = device_for(backend)
    r_out, r_grads = ref64(z1, z2, labels, kw)
    lp_out, lp_grads = loss_and_grads(reference.soft_contrastive_loss, z1, z2, labels, kw, dtype=dtype, device="cpu")
    out, grads = loss_and_grads(fused(backend), z1, z2, labels, kw, dtype=dtype, device=dev)
    assert out.dtype == torch.float32, "the loss is returned in fp32"
    assert all(g.dtype == dtype for g in grads), "gradients come back in the inputs' dtype"
    floor = 1e-4  # below this both are at the dtype's rounding level
    assert rel_err(out, r_out) <= max(2 * rel_err(lp_out, r_out), floor)
    for g, lg, rg in zip(grads, lp_grads, r_grads):
        assert rel_err(g, rg) <= max(2 * rel_err(lg, rg), 4e-3 if dtype == torch.bfloat16 else 5e-4)


@pytest.mark.parametrize("backend", sorted(set(FUSED) & F64))
@pytest.mark.parametrize(
    ("labels_kind", "lossconf"),
    [
        ("multi_hot", "softmax_sym"),
        ("zero_rows", "softmax"),
        ("scene_ignore", "softmax_sym"),
        ("scene", "sigmoid"),
        ("none", "softmax_sym"),
    ],
)
def test_gradcheck(backend, labels_kind, lossconf):
    n, d = 6, 4
    z1, z2, gen = make_inputs(n, d, seed=5)
    labels = make_labels("scene" if labels_kind == "scene_ignore" else labels_kind, n, 3, gen)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True) if lossconf == "sigmoid" else None
    kw = _kw(lossconf, labels_kind, 0.3, True, "none")
    kw.pop("temperature")
    kw.pop("bias", None)

    def f(a, b, t, *rest):
        return fastcon.soft_contrastive_loss(
            a, b, labels, temperature=t, bias=rest[0] if rest else None, backend=backend, **kw
        )

    inputs = (z1.clone().requires_grad_(), z2.clone().requires_grad_(), tau) + ((bias,) if bias is not None else ())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_reference():
    z1, z2, gen = make_inputs(5, 3, seed=2)
    labels = make_labels("fractions", 5, 4, gen)
    tau = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)

    def f(a, b, t):
        return reference.soft_contrastive_loss(a, b, labels, temperature=t, hard_weight=0.3)

    assert torch.autograd.gradcheck(f, (z1.requires_grad_(), z2.requires_grad_(), tau))


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_clip_equivalence(backend):
    """labels=None, softmax, symmetric: the CLIP loss."""
    z1, z2, _ = make_inputs(64, 32, seed=1)
    dev = device_for(backend)
    a, b = z1.float().to(dev), z2.float().to(dev)
    out = fastcon.soft_contrastive_loss(a, b, None, temperature=0.07, backend=backend)
    clip = reference.clip_loss(z1, z2, temperature=0.07)
    assert_rel(out, clip, 1e-5, "CLIP loss")


@pytest.mark.parametrize("backend", FUSED)
def test_sum_is_n_times_mean(backend):
    z1, z2, gen = make_inputs(21, 8, seed=4)
    labels = make_labels("multi_hot", 21, 4, gen)
    dev = device_for(backend)
    a, b, lab = z1.float().to(dev), z2.float().to(dev), labels.to(dev)
    mean = fastcon.soft_contrastive_loss(a, b, lab, backend=backend)
    total = fastcon.soft_contrastive_loss(a, b, lab, reduction="sum", backend=backend)
    per = fastcon.soft_contrastive_loss(a, b, lab, reduction="none", backend=backend)
    assert per.shape == (21,)
    assert_rel(total, 21 * mean, 1e-6, "sum vs mean")
    assert_rel(per.mean(), mean, 1e-6, "none vs mean")


def test_module_learnable_temperature_and_bias():
    z1, z2, gen = make_inputs(30, 10, seed=9)
    labels = make_labels("multi_hot", 30, 4, gen)
    mod = fastcon.SoftContrastiveLoss(0.2, learnable_temperature=True, loss="sigmoid", learnable_bias=True)
    out = mod(z1.float(), z2.float(), labels)
    out.backward()
    assert mod.log_scale.grad is not None
    assert torch.isfinite(mod.log_scale.grad)
    assert mod.bias.grad is not None
    assert torch.isfinite(mod.bias.grad)
    expected = reference.soft_contrastive_loss(z1, z2, labels, temperature=0.2, loss="sigmoid", bias=-10.0)
    assert_rel(out, expected, 1e-5, "module loss")
    assert "temperature=0.2" in repr(mod)


# --------------------------------------------------------------------------------------------
# 4. bad input: a clear error naming the argument, before any kernel runs


def _z(n=4, d=3, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype)


BAD_INPUTS = [
    ("shape_mismatch", lambda: (_z(4, 3), _z(4, 5), None, {}), ValueError, "z2 must have the shape of z1"),
    ("batch_mismatch", lambda: (_z(4, 3), _z(5, 3), None, {}), ValueError, "z2 must have the shape of z1"),
    ("dtype_mismatch", lambda: (_z(), _z(dtype=torch.float64), None, {}), TypeError, "z2 must have z1's dtype"),
    ("device_mismatch", lambda: (_z(), _z().to("meta"), None, {}), ValueError, "z2 must be on z1's device"),
    ("not_2d", lambda: (torch.randn(4), torch.randn(4), None, {}), ValueError, "z1 must be 2-D"),
    ("n_zero", lambda: (_z(0, 3), _z(0, 3), None, {}), ValueError, r"z1 must hold at least one sample"),
    ("d_zero", lambda: (_z(4, 0), _z(4, 0), None, {}), ValueError, r"z1 must have at least one feature"),
    (
        "integer_embeddings",
        lambda: (torch.ones(4, 3, dtype=torch.int64),) * 2 + (None, {}),
        TypeError,
        "z1 must be a floating-point tensor",
    ),
    ("not_a_tensor", lambda: ([[1.0]], _z(), None, {}), TypeError, "z1 must be a torch.Tensor"),
    ("negative_labels", lambda: (_z(), _z(), -torch.ones(4, 2), {}), ValueError, "labels must be >= 0"),
    ("nan_labels", lambda: (_z(), _z(), torch.full((4, 2), float("nan")), {}), ValueError, "labels must be finite"),
    ("inf_labels", lambda: (_z(), _z(), torch.full((4, 2), float("inf")), {}), ValueError, "labels must be finite"),
    (
        "labels_wrong_length",
        lambda: (_z(), _z(), torch.ones(5, 2), {}),
        ValueError,
        "labels must have one row per sample",
    ),
    (
        "scene_ids_wrong_length",
        lambda: (_z(), _z(), torch.arange(3), {}),
        ValueError,
        "labels must have one row per sample",
    ),
    (
        "float_1d_labels",
        lambda: (_z(), _z(), torch.ones(4), {}),
        TypeError,
        "1-D labels are scene ids and must be an integer tensor",
    ),
    ("labels_3d", lambda: (_z(), _z(), torch.ones(4, 2, 2), {}), ValueError, "labels must be 1-D or 2-D"),
    (
        "labels_no_classes",
        lambda: (_z(), _z(), torch.ones(4, 0), {}),
        ValueError,
        "labels must have at least one class",
    ),
    ("temperature_zero", lambda: (_z(), _z(), None, {"temperature": 0.0}), ValueError, "temperature must be > 0"),
    ("temperature_negative", lambda: (_z(), _z(), None, {"temperature": -0.1}), ValueError, "temperature must be > 0"),
    (
        "temperature_nan",
        lambda: (_z(), _z(), None, {"temperature": float("nan")}),
        ValueError,
        "temperature must be finite",
    ),
    (
        "temperature_inf",
        lambda: (_z(), _z(), None, {"temperature": torch.tensor(float("inf"))}),
        ValueError,
        "temperature must be finite",
    ),
    (
        "temperature_vector",
        lambda: (_z(), _z(), None, {"temperature": torch.ones(2)}),
        ValueError,
        "temperature must be a number or a 0-dim tensor",
    ),
    ("unknown_loss", lambda: (_z(), _z(), None, {"loss": "triplet"}), ValueError, "loss must be one of"),
    ("unknown_reduction", lambda: (_z(), _z(), None, {"reduction": "max"}), ValueError, "reduction must be one of"),
    (
        "unknown_scene_mode",
        lambda: (_z(), _z(), torch.arange(4), {"scene_mode": "drop"}),
        ValueError,
        "scene_mode must be one of",
    ),
    (
        "ignore_without_scene_ids",
        lambda: (_z(), _z(), torch.ones(4, 2), {"scene_mode": "ignore"}),
        ValueError,
        "scene_mode='ignore' needs scene ids",
    ),
    (
        "ignore_without_labels",
        lambda: (_z(), _z(), None, {"scene_mode": "ignore"}),
        ValueError,
        "scene_mode='ignore' needs scene ids",
    ),
    (
        "ignore_with_sigmoid",
        lambda: (_z(), _z(), torch.arange(4), {"scene_mode": "ignore", "loss": "sigmoid"}),
        ValueError,
        "defined for loss='softmax' only",
    ),
    (
        "hard_weight_out_of_range",
        lambda: (_z(), _z(), None, {"hard_weight": 1.5}),
        ValueError,
        "hard_weight must be <= 1",
    ),
    ("bias_with_softmax", lambda: (_z(), _z(), None, {"bias": 0.5}), ValueError, "bias is only used by loss='sigmoid'"),
    (
        "bias_nan",
        lambda: (_z(), _z(), None, {"loss": "sigmoid", "bias": float("nan")}),
        ValueError,
        "bias must be finite",
    ),
    ("symmetric_not_bool", lambda: (_z(), _z(), None, {"symmetric": 1}), TypeError, "symmetric must be a bool"),
]


@pytest.mark.parametrize(("case", "make", "exc", "match"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_input(case, make, exc, match, backend):
    z1, z2, labels, kw = make()
    with pytest.raises(exc, match=match):
        fastcon.soft_contrastive_loss(z1, z2, labels, backend=backend, **kw)
