"""``metrics.csv`` (one row per logged step) and the loss-curve figure drawn from it."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path


def read_metrics(path) -> list[dict]:
    """Rows of a metrics CSV as dicts of floats (empty cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: _num(v) for k, v in r.items()} for r in rows]


def run_throughput(rows: Sequence[dict]) -> dict:
    """The whole run's speed from its ``metrics.csv`` rows, and the last row's window apart.

    Each row averages the steps since the previous row, so the run's figures are the rows weighted
    by their step counts: images/s is all images over all step time (data wait plus compute), not
    the mean of the rows' rates. Returns ``steps``, ``images_per_s``, ``data_s_per_step``,
    ``compute_s_per_step`` over the run, and ``last`` with the same keys for the last row alone.
    """
    if not rows:
        raise ValueError("run_throughput needs at least one metrics row, got none")
    images = data = compute = 0.0
    steps, prev = 0, 0
    for r in rows:
        n = int(r["step"]) - prev
        prev = int(r["step"])
        data += r["data_s_per_step"] * n
        compute += r["compute_s_per_step"] * n
        images += r["images_per_s"] * (r["data_s_per_step"] + r["compute_s_per_step"]) * n
        steps += n
    last = rows[-1]
    last_n = int(last["step"]) - (int(rows[-2]["step"]) if len(rows) > 1 else 0)
    return {
        "steps": steps,
        "images_per_s": images / (data + compute) if data + compute > 0 else math.nan,
        "data_s_per_step": data / steps,
        "compute_s_per_step": compute / steps,
        "last": {
            "steps": last_n,
            "images_per_s": last["images_per_s"],
            "data_s_per_step": last["data_s_per_step"],
            "compute_s_per_step": last["compute_s_per_step"],
        },
    }


def _num(v):
    if v is None or v == "":
        return math.nan
    try:
        return float(v)
    except ValueError:
        return v


class MetricsLog:
    """Appends rows to ``path`` with fixed ``fields``; flushed after every row so a crash loses nothing.

    ``resume_step``: a resumed run first drops the rows logged after the checkpoint it resumes
    from (they will be logged again), so the file reads as one uninterrupted run.
    """

    def __init__(self, path, fields: Sequence[str], resume_step: int | None = None):
        self.path = Path(path)
        self.fields = list(fields)
        kept = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames and list(reader.fieldnames) != self.fields:
                    raise ValueError(
                        f"{self.path} has columns {reader.fieldnames}, this run logs {self.fields}; "
                        "resume into the same configuration or use a new output folder"
                    )
                kept = [r for r in reader if float(r["step"]) <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, self.fields, extrasaction="raise")

    def write(self, row: dict) -> None:
        self._writer.writerow({k: _fmt(row.get(k, "")) for k in self.fields})
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def plot_metrics(csv_path, png_path, *, loss_keys: Sequence[str] = ("loss",), title: str = "") -> Path:
    """Loss terms (log scale) over steps, with the learning rate and images/s below; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr, ax_speed) = plt.subplots(
        3, 1, figsize=(7, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1, 1]}
    )
    for key in loss_keys:
        values = [r.get(key, math.nan) for r in rows]
        if any(isinstance(v, float) and math.isfinite(v) for v in values):
            ax_loss.plot(steps, values, label=key, linewidth=1.2)
    finite = [r[k] for r in rows for k in loss_keys if isinstance(r.get(k), float) and math.isfinite(r[k])]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:  # log scale only when it spans decades
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")
    ax_loss.grid(True, alpha=0.3)
    if title:
        ax_loss.set_title(title)
    ax_lr.plot(steps, [r.get("lr", math.nan) for r in rows], color="tab:green")
    ax_lr.set_ylabel("lr")
    ax_lr.grid(True, alpha=0.3)
    ax_speed.plot(steps, [r.get("images_per_s", math.nan) for r in rows], color="tab:purple")
    ax_speed.set_ylabel("images/s")
    ax_speed.set_xlabel("step")
    ax_speed.grid(True, alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
