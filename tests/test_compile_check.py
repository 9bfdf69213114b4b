"""The ahead-of-time compile check of the Triton kernels (fastcon/kernels/triton/compile_check.py):
every kernel and every autotune config the pruning keeps compiles for sm_80 and sm_90 without
spills and within shared memory, and the check itself catches what it is there to catch.

The check compiles the GPU configs, so it runs in processes without TRITON_INTERPRET (this
suite's conftest sets it for the interpreted kernels)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# compiles ~250 kernels: ~2 minutes on 2 idle cores, far more on a busy machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ARCHS = ("sm_80", "sm_90")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_check") / "compile.csv"
    proc = _run(["-m", "fastcon.kernels.triton.compile_check", "--arch", "80,90", "--quiet", "--csv", str(out)], 1500)
    with open(out) as f:
        return proc, list(csv.DictReader(f))


def test_every_compile_passes(check):
    proc, rows = check
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert rows
    bad = [r for r in rows if r["status"] != "ok"]
    assert not bad, bad[:5]
    limits = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
    for r in rows:
        assert int(r["spill_bytes"]) == 0, r
        assert 0 < int(r["regs"]) <= 255, r
        assert int(r["smem_bytes"]) <= limits[r["arch"]], r
    assert "largest register count" in proc.stdout
    assert "largest shared memory" in proc.stdout


# Computed here from the kernel modules, not from the check's own plan: which kernels exist and
# which autotune configs the pruning keeps for some D and dtype on each architecture.
_EXPECTED = """
import json, torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from fastcon.kernels.triton import diffusion, fused_loss, masking, soft_contrastive
kernels, kept = [], set()
for mod in (soft_contrastive, masking, diffusion, fused_loss):
    for name, k in vars(mod).items():
        if name.endswith("_kernel") and isinstance(k, (Autotuner, JITFunction)):
            kernels.append(mod.__name__.rsplit(".", 1)[1] + "." + name)
        if name.endswith("_kernel") and isinstance(k, Autotuner):
            for arch in (80, 90):
                for d in (64, 128, 256, 512, 768, 1024):
                    for dt in (torch.float32, torch.float16, torch.bfloat16):
                        nargs = {"a_ptr": torch.empty(0, dtype=dt), "D": d, "ARCH": arch}
                        for c in k.early_config_prune(k.configs, nargs):
                            index = next(i for i, x in enumerate(k.configs) if x is c)
                            kept.add(("soft_contrastive." + name, index, f"sm_{arch}", len(k.configs)))
print(json.dumps({"kernels": kernels, "kept": sorted(kept)}))
"""


def test_every_kernel_and_every_kept_config_is_compiled_for_both_archs(check):
    _, rows = check
    proc = _run(["-c", _EXPECTED], 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = json.loads(proc.stdout)
    compiled = {(r["kernel"], r["arch"]) for r in rows}
    for kernel in expected["kernels"]:
        for arch in ARCHS:
            assert (kernel, arch) in compiled, f"{kernel} not compiled for {arch}"
    configs = {(r["kernel"], int(r["autotune"]), r["arch"]) for r in rows if r["autotune"] != ""}
    missing = [k[:3] for k in expected["kept"] if tuple(k[:3]) not in configs]
    assert not missing, f"kept configs never compiled: {missing}"
    # and no config in an autotune list is dead weight: each is kept somewhere
    for kernel in {k[0] for k in expected["kept"]}:
        size = next(k[3] for k in expected["kept"] if k[0] == kernel)
        used = {k[1] for k in expected["kept"] if k[0] == kernel}
        assert used == set(range(size)), f"{kernel}: configs {set(range(size)) - used} are never kept"


_CATCHES = """
from fastcon.kernels.triton import compile_check as cc

def job(kernel, shape, arch, warps, stages, **tiles):
    launch = next(x for x in cc.launches() if x.name == kernel and x.heavy and x.shape == shape)
    args = {**cc.configs(launch, arch)[0][1], **tiles}
    return cc.Compile(kernel, "test", None, arch, {"num_warps": warps, "num_stages": stages}, args, [shape], [""])

fwd, bwd = "soft_contrastive._sc_forward_kernel", "soft_contrastive._sc_backward_kernel"
for j in (
    job(bwd, "D=64 fp32", 80, 8, 2, BLOCK_N=64, BLOCK_M=64, CHUNK=64, N_CHUNK=1),  # spills on sm_80
    job(fwd, "D=256 bf16", 90, 8, 3, BLOCK_N=128, BLOCK_M=128),  # A block + 3 B stages > 227 KiB
    job(fwd, "D=64 bf16", 90, 4, 3, BLOCK_N=64, BLOCK_M=64, BLOCK_K=48),  # tl.arange needs a power of 2
):
    print(cc.compile_one(j)["status"])
"""


def test_check_fails_on_spills_shared_memory_and_compile_errors():
    proc = _run(["-c", _CATCHES], 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spill, smem, error = proc.stdout.strip().splitlines()[-3:]
    assert spill.startswith("FAIL: spills"), spill
    assert smem.startswith("FAIL: shared memory"), smem
    assert error.startswith("FAIL: "), error
    assert "spills" not in error, error
    assert "shared memory" not in error, error


def test_bad_arch_argument_is_an_error():
    proc = _run(["-m", "fastcon.kernels.triton.compile_check", "--arch", "ampere"], 120)
    assert proc.returncode == 2
    assert "--arch takes comma-separated compute capabilities" in proc.stderr
