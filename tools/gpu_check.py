"""`make gpu-check`: one prepared run of everything that needs an NVIDIA GPU, written to a report.

    make gpu-check                              # on a GPU machine: ~8 minutes on an H100 / H200
    FASTCON_GPU_CHECK_DRY=1 make gpu-check      # the same plumbing on the CPU at tiny sizes

Needs only a Python with torch (and triton) installed, no virtual environment, no internet; DALI
and rasterio only for the dali stage. Stages, each in its own process (a crashed kernel fails its stage, not the
report), in the order of what they are worth:

  build      the extension for this GPU's architecture only, against the installed torch
  ops        every op and backend (cuda, triton) on CUDA tensors against the float64 reference,
             fp32 / fp16 / bf16 (the bf16 tl.dot included)
  graphs     the fused loss under torch.compile and captured in a CUDA graph; deterministic mode
  sanitizer  compute-sanitizer memcheck and racecheck over the CUDA kernels at small sizes
  bench      loss forward + backward (cuda, triton, reference) as TFLOP/s next to a bf16 torch.mm
             of the same run; masking and diffusion rows
  pretrain   30 steps of the demo model and of ViT-S/14 at 224 px on synthetic 13-band tiles,
             bf16, compile off and on: images/s split into data and compute
  dali       the DALI mixed (GPU) decoders on the raw (JPEG 2000 / GeoTIFF) folders against the
             npy tiles, when nvidia-dali and rasterio are installed (else reported as not run)
  tests      the test suite's GPU subset (the tests put triton and cuda on CUDA tensors by
             themselves); last, as its length on a GPU (autotuning per shape) is the least known

Writes report.md, one CSV per table and one log per stage to $FASTCON_GPU_REPORT (default
gpu-report/); the report is rewritten after every stage, so a killed run still leaves one. Exits
non-zero when any stage failed or did not run. FASTCON_GPU_CHECK_BUDGET (seconds, default 470;
1800 for the dry run) bounds the whole run. The dry run uses the Triton interpreter and the SIMT emulation build of
the CUDA kernels (fastcon._C_simt) and skips the build, CUDA graphs and the sanitizer.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRY = os.environ.get("FASTCON_GPU_CHECK_DRY", "0") not in ("", "0")
OUT = Path(os.environ.get("FASTCON_GPU_REPORT") or ROOT / "gpu-report")
# the dry run on a shared CPU machine gets more time: its limits guard against hangs only
BUDGET_S = float(os.environ.get("FASTCON_GPU_CHECK_BUDGET", "1800" if DRY else "470"))
# stage: the most seconds it may take (less when the budget runs short)
STAGES = {"build": 240, "ops": 90, "graphs": 120, "sanitizer": 120, "bench": 120, "pretrain": 240, "dali": 120,
          "tests": 200}  # fmt: skip
STAGE_LIMIT_SCALE = 4 if DRY else 1


# --------------------------------------------------------------------------------------------
# stage plumbing: each stage runs as `gpu_check.py --stage NAME` and leaves NAME.json


class StageResult:
    """What a stage reports: ok / failed / skipped, summary lines, and its CSV tables."""

    def __init__(self, name: str):
        self.name, self.status, self.lines, self.tables = name, "ok", [], []

    def fail(self, line: str) -> None:
        self.status = "failed"
        self.lines.append("FAIL: " + line)

    def note(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def table(self, name: str, rows: list[dict]) -> None:
        if not rows:
            return
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(OUT / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        if name not in self.tables:
            self.tables.append(name)
        self.save()  # partial results survive a stage that runs out of time

    def save(self) -> None:
        data = {"status": self.status, "lines": self.lines, "tables": self.tables}
        (OUT / f"{self.name}.json").write_text(json.dumps(data, indent=1))


def device():
    import torch

    return torch.device("cpu" if DRY else "cuda")


def gpu_backends() -> list[str]:
    """The fused backends a GPU run checks; the dry run's stand-ins for them."""
    return ["cuda_simt", "triton"] if DRY else ["cuda", "triton"]


def sync() -> None:
    import torch

    if not DRY:
        torch.cuda.synchronize()


def env_lines() -> list[str]:
    lines = [f"python {platform.python_version()} on {platform.node()} ({os.cpu_count()} CPUs)"]
    try:
        import torch

        lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            lines.append(
                f"GPU {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
            )
        else:
            lines.append("no CUDA device" + (" (dry run)" if DRY else ""))
    except ImportError as e:
        lines.append(f"torch not importable: {e}")
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    lines.append(f"nvcc: {shutil.which('nvcc') or cuda_tool('nvcc') or 'not found'}")
    lines.append(f"compute-sanitizer: {cuda_tool('compute-sanitizer') or 'not found'}")
    return lines


def cuda_tool(name: str) -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    return shutil.which(name)


def write_report(results: dict[str, dict], seconds: dict[str, float], env: list[str], total: float) -> None:
    failed = [n for n, r in results.items() if r["status"] not in ("ok", "skipped")]
    skipped = [n for n, r in results.items() if r["status"] == "skipped"]
    lines = [
        "# fastcon GPU check" + (" (dry run on the CPU)" if DRY else ""),
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {total:.0f} s; "
        + ("all stages passed" if not failed else f"FAILED: {', '.join(failed)}")
        + (f"; skipped: {', '.join(skipped)}" if skipped else ""),
        "",
        *[f"- {line}" for line in env],
        "",
        "| stage | status | seconds | summary |",
        "|---|---|---|---|",
    ]
    for name in STAGES:
        r = results.get(name, {"status": "not run", "lines": []})
        summary = "; ".join(r["lines"][:3]).replace("|", "/")
        lines.append(f"| {name} | {r['status']} | {seconds.get(name, 0):.0f} | {summary} |")
    for name, r in results.items():
        lines += ["", f"## {name}: {r['status']}", "", *[f"- {line}" for line in r["lines"]]]
        for table in r.get("tables", []):
            lines += ["", f"{table}.csv:", "", *markdown_table(OUT / f"{table}.csv")]
        lines += ["", f"log: logs/{name}.log"]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")


def markdown_table(path: Path, max_rows: int = 60) -> list[str]:
    with open(path) as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1 : max_rows + 1]]
    if len(rows) > max_rows + 1:
        out.append(f"({len(rows) - 1 - max_rows} more rows in {path.name})")
    return out


def orchestrate(only: list[str] | None) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "logs").mkdir(exist_ok=True)
    env = env_lines()
    print("\n".join(env), flush=True)
    start = time.perf_counter()
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    child_env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child_env["FASTCON_GPU_REPORT"] = str(OUT)
    if DRY:
        child_env["TRITON_INTERPRET"] = "1"
    for name, limit in STAGES.items():
        if only and name not in only:
            continue
        limit *= STAGE_LIMIT_SCALE
        left = BUDGET_S - (time.perf_counter() - start)
        if left < 10:
            results[name] = {"status": "not run", "lines": ["the time budget was spent"], "tables": []}
            continue
        (OUT / f"{name}.json").unlink(missing_ok=True)
        t0 = time.perf_counter()
        print(f"== {name} (at most {min(limit, left):.0f} s)", flush=True)
        with open(OUT / "logs" / f"{name}.log", "w") as log:
            # its own process group: a stage that runs out of time is killed with what it started
            # (pytest, compute-sanitizer, the compiler)
            proc = subprocess.Popen(
                [sys.executable, __file__, "--stage", name], cwd=ROOT, env=child_env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            try:
                rc = proc.wait(timeout=min(limit, left))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "timeout"
        seconds[name] = time.perf_counter() - t0
        path = OUT / f"{name}.json"
        result = json.loads(path.read_text()) if path.exists() else {"status": "failed", "lines": [], "tables": []}
        if rc != 0 and result["status"] == "ok":
            result["status"] = "failed"
        if rc != 0:
            why = "timed out" if rc == "timeout" else f"exit status {rc}"
            result["lines"].insert(0, f"FAIL: the stage process {why}; see logs/{name}.log")
        results[name] = result
        print(f"   {result['status']} in {seconds[name]:.0f} s: " + "; ".join(result["lines"][:3]), flush=True)
        write_report(results, seconds, env, time.perf_counter() - start)
    write_report(results, seconds, env, time.perf_counter() - start)
    bad = [n for n, r in results.items() if r["status"] not in ("ok", "skipped")]
    print(f"report: {OUT / 'report.md'}; " + ("all stages passed" if not bad else f"FAILED: {', '.join(bad)}"))
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------
# stages


def stage_build(res: StageResult) -> None:
    import torch

    if DRY:
        have = sorted(p.name for p in (ROOT / "fastcon").glob("_C*.so"))
        if len(have) < 2:
            res.fail(f"the dry run uses the extensions `make build` made; found only {have}")
        res.status = "skipped" if res.status == "ok" else res.status
        res.note(f"dry run: no build (uses {', '.join(have)})")
        return
    major, minor = torch.cuda.get_device_capability(0)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", MAX_JOBS=str(os.cpu_count() or 4))
    env["FASTCON_BUILD_CUDA"] = "1"
    if not env.get("CUDA_HOME") and cuda_tool("nvcc"):
        env["CUDA_HOME"] = str(Path(cuda_tool("nvcc")).resolve().parents[1])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, env=env)
    if proc.returncode != 0:
        res.fail(f"setup.py build_ext exit status {proc.returncode}")
        return
    res.note(f"built for sm_{major}{minor} against torch {torch.__version__} in {time.perf_counter() - t0:.0f} s")


def _rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0


# relative error allowed against the float64 reference, per input dtype
TOL = {"fp32": 2e-4, "fp16": 5e-3, "bf16": 2e-2}


def _ids_keep(b: int, length: int, keep: int, gen):
    """(b, keep) random kept positions per row, ascending (as siamese_mask draws them)."""
    import torch

    return torch.argsort(torch.rand(b, length, generator=gen), dim=1)[:, :keep].sort(dim=1).values


def _op_cases(dev, small: bool = DRY):
    """(op name, inputs builder, function of (backend, *inputs) -> outputs) for every public op;
    small: tiny sizes (the dry run, the sanitizer)."""
    import torch

    import fastcon

    n, d = (37, 24) if small else (333, 256)
    b, length, dim = (2, 16, 24) if small else (8, 256, 384)
    img, patch = ((2, 3, 16, 16), 4) if small else ((4, 13, 224, 224), 14)
    sched = fastcon.NoiseSchedule("linear")

    def loss_inputs(gen, dt):
        z1 = torch.randn(n, d, generator=gen).to(dev, dt)
        z2 = torch.randn(n, d, generator=gen).to(dev, dt)
        labels = (torch.rand(n, 7, generator=gen) < 0.3).float().to(dev)
        scenes = torch.randint(0, max(2, n // 4), (n,), generator=gen).to(dev)
        return [z1, z2], dict(labels=labels, scenes=scenes)

    def mask_inputs(gen, dt):
        tokens = torch.randn(b, length, dim, generator=gen).to(dev, dt)
        pos = torch.randn(1, length, dim, generator=gen).to(dev, dt)
        return [tokens, pos], dict(ids=_ids_keep(b, length, length // 4, gen).to(dev))

    def image_inputs(gen, dt):
        x = torch.randn(*img, generator=gen).to(dev, dt)
        cells = (img[2] // patch) * (img[3] // patch)
        return [x], dict(ids=_ids_keep(img[0], cells, cells // 4, gen).to(dev))

    def diff_inputs(gen, dt):
        x0 = torch.randn(*img, generator=gen).to(dev, dt)
        pred = torch.randn(*img, generator=gen).to(dev, dt)
        t = torch.randint(0, 1000, (img[0],), generator=gen).to(dev)
        return [x0, pred], dict(t=t)

    return [
        ("loss softmax multi-label", loss_inputs,
         lambda be, z1, z2, k: fastcon.soft_contrastive_loss(z1, z2, k["labels"], temperature=0.1, hard_weight=0.3, backend=be)),
        ("loss sigmoid", loss_inputs,
         lambda be, z1, z2, k: fastcon.soft_contrastive_loss(z1, z2, k["labels"], loss="sigmoid", temperature=0.1, bias=-2.0, backend=be)),
        ("loss scene ids ignore", loss_inputs,
         lambda be, z1, z2, k: fastcon.soft_contrastive_loss(z1, z2, k["scenes"], scene_mode="ignore", temperature=0.05, backend=be)),
        ("siamese_mask + unmask", mask_inputs,
         lambda be, x, pos, k: fastcon.unmask(fastcon.siamese_mask(x, pos_embed=pos, ids_keep=k["ids"], backend=be)[0], k["ids"], length, 0.5, backend=be)),
        ("mask_image", image_inputs, lambda be, x, k: fastcon.mask_image(x, patch, k["ids"], backend=be)),
        ("q_sample (seeded)", diff_inputs, lambda be, x0, pred, k: sched.q_sample(x0, k["t"], seed=7, backend=be)[0]),
        ("diffusion loss v (seeded)", diff_inputs,
         lambda be, x0, pred, k: sched.loss(pred, x0, k["t"], seed=7, target="v", backend=be)),
    ]  # fmt: skip


def stage_ops(res: StageResult) -> None:
    import torch

    dev = device()
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    rows = []
    for name, make, fn in _op_cases(dev):
        for (dt_name, dt), backend in ((x, be) for x in dtypes.items() for be in gpu_backends()):
            gen = torch.Generator().manual_seed(len(rows))
            tensors, extra = make(gen, dt)
            row = {"op": name, "backend": backend, "dtype": dt_name}
            try:
                xs = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
                out = fn(backend, *xs, extra)
                w = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
                grads = torch.autograd.grad((out * w).sum().float(), xs, allow_unused=True)
                refs = [t.detach().cpu().double().requires_grad_() for t in tensors]
                ref_extra = {k: v.cpu() for k, v in extra.items()}
                ref = fn("reference", *refs, ref_extra)
                ref_grads = torch.autograd.grad((ref * w.cpu().double()).sum(), refs, allow_unused=True)
                pairs = [(g, r) for g, r in zip(grads, ref_grads) if r is not None]
                if any(g is None for g, _ in pairs):
                    raise RuntimeError("a gradient the reference has is missing")
                row["out_err"] = f"{_rel_err(out, ref):.2e}"
                row["grad_err"] = f"{max(_rel_err(g, r) for g, r in pairs):.2e}"
                worst = max(float(row["out_err"]), float(row["grad_err"]))
                row["status"] = "ok" if worst <= TOL[dt_name] else f"FAIL > {TOL[dt_name]:g}"
            except Exception as e:  # a failing op is a row of the table, the other ops still run
                row["status"] = f"FAIL {type(e).__name__}: {' '.join(str(e).split())[:160]}"
            if row["status"] != "ok":
                res.fail(f"{name} {backend} {dt_name}: {row['status']}")
            rows.append(row)
    res.table("ops", rows)
    res.note(
        f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} op x backend x dtype checks within tolerance {TOL}"
    )


def stage_graphs(res: StageResult) -> None:
    import torch

    import fastcon

    dev = device()
    n, d = (48, 32) if DRY else (4096, 256)
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, d, generator=gen).to(dev)
    z2 = torch.randn(n, d, generator=gen).to(dev)
    labels = (torch.rand(n, 9, generator=gen) < 0.3).float().to(dev)
    rows = []

    def fwd_bwd(fn, a, b):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        loss = fn(a, b)
        ga, gb = torch.autograd.grad(loss, (a, b))
        return loss.detach(), ga, gb

    def check(name: str, backend: str, run, skip: str | None = None) -> None:
        """One row: run() returns (error, passed); an exception is a failed row."""
        row = {"check": name, "backend": backend}
        if skip:
            row["status"] = f"skipped ({skip})"
        else:
            try:
                err, passed = run()
                row.update(error=f"{err:.1e}", status="ok" if passed else "FAIL")
            except Exception as e:
                row["status"] = f"FAIL {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        rows.append(row)

    for backend in gpu_backends():

        def loss_fn(a, b, backend=backend):
            return fastcon.soft_contrastive_loss(a, b, labels, temperature=0.1, hard_weight=0.2, backend=backend)

        eager = fwd_bwd(loss_fn, z1, z2)

        def compiled(loss_fn=loss_fn, eager=eager):
            # the dry run traces with aot_eager: inductor's CPU code generation takes minutes here
            fn = torch.compile(loss_fn, backend="aot_eager" if DRY else "inductor")
            err = max(_rel_err(g, e) for g, e in zip(fwd_bwd(fn, z1, z2), eager))
            return err, err < 1e-5

        def deterministic(loss_fn=loss_fn, eager=eager):
            torch.use_deterministic_algorithms(True)
            try:
                runs = [fwd_bwd(loss_fn, z1, z2) for _ in range(2)]
            finally:
                torch.use_deterministic_algorithms(False)
            err = max(_rel_err(g, e) for g, e in zip(runs[0], eager))
            return err, err < 1e-5 and all(torch.equal(x, y) for x, y in zip(*runs))

        def graph(loss_fn=loss_fn):
            sa, sb = z1.clone().requires_grad_(), z2.clone().requires_grad_()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (autotuning, allocations) outside the graph
                for _ in range(2):
                    sa.grad = sb.grad = None
                    loss_fn(sa, sb).backward()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            sa.grad = sb.grad = None
            with torch.cuda.graph(g):
                static_loss = loss_fn(sa, sb)
                static_loss.backward()
            with torch.no_grad():  # replay on other inputs: the graph must read them
                sa.copy_(z2)
                sb.copy_(z1)
            g.replay()
            sync()
            err = max(_rel_err(x, y) for x, y in zip((static_loss, sa.grad, sb.grad), fwd_bwd(loss_fn, z2, z1)))
            return err, err < 1e-5

        no_trace = "dynamo cannot trace the Triton interpreter" if DRY and backend == "triton" else None
        check("torch.compile", backend, compiled, no_trace)
        check("deterministic (2 runs bitwise equal)", backend, deterministic)
        check("CUDA graph capture + replay", backend, graph, "no CUDA in the dry run" if DRY else None)
    for row in rows:
        if row["status"].startswith("FAIL"):
            res.fail(f"{row['check']} {row['backend']}: {row['status']}")
    res.table("graphs", rows)
    skipped = sum(r["status"].startswith("skipped") for r in rows)
    passed = sum(r["status"] == "ok" for r in rows)
    res.note(f"{passed} of {len(rows)} compile / determinism / CUDA graph checks passed, {skipped} skipped")


# the GPU subset of the suite: the tests move triton and cuda onto CUDA tensors by themselves;
# the CPU and SIMT-emulator cases are what `make test` covers already
TEST_FILES = [
    "tests/test_soft_contrastive.py",
    "tests/test_soft_contrastive_triton.py",
    "tests/test_soft_contrastive_cuda.py",
    "tests/test_soft_contrastive_cuda_fused.py",
    "tests/test_masking.py",
    "tests/test_diffusion.py",
    "tests/test_compile.py",
]


def stage_tests(res: StageResult) -> None:
    try:
        import pytest  # noqa: F401
    except ImportError:
        res.fail("pytest is not installed on this machine: the ops stage is the parity check that ran")
        return
    # the dry run: the same command on one quick test
    select = [] if DRY else ["-k", "(triton or cuda) and not simt"]
    files = ["tests/test_compile.py::test_opcheck_soft_contrastive_ops"] if DRY else TEST_FILES
    _pytest(res, "tests", [*select, *files])


def _pytest(res: StageResult, name: str, args: list[str]) -> dict[str, int]:
    """Runs pytest on args with a junit report NAME.xml; a failure, an error or no test passed
    fails the stage. Returns the counts."""
    junit = OUT / f"{name}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    res.note("$ " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, cwd=ROOT)
    counts = _junit_counts(junit)
    res.note(", ".join(f"{v} {k}" for k, v in counts.items()))
    if proc.returncode not in (0, 5) or counts.get("failed", 0) or counts.get("errors", 0):
        res.fail(f"pytest exit status {proc.returncode}")
    if not counts.get("passed"):
        res.fail("no test ran (skipped: see the log for the reason)" if counts.get("skipped") else "no test ran")
    return counts


# the GPU decode: DALI's mixed decoders (nvJPEG2000 for the sample's JPEG 2000 bands, nvImageCodec
# for the SSL4EO-S12 GeoTIFFs) on the raw folders, against the npy tiles rasterio prepared
DALI_TEST = "tests/test_data_raw.py::test_dali_gpu_decodes_the_raw_folders_into_the_npy_tiles"


def stage_dali(res: StageResult) -> None:
    missing = []
    for module, what in (("nvidia.dali", "DALI"), ("rasterio", "rasterio")):
        try:
            __import__(module)
        except ImportError:
            missing.append(what)
    installed = f"{' and '.join(missing)} not installed" if missing else "DALI and rasterio installed"
    if DRY or missing:
        res.status = "skipped"
        if DRY:
            res.note(f"not run: the GPU decode needs a CUDA device (dry run; {installed})")
        else:
            res.note(f"not run: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed "
                     "on this machine (GPU decode unverified)")  # fmt: skip
        res.table("dali", [{"check": DALI_TEST, "status": res.lines[-1], "seconds": "0"}])
        return
    t0 = time.perf_counter()
    counts = _pytest(res, "dali", [DALI_TEST])
    seconds = time.perf_counter() - t0
    res.table("dali", [{"check": DALI_TEST, "status": res.status, "seconds": f"{seconds:.1f}", **counts}])
    res.note(f"GPU decode (DALI mixed decoders vs the npy tiles) {res.status} in {seconds:.0f} s")


def _junit_counts(path: Path) -> dict[str, int]:
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, fails = int(suite.get("tests", 0)), int(suite.get("failures", 0))
    errors, skipped = int(suite.get("errors", 0)), int(suite.get("skipped", 0))
    return {"passed": total - fails - errors - skipped, "failed": fails, "errors": errors, "skipped": skipped}


def sanitizer_workload() -> None:
    """The CUDA kernels at small sizes: every loss mode forward + backward, masking, diffusion."""
    backend = gpu_backends()[0]
    import torch

    for name, make, fn in _op_cases(device(), small=True):
        for dt in (torch.float32, torch.bfloat16):
            tensors, extra = make(torch.Generator().manual_seed(0), dt)
            xs = [t.detach().requires_grad_() for t in tensors]
            out = fn(backend, *xs, extra)
            if out.requires_grad:
                out.float().sum().backward()
            sync()
        print(f"{name}: ran on {backend}", flush=True)


def stage_sanitizer(res: StageResult) -> None:
    tool = cuda_tool("compute-sanitizer")
    workload = [sys.executable, __file__, "--stage", "sanitizer-workload"]
    if DRY or tool is None:
        proc = subprocess.run(workload, cwd=ROOT)  # the workload itself still has to run
        if proc.returncode:
            res.fail(f"the workload failed (exit status {proc.returncode})")
        if DRY:
            res.status = "skipped" if res.status == "ok" else res.status
            res.note("dry run: the sanitizer workload ran on cuda_simt, no sanitizer")
        else:
            res.fail("compute-sanitizer not found (CUDA_HOME/bin or PATH); the workload ran without it")
        return
    rows = []
    for check in ("memcheck", "racecheck"):
        log = OUT / "logs" / f"sanitizer-{check}.log"
        cmd = [tool, "--tool", check, "--error-exitcode", "97", "--kernel-name", "kns=fastcon", *workload]
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        text = log.read_text()
        summary = next((line for line in reversed(text.splitlines()) if "ERROR SUMMARY" in line), "no summary line")
        ok = proc.returncode == 0 and "ERROR SUMMARY: 0" in summary
        rows.append({"tool": check, "summary": summary.strip("= "), "seconds": f"{time.perf_counter() - t0:.0f}"})
        if not ok:
            res.fail(f"{check}: {summary.strip('= ')} (exit status {proc.returncode}; logs/sanitizer-{check}.log)")
    res.table("sanitizer", rows)
    res.note("; ".join(f"{r['tool']}: {r['summary']}" for r in rows))


def _time_ms(fn, repeat: int) -> float:
    """Median milliseconds of fn() over ``repeat`` runs after one warm-up (autotuning) run."""
    import torch

    fn()
    sync()
    times = []
    for _ in range(repeat):
        if DRY:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        else:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def stage_bench(res: StageResult) -> None:
    import torch

    import fastcon

    dev, dt = device(), torch.bfloat16
    sizes = [(64, 32), (128, 32)] if DRY else [(n, d) for d in (256, 768) for n in (4096, 16384, 65536)]
    repeat = 2 if DRY else 5
    mem = None if DRY else torch.cuda.get_device_properties(0).total_memory
    rows = []
    for n, d in sizes:
        gen = torch.Generator().manual_seed(n + d)
        z1 = torch.randn(n, d, generator=gen).to(dev, dt).requires_grad_()
        z2 = torch.randn(n, d, generator=gen).to(dev, dt).requires_grad_()
        labels = (torch.rand(n, 9, generator=gen) < 0.3).float().to(dev)
        # useful work of one forward + backward: the logits (2 N^2 D) and the two gradient
        # products (2 x 2 N^2 D); the kernels' recomputation of the logits is not counted
        flops = 6.0 * n * n * d
        a, bt = z1.detach(), z2.detach().t().contiguous()
        mm_ms = _time_ms(lambda a=a, bt=bt: torch.mm(a, bt), repeat)
        mm_tflops = 2.0 * n * n * d / mm_ms / 1e9
        for backend in [*gpu_backends(), "reference"]:
            row = {"op": "loss fwd+bwd", "backend": backend, "N": n, "D": d, "dtype": "bf16"}
            if backend == "reference" and mem is not None and 6 * 4 * n * n > 0.6 * mem:
                rows.append({**row, "status": "skipped: the dense N x N temporaries exceed the GPU memory"})
                continue

            def step(backend=backend, z1=z1, z2=z2, labels=labels):
                z1.grad = z2.grad = None
                fastcon.soft_contrastive_loss(z1, z2, labels, temperature=0.1, backend=backend).backward()

            try:
                ms = _time_ms(step, repeat)
                tflops = flops / ms / 1e9
                row.update(ms=f"{ms:.3g}", tflops=f"{tflops:.3g}", mm_tflops=f"{mm_tflops:.3g}")
                row.update(of_mm=f"{tflops / mm_tflops:.2f}", status="ok")
            except Exception as e:
                row["status"] = f"FAIL {type(e).__name__}: {' '.join(str(e).split())[:160]}"
                res.fail(f"loss {backend} N={n} D={d}: {row['status']}")
            rows.append(row)
            res.table("bench", rows)
            if not DRY:
                torch.cuda.empty_cache()
    rows += _bench_memory_bound(res, repeat)
    res.table("bench", rows)
    best = [r for r in rows if r.get("tflops") and r["backend"] != "reference"]
    if best:
        top = max(best, key=lambda r: float(r["tflops"]))
        res.note(
            f"loss fwd+bwd best {top['tflops']} TFLOP/s ({top['backend']} N={top['N']} D={top['D']}, torch.mm {top['mm_tflops']})"
        )


def _bench_memory_bound(res: StageResult, repeat: int) -> list[dict]:
    """Masking (ViT-S/14 tokens) and diffusion (13-band 224 px batch) rows, as GB/s of the
    bytes each op must move (read + write of its inputs and outputs once)."""
    import torch

    import fastcon

    dev, dt = device(), torch.bfloat16
    b, length, dim = (4, 16, 32) if DRY else (256, 256, 384)
    shape = (2, 13, 16, 16) if DRY else (64, 13, 224, 224)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(b, length, dim, generator=gen).to(dev, dt).requires_grad_()
    pos = torch.randn(1, length, dim, generator=gen).to(dev, dt).requires_grad_()
    keep = length // 4
    ids = _ids_keep(b, length, keep, gen).to(dev)
    x0 = torch.randn(*shape, generator=gen).to(dev, dt)
    pred = torch.randn(*shape, generator=gen).to(dev, dt).requires_grad_()
    t = torch.randint(0, 1000, (shape[0],), generator=gen).to(dev)
    sched = fastcon.NoiseSchedule("linear")
    elt = 2
    tok_bytes = elt * (b * keep * dim * 2 + b * keep * dim * 2 + length * dim * 2)  # gather fwd + bwd
    img_bytes = elt * x0.numel()
    cases = [
        ("siamese_mask fwd+bwd", tok_bytes,
         lambda be: fastcon.siamese_mask(tokens, pos_embed=pos, ids_keep=ids, backend=be)[0].sum().backward()),
        ("q_sample seeded", 2 * img_bytes, lambda be: sched.q_sample(x0, t, seed=1, backend=be)),
        ("diffusion loss fwd+bwd", 4 * img_bytes, lambda be: sched.loss(pred, x0, t, seed=1, backend=be).backward()),
    ]  # fmt: skip
    rows = []
    for name, nbytes, fn in cases:
        for backend in [*gpu_backends(), "reference"]:
            row = {"op": name, "backend": backend, "dtype": "bf16"}
            try:
                ms = _time_ms(lambda fn=fn, backend=backend: fn(backend), repeat)
                row.update(ms=f"{ms:.3g}", gb_per_s=f"{nbytes / ms / 1e6:.3g}", status="ok")
            except Exception as e:
                row["status"] = f"FAIL {type(e).__name__}: {' '.join(str(e).split())[:160]}"
                res.fail(f"{name} {backend}: {row['status']}")
            rows.append(row)
    return rows


def stage_pretrain(res: StageResult) -> None:
    """SoftCon steps (masked student, EMA teacher, fused loss, fused AdamW) on synthetic 13-band
    uint16 tiles; data = batch to the device, normalised and cropped into two views."""
    import torch
    import torch.nn.functional as F

    import fastcon
    from fastcon.models import EMATeacher, create_encoder, predictor, projector

    dev = device()
    steps, warm = (2, 1) if DRY else (30, 5)  # steps, and the first one timed
    models = {
        "demo (ViT 4 x 192)": dict(crop=28 if DRY else 56, batch=8 if DRY else 64, heads=(64, 32) if DRY else (512, 128),
                                   timm=dict(depth=1 if DRY else 4, embed_dim=192, num_heads=3)),
        "ViT-S/14 224 px": dict(crop=28 if DRY else 224, batch=4 if DRY else 128, heads=(64, 32) if DRY else (4096, 256),
                                timm=dict(depth=1) if DRY else {}),
    }  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    tile = 32 if DRY else 256
    tiles = torch.randint(0, 10000, (64 if DRY else 512, 13, tile, tile), dtype=torch.int16, generator=gen)
    tiles = tiles.pin_memory() if not DRY else tiles
    labels_all = (torch.rand(tiles.shape[0], 8, generator=gen) < 0.3).float()
    rows = []
    for (model_name, m), compile_on in ((x, c) for x in models.items() for c in (False, True)):
        row = {"model": model_name, "compile": compile_on, "batch": m["batch"], "crop": m["crop"]}
        try:
            encoder = create_encoder("vit_small_patch14_dinov2", in_chans=13, img_size=m["crop"], **m["timm"])
            hidden, dim = m["heads"]
            online = torch.nn.ModuleDict({"encoder": encoder, "proj": projector(encoder.num_features, hidden, dim)})
            head = predictor(dim, hidden)
            online.to(dev)
            head.to(dev)
            teacher = EMATeacher(online, base_momentum=0.99, total_steps=steps)

            def student(x, ids_keep, online=online, head=head):
                return head(online["proj"](online["encoder"](x, ids_keep=ids_keep)))

            def target(x, teacher=teacher):
                return teacher.module["proj"](teacher.module["encoder"](x))

            params = list(online.parameters()) + list(head.parameters())
            opt = torch.optim.AdamW(params, lr=1e-4, fused=not DRY)
            fwd_s, fwd_t = student, target
            if compile_on:
                fwd_s, fwd_t = (torch.compile(f, backend="eager" if DRY else "inductor") for f in (student, target))
            data_s, compute_s, first_s = 0.0, 0.0, 0.0
            for step in range(steps):
                t0 = time.perf_counter()
                idx = torch.randint(0, tiles.shape[0], (m["batch"],), generator=gen)
                batch = tiles[idx].to(dev, non_blocking=True).float()
                labels = labels_all[idx].to(dev, non_blocking=True)
                views = []
                for _ in range(2):  # a random crop per view, resized, normalised
                    size = int(tile * (0.5 + 0.5 * torch.rand(1, generator=gen).item()))
                    y, x = (int(torch.randint(0, tile - size + 1, (1,), generator=gen)) for _ in range(2))
                    v = F.interpolate(batch[:, :, y : y + size, x : x + size], size=m["crop"], mode="bilinear")
                    views.append((v - 5000.0) / 2900.0)
                # half of the patch tokens kept (drawn here: dynamo does not trace torch generators)
                cells = (m["crop"] // 14) ** 2
                ids_keep = _ids_keep(m["batch"], cells, cells // 2, gen).to(dev)
                sync()
                t1 = time.perf_counter()
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    pred = fwd_s(views[0], ids_keep)
                    with torch.no_grad():
                        tgt = fwd_t(views[1])
                loss = fastcon.soft_contrastive_loss(pred.float(), tgt.float(), labels, temperature=0.2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                teacher.update(online, step)
                sync()
                t2 = time.perf_counter()
                if step == 0:
                    first_s = t2 - t0
                elif step >= warm:  # steady state: after compilation and autotuning
                    data_s += t1 - t0
                    compute_s += t2 - t1
            counted = steps - warm
            total = data_s + compute_s
            row.update(first_step_s=f"{first_s:.1f}", images_per_s=f"{counted * m['batch'] / total:.3g}")
            row.update(data_ms=f"{1e3 * data_s / counted:.1f}", compute_ms=f"{1e3 * compute_s / counted:.1f}")
            row.update(loss=f"{loss.item():.3f}", status="ok" if torch.isfinite(loss) else "FAIL (non-finite loss)")
        except Exception as e:
            row["status"] = f"FAIL {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if row["status"] != "ok":
            res.fail(f"{model_name} compile={compile_on}: {row['status']}")
        rows.append(row)
        res.table("pretrain", rows)
        if not DRY:
            torch.cuda.empty_cache()
    for r in rows:
        if r.get("images_per_s"):
            res.note(
                f"{r['model']} compile={r['compile']}: {r['images_per_s']} images/s "
                f"(data {r['data_ms']} ms + compute {r['compute_ms']} ms per step)"
            )


def run_stage(name: str) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    if name == "sanitizer-workload":
        sanitizer_workload()
        return 0
    res = StageResult(name)
    try:
        if not DRY:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device: run with FASTCON_GPU_CHECK_DRY=1 for the CPU dry run")
        globals()[f"stage_{name}"](res)
    except Exception as e:  # the stage's own failure, reported; the next stage still runs
        import traceback

        traceback.print_exc()
        res.fail(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    res.save()
    return 0 if res.status in ("ok", "skipped") else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", default=None, help=f"comma-separated stages to run (of {', '.join(STAGES)})")
    ns = ap.parse_args(argv)
    if ns.stage:
        return run_stage(ns.stage)
    only = [s.strip() for s in ns.only.split(",")] if ns.only else None
    unknown = [s for s in only or [] if s not in STAGES]
    if unknown:
        ap.error(f"--only takes stages among {', '.join(STAGES)}, got {', '.join(unknown)}")
    return orchestrate(only)


if __name__ == "__main__":
    sys.exit(main())
