"""Peak-memory measurement shared by tests and benchmarks.

CPU: Linux lets a process reset its resident-set high-water mark (``echo 5 >
/proc/self/clear_refs``) and read it back (``VmHWM`` in /proc/self/status), so the peak of one
piece of work is measured exactly, in process. CUDA: torch's allocator statistics.
"""

from __future__ import annotations

import ctypes
import os

import torch

_MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _release_free_heap() -> None:
    """Hand memory that malloc keeps after frees back to the OS (glibc malloc_trim). Otherwise
    allocations below malloc's (dynamic, up to 32 MiB) mmap threshold reuse resident pages
    freed by earlier work, and the peak of the measured work reads as 0."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def rss_peak_supported() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)


class PeakMemory:
    """``with PeakMemory(device) as m: work()`` then ``m.peak_mib``: peak above the level at entry."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.peak_mib = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS to the current RSS
            self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.peak_mib = (peak - self._base) / _MIB
        return False
