"""benchmarks/results/latest.png: times on a linear axis from zero, in ms, with their values and
the speed-up over the reference written on the bars (a log axis with data-driven limits made
29.9 against 31.7 ms look like a factor of 20)."""

import importlib.util
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent


def _conftest():
    spec = importlib.util.spec_from_file_location("_bench_conftest", ROOT / "benchmarks" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ROWS = [
    {"group": "train step", "name": "test_step[reference]", "min": 0.0317, "mean": 0.0330},
    {"group": "train step", "name": "test_step[cpu]", "min": 0.0299, "mean": 0.0310},
    {"group": "loss N=8192", "name": "test_loss[8192-128-reference]", "min": 3.54, "mean": 3.6},
    {"group": "loss N=8192", "name": "test_loss[8192-128-cpu]", "min": 0.27, "mean": 0.28},
]


def test_times_on_a_linear_axis_from_zero_in_ms(tmp_path):
    bench = _conftest()
    fig = bench._figure(ROWS)
    try:
        axes = fig.axes
        assert len(axes) == 2
        for ax in axes:
            assert ax.get_xscale() == "linear"
            assert ax.get_xlim()[0] == 0
            assert "ms" in ax.get_xlabel()
        texts = {ax.get_title(loc="left"): [t.get_text() for t in ax.texts] for ax in axes}
        # the bars' values and the speed-up: 31.7 vs 29.9 ms is 1.06x, not a factor of 20
        assert texts["train step"] == [" 31.7 ms", " 29.9 ms (1.06x the reference's speed)"]
        assert texts["loss N=8192"] == [" 3.54 s", " 270 ms (13.11x the reference's speed)"]
        fig.canvas.draw()
        ticks = [t.get_text() for ax in axes for t in ax.get_xticklabels()]
        assert ticks
        assert not any("times" in t or "^" in t or "e+" in t for t in ticks), ticks
    finally:
        plt.close(fig)
    bench._plot(ROWS, tmp_path / "latest.png")
    assert (tmp_path / "latest.png").stat().st_size > 0
