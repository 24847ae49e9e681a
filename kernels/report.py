"""Static report of the Triton kernels, compiled ahead of time for sm_80 and sm_90 on any machine.

    python -m qtune.kernels.report            # every kernel at its first config + dtype/bit variants
    python -m qtune.kernels.report --all      # every autotune config of every kernel (the CI check)
    python -m qtune.kernels.report --fast     # one config per kernel

For each compiled kernel it prints registers per thread and spill bytes (``ptxas -v``; ptxas ships
inside the Triton wheel), the shared memory Triton allocates, whether tensor-core instructions appear
in the PTX (``mma.sync`` on sm_80, ``wgmma`` on sm_90), how many 128-bit global loads it issues
(``ld.global.v4`` and 16-byte ``cp.async``), and the bytes of quantized weight it moves per weight
element (formats at their usual parameters, see ``BYTES``). No GPU is needed: ``triton.compile`` takes a
``GPUTarget``. The interpreter must be off (Triton reads ``TRITON_INTERPRET`` when kernels are
defined), so run under the interpreter this module re-runs itself in a clean subprocess.

Exit status: 0 when everything compiled; with ``--check`` also 1 when a fused matmul has no
tensor-core instruction.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Optional

ARCHS = (80, 90)
_PKG = __package__ or "qtune.kernels"

# Scalars that real shapes (4096, 14336, ...) make multiples of 16, so Triton's JIT specializes them
# that way too (``tt.divisibility``); every pointer is 16-byte aligned (PyTorch allocations are).
_DIV16 = {"N", "K", "W_BYTES", "n_elements", "n_bytes", "stride_xm", "stride_ym", "stride_wn", "stride_dym", "stride_dxm",
          "stride_on", "stride_z", "stride_qm"}
_FLOAT_ARGS = {"threshold"}
_LAUNCH = ("num_warps", "num_stages")

# Bytes of quantized weight moved per weight element, at NF4/FP4 blocksize 64, GPTQ group 128 and
# N = 4096, int8 group 128 / per row, K = 4096; dequantize kernels add their output (2 B in fp16).
BS, GPTQ_G, INT8_G, KDIM, NDIM = 64, 128, 128, 4096, 4096


def _b4(double_quant: bool) -> float:
    return 0.5 + ((1 + 4 / 256) / BS if double_quant else 4 / BS)


def _bgptq(bits: int, act_order: bool = False) -> float:
    return bits / 8 + (2 + bits / 8) / GPTQ_G + (4 / NDIM if act_order else 0.0)


def _bgguf(ggml_type: int) -> float:
    """GGUF: the block's bytes over its weights."""
    from qtune.formats.gguf import config_for_ggml_type

    cfg = config_for_ggml_type(ggml_type)
    return cfg.type_size / cfg.block_size


def _b8(zero: bool, per_row: bool) -> float:
    if per_row:
        return 1 + (5 if zero else 4) / KDIM
    return 1 + (5 if zero else 4) / INT8_G


@dataclasses.dataclass(frozen=True)
class Job:
    """One kernel specialization to compile."""

    kernel: str             # "<module>:<jit function>"
    name: str               # short name printed in the report
    variant: str            # what the specialization is (dtype, format parameters)
    ptrs: tuple             # ((arg name, triton pointer type), ...)
    constexprs: tuple       # ((name, value), ...) besides the config's meta-parameters
    config: tuple           # ((name, value), ...) meta-parameters + num_warps/num_stages
    bytes_per_weight: float
    matmul: bool            # a fused matmul: must contain tensor-core instructions
    fp_fusion: bool = True
    not_div16: tuple = ()   # scalars not specialized as multiples of 16 (odd shapes)
    cap: int = 80


def _cfg_items(cfg: Any) -> tuple:
    import triton
    if isinstance(cfg, triton.Config):
        d = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        d = dict(cfg)
    return tuple(sorted(d.items()))


def _jobs(level: str) -> list[Job]:
    """Specializations to compile.

    level "fast": each kernel's main config list at its first config; "default": every config list at its
    first config, in every variant (dtype, bits, double quant, act-order, odd K); "all": "default" plus
    every config of every list at the list's first variant.
    """
    from . import (dequant_4bit, dequant_affine, dequant_gguf, dequant_gptq, dequant_int8, matmul_4bit,
                   matmul_affine, matmul_gguf, matmul_gptq, matmul_int8, matmul_llm_int8)

    jobs: list[Job] = []
    main_sets = {"fwd", "bwd", "fwd_decode", "bwd_decode", "gemm", "gemm_decode", "quantize", "dequant"}

    def add(kernel, name, configs, variants, fp_fusion=True, matmul=True, set_name="dequant"):
        # variants: list of (label, pointer types, constexprs, bytes per weight, scalars not multiple of 16)
        if level == "fast" and set_name not in main_sets:
            return
        for vi, (label, ptrs, consts, bpw, not_div) in enumerate(variants):
            if level == "fast" and vi > 0:
                break
            cfgs = configs if (vi == 0 and level == "all") else configs[:1]
            for cfg in cfgs:
                jobs.append(Job(kernel, name, label, tuple(ptrs.items()), tuple(sorted(consts.items())),
                                _cfg_items(cfg), bpw, matmul, fp_fusion, tuple(not_div)))

    f32, u8 = "*fp32", "*u8"
    odd = ("K", "stride_wn", "stride_xm", "stride_dxm")

    # -- dequantize ---------------------------------------------------------------------------------
    def d4(out, dq):
        return {"packed_ptr": u8, "absmax_ptr": u8 if dq else f32, "code_ptr": f32, "nested_absmax_ptr": f32,
                "nested_code_ptr": f32, "nested_offset_ptr": f32, "out_ptr": out}
    add("dequant_4bit:_dequant_4bit_kernel", "dequant_4bit", dequant_4bit.CONFIGS, [
        ("nf4 bs64 -> fp16", d4("*fp16", False), dict(BLOCKSIZE=64, DOUBLE_QUANT=False), _b4(False) + 2, ()),
        ("nf4 bs64 dq -> bf16", d4("*bf16", True), dict(BLOCKSIZE=64, DOUBLE_QUANT=True), _b4(True) + 2, ()),
        ("nf4 bs4096 dq -> fp32", d4("*fp32", True), dict(BLOCKSIZE=4096, DOUBLE_QUANT=True), 0.5 + 1.01 / 4096 + 4,
         ()),
        ("nf4 bs100 (not 2^n) -> fp16", d4("*fp16", False), dict(BLOCKSIZE=100, DOUBLE_QUANT=False),
         0.5 + 4 / 100 + 2, ()),
    ], fp_fusion=False, matmul=False)

    def d8(w, out, zero):
        return {"w_ptr": w, "scale_ptr": f32, "zero_ptr": u8 if zero else f32, "out_ptr": out}
    add("dequant_int8:_dequant_int8_kernel", "dequant_int8", dequant_int8.CONFIGS, [
        ("absmax per row -> fp16", d8("*i8", "*fp16", False), dict(HAS_ZERO=False, GROUP_SIZE=0),
         _b8(False, True) + 2, ()),
        ("zero-point g128 -> bf16", d8(u8, "*bf16", True), dict(HAS_ZERO=True, GROUP_SIZE=INT8_G),
         _b8(True, False) + 2, ()),
        ("absmax g32 -> fp32", d8("*i8", "*fp32", False), dict(HAS_ZERO=False, GROUP_SIZE=32),
         1 + 4 / 32 + 4, ()),
        ("zero-point g100 -> fp16", d8(u8, "*fp16", True), dict(HAS_ZERO=True, GROUP_SIZE=100),
         1 + 5 / 100 + 2, ()),
    ], fp_fusion=False, matmul=False)

    def dg(out):
        return {"qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16", "g_idx_ptr": "*i32", "out_ptr": out}
    add("dequant_gptq:_dequant_gptq_kernel", "dequant_gptq", dequant_gptq.CONFIGS, [
        (f"{b}-bit g128 -> fp16", dg("*fp16"), dict(BITS=b, GROUP_SIZE=GPTQ_G), _bgptq(b) + 2, ()) for b in (4, 2, 3, 8)
    ] + [("4-bit act-order -> bf16", dg("*bf16"), dict(BITS=4, GROUP_SIZE=0), _bgptq(4, True) + 2, ()),
         ("3-bit g32 -> fp32", dg("*fp32"), dict(BITS=3, GROUP_SIZE=32), 3 / 8 + 2.375 / 32 + 4, ())],
        fp_fusion=False, matmul=False)

    # GGUF: every block type, the output dtypes spread over them
    gguf_out = {"Q4_0": "*fp16", "Q4_1": "*bf16", "Q5_0": "*fp16", "Q5_1": "*fp32", "Q8_0": "*fp16", "Q4_K": "*bf16",
                "Q5_K": "*fp16", "Q6_K": "*fp32"}
    add("dequant_gguf:_dequant_gguf_kernel", "dequant_gguf", dequant_gguf.CONFIGS, [
        (f"{name} -> {out[1:]}", {"w_ptr": u8, "out_ptr": out}, dict(TYPE=t),
         _bgguf(t) + (4 if out == f32 else 2), ())
        for t, name in dequant_gguf.TYPES.items() for out in (gguf_out[name],)
    ], fp_fusion=False, matmul=False)
    def da(out):
        return {"w_ptr": u8, "scale_ptr": "*fp16", "offset_ptr": "*fp16", "out_ptr": out}
    add("dequant_affine:_dequant_affine_kernel", "dequant_affine", dequant_affine.CONFIGS, [
        (f"affine {b}-bit g64 -> fp16", da("*fp16"), dict(BITS=b, GROUP_SIZE=64), b / 8 + 4 / 64 + 2, ())
        for b in (4, 2, 3, 8)
    ] + [("affine 4-bit g128 -> bf16", da("*bf16"), dict(BITS=4, GROUP_SIZE=128), 0.5 + 4 / 128 + 2, ()),
         ("affine 3-bit g32 -> fp32", da("*fp32"), dict(BITS=3, GROUP_SIZE=32), 3 / 8 + 4 / 32 + 4, ())],
        fp_fusion=False, matmul=False)

    def prec(act):
        return "tf32x3" if act == f32 else "tf32"

    # -- fused 4-bit ----------------------------------------------------------------------------------
    def v4(direction, act, dq=False, even=True, bias=False, decode=False):
        p = {"dy_ptr" if direction == "bwd" else "x_ptr": act, "packed_ptr": u8, "absmax_ptr": u8 if dq else f32,
             "code_ptr": f32, "nested_absmax_ptr": f32, "nested_code_ptr": f32, "nested_offset_ptr": f32}
        c = dict(BLOCKSIZE=64, DOUBLE_QUANT=dq, EVEN_K=even, ROW_ALIGNED=even, DOT_FP32=False, DOT_PRECISION=prec(act))
        out = f32 if decode else act
        if direction == "fwd":
            p["bias_ptr"] = act
            p["y_ptr"] = out
            c["HAS_BIAS"] = bias
        else:
            p["dx_ptr"] = out
        label = f"{act[1:]} nf4{' dq' if dq else ''}{' odd K' if not even else ''}{' bias' if bias else ''}"
        return (label, p, c, _b4(dq), () if even else odd)

    variants4 = {
        "fwd": [v4("fwd", "*fp16", dq=True, bias=True), v4("fwd", "*bf16")],
        "fwd_fp32": [v4("fwd", f32, dq=True)],
        "fwd_odd_k": [v4("fwd", "*fp16", even=False), v4("fwd", "*bf16", dq=True, even=False)],
        "fwd_decode": [v4("fwd", "*fp16", dq=True, bias=True, decode=True), v4("fwd", f32, decode=True),
                       v4("fwd", "*bf16", even=False, decode=True)],
        "bwd": [v4("bwd", "*fp16", dq=True), v4("bwd", "*bf16")],
        "bwd_fp32": [v4("bwd", f32)],
        "bwd_odd_k": [v4("bwd", "*fp16", even=False)],
        "bwd_decode": [v4("bwd", "*fp16", dq=True, decode=True), v4("bwd", f32, decode=True),
                       v4("bwd", "*fp16", even=False, decode=True)],
        "fwd_decode_det": [v4("fwd", "*fp16", dq=True, bias=True), v4("fwd", "*bf16", even=False)],
        "bwd_decode_det": [v4("bwd", "*bf16", dq=True), v4("bwd", f32)],
    }
    for set_name, variants in variants4.items():
        kernel = "_linear_4bit_fwd_kernel" if set_name.startswith("fwd") else "_linear_4bit_bwd_kernel"
        add(f"matmul_4bit:{kernel}", f"linear_4bit[{set_name}]", matmul_4bit.CONFIGS[set_name], variants,
            set_name=set_name)

    # -- fused GPTQ -----------------------------------------------------------------------------------
    def vg(direction, act, bits=4, group=GPTQ_G, bias=False, decode=False):
        p = {"dy_ptr" if direction == "bwd" else "x_ptr": act, "qweight_ptr": "*i32", "qzeros_ptr": "*i32",
             "scales_ptr": "*fp16", "g_idx_ptr": "*i32"}
        c = dict(BITS=bits, GROUP_SIZE=group, DOT_FP32=False, DOT_PRECISION=prec(act))
        out = f32 if decode else act
        if direction == "fwd":
            p["bias_ptr"] = act
            p["y_ptr"] = out
            c["HAS_BIAS"] = bias
        else:
            p["dx_ptr"] = out
        grp = "act-order" if group == 0 else f"g{group}"
        bpw = bits / 8 + (2 + bits / 8) / (group or GPTQ_G) + (4 / NDIM if group == 0 else 0.0)
        return (f"{act[1:]} {bits}-bit {grp}{' bias' if bias else ''}", p, c, bpw, ())

    variantsg = {
        "fwd": [vg("fwd", "*fp16", bias=True), vg("fwd", "*fp16", bits=3), vg("fwd", "*fp16", group=0),
                vg("fwd", "*fp16", group=32), vg("fwd", "*bf16", bits=2)],
        "fwd_fp32": [vg("fwd", f32), vg("fwd", f32, bits=3, group=0)],
        "fwd_decode": [vg("fwd", "*fp16", bias=True, decode=True), vg("fwd", "*fp16", bits=3, group=0, decode=True),
                       vg("fwd", f32, bits=8, decode=True)],
        "bwd": [vg("bwd", "*fp16"), vg("bwd", "*bf16", bits=3), vg("bwd", "*fp16", group=0)],
        "bwd_fp32": [vg("bwd", f32)],
        "bwd_decode": [vg("bwd", "*fp16", decode=True), vg("bwd", "*fp16", group=0, decode=True),
                       vg("bwd", f32, decode=True)],
        "fwd_decode_det": [vg("fwd", "*fp16", bias=True), vg("fwd", "*bf16", bits=3, group=0)],
        "bwd_decode_det": [vg("bwd", "*bf16"), vg("bwd", f32, group=0)],
    }
    for set_name, variants in variantsg.items():
        kernel = "_linear_gptq_fwd_kernel" if set_name.startswith("fwd") else "_linear_gptq_bwd_kernel"
        add(f"matmul_gptq:{kernel}", f"linear_gptq[{set_name}]", matmul_gptq.CONFIGS[set_name], variants,
            set_name=set_name)

    # -- fused int8 (weight-only) -----------------------------------------------------------------------
    def v8(direction, act, zero=False, group=0, bias=False, decode=False):
        p = {"dy_ptr" if direction == "bwd" else "x_ptr": act, "w_ptr": u8 if zero else "*i8", "scale_ptr": f32,
             "zero_ptr": u8 if zero else f32}
        c = dict(HAS_ZERO=zero, GROUP_SIZE=group, DOT_FP32=False, DOT_PRECISION=prec(act))
        out = f32 if decode else act
        if direction == "fwd":
            p["bias_ptr"] = act
            p["y_ptr"] = out
            c["HAS_BIAS"] = bias
        else:
            p["dx_ptr"] = out
        label = f"{act[1:]} {'zero-point' if zero else 'absmax'} {'per row' if group == 0 else f'g{group}'}"
        return (label + (" bias" if bias else ""), p, c, _b8(zero, group == 0) if group in (0, INT8_G)
                else 1 + (5 if zero else 4) / group, ())

    variants8 = {
        "fwd": [v8("fwd", "*fp16", bias=True), v8("fwd", "*bf16", zero=True, group=INT8_G),
                v8("fwd", "*fp16", group=32)],
        "fwd_fp32": [v8("fwd", f32), v8("fwd", f32, zero=True, group=INT8_G)],
        "fwd_decode": [v8("fwd", "*fp16", bias=True, decode=True), v8("fwd", f32, zero=True, group=INT8_G,
                                                                       decode=True)],
        "bwd": [v8("bwd", "*fp16"), v8("bwd", "*bf16", zero=True, group=INT8_G)],
        "bwd_fp32": [v8("bwd", f32)],
        "bwd_decode": [v8("bwd", "*fp16", decode=True), v8("bwd", f32, zero=True, group=INT8_G, decode=True)],
        "fwd_decode_det": [v8("fwd", "*fp16", bias=True), v8("fwd", "*bf16", zero=True, group=INT8_G)],
        "bwd_decode_det": [v8("bwd", "*bf16"), v8("bwd", f32, zero=True, group=INT8_G)],
    }
    for set_name, variants in variants8.items():
        kernel = "_linear_int8_fwd_kernel" if set_name.startswith("fwd") else "_linear_int8_bwd_kernel"
        add(f"matmul_int8:{kernel}", f"linear_int8[{set_name}]", matmul_int8.CONFIGS[set_name], variants,
            set_name=set_name)

    # -- fused GGUF -------------------------------------------------------------------------------------
    def vq(direction, act, name, bias=False, decode=False):
        t = next(k for k, v in dequant_gguf.TYPES.items() if v == name)
        p = {"dy_ptr" if direction == "bwd" else "x_ptr": act, "w_ptr": u8}
        c = dict(TYPE=t, DOT_FP32=False, DOT_PRECISION=prec(act))
        out = f32 if decode else act
        if direction == "fwd":
            p["bias_ptr"] = act
            p["y_ptr"] = out
            c["HAS_BIAS"] = bias
        else:
            p["dx_ptr"] = out
        return (f"{act[1:]} {name}{' bias' if bias else ''}", p, c, _bgguf(t), ())

    h, b16 = "*fp16", "*bf16"
    variantsq = {
        "fwd": [vq("fwd", h, "Q4_1", bias=True), vq("fwd", b16, "Q4_K"), vq("fwd", h, "Q6_K")],
        "fwd_fp32": [vq("fwd", f32, "Q8_0")],
        # decode is the fused kernel's main use (dispatch: forward fused for M ≤ 16): every type
        "fwd_decode": [vq("fwd", h, "Q4_0", bias=True, decode=True), vq("fwd", b16, "Q4_1", decode=True),
                       vq("fwd", h, "Q5_0", decode=True), vq("fwd", f32, "Q5_1", decode=True),
                       vq("fwd", b16, "Q8_0", decode=True), vq("fwd", h, "Q4_K", decode=True),
                       vq("fwd", b16, "Q5_K", decode=True), vq("fwd", h, "Q6_K", decode=True)],
        "bwd": [vq("bwd", h, "Q4_1"), vq("bwd", b16, "Q4_K")],
        "bwd_fp32": [vq("bwd", f32, "Q5_0")],
        "bwd_decode": [vq("bwd", h, "Q8_0", decode=True), vq("bwd", f32, "Q6_K", decode=True)],
        "fwd_decode_det": [vq("fwd", h, "Q4_1", bias=True), vq("fwd", b16, "Q5_K")],
        "bwd_decode_det": [vq("bwd", b16, "Q4_0"), vq("bwd", f32, "Q6_K")],
    }
    for set_name, variants in variantsq.items():
        kernel = "_linear_gguf_fwd_kernel" if set_name.startswith("fwd") else "_linear_gguf_bwd_kernel"
        # without FMA contraction, as launched: the tile is the reference's fp32 Ŵ
        add(f"matmul_gguf:{kernel}", f"linear_gguf[{set_name}]", matmul_gguf.CONFIGS[set_name], variants,
            fp_fusion=False, set_name=set_name)

    # -- fused affine -----------------------------------------------------------------------------------
    def va(direction, act, bits=4, group=64, bias=False, decode=False, even=True):
        p = {"dy_ptr" if direction == "bwd" else "x_ptr": act, "w_ptr": u8, "scale_ptr": "*fp16",
             "offset_ptr": "*fp16"}
        c = dict(BITS=bits, GROUP_SIZE=group, DOT_FP32=False, DOT_PRECISION=prec(act))
        out = f32 if decode else act
        if direction == "fwd":
            p["bias_ptr"] = act
            p["y_ptr"] = out
            c["HAS_BIAS"] = bias
        else:
            p["dx_ptr"] = out
        label = f"{act[1:]} affine {bits}-bit g{group}{' odd K' if not even else ''}{' bias' if bias else ''}"
        # odd K: K, the packed row (W_BYTES = stride_wn) and the activation rows are not multiples of 16
        return (label, p, c, bits / 8 + 4 / group, () if even else (*odd, "W_BYTES"))

    variantsa = {
        "fwd": [va("fwd", h, bias=True), va("fwd", b16, bits=3, group=32), va("fwd", h, bits=2, group=128),
                va("fwd", h, bits=8)],
        "fwd_odd_k": [va("fwd", h, even=False), va("fwd", b16, bits=8, even=False),
                      va("fwd", h, bits=3, group=32, even=False)],
        "fwd_fp32": [va("fwd", f32), va("fwd", f32, bits=3, group=128)],
        # decode is the fused kernel's main use (dispatch: forward fused for M ≤ 16): every code width
        "fwd_decode": [va("fwd", h, bias=True, decode=True), va("fwd", b16, bits=3, decode=True),
                       va("fwd", h, bits=2, group=32, decode=True), va("fwd", f32, bits=8, group=128, decode=True),
                       va("fwd", h, bits=3, group=128, decode=True, even=False)],
        "bwd": [va("bwd", h), va("bwd", b16, bits=3, group=128), va("bwd", h, bits=2, group=32)],
        "bwd_odd_k": [va("bwd", h, even=False), va("bwd", b16, bits=8, group=32, even=False),
                      va("bwd", h, bits=3, group=128, even=False)],
        "bwd_fp32": [va("bwd", f32, bits=3)],
        "bwd_decode": [va("bwd", h, decode=True), va("bwd", f32, bits=3, group=32, decode=True),
                       va("bwd", b16, bits=8, decode=True)],
        "fwd_decode_det": [va("fwd", h, bias=True), va("fwd", b16, bits=3, group=32)],
        "bwd_decode_det": [va("bwd", b16), va("bwd", f32, bits=2, group=128)],
    }
    for set_name, variants in variantsa.items():
        kernel = "_linear_affine_fwd_kernel" if set_name.startswith("fwd") else "_linear_affine_bwd_kernel"
        # without FMA contraction, as launched: the tile is the reference's fp32 Ŵ
        add(f"matmul_affine:{kernel}", f"linear_affine[{set_name}]", matmul_affine.CONFIGS[set_name], variants,
            fp_fusion=False, set_name=set_name)

    # -- LLM.int8 -------------------------------------------------------------------------------------
    llm_variants = [
        ("int8 mma, fp16 out, bias", {"xq_ptr": "*i8", "w_ptr": "*i8", "sx_ptr": f32, "sw_ptr": f32,
                                      "bias_ptr": "*fp16", "y_ptr": "*fp16"}, dict(HAS_BIAS=True), 1 + 4 / KDIM, ()),
        ("int8 mma, bf16 out", {"xq_ptr": "*i8", "w_ptr": "*i8", "sx_ptr": f32, "sw_ptr": f32,
                                "bias_ptr": "*bf16", "y_ptr": "*bf16"}, dict(HAS_BIAS=False), 1 + 4 / KDIM, ()),
    ]
    mm = "matmul_llm_int8:_int8_matmul_kernel"
    add(mm, "llm_int8[gemm]", matmul_llm_int8.CONFIGS["gemm"], llm_variants, set_name="gemm")
    add(mm, "llm_int8[gemm_decode]", matmul_llm_int8.CONFIGS["gemm_decode"], llm_variants[:1], set_name="gemm_decode")
    add("matmul_llm_int8:_quantize_rows_kernel", "llm_int8[quantize]", matmul_llm_int8.CONFIGS["quantize"], [
        ("fp16 with outliers", {"x_ptr": "*fp16", "outlier_ptr": "*i8", "xq_ptr": "*i8", "sx_ptr": f32},
         dict(HAS_OUTLIERS=True), 0.0, ()),
        ("bf16 no outliers", {"x_ptr": "*bf16", "outlier_ptr": "*i8", "xq_ptr": "*i8", "sx_ptr": f32},
         dict(HAS_OUTLIERS=False), 0.0, ()),
    ], fp_fusion=False, matmul=False, set_name="quantize")
    return jobs


def _ptxas_info(ptx: str, cap: int) -> dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` (the ptxas Triton itself uses for ``cap``)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    try:
        ptxas = get_ptxas(cap).path  # Triton >= 3.5: the ptxas for this architecture
    except TypeError:
        ptxas = get_ptxas().path     # Triton 3.4 (the floor): one ptxas for every architecture
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(cap)}", src,
                              "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_stores": int(stores.group(1)) if stores else 0,
            "spill_loads": int(loads.group(1)) if loads else 0}


def compile_job(job: Job) -> dict[str, Any]:
    """Compile one specialization for ``job.cap`` and analyse it; never raises (errors are reported)."""
    import triton
    from triton.backends.compiler import GPUTarget

    row: dict[str, Any] = {"kernel": job.name, "variant": job.variant, "arch": f"sm_{job.cap}",
                           "config": dict(job.config), "bytes_per_weight": job.bytes_per_weight,
                           "matmul": job.matmul}
    t0 = time.time()
    try:
        module, fn_name = job.kernel.split(":")
        fn = getattr(importlib.import_module(f"{_PKG}.{module}"), fn_name)
        cfg = dict(job.config)
        meta = {k: v for k, v in cfg.items() if k not in _LAUNCH}
        consts = {**dict(job.constexprs), **meta}
        ptrs = dict(job.ptrs)
        signature, attrs = {}, {}
        for p in fn.params:
            if p.is_constexpr:
                if p.name not in consts:
                    raise KeyError(f"no value for constexpr {p.name}")
                signature[p.name] = "constexpr"
            elif p.name in ptrs:
                signature[p.name] = ptrs[p.name]
                attrs[(p.num,)] = [["tt.divisibility", 16]]
            elif p.name in _FLOAT_ARGS:
                signature[p.name] = "fp32"
            else:
                signature[p.name] = "i32"
                if p.name in _DIV16 and p.name not in job.not_div16:
                    attrs[(p.num,)] = [["tt.divisibility", 16]]
        missing = set(ptrs) - set(signature)
        if missing:
            raise KeyError(f"pointer types given for unknown arguments {sorted(missing)}")
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
        options = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3),
                   "enable_fp_fusion": job.fp_fusion}
        kernel = triton.compile(src, target=GPUTarget("cuda", job.cap, 32), options=options)
        ptx = kernel.asm["ptx"]
        row.update(_ptxas_info(ptx, job.cap))
        row["shared"] = int(kernel.metadata.shared)
        row["wgmma"] = bool(re.search(r"\bwgmma\.mma_async", ptx))
        row["mma_sync"] = "mma.sync" in ptx
        row["ld_v4"] = len(re.findall(r"ld\.global[\w:.]*\.v4", ptx))
        row["cp_async_16"] = len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^\n]*, (?:16|0x10)\b", ptx))
        row["ok"] = True
    except Exception as e:  # noqa: BLE001  (one failing kernel must not hide the others)
        row["ok"] = False
        row["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    row["seconds"] = round(time.time() - t0, 2)
    return row


def _fmt_cfg(cfg: dict) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "BLOCK": "B", "GROUP_M": "g", "SPLIT_K": "sk",
             "SPLIT_N": "sn", "num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k)}{v}" for k, v in cfg.items() if not (k in ("SPLIT_K", "SPLIT_N") and v == 1))


def format_rows(rows: list[dict]) -> str:
    head = (f"{'kernel':<26} {'variant':<26} {'config':<30} {'arch':<6} {'regs':>4} {'spill':>5} {'smem':>6} "
            f"{'tensor core':<11} {'v4 ld':>5} {'cp16':>4} {'B/weight':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r["ok"]:
            lines.append(f"{r['kernel']:<26} {r['variant']:<26} {_fmt_cfg(r['config']):<30} {r['arch']:<6} "
                         f"FAILED: {r['error'].splitlines()[0][:120]}")
            continue
        tc = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma_sync"] else "-")
        spill = r["spill_stores"] + r["spill_loads"]
        lines.append(f"{r['kernel']:<26} {r['variant']:<26} {_fmt_cfg(r['config']):<30} {r['arch']:<6} "
                     f"{r['registers']:>4} {spill:>5} {r['shared']:>6} {tc:<11} {r['ld_v4']:>5} {r['cp_async_16']:>4} "
                     f"{r['bytes_per_weight']:>8.3f}")
    return "\n".join(lines)


def run(level: str = "default", archs: tuple[int, ...] = ARCHS, jobs: Optional[int] = None) -> list[dict]:
    """Compile and analyse every specialization of ``level`` for every arch (in parallel processes)."""
    todo = [dataclasses.replace(j, cap=cap) for j in _jobs(level) for cap in archs]
    workers = jobs or min(len(todo), os.cpu_count() or 1)
    if workers <= 1:
        return [compile_job(j) for j in todo]
    import multiprocessing
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(compile_job, todo, chunksize=1))


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qtune.kernels.report", description=__doc__.split("\n\n")[0])
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--fast", action="store_const", const="fast", dest="level", help="one config per kernel")
    level.add_argument("--all", action="store_const", const="all", dest="level", help="every autotune config")
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities (default 80,90)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes (default: CPU count)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    parser.add_argument("--check", action="store_true", help="exit 1 when a fused matmul lacks tensor-core code")
    args = parser.parse_args(argv)
    if _interpreter_on():
        # kernels defined under the interpreter cannot be compiled: re-run without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", f"{_PKG}.report", *(argv if argv is not None else sys.argv[1:])],
                               env=env)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed: nothing to compile")
        return 0
    archs = tuple(int(a) for a in args.arch.split(",") if a)
    t0 = time.time()
    rows = run(args.level or "default", archs, args.jobs)
    print(format_rows(rows))
    failed = [r for r in rows if not r["ok"]]
    no_tc = [r for r in rows if r["ok"] and r["matmul"] and not (r["wgmma"] or r["mma_sync"])]
    spills = [r for r in rows if r["ok"] and r["spill_stores"] + r["spill_loads"] > 0]
    print(f"\n{len(rows)} compilations ({len(rows) - len(failed)} ok, {len(failed)} failed) for "
          f"{', '.join(f'sm_{a}' for a in archs)} in {time.time() - t0:.0f}s; "
          f"{len(spills)} with spills; {len(no_tc)} fused matmuls without tensor-core instructions")
    for r in failed:
        print(f"\nFAILED {r['kernel']} [{r['variant']}] {r['arch']} {_fmt_cfg(r['config'])}:\n{r['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if failed or (args.check and no_tc):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
