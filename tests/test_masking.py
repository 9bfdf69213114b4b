"""fastcon.siamese_mask / unmask / mask_image: every fused backend against the float64 reference.

Layers, from the inside out:
- the kernel contract: each backend's raw ops against reference.mask_* (what a new backend,
  e.g. cuda, must match);
- the public ops on each backend: values and gradients across dtypes, odd shapes, pos_embed
  of batch 1 and B, fill numbers and tokens, shared ids across branches, strided inputs;
- the random subsets: reproducible from a generator, uniform (chi-square with a fixed seed);
- determinism and every SIMD path of the cpu kernels, gradcheck in float64, memory;
- argument checking: one test per kind of bad input.

Expected values are the reference evaluated in float64 on the inputs rounded to the dtype under
test, so the only error left is the kernel's own rounding: at most one rounding of an fp32
(fp64) result, i.e. <= 1 ulp of the dtype relative to the largest value (a few ulps for sums
over the batch). Pure copies must be bit-exact.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from itertools import combinations

import pytest
import torch

import fastcon
from fastcon import _backends, masking, reference
from fastcon._memory import PeakMemory, rss_peak_supported

_EXT, _EXT_ERROR = _backends.load_extension()  # the raw-op tests call torch.ops.fastcon.* directly

FUSED = ["cpu", "triton", "cuda_simt"]
# bf16 is tested on cpu only: the Triton interpreter truncates fp32 -> bf16 (a GPU rounds to
# nearest even), so its bf16 results are not the ones a GPU gives.
DTYPES = {
    "cpu": [torch.float32, torch.float16, torch.bfloat16],
    "triton": [torch.float32, torch.float16],
    "cuda_simt": [torch.float32, torch.float16, torch.bfloat16],
}
BACKEND_DTYPES = [(b, dt) for b in FUSED for dt in DTYPES[b]]
BACKEND_DTYPE_IDS = [f"{b}-{str(dt)[6:]}" for b, dt in BACKEND_DTYPES]
# (B, L, D, K): a typical case; L = 1; K = L with D past one 128-wide block; K = 1
SHAPES = [(3, 17, 40, 9), (2, 1, 5, 1), (2, 6, 130, 6), (4, 9, 33, 1)]
SHAPE_IDS = ["typical", "L1", "K_eq_L_D130", "K1"]
# larger cases for the cpu kernels' parallel splits: few positions (D split), many rows
CPU_SHAPES = [(5, 2, 300, 1), (64, 50, 300, 25)]


def device_for(backend: str) -> str:
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


def impl_of(backend: str):
    return _backends.select("siamese_mask", backend, torch.device(device_for(backend)))[1]


def ids_for(b: int, length: int, k: int, seed: int = 0) -> torch.Tensor:
    return masking.random_ids_keep(b, length, k, generator=torch.Generator().manual_seed(seed))


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to dtype, back in float64: the exact input a dtype kernel sees."""
    return x.to(dtype).double()


def assert_ulps(actual, expected, dtype, ulps, what):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = (a - e).abs().max().item() / max(e.abs().max().item(), 1e-300)
    tol = ulps * torch.finfo(dtype).eps
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({ulps} ulp of {dtype})"


def assert_exact(actual, expected, what):
    """Equal values (NaN where NaN), same dtype and shape."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0, equal_nan=True, msg=what)


# --------------------------------------------------------------------------------------------
# 1. the kernel contract


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_kernel_contract(backend, dtype, shape):
    b, length, d, k = shape
    dev = device_for(backend)
    impl = impl_of(backend)
    gen = torch.Generator().manual_seed(1)
    ids = ids_for(b, length, k).to(dev)
    tokens = torch.randn(b, length, d, generator=gen).to(dev, dtype)
    grad_visible = torch.randn(b, k, d, generator=gen).to(dev, dtype)
    for pos_batch in (1, b):
        pos = torch.randn(pos_batch, length, d, generator=gen).to(dev, dtype)
        assert_exact(impl.gather(tokens, ids, pos), reference.mask_gather(tokens, ids, pos), "mask_gather")
    assert_exact(impl.gather(tokens, ids, None), reference.mask_gather(tokens, ids, None), "mask_gather no pos")
    for need_tokens in (True, False):
        for pos_batch in sorted({0, 1, b}):
            got = impl.gather_backward(grad_visible, ids, length, need_tokens, pos_batch)
            want = reference.mask_gather_backward(grad_visible, ids, length, need_tokens, pos_batch)
            what = f"mask_gather_backward need_tokens={need_tokens} pos_batch={pos_batch}"
            assert_exact(got[0], want[0], what + " grad_tokens")
            if pos_batch == 1 and b > 1:  # a sum in fp32 (fp64), rounded once to dtype
                want64 = reference.mask_gather_backward(grad_visible.double(), ids, length, False, 1)[1]
                assert_ulps(got[1], want64, dtype, 2, what + " grad_pos")
                assert got[1].dtype == dtype
            else:
                assert_exact(got[1], want[1], what + " grad_pos")
    fill = torch.randn(d, generator=gen).to(dev, dtype)
    assert_exact(
        impl.unmask(grad_visible, ids, length, fill),
        reference.mask_unmask(grad_visible, ids, length, fill),
        "mask_unmask",
    )
    grad_out = torch.randn(b, length, d, generator=gen).to(dev, dtype)
    for need_fill in (True, False):
        got = impl.unmask_backward(grad_out, ids, need_fill)
        want = reference.mask_unmask_backward(grad_out, ids, need_fill)
        assert_exact(got[0], want[0], "mask_unmask_backward grad_visible")
        assert got[1].dtype == want[1].dtype
        assert got[1].shape == want[1].shape
        if need_fill and k < length:  # a sum in fp32 (fp64), not rounded to dtype
            want64 = reference.mask_unmask_backward(grad_out.double(), ids, True)[1]
            assert_ulps(got[1], want64, want[1].dtype, 16, "grad_fill")


# --------------------------------------------------------------------------------------------
# 2. the public ops


def run_siamese_mask(backend, tokens64, pos64, ids, grad64, dtype):
    dev = device_for(backend)
    t = tokens64.to(dev, dtype).requires_grad_(True)
    p = None if pos64 is None else pos64.to(dev, dtype).requires_grad_(True)
    visible, ids_out = fastcon.siamese_mask(t, None, pos_embed=p, ids_keep=ids.to(dev), backend=backend)
    assert ids_out is not None
    assert torch.equal(ids_out.cpu(), ids)
    visible.backward(grad64.to(dev, dtype))
    return visible.detach(), t.grad, (None if p is None else p.grad)


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES, ids=BACKEND_DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("pos_kind", ["none", "shared", "per_sample"])
def test_siamese_mask(backend, dtype, shape, pos_kind):
    b, length, d, k = shape
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(b, length, d, generator=gen, dtype=torch.float64)
    pos = {"none": None, "shared": 1, "per_sample": b}[pos_kind]
    pos = None if pos is None else torch.randn(pos, length, d, generator=gen, dtype=torch.float64)
    grad = torch.randn(b, k, d, generator=gen, dtype=torch.float64)
    ids = ids_for(b, length, k, seed=3)
    visible, g_tokens, g_pos = run_siamese_mask(backend, tokens, pos, ids, grad, dtype)
    assert visible.dtype == dtype
    assert visible.shape == (b, k, d)

    # float64 reference on the rounded inputs, differentiated by autograd
    t64 = rounded(tokens, dtype).requires_grad_(True)
    p64 = None if pos is None else rounded(pos, dtype).requires_grad_(True)
    v64 = reference.mask_gather(t64, ids, p64)
    v64.backward(rounded(grad, dtype))
    assert_ulps(visible, v64, dtype, 1, "visible")
    assert_ulps(g_tokens, t64.grad, dtype, 1, "grad tokens")
    if pos is not None:
        assert g_pos.dtype == dtype
        assert g_pos.shape == pos.shape
        assert_ulps(g_pos, p64.grad, dtype, 2, "grad pos_embed")
    # and the same-dtype reference: one rounding of the fp32 sum, so bit-exact; copies too
    ref_visible = reference.mask_gather(tokens.to(dtype), ids, None if pos is None else pos.to(dtype))
    assert_exact(visible.cpu(), ref_visible, "visible vs same-dtype reference")
    assert torch.count_nonzero(g_tokens.cpu()[~reference.keep_mask(ids, length)]) == 0


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=["few_positions", "many_rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_siamese_mask_parallel_splits_cpu(shape, dtype):
    b, length, d, k = shape
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randn(b, length, d, generator=gen, dtype=torch.float64)
    pos = torch.randn(1, length, d, generator=gen, dtype=torch.float64)
    grad = torch.randn(b, k, d, generator=gen, dtype=torch.float64)
    ids = ids_for(b, length, k, seed=5)
    visible, g_tokens, g_pos = run_siamese_mask("cpu", tokens, pos, ids, grad, dtype)
    t64, p64 = rounded(tokens, dtype).requires_grad_(True), rounded(pos, dtype).requires_grad_(True)
    reference.mask_gather(t64, ids, p64).backward(rounded(grad, dtype))
    assert_ulps(visible, reference.mask_gather(t64, ids, p64), dtype, 1, "visible")
    assert_ulps(g_tokens, t64.grad, dtype, 1, "grad tokens")
    assert_ulps(g_pos, p64.grad, dtype, 2, "grad pos_embed")


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_siamese_mask_strided_inputs(backend):
    """Views that drop a class token (x[:, 1:]) and a pos_embed slice need no copy; a
    non-unit D stride is handled too."""
    dev = device_for(backend)
    b, length, d, k = 3, 10, 24, 4
    full = torch.randn(b, length + 1, d, device=dev)
    pos_full = torch.randn(1, length + 1, d, device=dev)
    tokens, pos = full[:, 1:], pos_full[:, 1:]
    ids = ids_for(b, length, k).to(dev)
    visible, _ = fastcon.siamese_mask(tokens, k, pos_embed=pos, ids_keep=ids, backend=backend)
    assert_exact(visible, reference.mask_gather(tokens.contiguous(), ids, pos.contiguous()), "strided tokens")
    transposed = torch.randn(b, d, length, device=dev).transpose(1, 2)  # D stride != 1
    visible, _ = fastcon.siamese_mask(transposed, k, ids_keep=ids, backend=backend)
    assert_exact(visible, reference.mask_gather(transposed.contiguous(), ids), "transposed tokens")


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES, ids=BACKEND_DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("fill_kind", ["zero", "number", "token", "token_1_1_D"])
def test_unmask(backend, dtype, shape, fill_kind):
    b, length, d, k = shape
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(6)
    vis = torch.randn(b, k, d, generator=gen, dtype=torch.float64)
    token = torch.randn(d, generator=gen, dtype=torch.float64)
    grad = torch.randn(b, length, d, generator=gen, dtype=torch.float64)
    ids = ids_for(b, length, k, seed=7)

    v = vis.to(dev, dtype).requires_grad_(True)
    if fill_kind in ("zero", "number"):
        fill = 0.0 if fill_kind == "zero" else -1.25
        f = fill
    else:
        shape_f = (d,) if fill_kind == "token" else (1, 1, d)
        f = token.reshape(shape_f).to(dev, dtype).requires_grad_(True)
    out = fastcon.unmask(v, ids.to(dev), length, f, backend=backend)
    out.backward(grad.to(dev, dtype))
    assert out.dtype == dtype
    assert out.shape == (b, length, d)

    v64 = rounded(vis, dtype).requires_grad_(True)
    f64 = (
        torch.full((d,), float(f), dtype=torch.float64)
        if isinstance(f, float)
        else rounded(token, dtype).requires_grad_(True)
    )
    o64 = reference.mask_unmask(v64, ids, length, f64)
    o64.backward(rounded(grad, dtype))
    assert_exact(out.detach().cpu(), o64.to(dtype), "unmask values (a copy)")
    assert_exact(v.grad.cpu(), v64.grad.to(dtype), "grad visible (a copy)")
    if isinstance(f, torch.Tensor):
        assert f.grad.shape == f.shape
        assert f.grad.dtype == dtype
        if k < length:
            assert_ulps(f.grad.reshape(d), f64.grad, dtype, 2, "grad fill")
        else:
            assert torch.count_nonzero(f.grad) == 0


@pytest.mark.parametrize("backend", FUSED)
def test_unmask_inverts_siamese_mask(backend):
    dev = device_for(backend)
    tokens = torch.randn(4, 12, 8, device=dev)
    visible, ids = fastcon.siamese_mask(tokens, 0.25, generator=torch.Generator(dev).manual_seed(0), backend=backend)
    full = fastcon.unmask(visible, ids, 12, 12345.0, backend=backend)
    kept = reference.keep_mask(ids, 12)
    assert torch.equal(full[kept], tokens[kept])
    assert (full[~kept] == 12345.0).all()


# (B, C, H, W, patch, K)
IMAGE_SHAPES = [(2, 3, 8, 12, 4, 3), (1, 1, 5, 5, 5, 1), (3, 2, 6, 9, 3, 4), (2, 1, 4, 3, 1, 5)]


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES, ids=BACKEND_DTYPE_IDS)
@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=["typical", "one_patch", "odd", "patch1"])
def test_mask_image(backend, dtype, shape):
    b, c, h, w, patch, k = shape
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(8)
    images = torch.randn(b, c, h, w, generator=gen).to(dtype)
    grad = torch.randn(b, c, h, w, generator=gen).to(dtype)
    grid_w, length = w // patch, (h // patch) * (w // patch)
    ids = ids_for(b, length, k, seed=9)
    kept = reference.keep_mask(ids, length)
    if k < length:  # dropped pixels become exactly 0, even NaN ones
        cell = int((~kept[0]).nonzero()[0])
        images[0, :, (cell // grid_w) * patch, (cell % grid_w) * patch] = float("nan")
    x = images.to(dev).requires_grad_(True)
    out = fastcon.mask_image(x, patch, ids.to(dev), backend=backend)
    out.backward(grad.to(dev))
    assert_exact(out.detach().cpu(), reference.mask_image(images, patch, ids), "mask_image")
    assert_exact(x.grad.cpu(), reference.mask_image(grad, patch, ids), "mask_image gradient")
    # the patch grid is row-major, like ViT tokens: pixel (y, x) is in patch (y // p) * (W / p) + x // p
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pixel_kept = kept[:, (ys // patch) * grid_w + xs // patch]  # (B, H, W)
    out = out.detach().cpu()
    assert (out.permute(1, 0, 2, 3)[:, ~pixel_kept] == 0).all()
    assert torch.equal(
        out.permute(1, 0, 2, 3)[:, pixel_kept].isnan(), images.permute(1, 0, 2, 3)[:, pixel_kept].isnan()
    )


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_shared_ids_mask_two_branches_alike(backend):
    """Siamese masking: the ids of one branch mask the other branch, tokens and images alike."""
    dev = device_for(backend)
    b, c, h, w, patch = 3, 2, 8, 8, 2
    gen = torch.Generator(dev).manual_seed(10)
    view1, view2 = torch.randn(2, b, c, h, w, device=dev)

    def patchify(img):  # (B, C, H, W) -> (B, L, C * patch * patch), row-major grid
        x = img.reshape(b, c, h // patch, patch, w // patch, patch)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)

    vis1, ids = fastcon.siamese_mask(patchify(view1), 0.4, generator=gen, backend=backend)
    vis2, ids2 = fastcon.siamese_mask(patchify(view2), 0.4, ids_keep=ids, backend=backend)
    assert ids2 is ids
    assert vis1.shape == vis2.shape == (b, round(16 * 0.4), c * patch * patch)
    # the same positions are kept in both views, and mask_image keeps exactly those patches
    for view, vis in ((view1, vis1), (view2, vis2)):
        masked = patchify(fastcon.mask_image(view, patch, ids, backend=backend))
        kept = reference.keep_mask(ids, 16)
        assert torch.equal(masked[kept].reshape(vis.shape), vis)
        assert (masked[~kept] == 0).all()


# --------------------------------------------------------------------------------------------
# 3. the random subsets


def test_keep_resolves_to_k():
    tokens = torch.zeros(2, 7, 3)
    for keep, k in [(3, 3), (7, 7), (1, 1), (0.5, 4), (1.0, 7), (0.01, 1), (0.3, 2)]:
        visible, ids = fastcon.siamese_mask(tokens, keep)
        assert ids.shape == (2, k), keep
        assert visible.shape == (2, k, 3), keep
        assert ids.dtype == torch.int64
        assert (ids[:, 1:] > ids[:, :-1]).all()
        assert ids.min() >= 0
        assert ids.max() < 7
    assert fastcon.siamese_mask(torch.zeros(2, 5, 3), 0.5)[1].shape == (2, 2)  # round(2.5) == 2


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_generator_reproducible(backend):
    dev = device_for(backend)
    tokens = torch.randn(8, 50, 4, device=dev)

    def draw(seed):
        return fastcon.siamese_mask(tokens, 0.3, generator=torch.Generator(dev).manual_seed(seed), backend=backend)

    (v1, i1), (v2, i2), (_, i3) = draw(123), draw(123), draw(124)
    assert torch.equal(i1, i2)
    assert torch.equal(v1, v2)
    assert not torch.equal(i1, i3)
    assert not torch.equal(i1[0], i1[1])  # rows are drawn independently
    torch.manual_seed(5)
    a = fastcon.siamese_mask(tokens, 0.3, backend=backend)[1]
    torch.manual_seed(5)
    assert torch.equal(a, fastcon.siamese_mask(tokens, 0.3, backend=backend)[1])  # the global generator


def test_subsets_are_uniform():
    """Every K-subset of [0, L) is equally likely (chi-square over all C(6, 3) = 20 subsets),
    and so every position is kept with probability K / L."""
    from scipy.stats import chisquare

    length, k, n = 6, 3, 20000
    ids = masking.random_ids_keep(n, length, k, generator=torch.Generator().manual_seed(2024))
    index = {s: i for i, s in enumerate(combinations(range(length), k))}
    counts = torch.zeros(len(index))
    for row in ids.tolist():
        counts[index[tuple(row)]] += 1
    p_subsets = chisquare(counts.numpy()).pvalue
    assert p_subsets > 1e-3, f"subset counts are not uniform (p = {p_subsets:.2e}): {counts.tolist()}"
    per_position = torch.bincount(ids.flatten(), minlength=length).double()
    p_positions = chisquare(per_position.numpy()).pvalue
    assert p_positions > 1e-3, f"positions are not kept uniformly (p = {p_positions:.2e})"
    assert per_position.sum() == n * k
    # and over a ViT-sized grid: inclusion frequency K / L at every position, within 5 sigma
    ids = masking.random_ids_keep(4000, 196, 49, generator=torch.Generator().manual_seed(7))
    freq = torch.bincount(ids.flatten(), minlength=196).double() / 4000
    sigma = math.sqrt(0.25 * 0.75 / 4000)
    assert (freq - 0.25).abs().max() < 5 * sigma


# --------------------------------------------------------------------------------------------
# 4. determinism, SIMD paths, gradcheck, memory


def test_cpu_sums_do_not_depend_on_threads():
    b, length, d, k = 37, 21, 70, 8
    gen = torch.Generator().manual_seed(11)
    grad_visible = torch.randn(b, k, d, generator=gen)
    grad_out = torch.randn(b, length, d, generator=gen)
    ids = ids_for(b, length, k)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(
                (
                    torch.ops.fastcon.mask_gather_backward(grad_visible, ids, length, True, 1)[1],
                    torch.ops.fastcon.mask_unmask_backward(grad_out, ids, True)[1],
                )
            )
    finally:
        torch.set_num_threads(threads)
    for pos_sum, fill_sum in results[1:]:
        assert torch.equal(pos_sum, results[0][0])
        assert torch.equal(fill_sum, results[0][1])


_PATHS_SCRIPT = """
import sys, torch, fastcon
from fastcon import _backends, masking
_backends.load_extension()


def outputs():
    ops = torch.ops.fastcon
    g = torch.Generator().manual_seed(0)
    out = {}
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        # D = 37: rows start at every alignment, so the streaming stores' head peeling is exercised
        t = torch.randn(3, 11, 37, generator=g).to(dt)
        p = torch.randn(1, 11, 37, generator=g).to(dt)
        gv = torch.randn(3, 5, 37, generator=g).to(dt)
        ids = masking.random_ids_keep(3, 11, 5, generator=g)
        img = torch.randn(3, 2, 6, 9, generator=g).to(dt)
        out[str(dt)] = [
            ops.mask_gather(t, ids, p),
            ops.mask_gather(t[:, :, 1:], ids, None),
            *ops.mask_gather_backward(gv, ids, 11, True, 1),
            *ops.mask_gather_backward(gv, ids, 11, True, 3),
            ops.mask_unmask(gv, ids, 11, p[0, 0]),
            *ops.mask_unmask_backward(t, ids, True),
            ops.mask_image(img, 3, masking.random_ids_keep(3, 6, 2, generator=g)),
        ]
    return out


if __name__ == "__main__":
    torch.save(outputs(), sys.argv[1])
"""

# instruction set cap, non-temporal stores (FASTCON_CPU_ISA, FASTCON_CPU_STREAM; see csrc/cpu/masking.cpp)
_CPU_PATHS = {
    "avx512_stream": {"FASTCON_CPU_STREAM": "1"},
    "avx2": {"FASTCON_CPU_ISA": "avx2", "FASTCON_CPU_STREAM": "0"},
    "avx2_stream": {"FASTCON_CPU_ISA": "avx2", "FASTCON_CPU_STREAM": "1"},
    "scalar": {"FASTCON_CPU_ISA": "scalar", "FASTCON_CPU_STREAM": "1"},
}


def test_cpu_simd_and_streaming_paths_agree(tmp_path):
    """The AVX-512, AVX2 and scalar row loops, with ordinary or non-temporal stores, give the
    same bits: one fp32 rounding each, fp16 / bf16 rounded to nearest even like torch."""
    if os.environ.get("FASTCON_CPU_ISA") or os.environ.get("FASTCON_CPU_STREAM"):
        pytest.skip("the caller's environment already forces a cpu path")
    namespace = {"__name__": "paths"}
    exec(_PATHS_SCRIPT, namespace)
    results = {"default": namespace["outputs"]()}  # this process: best ISA, small outputs -> ordinary stores
    for name, extra in _CPU_PATHS.items():
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **extra)
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _PATHS_SCRIPT, str(path)], env=env, check=True, timeout=120)
        results[name] = torch.load(path)
    for name in _CPU_PATHS:
        for dt, tensors in results["default"].items():
            for i, (a, b) in enumerate(zip(tensors, results[name][dt])):
                assert torch.equal(a, b), f"{name} differs from the default path: {dt}, output {i}"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("pos_batch", [1, 3])
def test_gradcheck_siamese_mask(backend, pos_batch):
    gen = torch.Generator().manual_seed(12)
    tokens = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(pos_batch, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = ids_for(3, 5, 2)

    def fn(t, p):
        return fastcon.siamese_mask(t, None, pos_embed=p, ids_keep=ids, backend=backend)[0]

    assert torch.autograd.gradcheck(fn, (tokens, pos))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_unmask_and_mask_image(backend):
    gen = torch.Generator().manual_seed(13)
    visible = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    token = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = ids_for(2, 7, 3)
    assert torch.autograd.gradcheck(lambda v, f: fastcon.unmask(v, ids, 7, f, backend=backend), (visible, token))
    images = torch.randn(2, 2, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = ids_for(2, 6, 2)
    assert torch.autograd.gradcheck(lambda x: fastcon.mask_image(x, 2, ids, backend=backend), (images,))


@pytest.mark.skipif(not rss_peak_supported(), reason="needs /proc/self/clear_refs to measure peak memory")
def test_cpu_memory_is_outputs_only():
    """Forward allocates visible only; backward d tokens and d pos_embed only (plus a B * L int32
    map): nothing of size (B, K, D) or (B, L, D) beyond the outputs. Sizes are large enough (tokens
    64 MiB) that the resident-memory noise of a long test process (a few MiB) cannot decide it."""
    b, length, d, k = 64, 256, 1024, 128  # tokens 64 MiB, visible 32 MiB
    tokens = torch.randn(b, length, d, requires_grad=True)
    pos = torch.randn(1, length, d, requires_grad=True)
    ids = ids_for(b, length, k)
    grad = torch.randn(b, k, d)
    mib = 1 / (1 << 20)
    # Page in the code paths once (RSS counts first-touched code and lazily built tables).
    warm, _ = fastcon.siamese_mask(tokens[:1], None, pos_embed=pos, ids_keep=ids[:1], backend="cpu")
    warm.backward(grad[:1])
    tokens.grad = pos.grad = None
    with PeakMemory() as fwd:
        visible, _ = fastcon.siamese_mask(tokens, None, pos_embed=pos, ids_keep=ids, backend="cpu")
    slack = 8.0  # MiB; one more (B, K, D) fp32 buffer would be 32
    assert fwd.peak_mib <= visible.numel() * 4 * mib + slack, fwd.peak_mib
    with PeakMemory() as bwd:
        visible.backward(grad)
    assert bwd.peak_mib <= (tokens.numel() + pos.numel()) * 4 * mib + slack, bwd.peak_mib


def test_fake_kernels_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        tokens, ids = torch.empty(3, 10, 8), torch.empty(3, 4, dtype=torch.int64)
        assert torch.ops.fastcon.mask_gather(tokens, ids, None).shape == (3, 4, 8)
        g_tok, g_pos = torch.ops.fastcon.mask_gather_backward(torch.empty(3, 4, 8), ids, 10, True, 1)
        assert g_tok.shape == (3, 10, 8)
        assert g_pos.shape == (1, 10, 8)
        out = torch.ops.fastcon.mask_unmask(torch.empty(3, 4, 8), ids, 10, torch.empty(8))
        assert out.shape == (3, 10, 8)
        g_vis, g_fill = torch.ops.fastcon.mask_unmask_backward(torch.empty(3, 10, 8, dtype=torch.float16), ids, True)
        assert g_vis.shape == (3, 4, 8)
        assert g_fill.shape == (8,)
        assert g_fill.dtype == torch.float32
        assert torch.ops.fastcon.mask_image(torch.empty(3, 2, 4, 10), 2, ids).shape == (3, 2, 4, 10)


# --------------------------------------------------------------------------------------------
# 5. bad input: a clear error naming the argument, before any kernel runs


def _t(b=3, length=8, d=4, dtype=torch.float32):
    return torch.randn(b, length, d, dtype=dtype)


def _ids(b=3, length=8, k=4):
    return ids_for(b, length, k)


def _unsorted():
    ids = _ids()
    ids[1] = ids[1].flip(0)
    return ids


def _repeated():
    ids = _ids()
    ids[2, 1] = ids[2, 0]
    return ids


def _with(ids, index, value):
    ids = ids.clone()
    ids[index] = value
    return ids


# (case, call, exception, message)
BAD_INPUTS = [
    ("tokens_not_tensor", lambda: fastcon.siamese_mask([[1.0]], 1), TypeError, "tokens must be a torch.Tensor"),
    ("tokens_2d", lambda: fastcon.siamese_mask(torch.randn(8, 4), 2), ValueError, "tokens must be 3-D"),
    (
        "tokens_integer",
        lambda: fastcon.siamese_mask(torch.ones(3, 8, 4, dtype=torch.int64), 2),
        TypeError,
        "tokens must be a floating-point tensor",
    ),
    ("tokens_empty", lambda: fastcon.siamese_mask(_t(length=0), 1), ValueError, "tokens must not be empty"),
    ("keep_zero", lambda: fastcon.siamese_mask(_t(), 0), ValueError, r"keep must be in \[1, 8\]"),
    ("keep_above_L", lambda: fastcon.siamese_mask(_t(), 9), ValueError, r"keep must be in \[1, 8\]"),
    ("keep_ratio_zero", lambda: fastcon.siamese_mask(_t(), 0.0), ValueError, "keep must be > 0"),
    ("keep_ratio_above_one", lambda: fastcon.siamese_mask(_t(), 1.5), ValueError, "keep must be <= 1"),
    ("keep_nan", lambda: fastcon.siamese_mask(_t(), float("nan")), ValueError, "keep must be finite"),
    ("keep_bool", lambda: fastcon.siamese_mask(_t(), True), TypeError, "keep must be an int K or a float ratio"),
    ("keep_str", lambda: fastcon.siamese_mask(_t(), "half"), TypeError, "keep must be an int K or a float ratio"),
    ("keep_missing", lambda: fastcon.siamese_mask(_t()), ValueError, "keep must be given"),
    (
        "keep_disagrees_with_ids",
        lambda: fastcon.siamese_mask(_t(), 3, ids_keep=_ids()),
        ValueError,
        "keep gives K = 3 .* but ids_keep has K = 4",
    ),
    (
        "ids_not_tensor",
        lambda: fastcon.siamese_mask(_t(), None, ids_keep=[[0, 1]]),
        TypeError,
        "ids_keep must be a torch.Tensor",
    ),
    (
        "ids_int32",
        lambda: fastcon.siamese_mask(_t(), None, ids_keep=_ids().int()),
        TypeError,
        "ids_keep must be an int64 tensor",
    ),
    (
        "ids_1d",
        lambda: fastcon.siamese_mask(_t(), None, ids_keep=_ids()[0]),
        ValueError,
        r"ids_keep must be 2-D \(B, K\)",
    ),
    (
        "ids_wrong_batch",
        lambda: fastcon.siamese_mask(_t(), None, ids_keep=_ids(b=2)),
        ValueError,
        r"ids_keep must have one row per sample \(B = 3",
    ),
    (
        "ids_no_columns",
        lambda: fastcon.siamese_mask(_t(), None, ids_keep=torch.zeros(3, 0, dtype=torch.int64)),
        ValueError,
        "ids_keep must have 1 <= K <= L = 8",
    ),
    (
        "ids_more_columns_than_L",
        lambda: fastcon.siamese_mask(_t(length=3), None, ids_keep=_ids(length=8, k=4)),
        ValueError,
        "ids_keep must have 1 <= K <= L = 3",
    ),
    (
        "ids_not_sorted",
        lambda: fastcon.siamese_mask(_t(), None, ids_keep=_unsorted()),
        ValueError,
        "ids_keep rows must be sorted ascending",
    ),
    (
        "ids_not_unique",
        lambda: fastcon.siamese_mask(_t(), None, ids_keep=_repeated()),
        ValueError,
        "ids_keep rows must be unique",
    ),
    (
        "ids_negative",
        lambda: fastcon.siamese_mask(_t(), None, ids_keep=_with(_ids(), (0, 0), -1)),
        ValueError,
        r"ids_keep must hold positions in \[0, L\) with L = 8",
    ),
    (
        "ids_L_mismatch",
        lambda: fastcon.siamese_mask(_t(length=8), None, ids_keep=_ids(length=16, k=4) * 0 + torch.arange(12, 16)),
        ValueError,
        r"ids_keep must hold positions in \[0, L\) with L = 8 .*another L",
    ),
    (
        "ids_device",
        lambda: fastcon.siamese_mask(_t(), None, ids_keep=_ids().to("meta")),
        ValueError,
        "ids_keep must be on tokens's device",
    ),
    (
        "ids_and_generator",
        lambda: fastcon.siamese_mask(_t(), None, ids_keep=_ids(), generator=torch.Generator()),
        ValueError,
        "pass either ids_keep or generator",
    ),
    (
        "generator_not_generator",
        lambda: fastcon.siamese_mask(_t(), 2, generator=0),
        TypeError,
        "generator must be a torch.Generator",
    ),
    (
        "generator_device",
        lambda: fastcon.siamese_mask(_t().to("meta"), 2, generator=torch.Generator(), backend="reference"),
        ValueError,
        "generator must be on tokens' device",
    ),
    (
        "pos_wrong_batch",
        lambda: fastcon.siamese_mask(_t(), 2, pos_embed=torch.randn(2, 8, 4)),
        ValueError,
        r"pos_embed must have shape \(1, L, D\) or \(B, L, D\)",
    ),
    (
        "pos_wrong_L",
        lambda: fastcon.siamese_mask(_t(), 2, pos_embed=torch.randn(1, 9, 4)),
        ValueError,
        r"pos_embed must have shape .* = \(1 or 3, 8, 4\), got \(1, 9, 4\)",
    ),
    (
        "pos_wrong_D",
        lambda: fastcon.siamese_mask(_t(), 2, pos_embed=torch.randn(1, 8, 5)),
        ValueError,
        r"pos_embed must have shape",
    ),
    (
        "pos_2d",
        lambda: fastcon.siamese_mask(_t(), 2, pos_embed=torch.randn(8, 4)),
        ValueError,
        "pos_embed must be 3-D",
    ),
    (
        "pos_dtype",
        lambda: fastcon.siamese_mask(_t(), 2, pos_embed=torch.randn(1, 8, 4, dtype=torch.float64)),
        TypeError,
        "pos_embed must have tokens's dtype",
    ),
    (
        "pos_device",
        lambda: fastcon.siamese_mask(_t(), 2, pos_embed=torch.randn(1, 8, 4, device="meta")),
        ValueError,
        "pos_embed must be on tokens's device",
    ),
    (
        "unknown_backend",
        lambda: fastcon.siamese_mask(_t(), 2, backend="gpu9000"),
        ValueError,
        "backend must be one of",
    ),
    (
        "unmask_visible_2d",
        lambda: fastcon.unmask(torch.randn(4, 4), _ids(), 8),
        ValueError,
        "visible must be 3-D",
    ),
    (
        "unmask_L_not_int",
        lambda: fastcon.unmask(_t(length=4), _ids(), 8.0),
        TypeError,
        "L must be an int",
    ),
    ("unmask_L_zero", lambda: fastcon.unmask(_t(length=4), _ids(), 0), ValueError, "L must be >= 1"),
    (
        "unmask_L_below_K",
        lambda: fastcon.unmask(_t(length=4), _ids(), 3),
        ValueError,
        r"ids_keep must have 1 <= K <= L = 3 \(the L argument\)",
    ),
    (
        "unmask_L_mismatch",
        lambda: fastcon.unmask(_t(length=4), _ids(length=16) * 0 + torch.arange(10, 14), 8),
        ValueError,
        r"ids_keep must hold positions in \[0, L\) with L = 8 \(the L argument\)",
    ),
    (
        "unmask_ids_columns_mismatch",
        lambda: fastcon.unmask(_t(length=3), _ids(), 8),
        ValueError,
        r"ids_keep must have one column per visible token \(K = 3\)",
    ),
    (
        "unmask_ids_device",
        lambda: fastcon.unmask(_t(length=4), _ids().to("meta"), 8),
        ValueError,
        "ids_keep must be on visible's device",
    ),
    (
        "unmask_fill_shape",
        lambda: fastcon.unmask(_t(length=4), _ids(), 8, torch.zeros(5)),
        ValueError,
        r"fill must be a number or a tensor of shape \(D,\) = \(4,\)",
    ),
    (
        "unmask_fill_dtype",
        lambda: fastcon.unmask(_t(length=4), _ids(), 8, torch.zeros(4, dtype=torch.float16)),
        TypeError,
        "fill must have visible's dtype",
    ),
    (
        "unmask_fill_device",
        lambda: fastcon.unmask(_t(length=4), _ids(), 8, torch.zeros(4, device="meta")),
        ValueError,
        "fill must be on visible's device",
    ),
    ("unmask_fill_str", lambda: fastcon.unmask(_t(length=4), _ids(), 8, "mask"), TypeError, "fill must be a real"),
    (
        "unmask_fill_inf",
        lambda: fastcon.unmask(_t(length=4), _ids(), 8, float("inf")),
        ValueError,
        "fill must be finite",
    ),
    (
        "image_3d",
        lambda: fastcon.mask_image(torch.randn(3, 8, 8), 4, _ids(length=4, k=2)),
        ValueError,
        "images must be 4-D",
    ),
    (
        "image_integer",
        lambda: fastcon.mask_image(torch.ones(3, 1, 8, 8, dtype=torch.uint8), 4, _ids(length=4, k=2)),
        TypeError,
        "images must be a floating-point tensor",
    ),
    (
        "patch_zero",
        lambda: fastcon.mask_image(torch.randn(3, 1, 8, 8), 0, _ids(length=4, k=2)),
        ValueError,
        "patch must be >= 1",
    ),
    (
        "patch_not_int",
        lambda: fastcon.mask_image(torch.randn(3, 1, 8, 8), 4.0, _ids(length=4, k=2)),
        TypeError,
        "patch must be an int",
    ),
    (
        "patch_not_dividing_H",
        lambda: fastcon.mask_image(torch.randn(3, 1, 6, 8), 4, _ids(length=2, k=1)),
        ValueError,
        r"patch must divide the image height and width \(H, W\) = \(6, 8\)",
    ),
    (
        "patch_not_dividing_W",
        lambda: fastcon.mask_image(torch.randn(3, 1, 8, 10), 4, _ids(length=4, k=2)),
        ValueError,
        r"patch must divide the image height and width \(H, W\) = \(8, 10\)",
    ),
    (
        "image_L_mismatch",
        lambda: fastcon.mask_image(torch.randn(3, 1, 8, 8), 4, _ids(length=16, k=2) * 0 + torch.tensor([3, 9])),
        ValueError,
        r"ids_keep must hold positions in \[0, L\) with L = 4 \(\(H / patch\) \* \(W / patch\)\)",
    ),
    (
        "image_ids_wrong_batch",
        lambda: fastcon.mask_image(torch.randn(2, 1, 8, 8), 4, _ids(length=4, k=2)),
        ValueError,
        r"ids_keep must have one row per sample \(B = 2",
    ),
]


@pytest.mark.parametrize(("case", "call", "exc", "match"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(case, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("backend", FUSED)
def test_bad_input_is_caught_before_the_kernel(backend, monkeypatch):
    """Checks run before backend dispatch: the kernels are never reached with bad ids."""
    calls = []
    impl = impl_of(backend)
    monkeypatch.setattr(type(impl), "gather", lambda *a, **k: calls.append(a), raising=False)
    with pytest.raises(ValueError, match="ids_keep rows must be sorted"):
        fastcon.siamese_mask(
            _t().to(device_for(backend)), None, ids_keep=_unsorted().to(device_for(backend)), backend=backend
        )
    assert calls == []


def test_direct_op_calls_are_memory_safe():
    """The raw cpu ops re-check what could make them read out of bounds."""
    with pytest.raises(RuntimeError, match="strictly increasing"):
        torch.ops.fastcon.mask_gather(_t(), _with(_ids(), (0, 0), 100), None)
    with pytest.raises(RuntimeError, match="pos_embed must have shape"):
        torch.ops.fastcon.mask_gather(_t(), _ids(), torch.randn(2, 8, 4))
    with pytest.raises(RuntimeError, match="patch must divide"):
        torch.ops.fastcon.mask_image(torch.randn(3, 1, 6, 8), 4, _ids(length=2, k=1))
