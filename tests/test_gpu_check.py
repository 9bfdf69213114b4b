"""`make gpu-check` (tools/gpu_check.py) in its dry run: the whole plumbing of the prepared GPU
run on the CPU at tiny sizes (Triton interpreted, the CUDA kernels through fastcon._C_simt,
no build, no CUDA graphs, no sanitizer), and its report when stages fail or do not run."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the dry run: ~2 minutes on 2 idle cores, far more on a busy machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
STAGES = ("build", "ops", "graphs", "sanitizer", "bench", "pretrain", "dali", "tests")


def _make_gpu_check(out: Path, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTCON_GPU_CHECK_DRY="1", FASTCON_GPU_REPORT=str(out), **env_extra)
    cmd = ["make", "--no-print-directory", "gpu-check", f"GPU_PYTHON={sys.executable}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("make") is None:
        pytest.fail("make is not installed: `make gpu-check` is the command under test")
    out = tmp_path_factory.mktemp("gpu-report")
    return _make_gpu_check(out), out


def test_dry_run_passes_and_writes_the_report(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "dry run on the CPU" in report
    assert "all stages passed" in report
    for stage in STAGES:
        assert f"## {stage}: " in report, stage
        assert (out / "logs" / f"{stage}.log").exists(), stage


def test_dry_run_says_the_gpu_decode_was_not_run(dry_run):
    # DALI's mixed decoders need CUDA: the report says so in its summary and its stage line
    _, out = dry_run
    report = (out / "report.md").read_text()
    assert "; skipped: build, sanitizer, dali" in report
    line = next(x for x in report.splitlines() if x.startswith("| dali | "))
    assert line.startswith("| dali | skipped | "), line
    assert "| not run: the GPU decode needs a CUDA device (dry run; " in line, line
    (row,) = _rows(out / "dali.csv")
    assert row["check"].endswith("::test_dali_gpu_decodes_the_raw_folders_into_the_npy_tiles")
    assert row["status"].startswith("not run: the GPU decode needs a CUDA device")


def test_dry_run_checks_every_op_backend_and_dtype(dry_run):
    _, out = dry_run
    rows = _rows(out / "ops.csv")
    ops = {r["op"] for r in rows}
    assert len(ops) == 7, ops
    assert {(r["backend"], r["dtype"]) for r in rows} == {
        (b, d) for b in ("cuda_simt", "triton") for d in ("fp32", "fp16", "bf16")
    }
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert all(max(float(r["out_err"]), float(r["grad_err"])) < 0.02 for r in rows)


def test_dry_run_graph_checks_say_what_they_skip(dry_run):
    _, out = dry_run
    rows = {(r["check"].split()[0], r["backend"]): r["status"] for r in _rows(out / "graphs.csv")}
    assert rows[("torch.compile", "cuda_simt")] == "ok"
    assert rows[("deterministic", "cuda_simt")] == "ok"
    assert rows[("deterministic", "triton")] == "ok"
    assert rows[("CUDA", "triton")].startswith("skipped (no CUDA")


def test_dry_run_benchmarks_and_pretraining_rows(dry_run):
    _, out = dry_run
    bench = _rows(out / "bench.csv")
    loss = [r for r in bench if r["op"] == "loss fwd+bwd"]
    assert {r["backend"] for r in loss} == {"cuda_simt", "triton", "reference"}
    assert all(float(r["tflops"]) > 0 and float(r["mm_tflops"]) > 0 for r in loss)
    assert {r["op"] for r in bench} >= {"siamese_mask fwd+bwd", "q_sample seeded", "diffusion loss fwd+bwd"}
    pretrain = _rows(out / "pretrain.csv")
    assert {(r["model"].split()[0], r["compile"]) for r in pretrain} == {
        (m, c) for m in ("demo", "ViT-S/14") for c in ("False", "True")
    }
    for r in pretrain:
        assert r["status"] == "ok", r
        for key in ("images_per_s", "data_ms", "compute_ms"):
            assert float(r[key]) > 0, r


def test_a_stage_that_does_not_run_fails_the_check_and_is_reported(tmp_path):
    proc = _make_gpu_check(tmp_path, FASTCON_GPU_CHECK_BUDGET="0")
    assert proc.returncode != 0
    report = (tmp_path / "report.md").read_text()
    assert "FAILED: build, ops" in report
    assert "| pretrain | not run |" in report
