"""Registers, spills and shared memory of the Triton soft contrastive kernels for chosen D and
dtypes, without a GPU: every autotune config the pruning keeps, at the flag combination with
the most live values. A view of ``fastcon.kernels.triton.compile_check`` (which compiles every
kernel for sm_80 and sm_90 in `make test`), for sizing tiles.

    python benchmarks/triton_resources.py --arch 90 --d 256 768 --dtype bf16 fp32
"""

from __future__ import annotations

import argparse
import sys
import time

from fastcon.kernels.triton import compile_check as cc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90])
    ap.add_argument("--d", type=int, nargs="+", default=[256, 768])
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=list(cc.DTYPES))
    ns = ap.parse_args(argv)
    cc.use_gpu_configs()
    shapes = {f"D={d} {dt}" for d in ns.d for dt in ns.dtype}

    def select(launch: cc.Launch) -> bool:
        return launch.name.startswith("soft_contrastive") and launch.heavy and launch.shape in shapes

    start = time.perf_counter()
    rows = cc.run(ns.arch, full=True, select=select)
    cc.print_rows(rows)
    print(cc.summary(rows, time.perf_counter() - start))
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
