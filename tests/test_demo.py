"""examples/demo.py as a new user meets it: a config typo fails in one line before any work, a
finished run is reported rather than trained again, --fresh says what it deletes, a run cut by
train.max_minutes says so and continues with --resume, and the throughput is the whole run's
(the last window apart). Tiny model sizes on the real sample, on the CPU."""

import json
import math

import pytest
import test_pretrain
from test_pretrain import TINY, demo  # the tiny model sizes; demo.py loaded beside its sibling scripts

from fastcon.train import read_metrics, run_throughput

sample = test_pretrain.sample  # the fixture: the bundled real sample, prepared once per session


def test_config_typo_fails_in_one_line_before_any_work(tmp_path, capsys):
    data = tmp_path / "data"
    assert demo.main(["--data", str(data), "train.stepz=5"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # not even the data step started
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "train.stepz" in lines[0]
    assert "did you mean 'train.steps'" in lines[0]
    assert not data.exists()
    # a value of the wrong type, the same way
    assert demo.main(["--data", str(data), "train.steps=many"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "train.steps must be an integer" in err[0]
    assert not data.exists()


def test_fresh_and_resume_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--fresh", "--resume"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_run_reported_once_finished_and_fresh_lists_what_it_deletes(sample, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--data", sample, *TINY, f"run.out_dir={out}", "train.steps=3", "log.every=2"]
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    assert "3 steps of 16 two-view pairs (finished)" in text
    assert "CUT SHORT" not in text
    # metrics.csv (and so loss.png) starts with step 1, the loss the summary calls "at step 1"
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3]
    summary = json.load(open(out / "summary.json"))
    assert rows[0]["loss"] == pytest.approx(summary["first_loss"], rel=1e-5)
    assert f"{summary['first_loss']:.4f} at step 1" in text
    # the throughput line is the whole run's; the last window (step 3 alone) is printed apart
    speed = run_throughput(rows)
    assert speed["images_per_s"] == pytest.approx(summary["images_per_s"], rel=1e-4)
    assert f"{speed['images_per_s']:.1f} images/s over the run" in text
    assert "last 1 step alone" in text

    # a rerun reports the finished run without training or "continuing" it
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    assert f"{out} already finished its 3 steps: reporting it" in text
    assert "continuing" not in text
    assert "resumed from" not in text
    assert "3 steps of 16 two-view pairs (finished)" in text

    # --fresh names what it deletes before starting over
    assert demo.main(["--fresh", *args]) == 0
    text = capsys.readouterr().out
    line = next(t for t in text.splitlines() if t.startswith("--fresh: deleting"))
    for name in ("checkpoints of step 3", "config.yaml", "encoder.safetensors", "loss.png", "metrics.csv"):
        assert name in line, (name, line)
    assert "already finished" not in text


def test_run_cut_by_max_minutes_says_so_and_resumes(sample, tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "--data",
        sample,
        *TINY,
        f"run.out_dir={out}",
        "train.steps=50",
        "log.every=1",
        "train.max_minutes=0.000001",
    ]
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    assert "1 of 50 steps (stopped: train.max_minutes=1e-06 reached)" in text
    assert "CUT SHORT" in text
    assert "`make demo` continues it" in text
    # the hint the training loop prints ("resume with --resume") works with the demo too
    assert demo.main(["--resume", *args]) == 0
    text = capsys.readouterr().out
    assert f"continuing the run in {out} from step 1 of 50" in text
    assert "2 of 50 steps" in text


def test_output_folder_that_holds_no_run_is_not_deleted(tmp_path, sample, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert demo.main(["--data", sample, *TINY, f"run.out_dir={out}", "train.steps=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "holds no run" in err[0]
    assert (out / "notes.txt").read_text() == "keep me"


def test_run_throughput_weights_rows_by_their_steps():
    # steps 1 (alone), 2..10 (9 steps), 11..12 (2 steps)
    rows = [
        {"step": 1.0, "images_per_s": 10.0, "data_s_per_step": 1.0, "compute_s_per_step": 5.4},
        {"step": 10.0, "images_per_s": 200.0, "data_s_per_step": 0.04, "compute_s_per_step": 0.28},
        {"step": 12.0, "images_per_s": 20.0, "data_s_per_step": 2.0, "compute_s_per_step": 1.2},
    ]
    images = 10.0 * 6.4 + 200.0 * 0.32 * 9 + 20.0 * 3.2 * 2
    seconds = 6.4 + 0.32 * 9 + 3.2 * 2
    got = run_throughput(rows)
    assert got["steps"] == 12
    assert got["images_per_s"] == pytest.approx(images / seconds)
    assert got["data_s_per_step"] == pytest.approx((1.0 + 0.04 * 9 + 2.0 * 2) / 12)
    assert got["compute_s_per_step"] == pytest.approx((5.4 + 0.28 * 9 + 1.2 * 2) / 12)
    assert got["last"] == {"steps": 2, "images_per_s": 20.0, "data_s_per_step": 2.0, "compute_s_per_step": 1.2}
    assert not math.isclose(got["images_per_s"], got["last"]["images_per_s"])
    with pytest.raises(ValueError, match="at least one metrics row"):
        run_throughput([])
