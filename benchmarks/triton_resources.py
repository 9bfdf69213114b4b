"""Registers, spills and shared memory of the Triton soft contrastive kernels, without a GPU.

Compiles every autotuning config that the pruning keeps for the given D and dtype for a GPU
architecture (Triton's bundled ptxas; no device needed) and prints what the hardware would
be asked for: spills (STACK > 0) or shared memory above the limit (227 KiB on sm_90, 163 KiB
on sm_80) mark configs to drop. Inputs are taken 16-aligned, as the launcher sees them when
D and the row strides are multiples of 16.

    python benchmarks/triton_resources.py --arch 90 --d 256 768 --dtype bf16 fp32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile the GPU configs, not the interpreter's

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastcon.kernels.triton import soft_contrastive as k

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_INTS = ["NA", "NB", "D", "stride_a", "stride_b", "offset", "SPLIT", "N_KEY", "M_KEY", "D_KEY"]
_ALIGNED = {"NA", "NB", "D", "stride_a", "stride_b"}


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _signature(kernel, dt: str, pointers: dict[str, str]) -> dict[str, str]:
    sig = {name: "i32" for name in _INTS}
    sig.update(scale="fp32", bias="fp32", bound="fp32")
    sig.update({name: f"*{dt}" for name in ("a_ptr", "b_ptr")})
    sig.update(pointers)
    return sig


def _usage(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    return {"regs": int(fields["REG"]), "spill_bytes": int(fields["STACK"])}


def compile_report(kernel, dt, pointers, consts, arch, warps, stages) -> dict[str, int]:
    fn = _jit(kernel)
    sig = _signature(kernel, dt, pointers)
    signature = {name: ("constexpr" if name in consts else sig[name]) for name in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or name in _ALIGNED
    }
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
    )
    return {"smem": compiled.metadata.shared, **_usage(compiled.asm["cubin"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90])
    ap.add_argument("--d", type=int, nargs="+", default=[256, 768])
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=list(DTYPES))
    args = ap.parse_args()
    for arch in args.arch:
        for dt in args.dtype:
            tensor = torch.empty(0, dtype=DTYPES[dt])
            elt = k._elt(tensor)
            prec = "tf32x3" if dt == "fp32" else "ieee"
            for d in args.d:
                nargs = {"D": d, "a_ptr": tensor}
                for c in k._prune_fwd(k._FWD_CONFIGS, nargs):
                    consts = dict(
                        MODE=0, FIXED_COL=True, HAS_POS=True, UPCAST=False, PRECISION=prec, BLOCK_K=k._block_k(d, elt),
                        RESIDENT=d <= k.RESIDENT_MAX_D[elt], **c.kwargs,
                    )  # fmt: skip
                    names = ["pos_ptr", "out_ptr", "col_sum_ptr"]
                    ptrs = {"a_ids_ptr": "*i64", "b_ids_ptr": "*i64", **{n: "*fp32" for n in names}}
                    _print(arch, dt, d, "forward", c, k._sc_forward_kernel, dt, ptrs, consts)
                for c in k._prune_bwd(k._BWD_CONFIGS, nargs):
                    chunk, n_chunk = k._chunks(d, elt, c.kwargs["CHUNK"], c.kwargs["N_CHUNK"])
                    consts = dict(
                        MODE=0, FIXED=True, HAS_POS=True, HAS_AW=True, HAS_BW=True, NEED_WSUM=True, UPCAST=False,
                        PRECISION=prec, W_PRECISION=prec, BLOCK_N=c.kwargs["BLOCK_N"], BLOCK_M=c.kwargs["BLOCK_M"],
                        BLOCK_K=k.STREAM_BLOCK_K[elt], RESIDENT=k._bwd_class(d, elt) in (k.D_SMALL, k.D_CHUNKED),
                        CHUNK=chunk, N_CHUNK=n_chunk,
                    )  # fmt: skip
                    names = [
                        "pos_ptr",
                        "a_stat_ptr",
                        "b_stat_ptr",
                        "a_w_ptr",
                        "b_w_ptr",
                        "b_wmax_ptr",
                        "out_ptr",
                        "wsum_ptr",
                    ]
                    ptrs = {"a_ids_ptr": "*i64", "b_ids_ptr": "*i64", **{n: "*fp32" for n in names}}
                    _print(arch, dt, d, "backward", c, k._sc_backward_kernel, dt, ptrs, consts)


def _print(arch, dt, d, which, c, kernel, kdt, ptrs, consts):
    tiles = {key: consts[key] for key in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "CHUNK", "N_CHUNK") if key in consts}
    head = f"sm_{arch} {dt} D={d} {which:8s} {tiles} warps={c.num_warps} stages={c.num_stages}"
    try:
        r = compile_report(kernel, kdt, ptrs, consts, arch, c.num_warps, c.num_stages)
    except Exception as e:  # report and go on: a config that fails to compile is one to drop
        print(f"{head}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        return
    flags = []
    if r["spill_bytes"]:
        flags.append("SPILLS")
    if r["smem"] > SMEM_LIMIT.get(arch, 227 * 1024):
        flags.append("SMEM>LIMIT")
    print(
        f"{head}: regs={r['regs']} spill={r['spill_bytes']}B smem={r['smem'] // 1024}KiB {' '.join(flags)}",
        flush=True,
    )


if __name__ == "__main__":
    main()
