"""examples/pretrain.py, examples/evaluate.py (--dataset sample) and examples/demo.py on the real sample, at tiny model sizes on the CPU.

Every config family runs a few steps; the loss falls on a fixed batch; a run stopped at step k
(by train.stop_at or by SIGTERM) and resumed equals the uninterrupted run bit for bit; a
non-finite loss stops the run naming the step and keeps the last checkpoint (or is skipped);
a corrupt checkpoint is a clear error; two torchrun processes (gloo) agree on the loss.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastcon.train import CheckpointDir, load_checkpoint, load_config, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
CONFIGS = os.path.join(EXAMPLES, "configs")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


pretrain = _load("pretrain")
evaluate = _load("evaluate")
sys.path.insert(0, EXAMPLES)  # demo.py imports its sibling scripts
demo = _load("demo")

# fastcon ops as a run picks them (auto: the fused cpu kernels)
OPS = "ops.backend=auto"
TINY = [
    "model.timm_kwargs={depth: 1, embed_dim: 48, num_heads: 2}",
    "data.crop_size=28",
    "data.batch_size=16",
    "data.num_workers=0",
    "model.proj_hidden=64",
    "model.proj_dim=32",
    "model.pred_hidden=64",
    "log.every=1",
    "log.progress=false",
    "checkpoint.every=1000",
    "optim.warmup_steps=1",
    OPS,
]
TINY_RESNET = [
    "model.timm_kwargs={layers: [1, 1, 1, 1], channels: [8, 16, 32, 64]}",
    "data.crop_size=32",
    "mask.patch=16",
]
TINY_RESNET += [t for t in TINY if not t.startswith(("model.timm_kwargs", "data.crop_size"))]
TINY_RESNET += ["swimdiff.decoder_width=8", "swimdiff.timesteps=50"]
# the realistic configs ask for GPU features; on the CPU they run in fp32 without compile
CPU = ["model.compile=false", "train.precision=fp32", "model.weights=null"]


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """The bundled real Sentinel-2 sample (253 tiles of 13 x 128 x 128, 8 OSM classes)."""
    from fastcon.data import prepare_sample

    out = str(tmp_path_factory.mktemp("sample"))
    prepare_sample(out, progress=False)
    return out


@pytest.fixture(scope="session")
def s1_sample(tmp_path_factory):
    """A Sentinel-1-like (VV, VH in dB) two-band version of the sample, with the same OSM labels."""
    import rasterio

    from fastcon.data import prepare
    from fastcon.data.sample import CLASS_FIELD, LANDCOVER_FILE, sample_dir

    src_dir = os.path.join(sample_dir(), "IMG_DATA")
    bands = []
    for b in ("B04", "B08"):
        with rasterio.open(os.path.join(src_dir, f"T33UUU_20170216T102101_{b}.jp2")) as r:
            profile = r.profile
            bands.append(10 * np.log10(r.read(1).astype(np.float32) / 10000 + 1e-3))  # "backscatter" in dB
    folder = tmp_path_factory.mktemp("s1_raw")
    tif = str(folder / "S1_20170216.tif")
    profile.update(driver="GTiff", count=2, dtype="float32", nodata=None)
    with rasterio.open(tif, "w", **profile) as dst:
        dst.write(np.stack(bands))
        dst.descriptions = ("VV", "VH")
    out = str(tmp_path_factory.mktemp("s1"))
    prepare(
        [tif], out, band_set="s1", layout="multiband", landcover=os.path.join(sample_dir(), LANDCOVER_FILE),
        class_field=CLASS_FIELD, tile_size=64, stride=64, scene_block=1280.0, workers=0, progress=False,
    )  # fmt: skip
    return out


def config(name, *overrides, data=None, out=None):
    extra = [f"data.root={data}"] if data else []
    extra += [f"run.out_dir={out}"] if out else []
    return load_config(os.path.join(CONFIGS, f"{name}.yaml"), [*extra, *overrides], defaults=pretrain.DEFAULTS)


def assert_same_state(a, b, what=""):
    """Bit-identical nested state (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), what
        assert a.dtype == b.dtype, what
        assert torch.equal(a, b), what
    elif isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            assert_same_state(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{what}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{what}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------------------------
# every config family builds and trains


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("demo", TINY),
        ("softcon_vits14_s2", TINY + CPU),
        ("swimdiff_resnet50_s2", [*TINY_RESNET, *CPU, "model.channels_last=true"]),  # the GPU memory format
        ("demo", [*TINY, "method=swimdiff", "mask.keep=null", "swimdiff.decoder_width=8"]),  # SwiMDiff on a ViT
        ("demo", [*TINY, "softcon.loss=sigmoid", "softcon.bias=-1.0", "softcon.use_labels=false"]),
    ],
    ids=["demo", "softcon_vits14_s2", "swimdiff_resnet50_s2", "swimdiff_vit", "softcon_sigmoid_no_labels"],
)
def test_config_family_runs_a_few_steps(sample, tmp_path, name, overrides):
    cfg = config(name, *overrides, "train.steps=2", data=sample, out=tmp_path / "run")
    summary = pretrain.train(cfg)
    assert summary["steps"] == 2
    assert summary["end"] == "finished"
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in pretrain.LOSS_TERMS[cfg.method]:
            assert np.isfinite(r[k]), (k, r)
        assert r["images_per_s"] > 0
        assert r["compute_s_per_step"] > 0
        assert r["peak_mem_mib"] > 0
    for f in ("config.yaml", "metrics.csv", "loss.png", "summary.json", "encoder.safetensors"):
        assert (tmp_path / "run" / f).is_file(), f
    assert load_config(tmp_path / "run" / "config.yaml", defaults=pretrain.DEFAULTS) == cfg


@pytest.mark.parametrize(
    ("name", "overrides"), [("demo", TINY), ("swimdiff_resnet50_s2", [*TINY_RESNET, *CPU])], ids=["softcon", "swimdiff"]
)
def test_bf16_autocast_and_gradient_accumulation(sample, tmp_path, name, overrides):
    # bf16 autocast is the GPU default; the CPU runs the same code path
    cfg = config(
        name, *overrides, "train.precision=bf16", "train.accum_steps=2", "train.steps=1", data=sample, out=tmp_path
    )
    summary = pretrain.train(cfg)
    assert np.isfinite(summary["final_loss"])
    state = load_checkpoint(summary["checkpoint"])
    assert state["loader"]["step"] == 2  # two micro-batches per optimiser step
    assert all(v.dtype == torch.float32 for v in state["student"].values() if v.is_floating_point())


def test_s1_config_runs_on_two_bands(s1_sample, tmp_path):
    cfg = config("softcon_vitb14_s1", *TINY, *CPU, "train.steps=2", data=s1_sample, out=tmp_path / "run")
    cfg.model.timm_kwargs = {"depth": 1, "embed_dim": 48, "num_heads": 2, "drop_path_rate": 0.1}
    summary = pretrain.train(cfg)
    assert summary["steps"] == 2
    assert np.isfinite(summary["final_loss"])
    ckpt = load_checkpoint(summary["checkpoint"])
    assert ckpt["student"]["online.encoder.backbone.patch_embed.proj.weight"].shape[1] == 2


def test_encoder_safetensors_load_in_timm(sample, tmp_path):
    import timm

    cfg = config("demo", *TINY, "train.steps=1", data=sample, out=tmp_path)
    summary = pretrain.train(cfg)
    model = timm.create_model(
        cfg.model.name, pretrained=True, pretrained_cfg_overlay=dict(file=summary["encoder"]),
        in_chans=13, num_classes=0, img_size=cfg.data.crop_size, **cfg.model.timm_kwargs,
    )  # fmt: skip
    student = load_checkpoint(summary["checkpoint"])["student"]
    prefix = "online.encoder.backbone."
    for k, v in model.state_dict().items():
        assert torch.equal(v, student[prefix + k]), k


def test_pretraining_never_sees_the_probe_test_region(sample):
    from fastcon.data import TileDataset, spatial_split

    cfg = config("demo", *TINY, data=sample)
    loader = pretrain.make_data(cfg)
    _, test = spatial_split(TileDataset(sample), cfg.data.holdout_fraction, axis=cfg.data.holdout_axis)
    seen = {int(i) for b in loader for i in b["indices"]}
    assert seen
    assert not seen & set(test.tolist())


# ---------------------------------------------------------------------------------------------
# learning


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("demo", [*TINY, "softcon.hard_weight=0.5"]), ("swimdiff_resnet50_s2", [*TINY_RESNET, *CPU])],
)
def test_loss_decreases_on_a_fixed_batch(sample, tmp_path, name, overrides):
    cfg = config(name, *overrides, "train.steps=12", "optim.lr=2e-3", "optim.warmup_steps=0", data=sample)
    info = pretrain.init_distributed("cpu")
    loader = pretrain.make_data(cfg)
    batch = next(iter(loader))
    with pretrain.ops_backend(cfg.ops.backend):
        run = pretrain.setup(cfg, info, loader.band_names)
        losses = [pretrain.train_step(run, iter([batch]))["loss"] for _ in range(12)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


# ---------------------------------------------------------------------------------------------
# exact resume


def _final_state(out):
    return load_checkpoint(CheckpointDir(os.path.join(out, "checkpoints")).latest())


def _compare_runs(a, b):
    sa, sb = _final_state(a), _final_state(b)
    assert sa["step"] == sb["step"]
    for key in ("student", "teacher", "optimizer", "scheduler", "loader"):
        assert_same_state(sa[key], sb[key], key)
    assert_same_state(sa["rng"], sb["rng"], "rng")
    ra, rb = read_metrics(os.path.join(a, "metrics.csv")), read_metrics(os.path.join(b, "metrics.csv"))
    assert [(r["step"], r["loss"], r["lr"]) for r in ra] == [(r["step"], r["loss"], r["lr"]) for r in rb]


@pytest.mark.parametrize(
    ("name", "overrides"), [("demo", TINY), ("swimdiff_resnet50_s2", [*TINY_RESNET, *CPU])], ids=["softcon", "swimdiff"]
)
def test_stop_and_resume_is_bit_identical(sample, tmp_path, name, overrides):
    full, parts = str(tmp_path / "full"), str(tmp_path / "parts")
    common = [*overrides, "train.steps=5", "checkpoint.every=2", "log.every=2"]
    pretrain.train(config(name, *common, data=sample, out=full))
    summary = pretrain.train(config(name, *common, "train.stop_at=3", data=sample, out=parts))
    assert summary["steps"] == 3
    assert "train.stop_at" in summary["end"]
    assert CheckpointDir(os.path.join(parts, "checkpoints")).latest().name == "step_00000003.ckpt"
    resumed = pretrain.train(config(name, *common, data=sample, out=parts), resume="auto")
    assert resumed["steps"] == 5
    _compare_runs(full, parts)


def test_time_limit_stops_with_a_checkpoint(sample, tmp_path):
    cfg = config("demo", *TINY, "train.steps=50", "train.max_minutes=0.00001", data=sample, out=tmp_path)
    summary = pretrain.train(cfg)
    assert summary["steps"] == 1
    assert "max_minutes" in summary["end"]
    assert load_checkpoint(summary["checkpoint"])["step"] == 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("FASTCON_BACKEND", None)
    return env


def test_sigterm_checkpoints_exits_cleanly_and_resumes_exactly(sample, tmp_path):
    out = str(tmp_path / "killed")
    # the default worker-process loader here, to cover resuming it too; the subprocess keeps torch's
    # thread count, as this process does (float sums depend on it)
    args = [*TINY, "data.num_workers=1", "train.steps=400", "checkpoint.every=1000", f"data.root={sample}"]
    cmd = [sys.executable, os.path.join(EXAMPLES, "pretrain.py"), "--config", os.path.join(CONFIGS, "demo.yaml")]
    proc = subprocess.Popen(
        [*cmd, *args, f"run.out_dir={out}"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = os.path.join(out, "metrics.csv")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(read_metrics(metrics)) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be stopped:\n" + proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert_stopped_then_resumes_exactly(proc.returncode, output, out, args, str(tmp_path / "straight"))


def assert_stopped_then_resumes_exactly(returncode, output, out, args, straight):
    """A run of ``args`` stopped by SIGTERM: exit 0 and a stop checkpoint at its step k; resumed
    for two more steps, it equals an uninterrupted run (into ``straight``) to the same step."""
    assert returncode == 0, output
    assert "stopped by SIGTERM" in output
    state, path = CheckpointDir(os.path.join(out, "checkpoints")).load()
    k = state["step"]
    assert 3 <= k < 400
    assert path.name == f"step_{k:08d}.ckpt"
    args = [*args, f"train.stop_at={k + 2}"]
    pretrain.train(config("demo", *args, out=out), resume="auto")
    pretrain.train(config("demo", *args, out=straight))
    _compare_runs(out, straight)


# ---------------------------------------------------------------------------------------------
# failures


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_checkpoint(sample, tmp_path, capsys):
    out = str(tmp_path / "nan")
    args = [
        "--config", os.path.join(CONFIGS, "demo.yaml"), *TINY, f"data.root={sample}", f"run.out_dir={out}",
        "train.steps=6", "checkpoint.every=2", "train.debug_nan_at_step=4",
    ]  # fmt: skip
    assert pretrain.main(args) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 4" in err
    assert "step_00000002.ckpt is kept unchanged" in err
    ckpts = CheckpointDir(os.path.join(out, "checkpoints"))
    assert [p.name for p in ckpts.all()] == ["step_00000002.ckpt"]
    state, _ = ckpts.load()
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_nonfinite_step_is_skipped_when_configured(sample, tmp_path):
    cfg = config(
        "demo", *TINY, "train.steps=5", "train.debug_nan_at_step=3", "train.skip_nonfinite=true",
        data=sample, out=tmp_path,
    )  # fmt: skip
    summary = pretrain.train(cfg)
    assert summary["steps"] == 5
    assert summary["skipped_steps"] == 1
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 0]
    assert np.isnan(rows[2]["loss"])
    assert np.isfinite(rows[3]["loss"])
    state = load_checkpoint(summary["checkpoint"])
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_corrupt_checkpoint_is_a_clear_error_and_the_previous_is_kept(sample, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["--config", os.path.join(CONFIGS, "demo.yaml"), *TINY, f"data.root={sample}", f"run.out_dir={out}"]
    assert pretrain.main([*args, "train.steps=4", "checkpoint.every=2"]) == 0
    ckpts = CheckpointDir(os.path.join(out, "checkpoints"))
    newest = ckpts.latest()
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    capsys.readouterr()
    assert pretrain.main([*args, "train.steps=6", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "step_00000004.ckpt is corrupt" in err
    assert "step_00000002.ckpt is intact" in err
    assert load_checkpoint(ckpts.path_for(2))["step"] == 2


def test_bad_config_key_is_a_clear_error(capsys):
    assert pretrain.main(["--config", os.path.join(CONFIGS, "demo.yaml"), "optim.lrate=1"]) == 1
    assert "unknown config key 'optim.lrate'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# two processes


def test_torchrun_two_processes_agree_on_the_loss(sample, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        os.path.join(EXAMPLES, "pretrain.py"), "--config", os.path.join(CONFIGS, "demo.yaml"), *TINY,
        f"data.root={sample}", f"run.out_dir={out}", "train.steps=3", "data.batch_size=8", "log.rank_losses=true",
        "run.device=cpu",
    ]  # fmt: skip
    # one thread per process: two processes share the cores
    proc = subprocess.run(cmd, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 rank(s)" in proc.stdout
    ranks = [np.loadtxt(os.path.join(out, f"rank{r}_losses.csv"), delimiter=",") for r in (0, 1)]
    assert ranks[0].shape == (3, 3)
    # the global-batch contrastive loss, computed on each rank independently
    np.testing.assert_allclose(ranks[0][:, 1], ranks[1][:, 1], rtol=1e-5)
    assert np.isfinite(ranks[0]).all()
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["world_size"] == 2
    assert summary["steps"] == 3
    assert [p.name for p in CheckpointDir(os.path.join(out, "checkpoints")).all()] == ["step_00000003.ckpt"]


DDP_GRADIENT_SCRIPT = """
import copy, importlib.util, sys, types
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from fastcon.train import DistInfo, load_config

spec = importlib.util.spec_from_file_location("pretrain", sys.argv[1])
pretrain = importlib.util.module_from_spec(spec); sys.modules["pretrain"] = pretrain; spec.loader.exec_module(pretrain)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
n = 6 * world
x = torch.randn(2 * n, 5, dtype=torch.float64)       # two views of n samples
target = torch.randn(n, 4, dtype=torch.float64)
labels = torch.rand(n, 3, dtype=torch.float64)
model = torch.nn.Linear(5, 4).double()
single = copy.deepcopy(model)
for method in ("softcon", "swimdiff"):
    cfg = load_config(sys.argv[2], [f"method={method}", "swimdiff.lambda_d=0.7"], defaults=pretrain.DEFAULTS)

    def losses(run, net, rows):
        z = net(torch.cat([x[:n][rows], x[n:][rows]]))
        z1, z2 = z.chunk(2)
        lab = labels[rows] if method == "softcon" else (torch.arange(n)[rows] // 3)
        kw = dict(temperature=0.2, symmetric=True)
        loss_c = pretrain.contrastive(run, z1, z2, lab, **kw)
        loss_d = ((z1 - target[rows]) ** 2).mean()  # stands in for the diffusion loss: a local mean
        return pretrain.ddp_objective(run, loss_c, None if method == "softcon" else loss_d)

    ddp = DDP(model)
    model.zero_grad()
    run = types.SimpleNamespace(cfg=cfg, info=DistInfo(rank, world, rank, torch.device("cpu")))
    mine = torch.arange(rank * (n // world), (rank + 1) * (n // world))
    losses(run, ddp, mine).backward()
    single.zero_grad()
    run1 = types.SimpleNamespace(cfg=cfg, info=DistInfo(0, 1, 0, torch.device("cpu")))
    losses(run1, single, torch.arange(n)).backward()
    for p, q in zip(model.parameters(), single.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    print(f"rank {rank} {method}: DDP gradients equal the single-process gradients")
    del ddp
# leave together: a rank exiting while gloo threads still talk to the other aborts it
dist.barrier()
dist.destroy_process_group()
"""


def test_ddp_gradients_equal_the_single_process_gradients(tmp_path):
    """The objective's scaling (contrastive term times W, diffusion-like local mean as is) gives, after
    DDP's average over 2 gloo ranks, the gradient one process computes on the whole batch."""
    script = tmp_path / "ddp_gradients.py"
    script.write_text(DDP_GRADIENT_SCRIPT)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        str(script), os.path.join(EXAMPLES, "pretrain.py"), os.path.join(CONFIGS, "demo.yaml"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        for method in ("softcon", "swimdiff"):
            assert f"rank {rank} {method}: DDP gradients equal" in proc.stdout


# ---------------------------------------------------------------------------------------------
# linear probe


def test_evaluate_sample_pretrained_and_random(sample, tmp_path):
    cfg = config("demo", *TINY, "train.steps=2", data=sample, out=tmp_path)
    pretrain.train(cfg)
    reports = {}
    for name, extra in (("pre", []), ("rnd", ["--random-init"])):
        out = tmp_path / f"{name}.json"
        assert evaluate.main(["--dataset", "sample", "--run", str(tmp_path), "--out", str(out), *extra]) == 0
        reports[name] = json.load(open(out))
        # features are cached beside the output
        assert len(list((tmp_path / f"{name}.features").glob("sample_*.pt"))) == 2
    for r in reports.values():
        rows = {row["metric"]: row for row in r["results"]}
        assert set(rows) == {"map_micro", "map_macro"}
        for row in rows.values():
            assert 0.0 < row["value"] <= 1.0
            assert row["n_train"] > row["n_test"] > 0
            assert (row["dataset"], row["split"], row["protocol"]) == ("sample", "test", "linear")
        assert set(r["details"]["per_class_ap"]) == {
            "farm", "forest", "grass", "meadow", "residential", "scrub", "water", "wetland",
        }  # fmt: skip
        assert r["details"]["selected_on"] == "cv"  # the sample has no validation split
    assert reports["pre"]["encoder"]["weights"].endswith("encoder.safetensors")
    assert reports["rnd"]["encoder"]["weights"].startswith("random init")
    assert reports["pre"]["results"][1]["value"] != reports["rnd"]["results"][1]["value"]
    # the final training checkpoint holds the same encoder as encoder.safetensors
    ckpt = CheckpointDir(tmp_path / "checkpoints").latest()
    argv = ["--dataset", "sample", "--run", str(tmp_path), "--weights", str(ckpt), "--out", str(tmp_path / "c.json")]
    assert evaluate.main(argv) == 0
    assert json.load(open(tmp_path / "c.json"))["results"] == reports["pre"]["results"]
    # a second run reads the cached features and gives the same numbers
    assert evaluate.main(["--dataset", "sample", "--run", str(tmp_path), "--out", str(tmp_path / "pre.json")]) == 0
    assert json.load(open(tmp_path / "pre.json"))["results"] == reports["pre"]["results"]


def test_demo_end_to_end_at_tiny_size(sample, tmp_path, capsys):
    args = ["--data", sample, *TINY, f"run.out_dir={tmp_path / 'demo'}", "train.steps=3"]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    for text in ("images/s", "loss ", "linear probe mAP pretrained", "vs random init", "loss.png", "metrics.csv"):
        assert text in out, text
    summary = json.load(open(tmp_path / "demo" / "summary.json"))
    for name in ("pretrained", "random"):
        assert 0.0 < summary["probe"][name]["map_macro"] <= 1.0
        assert 0.0 < summary["probe"][name]["map_micro"] <= 1.0
        report = json.load(open(tmp_path / "demo" / f"eval_{name}.json"))
        assert {r["metric"]: r["value"] for r in report["results"]} == summary["probe"][name]
    # a rerun reports the finished run instead of training again
    assert demo.main(args) == 0
    assert "already finished its 3 steps" in capsys.readouterr().out
