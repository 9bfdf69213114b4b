"""Per-band mean/std, streamed: each tile adds its count, mean and sum of squared deviations.

Partial results merge exactly (Chan et al.'s parallel form of Welford's update) in float64, so
worker processes each summarise their own tiles and nothing ever holds all pixels at once. The
naive sum / sum-of-squares form would lose the variance to cancellation when the mean is large
against the spread, as it is for bright reflectance bands.
"""

from __future__ import annotations

import json
import os

import numpy as np


class RunningStats:
    """count, mean, M2 (sum of squared deviations), min and max per band."""

    def __init__(self, num_bands: int):
        self.count = np.zeros(num_bands, dtype=np.int64)
        self.mean = np.zeros(num_bands, dtype=np.float64)
        self.m2 = np.zeros(num_bands, dtype=np.float64)
        self.min = np.full(num_bands, np.inf)
        self.max = np.full(num_bands, -np.inf)

    def update(self, values: np.ndarray) -> None:
        """Add samples: ``values`` is (bands, n), integer (uint16 tiles) or floating."""
        n = values.shape[1]
        if n == 0:
            return
        other = RunningStats(values.shape[0])
        other.count[:] = n
        if values.dtype.kind in "ui":
            # integer tiles: exact sum; deviations in float32 are exact to ~1e-3 for uint16 values,
            # squared and summed in float64 (2x faster than converting the tile to float64)
            other.mean = values.sum(axis=1, dtype=np.int64) / n
            dev = values.astype(np.float32) - other.mean.astype(np.float32)[:, None]
        else:
            other.mean = values.mean(axis=1, dtype=np.float64)
            dev = values.astype(np.float64) - other.mean[:, None]
        other.m2 = np.einsum("ij,ij->i", dev, dev, dtype=np.float64)
        other.min, other.max = values.min(axis=1).astype(np.float64), values.max(axis=1).astype(np.float64)
        self.merge(other)

    def merge(self, other: RunningStats) -> RunningStats:
        n_a, n_b = self.count.astype(np.float64), other.count.astype(np.float64)
        n = n_a + n_b
        safe = np.where(n > 0, n, 1.0)
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (n_b / safe)
        self.m2 = self.m2 + other.m2 + delta**2 * (n_a * n_b / safe)
        self.count = self.count + other.count
        self.min, self.max = np.minimum(self.min, other.min), np.maximum(self.max, other.max)
        return self

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation."""
        return np.sqrt(self.m2 / np.maximum(self.count, 1))

    def to_dict(self) -> dict:
        return {
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "min": self.min.tolist(),
            "max": self.max.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunningStats:
        s = cls(len(d["mean"]))
        s.count = np.asarray(d["count"], dtype=np.int64)
        s.mean, s.m2 = np.asarray(d["mean"], dtype=np.float64), np.asarray(d["m2"], dtype=np.float64)
        s.min, s.max = np.asarray(d["min"], dtype=np.float64), np.asarray(d["max"], dtype=np.float64)
        return s


def write_stats(path: str, stats: RunningStats, band_names, note: str = "") -> None:
    doc = {
        "bands": list(band_names),
        "mean": stats.mean.tolist(),
        "std": stats.std.tolist(),
        "min": stats.min.tolist(),
        "max": stats.max.tolist(),
        "count": stats.count.tolist(),
        "note": note,
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
