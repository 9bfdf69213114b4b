"""Ahead-of-time compile check of the Triton kernels for NVIDIA GPUs, on a machine without one.

    python -m fastcon.kernels.triton.compile_check --arch 80,90            # what `make test` runs
    python -m fastcon.kernels.triton.compile_check --arch 90 --full --csv compile.csv

The interpreter (TRITON_INTERPRET=1, what the tests use without a GPU) never runs the Triton
compiler, so ``tl.dot`` shape and dtype rules, layouts, register pressure and shared memory are
only checked here: every kernel of the loss, masking and diffusion is compiled to a cubin for
each architecture (Triton's bundled ptxas; no device needed) with the arguments its launcher
passes, specialised exactly as Triton specialises a launch (ints equal to 1 become constants,
multiples of 16 and tensors are 16-aligned), for every autotune config the pruning keeps for
that architecture (the prune functions receive the target as ``ARCH`` in their arguments).
Registers and the stack frame come from ``cuobjdump -res-usage`` (Triton's bundled copy); when a
kernel has a stack frame, ptxas -v (run as Triton runs it) tells spills from a call's saved
registers; shared memory comes from the compiled kernel's metadata.

A row fails on a compile error, on shared memory above the architecture's per-block limit, or
on spills: every config compiled is one the autotuner can pick, so a spilling config belongs
in the pruning, not in the list.

Coverage. The launch matrix is D in {64, 128, 256, 512, 768, 1024} x fp32 / fp16 / bf16 x every
MODE and flag combination the launchers pass (``launches()``; a ``*_kernel`` missing from it
fails the check). Compiles that Triton would specialise identically are compiled once. The
default (``make test``, ~250 compiles) compiles every kept config at every D and architecture
with the heaviest flag combinations (the most live values; one per code path) in bf16 and fp32
(fp16 compiles like bf16), then every other flag combination once, on its first kept config, cycling through the
shapes and architectures. ``--full`` compiles the whole product (~8,300 compiles, about three
hours on two cores); Triton's cache makes any rerun fast.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastcon.reference import MODE_SIGMOID, MODE_SOFTMAX, MODE_SOFTMAX_IGNORE

_KERNEL_MODULES = ("soft_contrastive", "masking", "diffusion", "fused_loss")


def use_gpu_configs() -> None:
    """The kernel modules must be imported with their GPU configs and Triton without its
    interpreter: both happen at import time, so a process with TRITON_INTERPRET=1 (the test
    suite's) cannot run the check. Raises a clear error there."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "the compile check compiles the GPU configs: run it in a process without TRITON_INTERPRET=1 "
            "(env -u TRITON_INTERPRET python -m fastcon.kernels.triton.compile_check)"
        )


def _modules():
    """(soft_contrastive, masking, diffusion, fused_loss), imported on first use (see use_gpu_configs)."""
    use_gpu_configs()
    from fastcon.kernels.triton import diffusion, fused_loss, masking, soft_contrastive

    return soft_contrastive, masking, diffusion, fused_loss


# Largest dynamic shared memory one block may use (opt-in), per compute capability.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DIMS = (64, 128, 256, 512, 768, 1024)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROWS = 4096  # representative N = M (a multiple of 16, as typical batches are)


def _t(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A stand-in tensor argument: only its dtype and 16-byte alignment reach the compiler."""
    return torch.empty(16, dtype=dtype)


@dataclasses.dataclass
class Launch:
    """One launch as a launcher issues it: every argument by name, before autotuning."""

    kernel: str  # attribute of the kernel module
    module: object
    args: dict
    shape: str  # D / dtype / sizes
    variant: str  # flag combination
    heavy: bool = False  # the flag combination with the most live values (default coverage)
    options: dict = dataclasses.field(default_factory=dict)  # launch options a launcher passes (maxnreg)

    @property
    def name(self) -> str:
        return f"{self.module.__name__.rsplit('.', 1)[1]}.{self.kernel}"


# --------------------------------------------------------------------------------------------
# the launch matrix, mirroring the launchers' calls


def _loss_launches() -> list[Launch]:
    sc = _modules()[0]
    out = []
    for (dt_name, dtype), d in itertools.product(DTYPES.items(), DIMS):
        a = _t(dtype)
        base = dict(
            a_ptr=a, b_ptr=a, a_ids_ptr=_t(torch.int64), b_ids_ptr=_t(torch.int64),
            NA=ROWS, NB=ROWS, D=d, stride_a=d, stride_b=d, offset=0,
            scale_ptr=_t(torch.float64), bias_ptr=_t(torch.float64),
            N_KEY=ROWS, M_KEY=ROWS, D_KEY=triton.next_power_of_2(d),
            UPCAST=False, PRECISION=sc.TritonSoftContrastiveCore._precision(dtype),
        )  # fmt: skip
        shape = f"D={d} {dt_name}"
        # forward row pass (and the column-owned pass: the same kernel)
        for mode, split, has_pos in itertools.product(
            (MODE_SOFTMAX, MODE_SOFTMAX_IGNORE, MODE_SIGMOID), (1, 2), (True, False)
        ):
            # (BOUNDED, FIXED_COL, COL_OF_FIXED): the row pass with fixed-max column sums, the
            # column pass after it, an unbounded pass; the sigmoid form with and without a bias
            if mode == MODE_SIGMOID:
                flag_sets = [(True, False, False, True), (False, False, False, False)]
            else:
                flag_sets = [(True, True, False, False), (True, False, True, False), (False, False, False, False)]
            for bounded, fixed_col, col_of_fixed, has_bias in flag_sets:
                args = dict(base, pos_ptr=_t(), out_ptr=_t(), col_sum_ptr=_t(), col_in_ptr=_t(), SPLIT=split)
                args.update(
                    MODE=mode,
                    BOUNDED=bounded,
                    HAS_BIAS=has_bias,
                    FIXED_COL=fixed_col,
                    COL_OF_FIXED=col_of_fixed,
                    HAS_POS=has_pos,
                )
                variant = (
                    f"MODE={mode} BOUNDED={bounded:d} HAS_BIAS={has_bias:d} FIXED_COL={fixed_col:d} "
                    f"COL_OF_FIXED={col_of_fixed:d} HAS_POS={has_pos:d} SPLIT={split}"
                )
                # the most live values: masked softmax with column sums, and the softplus form
                heavy = has_pos and split == 2 and (fixed_col or mode == MODE_SIGMOID) and mode != MODE_SOFTMAX
                heavy = heavy and (has_bias or mode != MODE_SIGMOID)
                out.append(Launch("_sc_forward_kernel", sc, args, shape, variant, heavy))
        # backward: the row pass (W v, W 1 with a_w = g, b_w = h) and the column pass (W^T u)
        for mode, split, has_pos in itertools.product(
            (MODE_SOFTMAX, MODE_SOFTMAX_IGNORE, MODE_SIGMOID), (1, 2), (True, False)
        ):
            if mode == MODE_SIGMOID:  # (BOUNDED is never passed with the sigmoid form)
                flag_sets = [(False, True, False, True), (False, False, True, False)]
            else:
                passes = [(True, True, True), (True, False, True), (True, True, False), (False, True, False)]
                flag_sets = [(bounded, *p) for bounded in (True, False) for p in passes]
            for bounded, has_aw, has_bw, wsum in flag_sets:
                has_bias = mode == MODE_SIGMOID
                args = dict(base, SPLIT=split, **{p: _t() for p in _BWD_F32_PTRS})
                args.update(
                    MODE=mode,
                    BOUNDED=bounded,
                    HAS_BIAS=has_bias,
                    HAS_POS=has_pos,
                    HAS_AW=has_aw,
                    HAS_BW=has_bw,
                    NEED_WSUM=wsum,
                )
                args["W_PRECISION"] = args["PRECISION"]
                variant = (
                    f"MODE={mode} BOUNDED={bounded:d} HAS_POS={has_pos:d} HAS_AW={has_aw:d} HAS_BW={has_bw:d} "
                    f"NEED_WSUM={wsum:d} SPLIT={split}"
                )
                # the most live values: both forms of W in one kernel (bounded), and the sigmoid
                heavy = (mode, bounded, has_pos, has_aw, has_bw, wsum, split) in (
                    (MODE_SOFTMAX_IGNORE, True, True, True, True, True, 2),
                    (MODE_SIGMOID, False, True, True, False, True, 2),
                )
                out.append(Launch("_sc_backward_kernel", sc, args, shape, variant, heavy))
    return out


_BWD_F32_PTRS = ("pos_ptr", "a_stat_ptr", "b_stat_ptr", "a_w_ptr", "b_w_ptr", "b_wmax_ptr", "out_ptr", "wsum_ptr")


def _masking_launches() -> list[Launch]:
    masking = _modules()[1]
    out = []
    tokens, keep = 256, 64  # ViT-S/14 at 224 px: a 16 x 16 grid, 75 % masked
    for (dt_name, dtype), d in itertools.product(DTYPES.items(), DIMS):
        x, acc = _t(dtype), masking._acc(dtype)
        bd = masking._block_d(d)
        shape = f"D={d} {dt_name}"
        ids, inv = _t(torch.int64), _t(torch.int32)
        for has_pos in (True, False):
            args = dict(src_ptr=x, ids_ptr=ids, pos_ptr=x, out_ptr=x, K=keep, D=d)
            args.update(src_batch_stride=tokens * d, src_row_stride=d, pos_batch_stride=0)
            args.update(pos_row_stride=d if has_pos else 0, HAS_POS=has_pos, ACC=acc, BLOCK_K=16, BLOCK_D=bd)
            out.append(Launch("_gather_kernel", masking, args, shape, f"HAS_POS={has_pos:d}", heavy=has_pos))
        for has_fill, has_out2 in ((True, False), (False, True), (False, False)):
            args = dict(src_ptr=x, inverse_ptr=inv, fill_ptr=x, out_ptr=x, out2_ptr=x, L=tokens, K=keep, D=d)
            args.update(HAS_FILL=has_fill, HAS_OUT2=has_out2, BLOCK_L=16, BLOCK_D=bd)
            variant = f"HAS_FILL={has_fill:d} HAS_OUT2={has_out2:d}"
            out.append(Launch("_expand_kernel", masking, args, shape, variant, heavy=has_fill))
        for write_out in (True, False):
            args = dict(src_ptr=x, inverse_ptr=inv, out_ptr=x, sum_ptr=x, B=64, L=tokens, K=keep, D=d)
            args.update(WRITE_OUT=write_out, ACC=acc, BLOCK_L=4, BLOCK_D=bd)
            out.append(Launch("_expand_sum_kernel", masking, args, shape, f"WRITE_OUT={write_out:d}", write_out))
        args = dict(src_ptr=x, inverse_ptr=inv, partial_ptr=_t(torch.float32), B=64, L=tokens, D=d)
        args.update(ACC=acc, BLOCK_L=16, BLOCK_D=bd)
        out.append(Launch("_dropped_sum_kernel", masking, args, shape, "", heavy=True))
    for dt_name, dtype in DTYPES.items():  # images: 13 bands, 224 px, patch 14 (BLOCK_W = 64)
        x = _t(dtype)
        args = dict(src_ptr=x, keep_ptr=_t(torch.uint8), out_ptr=x, C=13, H=224, W=224, L=256, GRID_W=16, PATCH=14)
        args.update(BLOCK_H=16, BLOCK_W=64)
        out.append(Launch("_image_kernel", masking, args, f"224 px {dt_name}", "", heavy=True))
    return out


def _diffusion_launches() -> list[Launch]:
    diffusion = _modules()[2]
    out = []
    k0, k1 = diffusion._keys(12345)
    per = 13 * 64 * 64
    for dt_name, dtype in DTYPES.items():
        x, f = _t(dtype), _t()
        shape = f"{per} per sample {dt_name}"
        for seeded in (True, False):
            args = dict(x0_ptr=x, noise_ptr=x, ca_ptr=f, cs_ptr=f, out_ptr=x, per_sample=per, k0=k0, k1=k1)
            args.update(SEEDED=seeded, BLOCK=diffusion.BLOCK)
            out.append(Launch("_q_sample_kernel", diffusion, args, shape, f"SEEDED={seeded:d}", heavy=seeded))
            for target in (0, 1, 2):
                common = dict(pred_ptr=x, x0_ptr=x, noise_ptr=x, ca_ptr=f, cs_ptr=f, per_sample=per, k0=k0, k1=k1)
                common.update(SEEDED=seeded, TARGET=target, BLOCK=diffusion.BLOCK)
                variant, heavy = f"SEEDED={seeded:d} TARGET={target}", seeded and target == 2
                out.append(Launch("_loss_kernel", diffusion, dict(common, partial_ptr=f), shape, variant, heavy))
                args = dict(common, gsse_ptr=f, grad_ptr=x)
                out.append(Launch("_loss_backward_kernel", diffusion, args, shape, variant, heavy))
    i64 = _t(torch.int64)
    out.append(Launch("_philox_normal_kernel", diffusion, dict(idx_ptr=i64, out_ptr=_t(), n=per, k0=k0, k1=k1, BLOCK=diffusion.BLOCK), "", "", True))  # fmt: skip
    out.append(Launch("_philox_words_kernel", diffusion, dict(ctr_ptr=i64, out_ptr=i64, n=per, k0=k0, k1=k1, BLOCK=diffusion.BLOCK), "", "", True))  # fmt: skip
    return out


def _fused_launches() -> list[Launch]:
    """The fused single-process loss (fused_loss.py): its own kernels with every flag combination
    its launchers pass, and the tile kernels as it launches them (the logit scale an fp32 slot,
    the bias in its own dtype, fp32 stand-ins for the ids it never reads, int64 ids for
    scene_mode "ignore", HAS_POS always)."""
    sc, fl = _modules()[0], _modules()[3]
    out = []
    f, lab_f, lab_b, i64, i8 = _t(), _t(), _t(torch.bool), _t(torch.int64), _t(torch.int8)
    blocks = dict(BLOCK_N=fl.BLOCK_N, BLOCK_D=fl.BLOCK_D, BLOCK_C=fl.BLOCK_C)
    for dt_name, dtype in DTYPES.items():
        z = _t(dtype)
        shape = f"{dt_name}"
        common = dict(N=ROWS, D=768, C=20, s_z1=768, s_z2=768, s_lab=20, PART=2 * 20 * 768 + 20, g_factor=0.5)
        common.update(NBLK=ROWS // fl.BLOCK_N, NPROG=fl.PROLOGUE_PROGRAMS)
        common.update(K=4096, s_q=768, s_qlab=20, s_ids=1, s_qids=1, QBLK=4096 // fl.BLOCK_N)
        ptrs = dict(
            z1_ptr=z, z2_ptr=z, tau_ptr=f, bias_ptr=f, go_ptr=f, r_ptr=f, uk_ptr=z, vk_ptr=z, n1_ptr=f, n2_ptr=f,
            pos_ptr=f, g_ptr=f, part_ptr=f, gmax_ptr=f, zero_ptr=f, scale_out_ptr=f, counter_ptr=f, ok_tau_ptr=f,
            ok_bias_ptr=f, lflag_ptr=f, gmax_out_ptr=f, q_ptr=z, qlab_ptr=lab_f, ids_in_ptr=f, qids_in_ptr=f, ids_ptr=f,
        )  # fmt: skip
        no_queue = dict(HAS_QUEUE=False, QLAB_FLOAT=False, QLAB_BOOL=False, IDS=False)
        # prologue, forward: normalize x labels (none, float, bool) x symmetric (NPROJ 2, fixed-max zeroing)
        for norm, labels, sym in itertools.product((True, False), ("none", "float", "bool"), (True, False)):
            args = dict(common, **ptrs, **blocks, lab_ptr=lab_b if labels == "bool" else lab_f)
            args.update(
                BACKWARD=False, NORMALIZE=norm, HAS_LABELS=labels != "none", NPROJ=2 if sym else 1, SIGMOID=not sym,
                GO_VECTOR=False, ZERO=sym and norm, RNE_BF16=False, CHECK=True, HAS_BIAS=not sym,
                LAB_FLOAT=labels == "float", LAB_BOOL=labels == "bool", GMAX_DIRECT=False, **no_queue,
            )  # fmt: skip
            variant = f"fwd NORMALIZE={norm:d} labels={labels} SYM={sym:d}"
            heavy = norm and labels == "float" and sym
            out.append(Launch("_prologue_kernel", fl, args, shape, variant, heavy, fl.PROLOGUE_OPTIONS))
        # prologue, forward with scene ids (int8 as read) and / or a queue (its labels float / bool)
        for norm, labels, queue in itertools.product((True, False), ("scene", "float", "bool", "none"), (True, False)):
            if labels != "scene" and not queue:
                continue
            args = dict(common, **ptrs, **blocks, lab_ptr=lab_f)
            if labels == "scene":
                args.update(ids_in_ptr=i8, qids_in_ptr=i64, ids_ptr=i64)
            args.update(qlab_ptr=lab_b if labels == "bool" else lab_f)
            args.update(
                BACKWARD=False, NORMALIZE=norm, HAS_LABELS=labels in ("float", "bool"), NPROJ=1, SIGMOID=False,
                GO_VECTOR=False, ZERO=False, RNE_BF16=False, CHECK=True, HAS_BIAS=False,
                LAB_FLOAT=labels == "float", LAB_BOOL=False, GMAX_DIRECT=False, HAS_QUEUE=queue,
                QLAB_FLOAT=labels == "float", QLAB_BOOL=labels == "bool", IDS=labels == "scene",
            )  # fmt: skip
            variant = f"fwd NORMALIZE={norm:d} labels={labels} QUEUE={queue:d}"
            heavy = norm and labels == "float" and queue
            out.append(Launch("_prologue_kernel", fl, args, shape, variant, heavy, fl.PROLOGUE_OPTIONS))
        # prologue, backward: normalize x labels x form (symmetric softmax, softmax, sigmoid) x upstream kind
        for norm, has_labels, form, vec in itertools.product(
            (True, False), (True, False), ("sym", "softmax", "sigmoid"), (True, False)
        ):
            args = dict(common, **ptrs, **blocks, lab_ptr=lab_f)
            args.update(
                BACKWARD=True, NORMALIZE=norm, HAS_LABELS=has_labels, NPROJ=4 if form == "sym" else 2,
                SIGMOID=form == "sigmoid", GO_VECTOR=vec, ZERO=False, RNE_BF16=False, CHECK=False, HAS_BIAS=False,
                LAB_FLOAT=False, LAB_BOOL=False, GMAX_DIRECT=not vec, **no_queue,
            )  # fmt: skip
            variant = f"bwd NORMALIZE={norm:d} HAS_LABELS={has_labels:d} form={form} GO_VECTOR={vec:d}"
            heavy = norm and has_labels and form == "sym"
            out.append(Launch("_prologue_kernel", fl, args, shape, variant, heavy, fl.PROLOGUE_OPTIONS))
        # prologue, backward with scene ids and / or a queue (softmax row losses, sigmoid)
        for norm, labels, queue, form in itertools.product(
            (True, False), ("scene", "float", "none"), (True, False), ("softmax", "sigmoid")
        ):
            if labels != "scene" and not queue:
                continue
            args = dict(common, **ptrs, **blocks, lab_ptr=lab_f)
            if labels == "scene":
                args.update(ids_in_ptr=i64, qids_in_ptr=i64, ids_ptr=i64)
            args.update(
                BACKWARD=True, NORMALIZE=norm, HAS_LABELS=labels == "float", NPROJ=2, SIGMOID=form == "sigmoid",
                GO_VECTOR=True, ZERO=False, RNE_BF16=False, CHECK=False, HAS_BIAS=False, LAB_FLOAT=False,
                LAB_BOOL=False, GMAX_DIRECT=False, HAS_QUEUE=queue, QLAB_FLOAT=False, QLAB_BOOL=False,
                IDS=labels == "scene",
            )  # fmt: skip
            variant = f"bwd NORMALIZE={norm:d} labels={labels} QUEUE={queue:d} form={form}"
            heavy = norm and labels == "float" and queue and form == "softmax"
            out.append(Launch("_prologue_kernel", fl, args, shape, variant, heavy, fl.PROLOGUE_OPTIONS))
        # epilogues: form x labels (none, multi-label, scene ids, scenes ignored) x reduction / gradient needs
        for form, labels, split in itertools.product(
            ("sym", "softmax", "sigmoid"), ("multi", "none", "scene", "ignore"), (1, 2)
        ):
            if labels == "ignore" and form == "sigmoid":
                continue
            has_labels, scenes, has_r = labels == "multi", labels == "scene", labels != "ignore"
            ids = i64 if scenes else f
            for store_per in (True, False):
                args = dict(
                    uk_ptr=z, vk_ptr=z, lab_ptr=lab_f, p_ptr=f, rowbuf_ptr=f, colbuf_ptr=f, tau_ptr=f, bias_ptr=f,
                    hw=0.3, row_ptr=f, col_ptr=f, r_ptr=f, per_ptr=f, lpart_ptr=f, counter_ptr=f, out_ptr=f,
                    factor=1.0 / ROWS, ids_ptr=ids, N=ROWS, M=ROWS + 4096, D=768, C=20, s_lab=20, s_uk=768, s_vk=768,
                    NBLK=ROWS // fl.BLOCK_N, SPLIT=split, SIGMOID=form == "sigmoid", NEED_COL=form == "sym",
                    HAS_LABELS=has_labels, HAS_BIAS=form == "sigmoid", STORE_PER=store_per, SCENES=scenes,
                    HAS_R=has_r, **blocks,
                )  # fmt: skip
                variant = f"form={form} labels={labels} SPLIT={split} STORE_PER={store_per:d}"
                heavy = form == "sym" and labels in ("multi", "scene") and split == 2 and not store_per
                opts = fl.SCENE_OPTIONS if scenes else {}
                out.append(Launch("_fwd_epilogue_kernel", fl, args, shape, variant, heavy, opts))
            for norm, need_tau in itertools.product((True, False), (True, False)):
                args = dict(
                    uk_ptr=z, vk_ptr=z, lab_ptr=lab_f, p_ptr=f, g_ptr=f, r_ptr=f, gu_ptr=f, gv_ptr=f, wsum_ptr=f,
                    n1_ptr=f, n2_ptr=f, tau_ptr=f, hw=0.3, dz1_ptr=z, dz2_ptr=z, spart_ptr=f, counter_ptr=f,
                    dtau_ptr=f, dbias_ptr=f, ids_ptr=ids, N=ROWS, M=ROWS + 4096, D=768, C=20, s_lab=20,
                    NBLK=ROWS // fl.BLOCK_N, NEED_TAU=need_tau, SPLIT=split, SIGMOID=form == "sigmoid",
                    NEED_COL=form == "sym", HAS_LABELS=has_labels, NORMALIZE=norm, NEED_Z1=True, NEED_Z2=True,
                    NEED_BIAS=form == "sigmoid", SCENES=scenes, HAS_R=has_r, **blocks,
                )  # fmt: skip
                variant = f"form={form} labels={labels} SPLIT={split} NORMALIZE={norm:d} NEED_TAU={need_tau:d}"
                heavy = form == "sym" and labels in ("multi", "scene") and split == 2 and norm and need_tau
                opts = fl.SCENE_OPTIONS if scenes else {}
                out.append(Launch("_bwd_epilogue_kernel", fl, args, shape, variant, heavy, opts))
        for has_max, has_flags in ((False, True), (True, False)):
            args = dict(
                part_ptr=f, out_ptr=f, gmax_ptr=f, max_out_ptr=f, lflag_ptr=f, ok_fin_ptr=f, ok_neg_ptr=f,
                NSLOT=fl.PROLOGUE_PROGRAMS, NBLK=ROWS // fl.BLOCK_N, PART=4 * 20 * 768, L=4 * 20 * 768,
                QBLK=4096 // fl.BLOCK_N, HAS_MAX=has_max, HAS_FLAGS=has_flags, BLOCK=fl.REDUCE_BLOCK,
            )  # fmt: skip
            out.append(Launch("_reduce_kernel", fl, args, shape, f"HAS_MAX={has_max:d}", has_max))
    # the tile kernels with the fused launchers' argument types
    for (dt_name, dtype), d in itertools.product(DTYPES.items(), (256, 768)):
        a = _t(dtype)
        base = dict(
            a_ptr=a, b_ptr=a, a_ids_ptr=f, b_ids_ptr=f, NA=ROWS, NB=ROWS, D=d, stride_a=d, stride_b=d, offset=0,
            scale_ptr=f, bias_ptr=f, N_KEY=ROWS, M_KEY=ROWS, D_KEY=triton.next_power_of_2(d), UPCAST=False,
            PRECISION=sc.TritonSoftContrastiveCore._precision(dtype), HAS_POS=True, SPLIT=1,
        )  # fmt: skip
        shape = f"fused D={d} {dt_name}"
        i64 = _t(torch.int64)
        for mode, bounded, fixed_col, col_of_fixed, has_bias in (
            (MODE_SOFTMAX, True, True, False, False), (MODE_SOFTMAX, True, False, True, False),
            (MODE_SOFTMAX, False, False, False, False), (MODE_SIGMOID, True, False, False, True),
            (MODE_SOFTMAX_IGNORE, True, True, False, False), (MODE_SOFTMAX_IGNORE, True, False, True, False),
            (MODE_SOFTMAX_IGNORE, False, False, False, False),
        ):  # fmt: skip
            args = dict(base, pos_ptr=f, out_ptr=f, col_sum_ptr=f, col_in_ptr=f, MODE=mode, BOUNDED=bounded,
                        HAS_BIAS=has_bias, FIXED_COL=fixed_col, COL_OF_FIXED=col_of_fixed)  # fmt: skip
            if mode == MODE_SOFTMAX_IGNORE:
                args.update(a_ids_ptr=i64, b_ids_ptr=i64)
            variant = f"fused MODE={mode} BOUNDED={bounded:d} FIXED_COL={fixed_col:d} COL_OF_FIXED={col_of_fixed:d}"
            out.append(Launch("_sc_forward_kernel", sc, args, shape, variant))
        for mode, bounded, has_aw, has_bw, wsum in (
            (MODE_SOFTMAX, True, True, True, False), (MODE_SOFTMAX, True, False, True, False),
            (MODE_SOFTMAX, True, True, False, False), (MODE_SIGMOID, False, True, False, True),
            (MODE_SIGMOID, False, False, True, False), (MODE_SOFTMAX_IGNORE, True, True, True, False),
            (MODE_SOFTMAX_IGNORE, True, False, True, False), (MODE_SOFTMAX_IGNORE, True, True, False, False),
        ):  # fmt: skip
            args = dict(base, **{p: f for p in _BWD_F32_PTRS}, MODE=mode, BOUNDED=bounded, HAS_BIAS=mode == MODE_SIGMOID,
                        HAS_AW=has_aw, HAS_BW=has_bw, NEED_WSUM=wsum)  # fmt: skip
            if mode == MODE_SOFTMAX_IGNORE:
                args.update(a_ids_ptr=i64, b_ids_ptr=i64)
            args["W_PRECISION"] = args["PRECISION"]
            variant = f"fused MODE={mode} BOUNDED={bounded:d} HAS_AW={has_aw:d} HAS_BW={has_bw:d} NEED_WSUM={wsum:d}"
            out.append(Launch("_sc_backward_kernel", sc, args, shape, variant))
    return out


def launches() -> list[Launch]:
    return _loss_launches() + _masking_launches() + _diffusion_launches() + _fused_launches()


def kernels_without_launch(found: list[Launch]) -> list[str]:
    """Every @triton.jit kernel (a function with a launch grid, not a helper) the modules define
    that the matrix never launches: a new kernel must be added to it."""
    launched = {launch.name for launch in found}
    missing = []
    for module in _modules():
        for attr, value in vars(module).items():
            fn = _jit(value) if isinstance(value, (Autotuner, Heuristics, JITFunction)) else None
            if fn is not None and "program_id" in fn.src and attr.endswith("_kernel"):
                name = f"{module.__name__.rsplit('.', 1)[1]}.{attr}"
                if name not in launched:
                    missing.append(name)
    return missing


# --------------------------------------------------------------------------------------------
# from a launch to the compiles the autotuner could ask for


def _jit(kernel) -> JITFunction:
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


@dataclasses.dataclass
class Compile:
    kernel: str
    config: str
    autotune: int | None  # index of the config in the kernel's autotune list (None: not autotuned)
    arch: int
    options: dict
    args: dict  # final arguments (config and heuristics applied)
    shapes: list = dataclasses.field(default_factory=list)
    variants: list = dataclasses.field(default_factory=list)


def configs(launch: Launch, arch: int) -> list[tuple[str, dict, dict, int | None]]:
    """(config label, final args, compile options, autotune index) for every config the pruning
    keeps for ``arch`` (passed to the prune functions as ``ARCH``), with the kernel's heuristics
    applied as at run time."""
    kernel = getattr(launch.module, launch.kernel)
    if isinstance(kernel, Autotuner):
        kept = kernel.configs
        if kernel.early_config_prune:
            kept = kernel.early_config_prune(kernel.configs, {**launch.args, "ARCH": arch})
        steps = []
        for c in kept:
            options = {"num_warps": c.num_warps, "num_stages": c.num_stages}
            if c.maxnreg is not None:
                options["maxnreg"] = c.maxnreg
            index = next(i for i, x in enumerate(kernel.configs) if x is c)  # Config == compares values
            steps.append((dict(c.kwargs), options, index))
        kernel = kernel.fn
    else:
        # Triton's defaults, unless the launcher passes options
        steps = [({}, {"num_warps": 4, "num_stages": 3, **launch.options}, None)]
    out = []
    for cfg_kwargs, options, index in steps:
        args = {**launch.args, **cfg_kwargs}
        layer = kernel
        while isinstance(layer, Heuristics):
            for name, rule in layer.values.items():
                args[name] = rule(args)
            layer = layer.fn
        tiles = {k: v for k, v in args.items() if k.startswith(("BLOCK", "CHUNK", "N_CHUNK")) or k == "RESIDENT"}
        label = " ".join(f"{k}={int(v)}" for k, v in tiles.items())
        regs = f" r{options['maxnreg']}" if "maxnreg" in options else ""
        out.append((f"{label} w{options['num_warps']} s{options['num_stages']}{regs}", args, options, index))
    return out


def _specialise(fn: JITFunction, args: dict, options: dict, arch: int):
    """Signature, constants and attributes as Triton's launcher derives them (runtime/jit.py)."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, extra = binder(**args, **options)
    opts, signature, constexprs, attrs = fn._pack_args(backend, dict(options), bound, specialization, extra)
    return opts, signature, constexprs, attrs


def plan(archs: list[int], full: bool = False, select=None) -> list[Compile]:
    """The unique compiles: every (launch, kept config, arch) of the selection, deduplicated by
    what Triton would compile (signature, constants, attributes, options, arch). ``select``: a
    predicate on launches to compile only some (then without the coverage check)."""
    all_launches = [launch for launch in launches() if select is None or select(launch)]
    missing = kernels_without_launch(all_launches) if select is None else []
    if missing:
        raise SystemExit(f"compile_check: kernels without a launch in the matrix: {', '.join(missing)}")
    # full: everything. Default: every kept config of every kernel at every D and arch with the
    # heaviest flags (bf16 and fp32; fp16 compiles like bf16), then every other flag combination
    # once, on its first kept config, cycling through the shapes and the architectures.
    selected: list[tuple[Launch, tuple, int]] = []
    light: dict[tuple, list[Launch]] = {}
    for launch in all_launches:
        if full or (launch.heavy and "fp16" not in launch.shape):
            selected += [(launch, cfg, arch) for arch in archs for cfg in configs(launch, arch)]
        elif not launch.heavy:
            light.setdefault((launch.name, launch.variant), []).append(launch)
    for i, group in enumerate(light.values()):
        launch, arch = group[i % len(group)], archs[i % len(archs)]
        selected.append((launch, configs(launch, arch)[0], arch))
    unique: dict[tuple, Compile] = {}
    for launch, (label, args, options, index), arch in selected:
        fn = _jit(getattr(launch.module, launch.kernel))
        _, signature, constexprs, attrs = _specialise(fn, args, options, arch)
        key = (launch.name, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())))
        key += (repr(sorted(attrs.items())), repr(sorted(options.items())))
        entry = unique.setdefault(key, Compile(launch.name, label, index, arch, options, args))
        entry.shapes.append(launch.shape)
        entry.variants.append(launch.variant)
    return list(unique.values())


# --------------------------------------------------------------------------------------------
# compiling (in worker processes) and reading the resources


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _usage(cubin: bytes) -> dict[str, int]:
    """Registers and stack frame bytes of the cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {"regs": int(fields["REG"]), "stack_bytes": int(fields["STACK"])}


def _spill_bytes(ptx: str, opts, arch: int) -> int:
    """Spill stores, from ptxas -v run the way Triton runs it. A stack frame alone is not a spill:
    the slow path of an IEEE division, for one, is a call that saves registers on the stack."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    log = io.StringIO()
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(log):
            backend.make_cubin(ptx, {}, opts, arch)
    finally:
        del os.environ["TRITON_DUMP_PTXAS_LOG"]
    stores = re.findall(r"(\d+) bytes spill stores", log.getvalue())
    if not stores:
        raise RuntimeError(f"no spill line in the ptxas log: {log.getvalue()[:300]!r}")
    return max(int(n) for n in stores)


def _cpu_seconds() -> float:
    t = os.times()  # this process and the ptxas / cuobjdump it ran
    return t.user + t.system + t.children_user + t.children_system


def compile_one(job: Compile) -> dict:
    """Compile one job for its architecture and return its row."""
    module_name, kernel_name = job.kernel.split(".")
    module = dict(zip(_KERNEL_MODULES, _modules()))[module_name]
    fn = _jit(getattr(module, kernel_name))
    row = {"kernel": job.kernel, "config": job.config, "autotune": "" if job.autotune is None else job.autotune}
    row.update(arch=f"sm_{job.arch}", regs="", stack_bytes="", spill_bytes="")
    row.update(smem_bytes="", status="ok", shapes=len(job.shapes), example=f"{job.shapes[0]} {job.variants[0]}".strip())
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    try:
        opts, signature, constexprs, attrs = _specialise(fn, job.args, job.options, job.arch)
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", job.arch, 32), options=opts.__dict__
        )
        row.update(_usage(compiled.asm["cubin"]), smem_bytes=compiled.metadata.shared, spill_bytes=0)
        if row["stack_bytes"]:
            row["spill_bytes"] = _spill_bytes(compiled.asm["ptx"], opts, job.arch)
        problems = []
        if row["spill_bytes"]:
            problems.append(f"spills {row['spill_bytes']} B")
        limit = SMEM_LIMIT.get(job.arch, 99 * 1024)
        if row["smem_bytes"] > limit:
            problems.append(f"shared memory {row['smem_bytes']} B > {limit} B")
        if problems:
            row["status"] = "FAIL: " + ", ".join(problems)
    except Exception as e:  # a compile error is a result to report, not a crash of the check
        row["status"] = f"FAIL: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["cpu_seconds"] = round(_cpu_seconds() - cpu0, 2)
    return row


def run(
    archs: list[int], full: bool = False, jobs: int | None = None, progress: bool = True, select=None
) -> list[dict]:
    todo = plan(archs, full, select)
    # the slowest first (the loss's backward) so that the pool does not end on one long compile
    todo.sort(key=lambda j: (not j.kernel.endswith("backward_kernel"), j.kernel, j.arch))
    jobs = jobs or os.cpu_count() or 1
    rows = []
    ctx = multiprocessing.get_context("fork")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="compiling", unit="kernel", file=sys.stderr)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for row in pool.map(compile_one, todo, chunksize=1):
            rows.append(row)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return rows


def summary(rows: list[dict], seconds: float) -> str:
    ok = [r for r in rows if r["regs"] != ""]
    kernels = sorted({r["kernel"] for r in rows})
    archs = sorted({r["arch"] for r in rows})
    fails = [r for r in rows if r["status"] != "ok"]
    lines = [
        f"{len(rows)} compiles ({len(kernels)} kernels x their kept configs, {len(ok)} with resources) for "
        f"{', '.join(archs)} in {seconds:.0f} s; {len(fails)} failed"
    ]
    if ok:
        top_r = max(ok, key=lambda r: r["regs"])
        top_s = max(ok, key=lambda r: r["smem_bytes"])
        spills = sum(1 for r in ok if r["spill_bytes"])
        lines.append(f"largest register count: {top_r['regs']} ({top_r['kernel']} {top_r['config']} {top_r['arch']})")
        lines.append(
            f"largest shared memory: {top_s['smem_bytes'] / 1024:.0f} KiB ({top_s['kernel']} {top_s['config']} "
            f"{top_s['arch']}); compiles that spill: {spills}"
        )
    return "\n".join(lines)


FIELDS = [
    "kernel",
    "config",
    "autotune",
    "arch",
    "regs",
    "stack_bytes",
    "spill_bytes",
    "smem_bytes",
    "status",
    "shapes",
    "example",
    "seconds",
    "cpu_seconds",
]


def print_rows(rows: list[dict], quiet: bool = False) -> None:
    """One line per compile (only the failures when quiet), sorted by kernel, arch and config."""
    rows.sort(key=lambda r: (r["kernel"], r["arch"], r["config"]))
    print(f"{'kernel':38s} {'config':62s} {'arch':6s} {'regs':>4s} {'spill':>5s} {'smem':>8s}  status")
    for r in rows:
        if quiet and r["status"] == "ok":
            continue
        smem = f"{r['smem_bytes'] / 1024:.1f}K" if r["smem_bytes"] != "" else ""
        print(
            f"{r['kernel']:38s} {r['config']:62s} {r['arch']:6s} {r['regs']!s:>4s} {r['spill_bytes']!s:>5s} "
            f"{smem:>8s}  {r['status']}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    ap.add_argument("--full", action="store_true", help="every flag combination x every config x every shape")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    ap.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    ns = ap.parse_args(argv)
    use_gpu_configs()
    try:
        archs = [int(a) for a in ns.arch.split(",") if a.strip()]
    except ValueError:
        ap.error(f"--arch takes comma-separated compute capabilities such as 80,90, got {ns.arch!r}")
    start = time.perf_counter()
    rows = run(archs, ns.full, ns.jobs, progress=not ns.quiet)
    seconds = time.perf_counter() - start
    print_rows(rows, ns.quiet)
    print(summary(rows, seconds))
    if ns.csv:
        with open(ns.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
