"""Process-level plumbing of a training run: torchrun/DDP setup, RNG states, stop signals, timing, memory.

- ``init_distributed(device, timeout)``: one process, or the process group torchrun describes in
  its environment (NCCL on GPUs, gloo on CPUs); every rank gets its device; collectives time out.
- ``collective_failure(error)``: the error of a collective that timed out or lost its
  peer, as a ``CollectiveFailure`` naming the collective and where it was called.
- ``rng_state()`` / ``set_rng_state(state)``: torch (CPU and every CUDA device), NumPy and Python
  ``random`` states as plain tensors and numbers, so they fit a ``weights_only`` checkpoint.
- ``derived_seed(seed, *keys)`` / ``step_generator``: independent, reproducible random streams
  for a given (seed, step, rank, purpose), so masks and diffusion noise do not depend on how
  many random numbers something else drew before, and a resumed run draws the same ones.
- ``StopRequest``: SIGTERM / SIGINT set a flag that the training loop reads at the end of a step
  (to checkpoint and exit cleanly); a second SIGINT interrupts at once.
- ``StepTimer``: per-step time split into waiting for data and computing; ``peak_memory_mib``.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
import random
import resource
import signal
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------
# devices and process groups


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` is this rank's GPU when there is one, else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: str = "auto", timeout: float | None = None) -> DistInfo:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1), or run as a single process.

    ``timeout`` (seconds; None: torch's default, 10 minutes for NCCL, 30 for gloo) bounds the
    rendezvous and every collective: a collective waiting longer for a stopped, hung or dead rank
    fails (gloo: it raises, see ``collective_failure``; NCCL: the watchdog of async error
    handling, which this switches on where the environment has not chosen, logs the stuck
    operation and ends the process) instead of hanging the job.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(
            f"the distributed timeout (run.dist_timeout) must be a positive number of seconds, got {timeout!r}"
        )
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # 3 (SkipCleanUp): a collective past its timeout ends the process (0 would leave it hanging);
        # torchrun sets 1 (TearDown), also on; a value the user chose (or its legacy name) stays
        if "NCCL_ASYNC_ERROR_HANDLING" not in os.environ:
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        kw = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        _DIST_TIMEOUT["seconds"] = timeout
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", **kw)
    return DistInfo(rank, world_size, local_rank, dev)


class CollectiveFailure(RuntimeError):
    """A collective that did not complete: another rank is stopped, hung or dead (the message
    names the collective, where it was called from, this rank and the timeout)."""


_DIST_TIMEOUT = {"seconds": None}  # what init_distributed passed, for the messages
_C10D = os.path.join("torch", "distributed", "distributed_c10d.py")
_AUTOGRAD = os.path.join("torch", "autograd", "")
_DDP = os.path.join("torch", "nn", "parallel", "distributed.py")
_BROKEN = ("timed out", "timeout", "pair closure", "closed by peer", "connection reset", "nccl", "gloo")


def collective_failure(error: BaseException) -> CollectiveFailure | None:
    """``error`` as a ``CollectiveFailure`` naming the stuck collective when a torch.distributed
    collective raised it (e.g. gloo's "Timed out waiting 300000ms for recv operation"), else None.

    The collective is the innermost ``torch.distributed`` call in the traceback (with its callers
    outside torch), DDP's own call of one (its buffer broadcast in forward), or DDP's gradient
    all-reduce when the error came out of backward.
    """
    if not isinstance(error, RuntimeError) or isinstance(error, CollectiveFailure):
        return None
    frames = traceback.extract_tb(error.__traceback__)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    op = caller = None
    for i in range(len(frames) - 1, -1, -1):
        # a torch.distributed call, or DDP calling the C++ collectives itself (the last frame:
        # e.g. its buffer broadcast at the start of forward)
        ddp = i == len(frames) - 1 and frames[i].filename.endswith(_DDP)
        if frames[i].filename.endswith(_C10D) or ddp:
            op = f"{frames[i].name} (DDP)" if ddp else frames[i].name
            outside = [f for f in frames[:i] if os.sep + "torch" + os.sep not in f.filename][-3:]
            caller = " < ".join(
                f"{os.path.basename(os.path.dirname(f.filename))}/{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                for f in reversed(outside)
            )
            break
    if op is None:
        in_backward = any(_AUTOGRAD in f.filename for f in frames[-3:])
        if not (in_backward and any(k in text.lower() for k in _BROKEN)):
            return None
        op = "DDP's gradient all-reduce (in backward)"
    rank = f"rank {dist.get_rank()}" if dist.is_available() and dist.is_initialized() else "this rank"
    timeout = _DIST_TIMEOUT["seconds"]
    if any(k in text.lower() for k in ("timed out", "timeout")):
        outcome = "did not complete " + (
            f"within run.dist_timeout={timeout:g} s" if timeout is not None else "within torch's default timeout"
        )
    else:  # e.g. gloo's "Connection closed by peer": the other side is gone
        outcome = "failed"
    where = f" (called from {caller})" if caller else ""
    return CollectiveFailure(
        f"{rank}: the collective {op}{where} {outcome}: another rank is stopped, hung or dead. "
        f"The newest checkpoint is the one to resume from. [{text}]"
    )


def shutdown_distributed() -> None:
    """Leave the process group. Call it after the objects that hold the group (DDP inside a ``Run``)
    are released: the group's threads (gloo's run loops and TCP loop) stop only when its last
    reference goes, and a group still held while the interpreter exits can abort the process
    ("terminate called without an active exception", SIGABRT) after a successful run. Reference
    cycles (DDP's hooks) are collected here first."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_ranks_any(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any rank (one tiny all-reduce)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ---------------------------------------------------------------------------------------------
# randomness


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the legacy global state is what libraries draw from)
    torch.manual_seed(seed)


def derived_seed(*keys) -> int:
    """A 63-bit seed that is a fixed function of ``keys`` (e.g. base seed, step, rank, purpose)."""
    digest = hashlib.blake2b("/".join(map(str, keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def step_generator(*keys, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derived_seed(*keys)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derived_seed(*keys))
    return g


def rng_state() -> dict:
    """Every global RNG state, in types a ``weights_only`` checkpoint accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))  # noqa: NPY002
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# ---------------------------------------------------------------------------------------------
# stop signals


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag (``bool(stop)``) instead of killing the process mid-step.

    The training loop checks it after each step, writes a checkpoint and exits. A second SIGINT
    at least ``repeat_s`` seconds after the first (Ctrl-C twice) raises ``KeyboardInterrupt`` at
    once; copies of one signal arriving together (to the process group, then forwarded by torchrun
    or srun) are one request. ``restore()`` puts the old handlers back.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), repeat_s: float = 1.0):
        self.signal_name: str | None = None
        self.repeat_s, self._first = repeat_s, 0.0
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signal_name is not None:
            if signum == signal.SIGINT and now - self._first >= self.repeat_s:
                raise KeyboardInterrupt
            return
        self.signal_name, self._first = signal.Signals(signum).name, now

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# ---------------------------------------------------------------------------------------------
# timing and memory


class StepTimer:
    """Splits each step into data wait (``data_ready`` - previous ``step_done``) and compute.

    ``step_done`` synchronises the GPU first, so compute time is the device's, not the launch
    queue's. Totals accumulate until ``reset()`` (at each log line).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()
        self._last = time.perf_counter()

    def reset(self) -> None:
        self.data_s = self.compute_s = 0.0
        self.steps = self.images = 0

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.data_s += now - self._last
        self._last = now

    def step_done(self, images: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.compute_s += now - self._last
        self._last = now
        self.steps += 1
        self.images += images

    def restart(self) -> None:
        """Forget the time since the last step (checkpoint writing, evaluation)."""
        self._last = time.perf_counter()

    @property
    def images_per_s(self) -> float:
        total = self.data_s + self.compute_s
        return self.images / total if total > 0 else float("nan")


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated GPU memory of this process on ``device``, or its peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
