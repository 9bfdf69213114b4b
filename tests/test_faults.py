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
from test_pretrain import CONFIGS, EXAMPLES, TINY, _compare_runs, _env, _free_port, config, pretrain

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
    assert proc.returncode == 0, output
    assert "stopped by SIGTERM" in output
    assert "DataLoader worker" not in output
    state, path = CheckpointDir(os.path.join(out, "checkpoints")).load()
    k = state["step"]
    assert 3 <= k < 400
    assert path.name == f"step_{k:08d}.ckpt"
    args.append(f"train.stop_at={k + 2}")
    pretrain.train(config("demo", *args, out=out), resume="auto")
    pretrain.train(config("demo", *args, out=str(tmp_path / "straight")))
    _compare_runs(out, str(tmp_path / "straight"))


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
