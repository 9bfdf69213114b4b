"""Training checkpoints that are written atomically and verified when read.

A checkpoint file is a short text header (``FASTCON-CHECKPOINT 1``, the payload's length and
SHA-256) followed by a ``torch.save`` payload. Writing goes to a temporary file in the same
folder, is flushed to disk, then renamed over the target: a crash or a full disk while writing
leaves the previous checkpoint untouched and never a half-written one under the final name.
Reading checks the header, the length and the digest before unpickling, so truncation or bit
rot is a ``CheckpointError`` that names the file, not an unpickling traceback. Payloads load
with ``weights_only=True``: tensors, numbers, strings and containers only (RNG states are
stored in those terms by ``fastcon.train.runtime``).

``CheckpointDir`` keeps the last ``keep`` checkpoints of a run as ``step_00001234.ckpt``; a new
one is complete on disk before older ones are pruned. ``remove_stale_temporaries`` deletes the
temporary files that writes killed midway left (their process no longer exists).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import torch

MAGIC = b"FASTCON-CHECKPOINT 1\n"
_HEADER = re.compile(rb"sha256 ([0-9a-f]{64}) (\d+)\n")
_NAME = re.compile(r"step_(\d{8,})\.ckpt")
_TEMPORARY = re.compile(r"\.step_\d{8,}\.ckpt\.(\d+)\.tmp")  # save_checkpoint's, with the writer's PID


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, corrupt, or from another run)."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    digest = hashlib.sha256(payload).hexdigest()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(f"sha256 {digest} {len(payload)}\n".encode())
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def load_checkpoint(path, map_location="cpu") -> dict:
    """The state saved by ``save_checkpoint``; ``CheckpointError`` if the file is not intact."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a fastcon checkpoint (its header is missing or damaged)")
    header_end = data.find(b"\n", len(MAGIC)) + 1
    m = _HEADER.fullmatch(data[len(MAGIC) : header_end]) if header_end > 0 else None
    if m is None:
        raise CheckpointError(f"{path} is damaged: its header line is unreadable")
    digest, size = m.group(1).decode(), int(m.group(2))
    payload = memoryview(data)[header_end:]
    if len(payload) != size:
        raise CheckpointError(
            f"{path} is truncated or padded: {len(payload)} payload bytes, {size} expected "
            "(was the write interrupted outside fastcon, or the file copied partially?)"
        )
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path} is corrupt: its content does not match the SHA-256 written with it")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # intact bytes that torch cannot read: another torch, or not ours
        raise CheckpointError(f"{path} passed its checksum but torch.load failed: {e}") from e


def checkpoint_step(path) -> int | None:
    m = _NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


class CheckpointDir:
    """The checkpoints of one run: ``root/step_XXXXXXXX.ckpt``, the newest ``keep`` kept."""

    def __init__(self, root, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}.ckpt"

    def all(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if checkpoint_step(p) is not None]
        return sorted(found, key=checkpoint_step)

    def latest(self) -> Path | None:
        paths = self.all()
        return paths[-1] if paths else None

    def save(self, state: dict, step: int) -> Path:
        path = save_checkpoint(state, self.path_for(step))
        # prune only once the new file is complete
        for old in self.all()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def remove_stale_temporaries(self) -> list[tuple[Path, int]]:
        """Delete the temporary files of writes whose process is gone (killed while writing a
        checkpoint: ``.step_*.ckpt.PID.tmp``); returns the (path, size in bytes) of each. A file
        whose PID is a running process on this machine is left alone (it may be writing)."""
        removed = []
        if not self.root.is_dir():
            return removed
        for p in sorted(self.root.iterdir()):
            m = _TEMPORARY.fullmatch(p.name)
            if m is None or int(m.group(1)) == os.getpid() or _process_exists(int(m.group(1))):
                continue
            try:
                size = p.stat().st_size
                p.unlink()
            except FileNotFoundError:  # removed meanwhile
                continue
            removed.append((p, size))
        return removed

    def load(self, path=None, map_location="cpu") -> tuple[dict, Path]:
        """Load ``path`` (default: the newest); a damaged file names an intact older one to resume from."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise CheckpointError(f"no checkpoint to resume from in {self.root}")
        try:
            return load_checkpoint(path, map_location), path
        except CheckpointError as e:
            older = [p for p in self.all() if (checkpoint_step(p) or -1) < (checkpoint_step(path) or -1)]
            for candidate in reversed(older):
                try:
                    load_checkpoint(candidate)
                except CheckpointError:
                    continue
                raise CheckpointError(
                    f"{e}. The previous checkpoint {candidate} is intact and was kept: "
                    f"resume from it with --resume {candidate}"
                ) from None
            raise
