"""The backend registry and the build: what fastcon.backends() reports must be true."""

import glob
import os
import subprocess
import sys

import pytest
import torch

import fastcon
from fastcon import _backends
from fastcon._fatbin import cubin_archs


def test_package_is_the_installed_one():
    # tests import the package as installed by `make` (editable install + in-place build),
    # they never compile anything themselves
    mod, err = _backends.load_extension()
    assert mod is not None, err
    assert os.path.dirname(mod.__file__) == os.path.dirname(fastcon.__file__)


def test_backends_lists_all_four_with_status():
    table = fastcon.backends()
    assert [b.name for b in table] == ["reference", "cpu", "triton", "cuda"]
    assert table["reference"].available
    assert table["cpu"].available, table["cpu"].status
    assert "threads" in table["cpu"].status
    for b in table:
        assert b.status, b.name
    assert "cpu: available" in repr(table)


def test_triton_status_under_interpreter():
    info = fastcon.backends()["triton"]
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert info.available
        assert info.status == "interpreted (TRITON_INTERPRET=1, no GPU)"


def test_triton_status_without_interpreter():
    code = "import fastcon; print(fastcon.backends()['triton'])"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    if not torch.cuda.is_available():
        assert "triton: unavailable (no CUDA device" in out


def test_cuda_kernels_really_built():
    """When the build says it compiled CUDA kernels, the .so holds cubins for those archs."""
    mod, _ = _backends.load_extension()
    promised = [a for a in torch.ops.fastcon.build_info().split(",") if a]
    found = cubin_archs(mod.__file__)
    assert found == promised, f"build promised {promised}, the shared object holds {found}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    have_sources = bool(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))
    have_nvcc = os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    if torch.version.cuda and have_nvcc and have_sources and os.environ.get("FASTCON_BUILD_CUDA", "auto") != "0":
        assert promised == ["sm_80", "sm_90"]
    status = fastcon.backends()["cuda"].status
    if promised:
        assert status.startswith("compiled for " + ", ".join(promised))


def test_bad_env_backend_lists_valid_names(monkeypatch):
    monkeypatch.setenv("FASTCON_BACKEND", "gpu9000")
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="FASTCON_BACKEND") as e:
        fastcon.soft_contrastive_loss(z, z)
    for name in ("auto", "reference", "cpu", "triton", "cuda"):
        assert name in str(e.value)


def test_env_backend_overrides_auto(monkeypatch):
    z = torch.randn(4, 8)
    monkeypatch.setenv("FASTCON_BACKEND", "reference")
    name, impl = _backends.select("soft_contrastive", "auto", z.device)
    assert name == "reference"
    monkeypatch.setenv("FASTCON_BACKEND", "cpu")
    assert _backends.select("soft_contrastive", "auto", z.device)[0] == "cpu"


def test_auto_picks_cpu_for_cpu_tensors():
    assert _backends.select("soft_contrastive", "auto", torch.device("cpu"))[0] == "cpu"


def test_bad_backend_argument():
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastcon.soft_contrastive_loss(z, z, backend="fast")
    with pytest.raises(TypeError, match="backend must be a str"):
        fastcon.soft_contrastive_loss(z, z, backend=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a CUDA device")
def test_unavailable_cuda_backend_is_a_clear_error():
    z = torch.randn(4, 8)
    with pytest.raises(fastcon.BackendError, match="cuda backend is unavailable here: .*(no CUDA device|without CUDA)"):
        fastcon.soft_contrastive_loss(z, z, backend="cuda")


def test_cuda_auto_rule_follows_cubin_compatibility():
    """auto takes the cuda backend only on devices the embedded cubins run on: same major
    architecture, device minor >= cubin minor; other GPUs fall through to triton."""
    archs = ["sm_80", "sm_90"]
    assert _backends.cubin_runs_on(archs, (8, 0))
    assert _backends.cubin_runs_on(archs, (8, 6))  # A10 / RTX 30xx run sm_80 code
    assert _backends.cubin_runs_on(archs, (8, 9))
    assert _backends.cubin_runs_on(archs, (9, 0))
    assert not _backends.cubin_runs_on(archs, (7, 5))
    assert not _backends.cubin_runs_on(archs, (10, 0))
    assert not _backends.cubin_runs_on(["sm_86"], (8, 0))
    assert _backends._AUTO_ORDER["cuda"][:2] == ("cuda", "triton")
