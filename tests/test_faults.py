"""The faults of real clusters, injected: each one ends in a named error or a resumable stop.

- SIGTERM to the whole process group (SLURM preemption, ``timeout``, Kubernetes, torchrun's
  shutdown), one process with DataLoader workers and two gloo ranks under torchrun: the stop
  checkpoint is written, the exit code is 0, and the resumed run is bit-identical to an
  uninterrupted one.
See docs/faults.md for the behaviour on each fault.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_pretrain import (
    CONFIGS,
    EXAMPLES,
    TINY,
    _compare_runs,
    _env,
    _free_port,
    assert_stopped_then_resumes_exactly,
    pretrain,
)

from fastcon.train import CheckpointDir, read_metrics


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The bundled real Sentinel-2 sample, prepared (253 tiles)."""
    from fastcon.data import prepare_sample

    out = str(tmp_path_factory.mktemp("sample"))
    prepare_sample(out, progress=False)
    return out


PRETRAIN = [sys.executable, os.path.join(EXAMPLES, "pretrain.py"), "--config", os.path.join(CONFIGS, "demo.yaml")]


def _torchrun(nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(_free_port()),
    ]


def _start(cmd, **env):
    """A process in a session (and process group) of its own, as a batch system starts a job."""
    return subprocess.Popen(
        cmd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _wait_for_rows(proc, metrics: str, rows: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(read_metrics(metrics)) >= rows:
            return
        time.sleep(0.1)
    out = proc.communicate(timeout=30)[0] if proc.poll() is not None else "(still running)"
    pytest.fail(f"the run did not log {rows} steps before it could be stopped:\n{out}")


def _stop_group(proc, sig=signal.SIGTERM, timeout: float = 120.0) -> str:
    """``kill -TERM -- -PGID``: the signal reaches every process of the group at once."""
    os.killpg(proc.pid, sig)
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run did not exit within {timeout} s of {sig.name}:\n{proc.communicate()[0]}")


# ---------------------------------------------------------------------------------------------
# preemption: SIGTERM to the process group


def test_sigterm_to_the_process_group_stops_with_a_checkpoint_and_resumes_exactly(sample, tmp_path):
    out = str(tmp_path / "killed")
    # two DataLoader worker processes: they receive the signal too
    args = [*TINY, "data.num_workers=2", "train.steps=400", f"data.root={sample}"]
    proc = _start([*PRETRAIN, *args, f"run.out_dir={out}"])
    _wait_for_rows(proc, os.path.join(out, "metrics.csv"), 3)
    output = _stop_group(proc)
    assert "DataLoader worker" not in output
    assert_stopped_then_resumes_exactly(proc.returncode, output, out, args, str(tmp_path / "straight"))


def test_sigterm_under_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(sample, tmp_path):
    out, straight = str(tmp_path / "killed"), str(tmp_path / "straight")
    args = [
        *TINY, "data.num_workers=1", "data.batch_size=8", "train.steps=400", "log.rank_losses=true",
        "run.device=cpu", f"data.root={sample}",
    ]  # fmt: skip
    proc = _start([*_torchrun(), *PRETRAIN[1:], *args, f"run.out_dir={out}"], OMP_NUM_THREADS="1")
    _wait_for_rows(proc, os.path.join(out, "metrics.csv"), 3)
    output = _stop_group(proc)
    # the workers stopped cleanly; torchrun itself reports the signal it got as its SignalException
    print(f"torchrun exit status {proc.returncode}:\n{output}")
    assert "stopped by SIGTERM" in output, output
    assert "DataLoader worker" not in output, output
    assert "ChildFailedError" not in output, output
    k = CheckpointDir(os.path.join(out, "checkpoints")).load()[0]["step"]
    ranks = [np.loadtxt(os.path.join(out, f"rank{r}_losses.csv"), delimiter=",", ndmin=2) for r in (0, 1)]
    assert ranks[0][-1, 0] == ranks[1][-1, 0] == k  # both ranks stopped after step k
    # resume to k + 2 and, at the same time, run straight to k + 2
    args.append(f"train.stop_at={k + 2}")
    procs = [
        _start([*_torchrun(), *PRETRAIN[1:], *args, f"run.out_dir={out}", "--resume"], OMP_NUM_THREADS="1"),
        _start([*_torchrun(), *PRETRAIN[1:], *args, f"run.out_dir={straight}"], OMP_NUM_THREADS="1"),
    ]
    for p in procs:
        text = p.communicate(timeout=180)[0]
        assert p.returncode == 0, text
    _compare_runs(out, straight)


# ---------------------------------------------------------------------------------------------
# a hung rank: the others stop at run.dist_timeout, naming the collective


def _ranks(cmd, world: int, **env):
    """``world`` processes with the environment torchrun gives its workers (no agent in between)."""
    port = str(_free_port())
    return [
        _start(cmd, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
        for r in range(world)
    ]  # fmt: skip


@pytest.mark.parametrize("fault", [signal.SIGSTOP, signal.SIGKILL], ids=["hung", "dead"])
def test_a_hung_or_dead_rank_ends_the_others_with_the_collective_named(sample, tmp_path, fault):
    out, timeout = str(tmp_path / "run"), 5
    args = [*TINY, "data.batch_size=8", "train.steps=400", "run.device=cpu", f"run.dist_timeout={timeout}"]
    rank0, rank1 = _ranks([*PRETRAIN, *args, f"data.root={sample}", f"run.out_dir={out}"], 2, OMP_NUM_THREADS="1")
    try:
        _wait_for_rows(rank0, os.path.join(out, "metrics.csv"), 2)
        # SIGSTOP: hung, alive and holding its connections, never answering; SIGKILL: dead
        os.kill(rank1.pid, fault)
        stopped = time.monotonic()
        output = rank0.communicate(timeout=timeout + 60)[0]
        waited = time.monotonic() - stopped
    finally:
        for p in (rank0, rank1):
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"rank 0 exited {waited:.1f} s after rank 1 got {fault.name} (run.dist_timeout={timeout} s):\n{output}")
    assert rank0.returncode == 1, output
    assert "error: rank 0: the collective " in output, output
    outcome = f"did not complete within run.dist_timeout={timeout} s" if fault == signal.SIGSTOP else "failed"
    assert f"{outcome}: another rank is stopped, hung or dead" in output
    assert "Traceback" not in output
    assert waited < timeout + 30  # the step in progress, the timeout, the exit


def _raised_in(path_parts, function, message):
    """The error ``function`` (compiled as if it lived in torch's file ``path_parts``) raises."""
    code = compile(f"def {function}():\n    raise RuntimeError({message!r})\n", os.path.join("/x", *path_parts), "exec")
    namespace = {}
    exec(code, namespace)

    def caller():
        namespace[function]()

    try:
        caller()
    except RuntimeError as e:
        return e
    raise AssertionError("did not raise")


@pytest.mark.parametrize(
    ("path", "function", "message", "named"),
    [
        (("torch", "distributed", "distributed_c10d.py"), "all_gather_into_tensor", "Timed out waiting 5000ms for recv",
         "the collective all_gather_into_tensor (called from tests/test_faults.py:"),
        (("torch", "nn", "parallel", "distributed.py"), "_distributed_broadcast_coalesced", "Connection reset by peer",
         "the collective _distributed_broadcast_coalesced (DDP) (called from tests/test_faults.py:"),
        (("torch", "autograd", "graph.py"), "_engine_run_backward", "Application timeout caused pair closure",
         "the collective DDP's gradient all-reduce (in backward)"),
        (("torch", "autograd", "graph.py"), "_engine_run_backward", "shape mismatch", None),
        (("torch", "nn", "modules", "linear.py"), "forward", "Timed out", None),
    ],
    ids=["c10d", "ddp-forward", "ddp-backward", "backward-other-error", "not-a-collective"],
)  # fmt: skip
def test_collective_failures_are_told_from_other_errors(path, function, message, named):
    from fastcon.train import collective_failure

    failure = collective_failure(_raised_in(path, function, message))
    if named is None:
        assert failure is None
    else:
        assert named in str(failure)
        assert "another rank is stopped, hung or dead" in str(failure)
        assert message in str(failure)


# ---------------------------------------------------------------------------------------------
# damaged band files: the scene fails, named; exit 1; not recorded; processed once repaired


def _prepare_cli(*args) -> tuple[int, str]:
    """``python -m fastcon.data prepare ...`` in this process: (exit status, stdout + stderr)."""
    import contextlib
    import io

    from fastcon.data.__main__ import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = main(["prepare", *map(str, args)])
    return status, out.getvalue()


def _journal_keys(folder) -> set[str]:
    import json

    path = os.path.join(folder, "progress.jsonl")
    return {json.loads(line)["key"] for line in open(path)} if os.path.exists(path) else set()


def _manifest_sources(folder) -> set[str]:
    import pandas as pd

    return set(pd.read_parquet(os.path.join(folder, "manifest.parquet"))["source"])


def _truncate(path, fraction: float) -> bytes:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * fraction)])
    return data


@pytest.fixture(scope="module")
def jp2_bands(tmp_path_factory):
    """A copy of the bundled real Sentinel-2 bands (JPEG 2000), one scene."""
    import shutil

    from fastcon.data.sample import sample_dir

    folder = tmp_path_factory.mktemp("jp2") / "IMG_DATA"
    shutil.copytree(os.path.join(sample_dir(), "IMG_DATA"), folder)
    return folder


def test_truncated_jp2_band_fails_its_scene_and_is_processed_once_repaired(jp2_bands, tmp_path):
    band = jp2_bands / "T33UUU_20170216T102101_B04.jp2"
    out = tmp_path / "prepared"
    cli = [jp2_bands, "--out", out, "--layout", "bands", "--tile-size", "128", "--workers", "1", "--no-progress"]
    whole = _truncate(band, 0.75)  # GDAL: "Stream too short", yet the read returns zeros and garbage
    try:
        status, output = _prepare_cli(*cli)
        assert status == 1, output
        assert f"reading {band} failed" in output  # the scene's damaged file, named
        assert "Stream too short" in output
        assert _journal_keys(out) == set()  # not recorded as done
    finally:
        band.write_bytes(whole)  # repaired
    status, output = _prepare_cli(*cli)
    assert status == 0, output
    assert len(_journal_keys(out)) == 1
    assert _manifest_sources(out) == _journal_keys(out)


def _s1_geotiff(path, source_dir, scale: float):
    import rasterio

    bands = []
    for b in ("B04", "B08"):
        with rasterio.open(os.path.join(source_dir, f"T33UUU_20170216T102101_{b}.jp2")) as r:
            profile = r.profile
            bands.append(10 * np.log10(scale * r.read(1).astype(np.float32) / 10000 + 1e-3))
    profile.update(driver="GTiff", count=2, dtype="float32", nodata=None, compress="deflate", tiled=True)
    profile.update(blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.descriptions = ("VV", "VH")  # before the pixels: the directory stays at the start of the file
        dst.write(np.stack(bands))


def test_truncated_geotiff_fails_its_scene_in_a_worker_pool_and_is_processed_once_repaired(jp2_bands, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    good, bad = raw / "S1_a.tif", raw / "S1_b.tif"
    _s1_geotiff(good, jp2_bands, 1.0)
    _s1_geotiff(bad, jp2_bands, 0.9)
    out = tmp_path / "prepared"
    cli = [raw, "--out", out, "--band-set", "s1", "--layout", "multiband", "--tile-size", "128", "--workers", "2"]
    whole = _truncate(bad, 0.7)
    status, output = _prepare_cli(*cli, "--no-progress")
    assert status == 1, output
    assert f"reading {bad} failed" in output
    assert "S1_b" in output
    assert _journal_keys(out) == {"S1_a"}
    assert _manifest_sources(out) == {"S1_a"}
    bad.write_bytes(whole)
    status, output = _prepare_cli(*cli)
    assert status == 0, output
    assert _journal_keys(out) == _manifest_sources(out) == {"S1_a", "S1_b"}


def test_truncated_landcover_raster_is_a_named_input_error(jp2_bands, tmp_path):
    import rasterio

    from fastcon.data.inputs import InputError
    from fastcon.data.landcover import RasterLandCover
    from fastcon.data.raster import Grid

    with rasterio.open(jp2_bands / "T33UUU_20170216T102101_B04.jp2") as r:
        profile, pixels = r.profile, r.read(1)
    codes = (10 * (1 + np.digitize(pixels, np.quantile(pixels, [0.25, 0.5, 0.75])))).astype(np.uint8)
    path = tmp_path / "worldcover.jp2"
    keep = {k: profile[k] for k in ("crs", "transform", "width", "height")}
    with rasterio.open(
        path, "w", driver="JP2OpenJPEG", count=1, dtype="uint8", reversible=True, quality=100, **keep
    ) as dst:
        dst.write(codes, 1)
    grid = Grid(keep["crs"], keep["transform"], keep["width"], keep["height"])
    lc = RasterLandCover(str(path), "worldcover")
    np.testing.assert_array_equal(lc.labels(grid), codes // 10)  # intact: WorldCover classes 10..40 are 1..4
    _truncate(path, 0.75)
    with pytest.raises(InputError, match=f"land cover {path}: reading it failed: GDAL reported"):
        lc.labels(grid)


def test_strict_stops_at_a_bad_input_and_leaves_a_consistent_folder(jp2_bands, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _s1_geotiff(raw / "S1_a.tif", jp2_bands, 1.0)
    (raw / "S1_b.tif").write_bytes(b"II*\x00garbage")  # not a raster
    _s1_geotiff(raw / "S1_c.tif", jp2_bands, 0.8)
    out = tmp_path / "prepared"
    cli = [raw, "--out", out, "--band-set", "s1", "--layout", "multiband", "--tile-size", "128", "--workers", "2"]
    status, output = _prepare_cli(*cli, "--strict", "--no-progress")
    assert status == 1, output
    assert "error: input S1_b:" in output
    assert "Traceback" not in output
    # what finished is recorded and listed: the manifest is the journal, every listed tile exists
    done = _journal_keys(out)
    assert "S1_b" not in done
    assert _manifest_sources(out) == done
    import pandas as pd

    files = pd.read_parquet(out / "manifest.parquet")["file"]
    assert all((out / f).is_file() for f in files)
    assert not list((out / "tiles").glob(".*.tmp"))


def test_failures_are_printed_without_progress_output(jp2_bands, tmp_path, capsys):
    from fastcon.data import prepare

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "S1_b.tif").write_bytes(b"II*\x00garbage")
    summary = prepare([raw], tmp_path / "out", band_set="s1", layout="multiband", workers=0, progress=False)
    assert [key for key, _ in summary.failed] == ["S1_b"]
    err = capsys.readouterr().err
    assert "1 input(s) skipped:" in err
    assert "S1_b: input S1_b:" in err


# ---------------------------------------------------------------------------------------------
# a bad input on one rank under group=: every rank raises, at once


def _one_bad_rank(rank, world, store, out_dir):
    import torch
    import torch.distributed as dist

    import fastcon

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    try:
        z, labels = torch.randn(6, 5), torch.rand(6, 3)
        bad = {
            "empty batch": (torch.randn(0, 5), torch.randn(0, 5), torch.rand(0, 3)),
            "negative labels": (z, z, -labels),
            "labels of another length": (z, z, labels[:4]),
        }
        for name, args in bad.items():
            dist.barrier()  # the clocks start together: the time is the exchange's, not the ranks' skew
            t0 = time.perf_counter()
            try:
                fastcon.soft_contrastive_loss(*(args if rank == world - 1 else (z, z, labels)), group=True)
                results[name] = (None, time.perf_counter() - t0)
            except (ValueError, TypeError) as e:
                results[name] = (f"{type(e).__name__}: {e}", time.perf_counter() - t0)
        # the group is still usable afterwards: a good call on every rank
        results["after"] = float(fastcon.soft_contrastive_loss(z, z, labels, group=True))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: a rank exiting while gloo still talks to it aborts the other
    finally:
        dist.destroy_process_group()


def test_a_bad_input_on_one_rank_raises_on_every_rank_at_once(tmp_path):
    import torch
    from test_distributed import spawn_with_timeout

    world = 2
    spawn_with_timeout(_one_bad_rank, world, (world, str(tmp_path / "store"), str(tmp_path)), 120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name in ("empty batch", "negative labels", "labels of another length"):
        own = ranks[-1][name][0]
        assert own is not None, f"the bad rank did not raise for {name}"
        assert own.startswith("ValueError"), own  # the bad rank: its own error
        for r in range(world - 1):
            msg, seconds = ranks[r][name]
            assert msg is not None, f"rank {r} did not raise for {name}"
            assert msg.startswith(f"ValueError: rank(s) [{world - 1}] of the group got invalid input"), msg
            assert own.split(": ", 1)[1] in msg  # the bad rank's message, on every rank
            assert seconds < 1.0, f"rank {r} took {seconds:.2f} s to raise for {name}"
    assert len({r["after"] for r in ranks}) == 1
    print({name: [f"{ranks[r][name][1] * 1e3:.1f} ms" for r in range(world)] for name in ranks[0] if name != "after"})


# ---------------------------------------------------------------------------------------------
# leftovers


def test_stale_temporary_checkpoints_of_dead_processes_are_removed_at_start(sample, tmp_path, capsys):
    out = tmp_path / "run"
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its PID names a process that no longer exists
    stale = ckpt_dir / f".step_00000007.ckpt.{dead.pid}.tmp"
    stale.write_bytes(b"x" * 3_000_000)  # a write killed midway
    live = ckpt_dir / f".step_00000007.ckpt.{os.getppid()}.tmp"  # a running process: maybe writing
    live.write_bytes(b"y")
    args = ["--config", os.path.join(CONFIGS, "demo.yaml"), *TINY, f"data.root={sample}", f"run.out_dir={out}"]
    assert pretrain.main([*args, "train.steps=1"]) == 0
    printed = capsys.readouterr().out
    assert f"removed 1 stale temporary checkpoint file(s) (2.9 MiB): {stale.name}" in printed
    assert not stale.exists()
    assert live.exists()
    assert [p.name for p in CheckpointDir(ckpt_dir).all()] == ["step_00000001.ckpt"]
