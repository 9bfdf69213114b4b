"""The pretraining methods of fastcon.train.methods on synthetic batches (no data set needed).

SwiMDiff's MoCo structure: the key queue keeps exactly the last K keys with their scene ids
(wrap-around included); the key encoder is the EMA of the query branch; the contrastive term
equals a dense computation over the batch keys and the queue (same-scene queue keys are
positives, or leave the softmax with scene_mode "ignore"); queue_size 0 is the batch-only loss;
an old checkpoint without key encoder / queue loads with a message. Two gloo ranks: the
objective's scaling gives the single-process gradients, and both ranks enqueue both ranks'
keys in rank order and hold identical queues.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastcon
from fastcon.models import S2_L1C_BANDS, cosine_momentum
from fastcon.train import DistInfo, KeyQueue, StepContext, build_method, load_config, setup, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "examples", "configs")
DEFAULTS = os.path.join(CONFIGS, "defaults.yaml")
CPU = DistInfo(0, 1, 0, torch.device("cpu"))
# a ResNet with one block per stage, 32 px crops: a SwiMDiff step in well under a second
TINY_SWIMDIFF = [
    "method=swimdiff",
    "model.name=resnet50",
    "model.timm_kwargs={layers: [1, 1, 1, 1], channels: [8, 16, 32, 64]}",
    "model.proj_hidden=32",
    "model.proj_dim=16",
    "model.proj_layers=2",
    "mask.keep=null",
    "mask.patch=16",
    "data.crop_size=32",
    "swimdiff.decoder_width=8",
    "swimdiff.timesteps=50",
    "train.precision=fp32",
    "optim.warmup_steps=0",
    "optim.lr=1e-2",
]


def swimdiff_config(*overrides):
    return load_config(os.path.join(CONFIGS, "demo.yaml"), [*TINY_SWIMDIFF, *overrides], defaults=DEFAULTS)


def fake_batch(n=6, seed=0, scenes=(0, 1, 2)):
    g = torch.Generator().manual_seed(seed)
    return {
        "view1": torch.randn(n, 13, 32, 32, generator=g),
        "view2": torch.randn(n, 13, 32, 32, generator=g),
        "scene_ids": torch.tensor([scenes[i % len(scenes)] for i in range(n)]),
        "labels": torch.rand(n, 8, generator=g),
    }


def context(batch, step=0):
    key = (0, step, 0, 0)
    return StepContext(batch["view1"], batch["view2"], batch, key, torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# the key queue


def test_queue_holds_the_last_k_keys_and_ids_across_a_wrap_around():
    queue = KeyQueue(10, 3)
    assert len(queue) == 0
    assert queue.contents()[0].shape == (0, 3)
    pushed_keys, pushed_ids = [], []
    for step in range(5):  # 4 keys a step: the ring wraps after the third step
        keys = torch.randn(4, 3)
        ids = torch.arange(4) + 100 * step
        queue.push(keys, ids)
        pushed_keys.append(keys)
        pushed_ids.append(ids)
        keys_all, ids_all = torch.cat(pushed_keys), torch.cat(pushed_ids)
        keep = min(10, keys_all.shape[0])
        got_keys, got_ids = queue.ordered()
        assert len(queue) == keep
        assert torch.equal(got_keys, keys_all[-keep:])
        assert torch.equal(got_ids, ids_all[-keep:])
        # what the loss sees: the same keys and ids, paired, in ring order
        k, i = queue.contents()
        assert sorted(zip(i.tolist(), k.sum(1).tolist())) == sorted(zip(got_ids.tolist(), got_keys.sum(1).tolist()))
    assert queue.ptr == 20 % 10
    # more keys than the queue holds: only the newest stay
    big = torch.randn(13, 3)
    queue.push(big, torch.arange(13))
    assert torch.equal(queue.ordered()[0], big[-10:])
    assert torch.equal(queue.ordered()[1], torch.arange(3, 13))


def test_queue_state_round_trips_and_resizes_keeping_the_newest():
    queue = KeyQueue(8, 2)
    for step in range(3):
        queue.push(torch.randn(3, 2), torch.arange(3) + 10 * step)
    same = KeyQueue(8, 2)
    same.load_state_dict(queue.state_dict())
    assert (same.ptr, same.count) == (queue.ptr, queue.count)
    assert torch.equal(same.keys, queue.keys)
    assert torch.equal(same.ids, queue.ids)
    smaller = KeyQueue(5, 2)
    smaller.load_state_dict(queue.state_dict())
    assert torch.equal(smaller.ordered()[0], queue.ordered()[0][-5:])
    assert torch.equal(smaller.ordered()[1], queue.ordered()[1][-5:])


def test_queue_rejects_keys_of_the_wrong_width():
    with pytest.raises(ValueError, match="keys must be"):
        KeyQueue(4, 3).push(torch.randn(2, 5), torch.arange(2))
    with pytest.raises(ValueError, match="queue size"):
        KeyQueue(0, 3)


# ---------------------------------------------------------------------------------------------
# the loss of one step against a dense computation


def dense_row_loss(q, k, ids, queue_keys, queue_ids, tau, scene_mode):
    """Row losses of queries q against the columns [k; queue] densely (SPEC 1b), averaged."""
    u = F.normalize(q.double(), dim=1)
    v = F.normalize(torch.cat([k, queue_keys]).double(), dim=1)
    s = u @ v.T / tau
    col_ids = torch.cat([ids, queue_ids])
    same = ids[:, None] == col_ids[None, :]
    n = q.shape[0]
    positive = torch.zeros_like(same)
    positive[:, :n] = torch.eye(n, dtype=torch.bool)
    if scene_mode == "positive":
        t = (same | positive).double()
        p = t / t.sum(1, keepdim=True)
        a = torch.logsumexp(s, 1) - (p * s).sum(1)
    else:
        keep = ~same | positive
        a = torch.logsumexp(s.masked_fill(~keep, float("-inf")), 1) - s[positive]
    return a.mean()


@pytest.mark.parametrize("scene_mode", ["positive", "ignore"])
def test_queue_loss_equals_the_dense_loss_with_same_scene_queue_keys(scene_mode):
    cfg = swimdiff_config("swimdiff.queue_size=9", f"swimdiff.scene_mode={scene_mode}")
    torch.manual_seed(0)
    method = build_method(cfg, CPU, S2_L1C_BANDS)
    batch = fake_batch(6, scenes=(0, 1, 2))
    # queue keys of the batch's scenes (0, 2) and of others (7, 8): the ones of 0 and 2 must count
    queue_ids = torch.tensor([0, 7, 2, 8, 0, 7, 2])
    method.queue.push(torch.randn(7, cfg.model.proj_dim), queue_ids)
    out = method.losses(context(batch))

    with torch.no_grad():
        x = torch.cat([batch["view1"], batch["view2"]])
        q1, q2 = method.student.online(x).chunk(2)
        k1, k2 = method.teacher(x).chunk(2)
    ids, (qk, qi) = batch["scene_ids"], method.queue.contents()
    tau = cfg.swimdiff.temperature
    want = 0.5 * (
        dense_row_loss(q1, k2, ids, qk, qi, tau, scene_mode) + dense_row_loss(q2, k1, ids, qk, qi, tau, scene_mode)
    )
    torch.testing.assert_close(out["loss_contrastive"].double(), want, rtol=1e-5, atol=1e-6)
    # the queue's scene ids matter: other ids give another loss
    other = 0.5 * (
        dense_row_loss(q1, k2, ids, qk, qi + 50, tau, scene_mode)
        + dense_row_loss(q2, k1, ids, qk, qi + 50, tau, scene_mode)
    )
    assert abs(float(other - want)) > 1e-3
    assert out["loss"].item() == pytest.approx(
        cfg.swimdiff.lambda_c * out["loss_contrastive"].item() + cfg.swimdiff.lambda_d * out["loss_diffusion"].item()
    )


def test_queue_size_0_is_the_batch_only_loss_without_key_encoder():
    cfg = swimdiff_config("swimdiff.queue_size=0")
    torch.manual_seed(0)
    method = build_method(cfg, CPU, S2_L1C_BANDS)
    assert method.teacher is None
    assert method.queue is None
    assert "queue" not in method.state_dict()
    batch = fake_batch(6)
    out = method.losses(context(batch))
    with torch.no_grad():
        z1, z2 = method.student.online(torch.cat([batch["view1"], batch["view2"]])).chunk(2)
    s = cfg.swimdiff
    want = fastcon.reference.soft_contrastive_loss(
        z1.double(), z2.double(), batch["scene_ids"], temperature=s.temperature, symmetric=True, scene_mode=s.scene_mode
    )
    torch.testing.assert_close(out["loss_contrastive"].double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the key encoder


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_key_encoder_is_the_ema_of_the_query_branch(schedule):
    cfg = swimdiff_config(
        "swimdiff.queue_size=64", "swimdiff.key_momentum=0.9", f"swimdiff.key_momentum_schedule={schedule}",
        "train.steps=4",
    )  # fmt: skip
    run = setup(cfg, CPU, S2_L1C_BANDS)
    method = run.method
    key_encoder, query = method.teacher.module, method.student.online
    for p, q in zip(key_encoder.parameters(), query.parameters()):
        assert torch.equal(p, q)  # starts as a copy
        assert not p.requires_grad
    before = [p.clone() for p in key_encoder.parameters()]
    batch = fake_batch(6)
    train_step(run, iter([batch]))
    m = 0.9 if schedule == "constant" else cosine_momentum(1, 4, 0.9)
    assert run.extra["momentum"] == pytest.approx(m)
    changed = 0
    for old, p, q in zip(before, key_encoder.parameters(), query.parameters()):
        torch.testing.assert_close(p, m * old + (1 - m) * q.detach(), rtol=1e-6, atol=1e-7)
        changed += not torch.equal(p, q)
    assert changed > 0  # the query branch moved on; the key encoder followed only part of the way
    # the step's keys (both views, with their scene ids) are in the queue
    assert len(method.queue) == 12
    assert torch.equal(method.queue.ordered()[1], torch.cat([batch["scene_ids"], batch["scene_ids"]]))


def test_checkpoint_without_key_encoder_and_queue_loads_with_a_message(capsys):
    cfg = swimdiff_config("swimdiff.queue_size=16")
    torch.manual_seed(0)
    old = build_method(cfg, CPU, S2_L1C_BANDS)
    with torch.no_grad():
        for p in old.student.parameters():
            p.add_(0.5)
    state = {"student": old.student.state_dict(), "teacher": None}  # what swimdiff checkpoints held before
    torch.manual_seed(1)
    new = build_method(cfg, CPU, S2_L1C_BANDS)
    new.student.load_state_dict(state["student"])
    new.load_state_dict(state)
    assert "no SwiMDiff key encoder or queue" in capsys.readouterr().err
    for p, q in zip(new.teacher.module.parameters(), old.student.online.parameters()):
        assert torch.equal(p, q)
    assert len(new.queue) == 0


def test_bad_swimdiff_settings_are_clear_errors():
    with pytest.raises(ValueError, match="key_momentum_schedule"):
        build_method(swimdiff_config("swimdiff.key_momentum_schedule=linear"), CPU, S2_L1C_BANDS)
    with pytest.raises(ValueError, match="queue_size"):
        build_method(swimdiff_config("swimdiff.queue_size=-1"), CPU, S2_L1C_BANDS)


# ---------------------------------------------------------------------------------------------
# two processes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script, *args):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        str(script), *args,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("FASTCON_BACKEND", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


DDP_GRADIENT_SCRIPT = """
import copy, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from fastcon.train import DistInfo, Method, ddp_objective, load_config

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
n = 6 * world
x = torch.randn(2 * n, 5, dtype=torch.float64)       # two views of n samples
target = torch.randn(n, 4, dtype=torch.float64)
labels = torch.rand(n, 3, dtype=torch.float64)
model = torch.nn.Linear(5, 4).double()
single = copy.deepcopy(model)
queue = torch.randn(7, 4, dtype=torch.float64)  # the same (replicated) key queue on every rank
queue_ids = torch.tensor([0, 1, 5, 9, 2, 0, 7])
for method in ("softcon", "swimdiff", "swimdiff_queue"):
    name = method.split("_")[0]
    cfg = load_config(sys.argv[1], [f"method={name}", "swimdiff.lambda_d=0.7"], defaults=sys.argv[2])

    def losses(info, net, rows):
        z = net(torch.cat([x[:n][rows], x[n:][rows]]))
        z1, z2 = z.chunk(2)
        lab = labels[rows] if method == "softcon" else (torch.arange(n)[rows] // 3)
        kw = dict(temperature=0.2, symmetric=True)
        if method == "swimdiff_queue":
            kw.update(symmetric=False, queue=queue, queue_labels=queue_ids)
        loss_c = Method(cfg, info).contrastive(z1, z2, lab, **kw)
        if method == "softcon":
            return ddp_objective(loss_c, info.world_size, 1)
        loss_d = ((z1 - target[rows]) ** 2).mean()  # stands in for the diffusion loss: a local mean
        return ddp_objective(loss_c, info.world_size, 1, loss_d, 1.0, 0.7)

    ddp = DDP(model)
    model.zero_grad()
    mine = torch.arange(rank * (n // world), (rank + 1) * (n // world))
    losses(DistInfo(rank, world, rank, torch.device("cpu")), ddp, mine).backward()
    single.zero_grad()
    losses(DistInfo(0, 1, 0, torch.device("cpu")), single, torch.arange(n)).backward()
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
    DDP's average over 2 gloo ranks, the gradient one process computes on the whole batch, with and
    without a key queue."""
    script = tmp_path / "ddp_gradients.py"
    script.write_text(DDP_GRADIENT_SCRIPT)
    proc = _torchrun(script, os.path.join(CONFIGS, "demo.yaml"), DEFAULTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        for method in ("softcon", "swimdiff", "swimdiff_queue"):
            assert f"rank {rank} {method}: DDP gradients equal" in proc.stdout


QUEUE_SCRIPT = """
import sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from test_methods import S2_L1C_BANDS, fake_batch, swimdiff_config
from fastcon.train import init_distributed, setup, shutdown_distributed, train_step

info = init_distributed("cpu")
rank = info.rank
cfg = swimdiff_config("swimdiff.queue_size=20")  # 2 ranks x 2 views x 4 keys a step: wraps at step 3
run = setup(cfg, info, S2_L1C_BANDS)
expected_keys, expected_ids = [], []
for step in range(3):
    batch = fake_batch(4, seed=10 * step + rank, scenes=(rank, 5 + step))
    # this step's keys as the key encoder computes them before its EMA update
    with torch.no_grad():
        k = run.method.teacher(torch.cat([batch["view1"], batch["view2"]]))
    mine = [k, torch.cat([batch["scene_ids"], batch["scene_ids"]])]
    everyone = [None, None]
    dist.all_gather_object(everyone, mine)
    expected_keys += [e[0] for e in everyone]  # rank order
    expected_ids += [e[1] for e in everyone]
    train_step(run, iter([batch]))
keys, ids = run.method.queue.ordered()
want_keys, want_ids = torch.cat(expected_keys)[-20:], torch.cat(expected_ids)[-20:]
torch.testing.assert_close(keys, want_keys, rtol=1e-5, atol=1e-6)
assert torch.equal(ids, want_ids), (ids, want_ids)
queues = [None, None]
dist.all_gather_object(queues, run.method.queue.state_dict())
assert all(torch.equal(queues[0][k], queues[1][k]) for k in ("keys", "ids")), "ranks hold different queues"
assert queues[0]["ptr"] == queues[1]["ptr"] == (3 * 16) % 20
print(f"rank {rank}: queue holds both ranks' keys in rank order, identical on both ranks")
# leave as pretrain.py does: release the Run (its DDP holds the group), then leave the group; gloo's
# threads must be gone then (a group still held at exit can abort the process after a good run)
del run
dist.barrier()
shutdown_distributed()
import os
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
assert not [t for t in threads if "gloo" in t], threads
print(f"rank {rank}: no gloo thread left after shutdown_distributed")
"""


def test_two_ranks_enqueue_both_ranks_keys_and_hold_identical_queues(tmp_path):
    script = tmp_path / "queue_ranks.py"
    script.write_text(QUEUE_SCRIPT)
    proc = _torchrun(script, os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"rank {rank}: queue holds both ranks' keys in rank order" in proc.stdout
        assert f"rank {rank}: no gloo thread left after shutdown_distributed" in proc.stdout
