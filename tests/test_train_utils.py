"""fastcon.train: configs, checkpoints, schedules, metrics, runtime plumbing and the linear-probe metrics."""

import math
import os
import random
import signal

import numpy as np
import pytest
import torch

from fastcon.train import (
    CheckpointDir,
    CheckpointError,
    ConfigError,
    MetricsLog,
    StopRequest,
    WarmupCosine,
    derived_seed,
    load_checkpoint,
    load_config,
    parse_override,
    plot_metrics,
    read_metrics,
    rng_state,
    save_checkpoint,
    save_config,
    set_rng_state,
    step_generator,
    warmup_cosine,
)
from fastcon.train.probe import average_precision, fit_linear_probe, mean_average_precision

DEFAULTS = {
    "method": "softcon",
    "optim": {"lr": 1.0e-4, "betas": [0.9, 0.95], "clip": 3.0},
    "train": {"steps": 100, "stop_at": None, "skip": False},
    "model": {"name": "vit", "timm_kwargs": {}, "fused": "auto"},
}


# ---------------------------------------------------------------------------------------------
# config


def test_config_layers_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 3e-4\ntrain:\n  steps: 7\nmodel:\n  timm_kwargs: {depth: 2}\n")
    cfg = load_config(f, ["train.steps=9", "optim.betas=[0.8, 0.9]", "train.stop_at=4"], defaults=DEFAULTS)
    assert cfg.optim.lr == pytest.approx(3e-4)  # YAML 1.1 reads "3e-4" as a string: converted
    assert isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 9
    assert cfg.train.stop_at == 4
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.timm_kwargs == {"depth": 2}  # an empty default mapping is open
    assert cfg.optim.clip == 3.0
    assert cfg.method == "softcon"
    assert DEFAULTS["train"]["steps"] == 100  # the defaults are not modified


def test_config_int_where_float_expected_becomes_float():
    cfg = load_config(None, ["optim.clip=1"], defaults=DEFAULTS)
    assert cfg.optim.clip == 1.0
    assert isinstance(cfg.optim.clip, float)


def test_config_auto_keys_take_booleans():
    assert load_config(None, ["model.fused=true"], defaults=DEFAULTS).model.fused is True
    with pytest.raises(ConfigError, match="model.name must be a string"):
        load_config(None, ["model.name=true"], defaults=DEFAULTS)


def test_config_null_allowed_everywhere():
    cfg = load_config(None, ["optim.clip=null"], defaults=DEFAULTS)
    assert cfg.optim.clip is None


def test_config_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"):
        load_config(None, ["optim.lrr=1"], defaults=DEFAULTS)
    f = tmp_path / "bad.yaml"
    f.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'trian'.*'train'"):
        load_config(f, defaults=DEFAULTS)


def test_config_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.steps must be an integer"):
        load_config(None, ["train.steps=1.5"], defaults=DEFAULTS)
    with pytest.raises(ConfigError, match="train.skip must be a boolean"):
        load_config(None, ["train.skip=1"], defaults=DEFAULTS)
    with pytest.raises(ConfigError, match="optim.lr must be a number"):
        load_config(None, ["optim.lr=fast"], defaults=DEFAULTS)


def test_config_section_needs_a_mapping():
    with pytest.raises(ConfigError, match="optim is a section"):
        load_config(None, ["optim=3"], defaults=DEFAULTS)


def test_parse_override_errors():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=") == ("a", "")
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="section.key=value"):
            parse_override(bad)


def test_config_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", defaults=DEFAULTS)
    f = tmp_path / "broken.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f, defaults=DEFAULTS)


def test_config_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(None, ["train.steps=5", "model.timm_kwargs={depth: 1}"], defaults=DEFAULTS)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml", defaults=DEFAULTS)
    assert again == cfg
    assert list((tmp_path / "config.yaml").read_text().splitlines())[0] == "method: softcon"  # defaults' order


# ---------------------------------------------------------------------------------------------
# checkpoints


def _state(step=3):
    g = torch.Generator().manual_seed(step)
    return {"step": step, "w": torch.randn(4, 5, generator=g), "nested": {"rng": rng_state(), "name": "x"}}


def test_checkpoint_roundtrip(tmp_path):
    state = _state()
    path = save_checkpoint(state, tmp_path / "a.ckpt")
    back = load_checkpoint(path)
    assert back["step"] == 3
    assert back["nested"]["name"] == "x"
    torch.testing.assert_close(back["w"], state["w"], rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]  # no temporary file left


def test_checkpoint_failed_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "a.ckpt"
    save_checkpoint(_state(1), path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


def test_checkpoint_truncated_is_a_clear_error(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "a.ckpt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"a\.ckpt is truncated"):
        load_checkpoint(path)


def test_checkpoint_flipped_byte_is_a_clear_error(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "a.ckpt")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"a\.ckpt is corrupt"):
        load_checkpoint(path)


def test_checkpoint_foreign_file_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(CheckpointError, match="not a fastcon checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_checkpoint_dir_keeps_the_newest(tmp_path):
    ckpts = CheckpointDir(tmp_path / "c", keep=2)
    for step in (5, 10, 15):
        ckpts.save(_state(step), step)
    assert [p.name for p in ckpts.all()] == ["step_00000010.ckpt", "step_00000015.ckpt"]
    state, path = ckpts.load()
    assert state["step"] == 15
    assert path.name == "step_00000015.ckpt"


def test_checkpoint_dir_corrupt_newest_names_the_intact_previous(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep=2)
    ckpts.save(_state(1), 1)
    newest = ckpts.save(_state(2), 2)
    newest.write_bytes(newest.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"truncated.*step_00000001\.ckpt is intact.*--resume"):
        ckpts.load()
    assert load_checkpoint(ckpts.path_for(1))["step"] == 1  # kept


def test_checkpoint_dir_empty(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        CheckpointDir(tmp_path / "none").load()


# ---------------------------------------------------------------------------------------------
# schedules


def test_warmup_cosine_shape():
    f = WarmupCosine(total_steps=110, warmup_steps=10, final_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(10, 11)


def test_scheduler_resumes_on_the_same_curve():
    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        return opt, warmup_cosine(opt, 20, 5, 0.0)

    opt, sched = make()
    lrs = []
    for _ in range(20):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    opt2, sched2 = make()
    for _ in range(7):
        opt2.step()
        sched2.step()
    state = sched2.state_dict()
    opt3, sched3 = make()
    sched3.load_state_dict(state)
    resumed = []
    for _ in range(13):
        opt3.step()
        sched3.step()
        resumed.append(sched3.get_last_lr()[0])
    assert resumed == lrs[7:]


# ---------------------------------------------------------------------------------------------
# metrics


def test_metrics_log_resume_drops_later_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    with MetricsLog(path, ["step", "loss"]) as log:
        for s in (10, 20, 30):
            log.write({"step": s, "loss": 1.0 / s})
    with MetricsLog(path, ["step", "loss"], resume_step=20) as log:
        log.write({"step": 30, "loss": 0.5})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[2]["loss"] == 0.5
    with pytest.raises(ValueError, match="has columns"):
        MetricsLog(path, ["step", "other"], resume_step=20)


def test_plot_metrics_writes_a_png(tmp_path):
    path = tmp_path / "metrics.csv"
    with MetricsLog(path, ["step", "loss", "lr", "images_per_s"]) as log:
        for s in range(1, 6):
            log.write({"step": s, "loss": 5.0 / s, "lr": 1e-3, "images_per_s": 100.0})
    png = plot_metrics(path, tmp_path / "loss.png", loss_keys=("loss",), title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# runtime


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)  # noqa: NPY002
    random.seed(3)
    save_checkpoint({"rng": rng_state()}, tmp_path / "r.ckpt")
    first = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    torch.manual_seed(9)
    np.random.seed(9)  # noqa: NPY002
    random.seed(9)
    set_rng_state(load_checkpoint(tmp_path / "r.ckpt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_derived_seeds_are_stable_and_distinct():
    assert derived_seed(0, 5, "mask") == derived_seed(0, 5, "mask")
    seeds = {derived_seed(0, step, rank, p) for step in range(50) for rank in range(4) for p in ("mask", "noise")}
    assert len(seeds) == 400
    a = torch.rand(4, generator=step_generator(0, 1, "mask"))
    assert torch.equal(a, torch.rand(4, generator=step_generator(0, 1, "mask")))


def test_stop_request_turns_sigterm_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    try:
        assert not stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop
        assert stop.signal_name == "SIGTERM"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_second_sigint_interrupts():
    stop = StopRequest(repeat_s=0.0)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()


def test_copies_of_one_sigint_are_one_stop_request():
    """The group's SIGINT and torchrun's (or srun's) forwarded copy arrive together: one request."""
    stop = StopRequest(repeat_s=60.0)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGINT"
    finally:
        stop.restore()


# ---------------------------------------------------------------------------------------------
# probe metrics


def test_average_precision_by_hand():
    # class 0: ranking pos, neg, pos -> AP = (1/1 + 2/3) / 2; class 1: no positive -> NaN;
    # class 2: a tie between one positive and one negative at the top -> precision 1/2 at recall 1
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.1, 0.3, 0.1]])
    targets = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 0, 0]])
    ap = average_precision(scores, targets)
    assert ap[0].item() == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(ap[1].item())
    assert ap[2].item() == pytest.approx(0.5)
    m, _ = mean_average_precision(scores, targets)
    assert m == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)


def test_average_precision_matches_a_brute_force_definition():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40, 3), generator=g).float()  # many ties
    targets = (torch.rand(40, 3, generator=g) < 0.4).long()
    ap = average_precision(scores, targets)
    for c in range(3):
        s, t = scores[:, c], targets[:, c].bool()
        thresholds = sorted(set(s.tolist()), reverse=True)
        total, prev_recall = 0.0, 0.0
        for th in thresholds:
            sel = s >= th
            recall = (sel & t).sum().item() / t.sum().item()
            precision = (sel & t).sum().item() / sel.sum().item()
            total += (recall - prev_recall) * precision
            prev_recall = recall
        assert ap[c].item() == pytest.approx(total)


def test_linear_probe_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    y = torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0.5], dim=1).float()
    clf = fit_linear_probe(x[:90], y[:90], weight_decays=(1e-3, 1e-1))
    m, ap = mean_average_precision(clf.scores(x[90:].double()), y[90:])
    assert m > 0.97
    assert set(clf.cv_map) == {1e-3, 1e-1}
