"""fastcon.soft_contrastive_loss over a process group (SPEC section 4), both modes.

Every case runs on 2 and 3 gloo ranks on CPU; each rank's loss and the gradients gathered from
the ranks are compared with the float64 dense reference of the single-process loss over the
concatenated batch (rank order). Process start-up dominates the cost, so one spawned group per
world size runs every case (results come back through files) and the tests below read them.
A hung collective fails the test at the timeout instead of stalling the run.

- every fused backend of the loss suite in fp32 (cpu; triton under its interpreter; the CUDA
  kernels on the SIMT emulator), SPEC tolerances, and the dense kernel contract in float64
  (exact algebra and communication, 1e-11 / 1e-9);
- a DDP toy model whose parameter gradients equal the single-process ones under the documented
  convention (loss scaled by the world size);
- subgroups (global-rank translation; a group of one);
- one test per kind of bad input, cross-rank mismatches included.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_soft_contrastive import FUSED, _kw, assert_rel, make_labels

import fastcon
from fastcon import reference

# the fused backends of the loss suite (test_soft_contrastive.FUSED: cpu, and triton / the CUDA
# kernels on their CPU stand-ins) in fp32, and the dense kernel contract in float64. The gloo ranks
# hold CPU tensors, which triton takes under its interpreter only (set by conftest without a GPU).
CPU_FUSED = [b for b in FUSED if b != "triton" or os.environ.get("TRITON_INTERPRET") == "1"]
WORLD_SIZES = [2, 3]
MODES = ["gather", "ring"]
TIMEOUT_S = 300  # per spawned group; the whole run takes well under a minute when nothing hangs

# (labels kind, loss form, hard weight, normalize, learnable tau (and bias), reduction, tau, N_local)
CASES = [
    ("multi_hot", "softmax_sym", 0.0, True, True, "mean", 0.2, 7),
    ("fractions", "softmax", 0.3, True, False, "sum", 0.1, 5),
    ("zero_rows", "softmax_sym", 0.5, False, True, "none", 0.5, 11),
    ("scene", "softmax_sym", 0.0, True, True, "mean", 0.1, 13),
    ("scene_big_ids", "softmax", 0.3, True, True, "none", 0.2, 8),
    ("scene_ignore", "softmax_sym", 0.0, True, True, "none", 0.1, 9),
    ("scene_ignore", "softmax", 0.0, True, False, "mean", 0.05, 6),
    ("scene_ignore_spanning", "softmax_sym", 0.0, True, True, "mean", 0.1, 8),
    ("none", "softmax_sym", 0.0, True, True, "mean", 0.01, 17),
    ("none", "softmax", 0.3, True, False, "sum", 0.1, 5),
    ("multi_hot", "sigmoid", 0.3, True, True, "mean", 0.1, 10),
    ("scene", "sigmoid", 0.0, True, True, "sum", 0.2, 7),
    ("none", "sigmoid", 0.0, False, True, "none", 0.3, 12),
    ("fractions", "softmax_sym", 0.3, False, True, "mean", 0.05, 15),
    ("multi_hot", "softmax_sym", 0.0, True, True, "mean", 0.01, 16),
]
# with a key queue (SPEC 1b; softmax cases are row losses only): (case, K)
QUEUE_CASES = [
    (("multi_hot", "softmax", 0.3, True, True, "mean", 0.2, 7), 5),
    (("scene", "sigmoid", 0.0, True, True, "none", 0.1, 6), 37),
    (("scene_ignore", "softmax", 0.0, True, True, "none", 0.1, 9), 11),
    (("none", "softmax", 0.0, True, True, "sum", 0.1, 5), 1),
    (("fractions", "sigmoid", 1.0, False, True, "mean", 0.3, 4), 20),
    (("zero_rows", "softmax", 0.3, True, False, "mean", 0.05, 8), 13),
]
PRECISIONS = {  # name: (backend, dtype, loss tolerance, gradient tolerance)
    **{f"{b}_fp32": (b, torch.float32, 1e-5, 1e-4) for b in CPU_FUSED},
    "dense_f64": ("reference", torch.float64, 1e-11, 1e-9),
}


def case_id(case) -> str:
    labels_kind, lossconf, hw, norm, learn, red, tau, n = case
    return f"{labels_kind}-{lossconf}-hw{hw}-{'norm' if norm else 'raw'}-{'learn' if learn else 'fixed'}-{red}-tau{tau}-n{n}"


def global_inputs(case, world: int, seed: int, queue_k: int = 0):
    """The global batch of a case (identical on every rank): z1, z2 (float64), labels, upstream,
    and with queue_k > 0 the replicated queue and its labels (else None, None)."""
    labels_kind, lossconf, hw, norm, learn, red, tau, n = case
    big = world * n
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 if norm else 0.3
    z1 = torch.randn(big, 11, generator=gen, dtype=torch.float64) * scale
    z2 = z1 + 0.7 * scale * torch.randn(big, 11, generator=gen, dtype=torch.float64)
    kind = labels_kind if labels_kind in ("multi_hot", "fractions", "zero_rows", "none") else "scene"
    labels = make_labels(kind, big, 4, gen)
    if labels_kind == "scene_big_ids":  # arbitrary int64 ids, not 0..S-1
        labels = labels * 7_919_000_003 - 2**40
    if labels_kind == "scene_ignore_spanning":
        # one scene over rank 0 and half of rank 1, the rest all different: on rank 0, half of rank
        # 1's columns have every pair masked (a -inf partial log-sum-exp), and so do rank 0's rows there
        idx = torch.arange(big)
        labels = torch.where(idx < n + n // 2, 0, idx)
    upstream = torch.rand(big, generator=gen, dtype=torch.float64) if red == "none" else None
    queue = queue_labels = None
    if queue_k:
        queue = torch.randn(queue_k, 11, generator=gen, dtype=torch.float64) * scale
        if kind == "scene":  # some scenes shared with the batch, some only in the queue
            queue_labels = torch.randint(0, big // 3 + 3, (queue_k,), generator=gen)
        else:
            queue_labels = make_labels(kind, queue_k, 4, gen)
    return z1, z2, labels, upstream, queue, queue_labels


def case_kwargs(case):
    labels_kind, lossconf, hw, norm, learn, red, tau, n = case
    return _kw(lossconf, "scene_ignore" if "ignore" in labels_kind else labels_kind, hw, norm, red, tau=tau)


def run_case(case, world, rank, group, mode, backend, dtype, seed, queue_k=0):
    """This rank's loss and gradients for one case."""
    labels_kind, lossconf, hw, norm, learn, red, tau, n = case
    z1, z2, labels, upstream, queue, queue_labels = global_inputs(case, world, seed, queue_k)
    rows = slice(rank * n, (rank + 1) * n)
    kw = case_kwargs(case)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a = z1[rows].to(dtype).requires_grad_(True)
    b = z2[rows].to(dtype).requires_grad_(True)
    inputs = [a, b]
    if learn:
        kw["temperature"] = torch.tensor(tau, dtype=acc, requires_grad=True)
        inputs.append(kw["temperature"])
        if lossconf == "sigmoid":
            kw["bias"] = torch.tensor(kw["bias"], dtype=acc, requires_grad=True)
            inputs.append(kw["bias"])
    lab = None if labels is None else labels[rows]
    if queue is not None:
        kw.update(queue=queue.to(dtype), queue_labels=queue_labels)
    out = fastcon.soft_contrastive_loss(a, b, lab, backend=backend, group=group, distributed=mode, **kw)
    go = torch.ones_like(out) if upstream is None else upstream[rows].to(out)
    grads = torch.autograd.grad(out, inputs, go)
    return {"out": out.detach(), "grads": [g.detach() for g in grads]}


def expected(case, world, seed, queue_k=0):
    """The float64 single-process reference over the concatenated batch."""
    labels_kind, lossconf, hw, norm, learn, red, tau, n = case
    z1, z2, labels, upstream, queue, queue_labels = global_inputs(case, world, seed, queue_k)
    kw = case_kwargs(case)
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    inputs = [a, b]
    if learn:
        kw["temperature"] = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
        inputs.append(kw["temperature"])
        if lossconf == "sigmoid":
            kw["bias"] = torch.tensor(kw["bias"], dtype=torch.float64, requires_grad=True)
            inputs.append(kw["bias"])
    out = reference.soft_contrastive_loss(a, b, labels, queue=queue, queue_labels=queue_labels, **kw)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out) if upstream is None else upstream)
    return out.detach(), [g.detach() for g in grads]


# --------------------------------------------------------------------------------------------
# DDP: a toy encoder and a loss head with a learnable temperature (and bias)

DDP_CASES = [  # (labels kind, loss form, mode)
    ("multi_hot", "softmax_sym", "gather"),
    ("scene", "sigmoid", "ring"),
    ("scene_ignore", "softmax_sym", "ring"),
]


class ToyModel(torch.nn.Module):
    def __init__(self, lossconf, labels_kind, group, mode="gather"):
        super().__init__()
        torch.manual_seed(1234)  # the same initial weights in every process
        self.encoder = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
        sigmoid = lossconf == "sigmoid"
        self.head = fastcon.SoftContrastiveLoss(
            0.2,
            learnable_temperature=True,
            loss="sigmoid" if sigmoid else "softmax",
            learnable_bias=sigmoid,
            scene_mode="ignore" if labels_kind == "scene_ignore" else "positive",
            hard_weight=0.0 if labels_kind == "scene_ignore" else 0.3,
            backend="reference",
            group=group,
            distributed=mode,
        )
        self.double()

    def forward(self, x1, x2, labels):
        return self.head(self.encoder(x1), self.encoder(x2), labels)


def toy_batch(labels_kind, world, n=6):
    gen = torch.Generator().manual_seed(77)
    x1 = torch.randn(world * n, 6, generator=gen, dtype=torch.float64)
    x2 = x1 + 0.5 * torch.randn(world * n, 6, generator=gen, dtype=torch.float64)
    kind = "scene" if labels_kind == "scene_ignore" else labels_kind
    return x1, x2, make_labels(kind, world * n, 5, gen), n


def ddp_gradients(ddp_case, world, rank):
    labels_kind, lossconf, mode = ddp_case
    x1, x2, labels, n = toy_batch(labels_kind, world)
    rows = slice(rank * n, (rank + 1) * n)
    model = ToyModel(lossconf, labels_kind, fastcon.distributed.WORLD, mode)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss = ddp(x1[rows], x2[rows], labels[rows])
    (loss * world).backward()  # the documented convention: DDP averages, the loss scaled by W sums
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}, loss.detach()


# --------------------------------------------------------------------------------------------
# bad input across ranks: every rank raises the same error (no rank is left in a collective)


def cross_rank_errors(world, rank, group):
    msgs = {}
    z = torch.randn(6, 5)

    def attempt(name, *args, backend="reference", **kw):
        try:
            fastcon.soft_contrastive_loss(*args, backend=backend, group=group, **kw)
            msgs[name] = None
        except (ValueError, TypeError) as e:
            msgs[name] = f"{type(e).__name__}: {e}"

    bigger = torch.randn(7, 5) if rank == 0 else z
    attempt("batch_sizes", bigger, bigger)
    attempt("labels_kind", z, z, None if rank == 0 else torch.ones(6, 3))
    attempt("classes", z, z, torch.ones(6, 3 + (rank == 0)))
    attempt("temperature", z, z, temperature=0.1 if rank == 0 else 0.2)
    attempt("options", z, z, symmetric=rank != 0)
    attempt("dtype", z.double() if rank == 0 else z, z.double() if rank == 0 else z)
    attempt("mode", z, z, distributed="ring" if rank == 0 else "gather")
    attempt("backend", z, z, backend="cuda" if rank == 0 else "reference")  # CPU tensors: cuda unavailable on rank 0
    return msgs


# --------------------------------------------------------------------------------------------
# the worker: every case of one world size, in one spawned group


def _worker(rank, world, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {"cases": {}, "queue": {}, "ddp": {}, "sub": {}}
        for mode in MODES:
            for prec, (backend, dtype, _, _) in PRECISIONS.items():
                for k, case in enumerate(CASES):
                    results["cases"][(mode, prec, k)] = run_case(case, world, rank, True, mode, backend, dtype, k)
                for k, (case, queue_k) in enumerate(QUEUE_CASES):
                    results["queue"][(mode, prec, k)] = run_case(
                        case, world, rank, True, mode, backend, dtype, 100 + k, queue_k
                    )
        for k, ddp_case in enumerate(DDP_CASES):
            results["ddp"][k] = ddp_gradients(ddp_case, world, rank)
        # subgroups: the last two ranks, and each rank alone (group of one)
        last_two = dist.new_group([world - 2, world - 1])
        singles = [dist.new_group([r]) for r in range(world)]
        case = CASES[0]
        for mode in MODES:
            if rank >= world - 2:
                sub_rank = rank - (world - 2)
                results["sub"][("pair", mode)] = run_case(
                    case, 2, sub_rank, last_two, mode, "reference", torch.float64, 5
                )
            results["sub"][("single", mode)] = run_case(case, 1, 0, singles[rank], mode, "reference", torch.float64, 6)
        results["errors"] = cross_rank_errors(world, rank, True)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_with_timeout(fn, world, args, timeout):
    """Run fn(rank, *args) on `world` spawned processes; fail (and kill them) after `timeout` s."""
    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):  # raises if a worker raised
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world} ranks did not finish within {timeout} s: a collective hangs")


_RESULTS: dict = {}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    if world not in _RESULTS:
        out = tmp_path_factory.mktemp(f"world{world}")
        spawn_with_timeout(_worker, world, (world, str(out / "store"), str(out)), TIMEOUT_S)
        _RESULTS[world] = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return world, _RESULTS[world]


# --------------------------------------------------------------------------------------------
# the tests


def _compare(ranks, case, world, seed, loss_tol, grad_tol, what, queue_k=0):
    red = case[5]
    r_out, r_grads = expected(case, world, seed, queue_k)
    if red == "none":  # each rank returns its own samples' losses
        assert_rel(torch.cat([r["out"] for r in ranks]), r_out, loss_tol, what + " per-sample losses")
    else:
        for rank, r in enumerate(ranks):
            assert_rel(r["out"], r_out, loss_tol, f"{what} loss on rank {rank}")
    names = ["dz1", "dz2", "dtemperature", "dbias"]
    for k, (name, r_grad) in enumerate(zip(names, r_grads)):
        if k < 2:  # sharded: each rank holds its samples' rows
            assert_rel(torch.cat([r["grads"][k] for r in ranks]), r_grad, grad_tol, f"{what} {name}")
        else:  # replicated: every rank holds the same 1 / W share
            shares = [r["grads"][k] for r in ranks]
            assert all(torch.equal(s, shares[0]) for s in shares), f"{what} {name} differs across ranks"
            assert_rel(shares[0] * len(ranks), r_grad, grad_tol, f"{what} {name} x world size")


@pytest.mark.parametrize("prec", list(PRECISIONS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_matches_single_process(world_results, mode, prec, k):
    world, ranks = world_results
    _, dtype, loss_tol, grad_tol = PRECISIONS[prec]
    got = [r["cases"][(mode, prec, k)] for r in ranks]
    assert all(g["grads"][0].dtype == dtype for g in got), "gradients come back in the inputs' dtype"
    _compare(got, CASES[k], world, k, loss_tol, grad_tol, f"world {world} {mode} {prec} {case_id(CASES[k])}")


@pytest.mark.parametrize("prec", list(PRECISIONS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", range(len(QUEUE_CASES)), ids=[f"{case_id(c)}-K{q}" for c, q in QUEUE_CASES])
def test_queue_matches_single_process(world_results, mode, prec, k):
    """With a replicated key queue: the single-process loss of the global batch against the queue."""
    world, ranks = world_results
    _, _, loss_tol, grad_tol = PRECISIONS[prec]
    case, queue_k = QUEUE_CASES[k]
    got = [r["queue"][(mode, prec, k)] for r in ranks]
    what = f"world {world} {mode} {prec} {case_id(case)} K={queue_k}"
    _compare(got, case, world, 100 + k, loss_tol, grad_tol, what, queue_k)


@pytest.mark.parametrize("mode", MODES)
def test_subgroups(world_results, mode):
    """A group of the last two ranks (peers are global ranks) and groups of one rank."""
    world, ranks = world_results
    tol = PRECISIONS["dense_f64"][2:]
    _compare([r["sub"][("pair", mode)] for r in ranks[-2:]], CASES[0], 2, 5, *tol, f"pair {mode}")
    for rank, r in enumerate(ranks):
        _compare([r["sub"][("single", mode)]], CASES[0], 1, 6, *tol, f"group of rank {rank} alone, {mode}")


@pytest.mark.parametrize("k", range(len(DDP_CASES)), ids=["-".join(c) for c in DDP_CASES])
def test_ddp_parameter_gradients(world_results, k):
    """DDP(encoder + loss head), (loss * world_size).backward(): the single-process gradients,
    for the encoder and the learnable temperature / bias alike, on every rank."""
    world, ranks = world_results
    labels_kind, lossconf, mode = DDP_CASES[k]
    x1, x2, labels, _ = toy_batch(labels_kind, world)
    model = ToyModel(lossconf, labels_kind, None)
    loss = model(x1, x2, labels)
    loss.backward()
    for rank, r in enumerate(ranks):
        grads, dist_loss = r["ddp"][k]
        assert_rel(dist_loss, loss, 1e-12, f"rank {rank} loss")
        assert set(grads) == {name for name, _ in model.named_parameters()}
        for name, p in model.named_parameters():
            assert_rel(grads[name], p.grad, 1e-9, f"rank {rank} {name}")


CROSS_RANK_ERRORS = {
    "batch_sizes": r"local batch size \(rows of z1\) must be equal on all ranks of the group, got \[7, 6(, 6)?\]",
    "labels_kind": r"labels kind .* must be equal on all ranks of the group",
    "classes": r"number of label classes C must be equal on all ranks of the group, got \[4, 3(, 3)?\]",
    "temperature": r"temperature must be equal on all ranks of the group, got \[0.1, 0.2(, 0.2)?\]",
    "options": r"symmetric must be equal on all ranks of the group",
    "dtype": r"z1 dtype must be equal on all ranks of the group, got \['torch.float64', 'torch.float32'",
    "mode": r"distributed mode must be equal on all ranks of the group",
    "backend": r"backend available \(1 yes, 0 no\) must be equal on all ranks of the group, got \[0, 1(, 1)?\]",
}


@pytest.mark.parametrize("name", list(CROSS_RANK_ERRORS))
def test_cross_rank_mismatch(world_results, name):
    """Every rank raises the same ValueError, naming the values on each rank."""
    import re

    world, ranks = world_results
    msgs = [r["errors"][name] for r in ranks]
    assert msgs[0] is not None, f"{name}: no error raised"
    assert all(m == msgs[0] for m in msgs), f"{name}: ranks disagree: {msgs}"
    assert msgs[0].startswith("ValueError"), msgs[0]
    assert re.search(CROSS_RANK_ERRORS[name], msgs[0]), msgs[0]


# --------------------------------------------------------------------------------------------
# bad input in one process (no group needed to reject it)


def test_group_without_init():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="group=True needs torch.distributed to be initialised"):
        fastcon.soft_contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), group=True)


def test_group_wrong_type():
    with pytest.raises(TypeError, match="group must be None, True, fastcon.distributed.WORLD or a"):
        fastcon.soft_contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), group="world")


def test_unknown_distributed_mode():
    with pytest.raises(ValueError, match="distributed must be one of 'gather', 'ring'"):
        fastcon.soft_contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), group=True, distributed="tree")
