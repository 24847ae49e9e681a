"""One GPU command: is qtune right and fast on this GPU?

``python -m qtune.bench.gpu [--stages dispatch,correct,bench,step] [--quick] [--rep MS] [--out PATH]``

Stages (default: all four, in this order). Designed to finish in under 8 minutes on one H200; most of a
first run is Triton compiling and autotuning, both kept on disk (``TRITON_CACHE_DIR``, default
``~/.triton/cache``; autotuning results too, as ``TRITON_CACHE_AUTOTUNING=1`` is set unless given), so a
second run on the same machine skips them. ``--quick`` measures two weight shapes at M ∈ {1, 4096}.

``dispatch``
    A tiny Llama with a qtune layer of every op family (NF4+DQ, affine 3-bit, int8 ± zero point, LLM.int8, GPTQ,
    GGUF Q4_1) plus peft LoRA runs forward + backward in bf16 and fp32 under ``torch.profiler``. It lists the
    ``qtune::`` ops and the GPU kernels that ran, and flags an op family that ran on CUDA tensors
    without any of its Triton kernels (the pure-PyTorch reference: a silent slow path).
``correct``
    Every kernel and variant against the reference (``qtune.formats``) on the same GPU: NF4/FP4 ±
    double quant, odd K and K not a multiple of the blocksize, GPTQ 2/3/4/8-bit ± act-order, int8 ±
    zero point (group that does not divide K), LLM.int8 with injected outlier columns, every GGUF type
    (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 quantized by qtune; Q4_K, Q5_K, Q6_K as random blocks), affine 2/3/4/8-bit
    with groups of 32/64/128 and K not a multiple of 8 or of the group, strided and
    storage-offset inputs, transposed ``grad_out``, bias; on a machine with two GPUs also weights on the
    last GPU while the first is current (the launchers' device guard). ``dequantize_*`` must be bit-identical;
    forward ``y = x Ŵᵀ + b`` and ``grad_input = dy Ŵ`` must satisfy
    ``e_kernel ≤ max(2 · e_matmul, floor)`` with ``e = max|out − ref₆₄| / max|ref₆₄|``, ``ref₆₄`` the
    fp64 product with the reference-dequantized weight and ``e_matmul`` ``torch.matmul``'s (cuBLAS) own
    error in the same dtype. Both branches: the fused kernel wrappers and dequantize + ``torch.matmul``,
    and through ``torch.ops.qtune.*`` with autograd under ``qtune.ops.dispatch.force("fused")`` and
    ``force("dequant")`` (the branch the dispatcher took is recorded and must be the forced one).
``bench``
    Weights (N, K) ∈ {4096², 11008×4096, 4096×11008, 14336×4096, 4096×14336}, M ∈ {1, 16, 64, 256,
    4096}, fp16 and bf16, NF4+DQ / GPTQ-4 / int8 / LLM.int8 / GGUF Q4_1 and Q4_K / affine-4 g64, forward and backward
    (grad_input): median
    ms (``triton.testing.do_bench``) of the ``qtune::`` op forced to its fused branch, GB/s (weight +
    activation bytes), TFLOP/s, ratio to the same op forced to dequantize + cuBLAS and to a dense
    ``torch.matmul`` (ratios are ``baseline ms / fused ms``: > 1 means the fused kernel is faster), and
    the crossover each (family, direction, dtype) implies: fused for ``M ≤ threshold``, dequantize +
    cuBLAS above. ``results["bench"]["crossover"]`` has the layout of ``qtune.ops.dispatch``'s crossover
    file; ``--save-crossovers`` stores it there for this GPU architecture.
``step``
    One QLoRA training step (forward, backward, AdamW step) of a Llama-8B-shaped decoder stack (2
    layers, hidden 4096, intermediate 14336, 32 heads / 8 KV heads, seq 2048, batch 1) with qtune NF4+DQ
    against transformers + bitsandbytes NF4+DQ + peft on the same float checkpoint, same run; skipped
    (with the reason in the JSON) when bitsandbytes has no CUDA build here.

It writes one JSON file with :func:`qtune.bench.results.write_results` (default
``bench/results/gpu.json``; ``results`` holds one entry per stage that ran, ``"failures"`` and
``"ok"``). Exit status 1 when a correctness or dispatch check failed, else 0.

Without a CUDA device it prints one line saying so, writes nothing and exits 0.

Test-only: ``--interpret`` runs the same code on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set by re-running itself in a subprocess) with tiny shapes and a wall-clock
timer. Its numbers say nothing about speed; the test suite uses it to check the code paths and the JSON
schema without a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import torch

STAGES = ("dispatch", "correct", "bench", "step")
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336))  # (N out, K in)
TOKENS = (1, 16, 64, 256, 4096)
FAMILIES = ("4bit", "gptq", "int8", "llm_int8", "gguf", "affine")  # the qtune::linear_<family> ops

# relative-error floors of the fused matmuls (fp32 runs as 3×TF32 on tensor cores)
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-5}
# LLM.int8: the output is the int32 product rescaled in fp32 then rounded once: one ulp of the output dtype
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -22}
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# Dense fp16/bf16 tensor-core TFLOP/s and memory GB/s of common devices (vendor datasheets).
_PEAKS = (
    ("H200", 989.0, 4800.0), ("H100 PCIe", 756.0, 2000.0), ("H100", 989.0, 3350.0),
    ("A100-SXM4-80GB", 312.0, 2039.0), ("A100 80GB PCIe", 312.0, 1935.0), ("A100", 312.0, 1555.0),
    ("L40S", 362.0, 864.0), ("L40", 181.0, 864.0), ("L4", 121.0, 300.0), ("A10G", 70.0, 600.0),
    ("A10", 125.0, 600.0), ("RTX 4090", 165.0, 1008.0), ("RTX 3090", 71.0, 936.0), ("V100", 125.0, 900.0),
    ("T4", 65.0, 320.0),
)


def device_peaks(device: torch.device) -> tuple[Optional[float], Optional[float]]:
    """(peak dense 16-bit TFLOP/s, peak memory GB/s) of a CUDA ``device``; None where unknown."""
    props = torch.cuda.get_device_properties(device)
    tflops = gbps = None
    for name, tf, bw in _PEAKS:
        if name in props.name:
            tflops, gbps = tf, bw
            break
    clock = getattr(props, "memory_clock_rate", None)  # kHz
    width = getattr(props, "memory_bus_width", None)   # bits
    if gbps is None and clock and width:
        gbps = 2 * clock * 1e3 * width / 8 / 1e9
    return tflops, gbps


# ------------------------------------------------------------------------------------------------ setup
@dataclasses.dataclass
class Run:
    """What one run measures, where, and what it has found so far."""

    device: torch.device
    interpret: bool
    shapes: tuple
    tokens: tuple
    dtypes: tuple                 # activation dtypes of the correct stage
    variant_dtypes: tuple         # activation dtypes of the format variants in the correct stage
    bench_dtypes: tuple
    rep_ms: int
    families: tuple = FAMILIES    # op families to check and time
    failures: list = dataclasses.field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn``: ``triton.testing.do_bench`` (L2 flushed between runs) on CUDA,
        one wall-clock call under the interpreter (a code-path check, not a measurement)."""
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=max(2, self.rep_ms // 4), rep=self.rep_ms,
                                             return_mode="median"))

    def check(self, stage: str, row: dict) -> dict:
        """Record a check row; a row with ``ok`` False is also a failure of the run."""
        if row.get("ok") is False:
            self.failures.append(f"{stage}: {row}")
            print(f"  FAIL {row}", flush=True)
        return row


def _kernels():
    from .. import kernels as K
    return K


# ---------------------------------------------------------------------------------------------- weights
@dataclasses.dataclass
class Weight:
    """One quantized weight: its op family, the op's weight arguments and the reference dequantize."""

    name: str
    family: str
    args: tuple
    reference: Callable[[torch.dtype], torch.Tensor]   # dtype -> [N, K] via qtune.formats (pure PyTorch)

    @property
    def shape(self) -> tuple[int, int]:
        from ..ops.linear import OP_FAMILIES

        fam = OP_FAMILIES[self.family]
        return tuple(fam.shape(**fam.named(self.args)))

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.args if isinstance(a, torch.Tensor))


def _four_bit(name: str, w: torch.Tensor, cfg) -> Weight:
    from ..formats import nf4

    t = nf4.quantize_4bit(w, cfg)
    n, k = w.shape
    args = (t.packed, t.absmax, t.code, t.nested_absmax, t.nested_code, t.nested_offset, cfg.blocksize, [n, k])
    return Weight(name, "4bit", args, lambda dt: nf4.dequantize_4bit(
        t.packed, t.absmax, t.code, cfg.blocksize, (n, k), dt, nested_absmax=t.nested_absmax,
        nested_code=t.nested_code, nested_offset=t.nested_offset))


def _gptq(name: str, w: torch.Tensor, bits: int, group: int, act_order: bool, gen: torch.Generator) -> Weight:
    from ..formats import gptq

    q = gptq.quantize_rtn(w, gptq.RTNConfig(bits=bits, group_size=group, sym=False))
    g_idx = q.g_idx
    if act_order:  # a permuted group index, as desc_act checkpoints hold
        g_idx = g_idx[torch.randperm(g_idx.numel(), generator=gen, device=w.device)].contiguous()
    args = (q.qweight, q.qzeros, q.scales, g_idx, bits, w.shape[1])
    return Weight(name, "gptq", args, lambda dt: gptq.dequantize_gptq(*args, dt))


def _int8(name: str, w: torch.Tensor, cfg) -> Weight:
    from ..formats import int8

    t = int8.quantize_int8(w, cfg)
    args = (t.weight, t.scale, t.zero, t.group_size)
    return Weight(name, "int8", args, lambda dt: int8.dequantize_int8(*args, dt))


def _llm_int8(name: str, w: torch.Tensor) -> Weight:
    from ..formats import int8

    t = int8.quantize_int8(w, int8.LLMInt8Config())
    args = (t.weight, t.scale[:, 0].contiguous(), 6.0)
    return Weight(name, "llm_int8", args, lambda dt: int8.dequantize_int8(t.weight, t.scale, None, -1, dt))


def _gguf(name: str, w: torch.Tensor, type_name: str, gen: torch.Generator) -> Weight:
    """GGUF blocks of ``w``'s shape: quantized from ``w`` (``gguf.quants.quantize``'s bytes) for the 32-weight
    types; for the K-quants, which neither qtune nor the gguf package can quantize, random blocks (random
    code and scale bytes, fp16 ``d``/``dmin`` ≈ N(0, 0.002²)): the same bytes per weight and the same maths."""
    from ..formats import gguf

    cfg = next(c for c in gguf.GGUF_CONFIGS if c.type_name == type_name)
    n, k = w.shape
    if cfg.can_quantize:
        blocks = gguf.quantize_gguf(w, cfg.ggml_type, name=name)
    else:
        nb = n * k // cfg.block_size
        blocks = torch.randint(0, 256, (nb, cfg.type_size), generator=gen, device=w.device, dtype=torch.uint8)
        for off in ((208,) if type_name == "Q6_K" else (0, 2)):
            d = (torch.randn(nb, generator=gen, device=w.device) * 0.002).to(torch.float16)
            blocks[:, off:off + 2] = d.view(torch.uint8).reshape(nb, 2)
        blocks = blocks.reshape(n, cfg.row_bytes(k))
    args = (blocks, cfg.ggml_type, k)
    return Weight(name, "gguf", args, lambda dt: gguf.dequantize_gguf(*args, dt))


def _affine(name: str, w: torch.Tensor, bits: int, group_size: int) -> Weight:
    """``w`` in the affine format, min-max rounded (``iters=0``): the kernels read the same tensors whatever
    the fit, and the fit of a 14336×4096 weight would only lengthen the run."""
    from ..formats import affine

    t = affine.quantize_affine(w, affine.AffineConfig(bits=bits, group_size=group_size, iters=0), name=name)
    args = (t.weight, t.scale, t.offset, bits, group_size, w.shape[1])
    return Weight(name, "affine", args, lambda dt: affine.dequantize_affine(*args, dt))


def main_weights(n: int, k: int, device: torch.device, seed: int = 0) -> list[Weight]:
    """The formats the bench times: NF4+DQ (blocksize 64), GPTQ 4-bit g128, int8 per row, LLM.int8, GGUF Q4_1
    and (when 256 divides K) Q4_K, affine 4-bit g64."""
    from ..formats import int8, nf4

    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=gen, device=device) * 0.02
    out = [_four_bit("nf4_dq", w, nf4.NF4Config(blocksize=64, double_quant=True)),
           _gptq("gptq4_g128", w, 4, 128, False, gen),
           _int8("int8_row", w, int8.Int8Config(symmetric=True, group_size=-1)),
           _llm_int8("llm_int8", w)]
    if k % 32 == 0:
        out.append(_gguf("gguf_q4_1", w, "Q4_1", gen))
    if k % 256 == 0:
        out.append(_gguf("gguf_q4_k", w, "Q4_K", gen))
    out.append(_affine("affine4_g64", w, 4, 64))
    return out


def variant_weights(n: int, k: int, device: torch.device, seed: int = 1) -> list[Weight]:
    """Every other variant: FP4, NF4 without DQ, odd K, K not a multiple of the blocksize, GPTQ 2/3/8-bit
    and act-order with a partial last group, int8 zero point, an int8 group that does not divide K, the GGUF
    types the main weights leave out, affine 2/3/8-bit with every group size (K not a multiple of 8, of the group
    or of 16 bytes per packed row: the ``_odd_k`` tiles)."""
    from ..formats import int8, nf4

    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(nn: int, kk: int) -> torch.Tensor:
        return torch.randn(nn, kk, generator=gen, device=device) * 0.02

    out = [_four_bit("fp4_bs128_dq", rand(n, k), nf4.FP4Config(blocksize=128, double_quant=True)),
           _four_bit("nf4_bs64", rand(n, k), nf4.NF4Config(blocksize=64)),
           _four_bit("nf4_dq_odd_k", rand(n - 3, k - 61), nf4.NF4Config(blocksize=64, double_quant=True)),
           _four_bit("nf4_k_not_blocksize", rand(n, k - 32), nf4.NF4Config(blocksize=64))]
    for bits, group, act in ((2, 64, False), (3, 128, False), (8, 128, False), (4, 128, True), (3, 32, True)):
        out.append(_gptq(f"gptq{bits}_g{group}{'_act' if act else ''}", rand(n, k + 4), bits, group, act, gen))
    out += [_int8("int8_zp_g128", rand(n, k), int8.Int8Config(symmetric=False, group_size=128)),
            _int8("int8_sym_g100", rand(n, k), int8.Int8Config(symmetric=True, group_size=100))]
    # every other GGUF type; K rounded up to whole blocks (256 weights for the K-quants), N odd
    for type_name in ("Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q5_K", "Q6_K"):
        blk = 256 if type_name.endswith("_K") else 32
        out.append(_gguf(f"gguf_{type_name.lower()}", rand(n - 1, -(-k // blk) * blk), type_name, gen))
    for bits, group, kk in ((2, 32, k), (3, 128, k - 61), (8, 64, k - 61), (3, 32, k + 4), (4, 128, k - 61)):
        out.append(_affine(f"affine{bits}_g{group}{'_odd_k' if kk != k else ''}", rand(n - 1, kk), bits, group))
    return out


# ---------------------------------------------------------------------------------------- the two branches
def fused(w: Weight, x: torch.Tensor, bias: Optional[torch.Tensor] = None, config: Optional[dict] = None):
    """``y = x Ŵᵀ + b`` by the fused Triton kernel (``config``: fixed launch config, None: autotuned)."""
    K = _kernels()
    kw = {} if config is None else {"config": config}
    return getattr(K, f"linear_{w.family}")(x, *w.args, bias, **kw)


def fused_grad(w: Weight, dy: torch.Tensor, config: Optional[dict] = None):
    """``dx = dy Ŵ`` by the fused Triton kernel."""
    K = _kernels()
    kw = {} if config is None else {"config": config}
    return getattr(K, f"linear_{w.family}_grad_input")(dy, *w.args, **kw)


def kernel_dequant(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """Dense [N, K] ``dtype`` weight by the Triton dequantize kernel of ``w``'s family."""
    K = _kernels()
    if w.family == "llm_int8":
        weight, scb, _ = w.args
        return K.dequantize_int8(weight, scb.view(-1, 1), None, -1, dtype)
    fn = {"4bit": K.dequantize_4bit, "gptq": K.dequantize_gptq, "int8": K.dequantize_int8,
          "gguf": K.dequantize_gguf, "affine": K.dequantize_affine}[w.family]
    return fn(*w.args, dtype)


def dequant_matmul(w: Weight, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The other branch: dequantize (Triton) then ``torch.matmul`` (cuBLAS)."""
    y = torch.matmul(x, kernel_dequant(w, x.dtype).t())
    return y if bias is None else y + bias


def dequant_matmul_grad(w: Weight, dy: torch.Tensor) -> torch.Tensor:
    return torch.matmul(dy, kernel_dequant(w, dy.dtype))


def first_config(w: Weight, direction: str, m: int, dtype: torch.dtype) -> Optional[dict]:
    """First config of the autotune list the wrapper would pick (one compile per variant instead of a
    tuning run); None for LLM.int8, whose wrapper takes no per-direction config list here."""
    import importlib

    from ..kernels._common import config_set
    if w.family == "llm_int8":
        return None
    mod = importlib.import_module(f"qtune.kernels.matmul_{w.family}")
    odd_k = ((w.family == "4bit" and w.shape[1] % 2 == 1)
             or (w.family == "affine" and mod.odd_rows(w.args[0].shape[1])))
    return mod.CONFIGS[config_set(direction, m, dtype, mod.DECODE_MAX_M, odd_k=odd_k)][0].all_kwargs()


# ---------------------------------------------------------------------------------------------- checks
def rel_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """``max|out − ref| / max|ref|`` in fp64."""
    return ((out.double() - ref64).abs().max() / ref64.abs().max().clamp_min(1e-30)).item()


def matmul_check(what: str, out: torch.Tensor, a: torch.Tensor, w_ref: torch.Tensor, transpose: bool,
                 bias: Optional[torch.Tensor] = None) -> dict:
    """``out ≈ a @ w_refᵀ (+ bias)`` (``transpose``) or ``a @ w_ref`` within ``max(2 e_matmul, floor)``."""
    wd = w_ref.double()
    ref64 = a.double() @ (wd.t() if transpose else wd)
    dense = a @ (w_ref.t() if transpose else w_ref)
    if bias is not None:
        ref64, dense = ref64 + bias.double(), dense + bias
    e_k, e_m = rel_err(out, ref64), rel_err(dense, ref64)
    bound = max(2 * e_m, FLOOR[a.dtype])
    ok = bool(torch.isfinite(out).all()) and out.dtype == a.dtype and e_k <= bound
    return {"check": "matmul", "what": what, "e_kernel": e_k, "e_matmul": e_m, "bound": bound, "ok": ok}


def llm_int8_check(what: str, out: torch.Tensor, x: torch.Tensor, w: Weight, bias=None) -> dict:
    """LLM.int8 against ``qtune.formats.int8.llm_int8_linear`` (same maths): within one output ulp."""
    from ..formats import int8

    ref = int8.llm_int8_linear(x, *w.args, bias)
    diff = (out.float() - ref.float()).abs()
    ok = bool(torch.isfinite(out).all()) and bool((diff <= ULP[x.dtype] * ref.float().abs() + 1e-5).all())
    return {"check": "llm_int8", "what": what, "max_diff": diff.max().item(), "ok": ok}


def _with_outliers(x: torch.Tensor) -> torch.Tensor:
    """A few input columns at |x| ≥ 6 (LLM.int8's outlier threshold)."""
    x = x.clone()
    x[:, :: max(1, x.shape[1] // 7)] *= 400.0
    return x


# ------------------------------------------------------------------------------------------ stage: correct
def _check_weight(run: Run, w: Weight, dtype: torch.dtype, tokens: Sequence[int], fixed: bool,
                  views: bool) -> list[dict]:
    """Dequantize bit-identity, both branches forward and grad_input; with ``views`` also strided/offset
    inputs + bias and a transposed ``grad_out`` at the smallest and largest M (each view is a new
    specialization to compile)."""
    rows = []
    n, k = w.shape
    dt = _DTYPE_NAMES[dtype]
    w_ref = w.reference(dtype)
    if w.family != "llm_int8":
        rows.append(run.check("correct", {"check": "dequantize", "what": f"{w.name} {n}x{k} {dt}",
                                          "ok": torch.equal(kernel_dequant(w, dtype), w_ref)}))
    for m in tokens:
        gen = torch.Generator(device=run.device).manual_seed(m)
        x = torch.randn(m, k, generator=gen, device=run.device).to(dtype)
        dy = torch.randn(m, n, generator=gen, device=run.device).to(dtype)
        tag = f"{w.name} M={m} {n}x{k} {dt}"
        cfg_f = first_config(w, "fwd", m, dtype) if fixed else None
        cfg_b = first_config(w, "bwd", m, dtype) if fixed else None
        if w.family == "llm_int8":
            xo = _with_outliers(x)
            rows.append(run.check("correct", llm_int8_check(f"fused fwd {tag} outliers", fused(w, xo), xo, w)))
        else:
            rows.append(run.check("correct", matmul_check(f"fused fwd {tag}", fused(w, x, config=cfg_f), x, w_ref,
                                                          True)))
            rows.append(run.check("correct", matmul_check(f"dequant fwd {tag}", dequant_matmul(w, x), x, w_ref, True)))
        rows.append(run.check("correct", matmul_check(f"fused bwd {tag}", fused_grad(w, dy, config=cfg_b), dy, w_ref,
                                                      False)))
        rows.append(run.check("correct", matmul_check(f"dequant bwd {tag}", dequant_matmul_grad(w, dy), dy, w_ref,
                                                      False)))
        if views and m in (tokens[0], tokens[-1]):
            # rows with stride K+1 and a one-element storage offset (unaligned), a bias, a transposed dy
            xv = torch.randn(m, k + 1, generator=gen, device=run.device).to(dtype)[:, 1:]
            bias = torch.randn(n, generator=gen, device=run.device).to(dtype)
            dyt = torch.randn(n, m, generator=gen, device=run.device).to(dtype).t()
            if w.family == "llm_int8":
                rows.append(run.check("correct", llm_int8_check(f"fused fwd view+bias {tag}", fused(w, xv, bias),
                                                                xv, w, bias)))
            else:
                rows.append(run.check("correct", matmul_check(f"fused fwd view+bias {tag}",
                                                              fused(w, xv, bias, config=cfg_f), xv, w_ref, True, bias)))
            rows.append(run.check("correct", matmul_check(f"fused bwd transposed dy {tag}",
                                                          fused_grad(w, dyt, config=cfg_b), dyt, w_ref, False)))
    return rows


def _check_ops(run: Run, w: Weight, dtype: torch.dtype, m: int) -> list[dict]:
    """Through ``torch.ops.qtune.linear_<family>`` with autograd, once per forced dispatch branch; the
    branch the dispatcher took is recorded and must be the forced one (LLM.int8's forward: always fused)."""
    from ..ops import dispatch

    rows = []
    n, k = w.shape
    w_ref = w.reference(dtype)
    op = getattr(torch.ops.qtune, f"linear_{w.family}")
    gen = torch.Generator(device=run.device).manual_seed(7)
    x0 = torch.randn(m, k, generator=gen, device=run.device).to(dtype)
    if w.family == "llm_int8":
        x0 = _with_outliers(x0)
    dy = torch.randn(m, n, generator=gen, device=run.device).to(dtype)
    for branch in ("fused", "dequant"):
        x = x0.clone().requires_grad_(True)
        with dispatch.force(branch), dispatch.record() as decisions:
            y = op(x, *w.args, None)
            y.backward(dy)
        tag = f"op {branch} {w.name} M={m} {n}x{k} {_DTYPE_NAMES[dtype]}"
        want = {(w.family, "forward", "fused" if w.family in dispatch.FUSED_ONLY_FORWARD else branch),
                (w.family, "grad_input", branch)}
        took = {(f, d, b) for f, d, _, b in decisions}
        rows.append(run.check("correct", {"check": "op_branch", "what": tag, "took": sorted(took),
                                          "ok": took == want}))
        if w.family == "llm_int8":
            rows.append(run.check("correct", llm_int8_check(f"{tag} fwd", y.detach(), x0, w)))
        else:
            rows.append(run.check("correct", matmul_check(f"{tag} fwd", y.detach(), x0, w_ref, True)))
        rows.append(run.check("correct", matmul_check(f"{tag} bwd", x.grad, dy, w_ref, False)))
    return rows


def _check_second_device(run: Run) -> list[dict]:
    """The device guard: weights and activations on the last GPU while the current device is the first;
    kernels launched on the wrong device would fail or compute garbage there."""
    if not run.cuda or torch.cuda.device_count() < 2:
        return [{"check": "second_device", "skipped": "needs two CUDA devices"}]
    other = torch.device("cuda", torch.cuda.device_count() - 1)
    sub = dataclasses.replace(run, device=other, failures=run.failures)
    rows = []
    with torch.cuda.device(0):
        for w in main_weights(1024, 1024, other):
            if w.family in run.families:
                rows += _check_weight(sub, w, torch.bfloat16, (1, 256), fixed=False, views=False)
                rows += _check_ops(sub, w, torch.bfloat16, 256)
    return rows


def stage_correct(run: Run) -> dict:
    print("\n== correct: every kernel and variant against the reference on this device", flush=True)
    t0 = time.time()
    rows: list[dict] = []
    n, k = run.shapes[0]
    # main formats at the first bench shape, autotuned as in use, every dtype, views + bias
    for w in main_weights(n, k, run.device):
        if w.family not in run.families:
            continue
        for dtype in run.dtypes:
            rows += _check_weight(run, w, dtype, run.tokens, fixed=False, views=True)
            rows += _check_ops(run, w, dtype, run.tokens[-1])
    # every other variant on a smaller weight at the first config of each list (decode and GEMM sizes)
    vn, vk = (96, 160) if run.interpret else (1024, 1024)
    var_tokens = (1, 33) if run.interpret else (1, 100)
    for w in variant_weights(vn, vk, run.device):
        if w.family not in run.families:
            continue
        for dtype in run.variant_dtypes:
            rows += _check_weight(run, w, dtype, var_tokens, fixed=True, views=w.family != "4bit")
    rows += _check_second_device(run)
    checked = [r for r in rows if "ok" in r]
    n_ok = sum(r["ok"] for r in checked)
    print(f"   {n_ok}/{len(checked)} checks passed in {time.time() - t0:.0f}s", flush=True)
    return {"rows": rows, "passed": n_ok, "checked": len(checked), "ok": n_ok == len(checked),
            "seconds": round(time.time() - t0, 1)}


# -------------------------------------------------------------------------------------------- stage: bench
def crossover(rows: list[dict], tokens: Sequence[int]) -> dict:
    """Per family → direction → dtype: the largest measured M up to which the fused kernel beats
    dequantize + ``torch.matmul`` on every weight shape (0: never, not even at M = 1).

    The dispatch policy reads it as "fused for M ≤ threshold, dequantize + cuBLAS above". Only the
    measured M values are candidates, so the true crossover lies between the threshold and the next M.
    LLM.int8's forward is left out: it is always its own int8 GEMM (``dispatch.FUSED_ONLY_FORWARD``).
    """
    from ..ops import dispatch

    out: dict = {}
    keys = {(r["family"], r["direction"], r["dtype"]) for r in rows
            if not (r["direction"] == "forward" and r["family"] in dispatch.FUSED_ONLY_FORWARD)}
    for fam, direction, dt in sorted(keys):
        threshold = 0
        for m in sorted(tokens):
            sel = [r for r in rows if (r["family"], r["direction"], r["dtype"], r["m"]) == (fam, direction, dt, m)]
            if not sel or any(r["ms"] > r["ms_dequant_matmul"] for r in sel):
                break
            threshold = m
        out.setdefault(fam, {}).setdefault(direction, {})[dt] = threshold
    return out


def crossover_table(per_dtype: dict) -> dict:
    """``{family: {direction: M}}`` for :func:`qtune.ops.dispatch.save_crossovers`: the smallest threshold
    over the activation dtypes (the dispatch table has one bound per family and direction)."""
    return {fam: {d: min(by_dtype.values()) for d, by_dtype in dirs.items()} for fam, dirs in per_dtype.items()}


def stage_bench(run: Run) -> dict:
    print("\n== bench: median ms; ratios = baseline ms / fused ms (> 1: fused is faster)", flush=True)
    print(f"{'kernel':<22} {'dtype':<5} {'M':>5} {'N x K':>12} {'ms':>8} {'GB/s':>7} {'TFLOP/s':>8} "
          f"{'vs deq+mm':>9} {'vs dense':>9}", flush=True)
    from ..ops import dispatch

    t0 = time.time()
    peak_tflops, peak_gbps = device_peaks(run.device) if run.cuda else (None, None)
    dequant_rows, rows = [], []
    dense_ms: dict = {}  # (n, k, dtype, m, direction) -> ms: the same dense matmul for every format
    for n, k in run.shapes:
        weights = main_weights(n, k, run.device)
        for dtype in run.bench_dtypes:
            dt = _DTYPE_NAMES[dtype]
            elt = torch.empty((), dtype=dtype).element_size()
            dense = (torch.randn(n, k, device=run.device) * 0.02).to(dtype)
            for w in weights:
                if w.family not in run.families:
                    continue
                if w.family != "llm_int8":
                    ms = run.time(lambda: kernel_dequant(w, dtype))
                    gbps = (w.nbytes + n * k * elt) / ms / 1e6
                    dequant_rows.append({"format": w.name, "family": w.family, "dtype": dt, "n": n, "k": k,
                                         "ms": ms, "gbps": gbps,
                                         "pct_peak_bw": 100 * gbps / peak_gbps if peak_gbps else None})
                    print(f"{'dequant ' + w.name:<22} {dt:<5} {'-':>5} {n:>5}x{k:<6} {ms:8.3f} {gbps:7.0f}",
                          flush=True)
                for m in run.tokens:
                    x = torch.randn(m, k, device=run.device).to(dtype)
                    if w.family == "llm_int8":
                        x = _with_outliers(x)
                    dy = torch.randn(m, n, device=run.device).to(dtype)
                    # both branches as they ship: the qtune:: op, its dispatcher forced to one branch
                    # (LLM.int8's forward has no dequantize branch: its baseline is a plain dequantize + matmul)
                    op, grad_op = (getattr(torch.ops.qtune, f"linear_{w.family}{s_}") for s_ in ("", "_grad_input"))
                    fwd_deq = ((lambda: dequant_matmul(w, x)) if w.family in dispatch.FUSED_ONLY_FORWARD
                               else (lambda: op(x, *w.args, None)))
                    cases = (("forward", lambda: op(x, *w.args, None), fwd_deq, lambda: x @ dense.t()),
                             ("grad_input", lambda: grad_op(dy, *w.args), lambda: grad_op(dy, *w.args),
                              lambda: dy @ dense))
                    for direction, f_fused, f_deq, f_dense in cases:
                        with dispatch.force("fused"):
                            ms = run.time(f_fused)
                        with dispatch.force("dequant"):
                            ms_dm = run.time(f_deq)
                        key = (n, k, dt, m, direction)
                        if key not in dense_ms:
                            dense_ms[key] = run.time(f_dense)
                        ms_dense = dense_ms[key]
                        moved = w.nbytes + (m * k + m * n) * elt
                        gbps, tflops = moved / ms / 1e6, 2 * m * n * k / ms / 1e9
                        rows.append({"format": w.name, "family": w.family, "direction": direction, "dtype": dt,
                                     "m": m, "n": n, "k": k, "ms": ms, "ms_dequant_matmul": ms_dm,
                                     "ms_dense": ms_dense, "gbps": gbps, "tflops": tflops,
                                     "pct_peak_bw": 100 * gbps / peak_gbps if peak_gbps else None,
                                     "pct_peak_tflops": 100 * tflops / peak_tflops if peak_tflops else None,
                                     "vs_dequant_matmul": ms_dm / ms, "vs_dense": ms_dense / ms})
                        print(f"{direction[:4] + ' ' + w.name:<22} {dt:<5} {m:>5} {n:>5}x{k:<6} {ms:8.3f} {gbps:7.0f} "
                              f"{tflops:8.1f} {ms_dm / ms:8.2f}x {ms_dense / ms:8.2f}x", flush=True)
            del dense
        del weights
        if run.cuda:
            torch.cuda.empty_cache()
    arch = dispatch.device_arch(run.device)
    cross = crossover(rows, run.tokens)
    table = crossover_table(cross)
    print(f"   crossover (fused for M ≤ threshold) on {arch}: {table}", flush=True)
    return {"peak_tflops": peak_tflops, "peak_gbps": peak_gbps, "dequantize": dequant_rows, "rows": rows,
            "crossover_by_dtype": {"arch": arch, "tokens": list(run.tokens), "thresholds": cross},
            # the layout of qtune.ops.dispatch's crossover file (load_crossovers reads it as is)
            "crossover": {"version": dispatch.CROSSOVER_VERSION, "crossovers": {arch: table}},
            "seconds": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------------------- stage: dispatch
# Triton kernel (jit function) names per op family: what the profiler must show when the family ran
_FAMILY_KERNELS = {"4bit": ("_linear_4bit_", "_dequant_4bit_"), "gptq": ("_linear_gptq_", "_dequant_gptq_"),
                   "int8": ("_linear_int8_", "_dequant_int8_"), "gguf": ("_linear_gguf_", "_dequant_gguf_"),
                   "affine": ("_linear_affine_", "_dequant_affine_"),
                   "llm_int8": ("_int8_matmul_kernel", "_quantize_rows_kernel", "_linear_int8_bwd", "_dequant_int8_")}
_LAYER_FORMATS = {"q_proj": "nf4_dq", "k_proj": "affine3_g64", "v_proj": "int8_zp", "o_proj": "gguf_q4_1",
                  "gate_proj": "gptq4", "up_proj": "llm_int8", "down_proj": "gptq3_g32"}


def _layer_configs() -> dict:
    from ..formats import AffineConfig, Int8Config, LLMInt8Config, NF4Config, RTNConfig
    from ..formats.gguf import GGUFQ4_1Config

    # RTN writes the GPTQ layout (a calibrated GPTQ needs data and gives the same tensors)
    # one layer per op family (FP4 shares NF4's kernels: the correct stage checks it)
    return {"q_proj": NF4Config(double_quant=True), "k_proj": AffineConfig(bits=3, group_size=64, iters=2),
            "v_proj": Int8Config(symmetric=False, group_size=64), "o_proj": GGUFQ4_1Config(),
            "gate_proj": RTNConfig(bits=4, group_size=64, sym=False), "up_proj": LLMInt8Config(),
            "down_proj": RTNConfig(bits=3, group_size=32, sym=False)}


def tiny_qlora_llama(run: Run, compute: torch.dtype, hidden: int, inter: int, layers: int):
    """A Llama with a qtune layer of every format (see ``_LAYER_FORMATS``) and peft LoRA on all of them."""
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from .. import get_peft_model
    from ..nn import quantize_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).to(compute)
    name = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[compute]
    overrides = {p: dataclasses.replace(c, compute_dtype=name) for p, c in _layer_configs().items()}
    quantize_model(model, None, overrides=overrides)
    model = model.to(run.device)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def stage_dispatch(run: Run) -> dict:
    """Profile a QLoRA forward + backward; list qtune ops and kernels; flag reference paths on the device."""
    from torch.profiler import ProfilerActivity, profile

    print("\n== dispatch: which kernels a QLoRA forward + backward runs", flush=True)
    from ..ops import dispatch

    K = _kernels()
    t0 = time.time()
    key = "CUDA" if run.cuda else "CPU"
    registered = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"qtune::{op}", key) for op in K.OPS}
    hidden, inter, layers, batch, seq = (64, 96, 2, 1, 8) if run.interpret else (512, 1408, 2, 2, 256)
    from ..ops.library import registration_failure, slow_path_reason

    # qtune's own diagnosis of a slow path on this device (None: its Triton kernels are registered)
    out: dict = {"registered": registered, "registration_failure": registration_failure(),
                 "slow_path_reason": slow_path_reason(run.device.type), "layer_formats": _LAYER_FORMATS, "runs": []}
    if out["slow_path_reason"] is not None:
        run.check("dispatch", {"check": "slow_path_reason", "reason": out["slow_path_reason"], "ok": False})
    for compute in (torch.bfloat16, torch.float32):
        model = tiny_qlora_llama(run, compute, hidden, inter, layers)
        ids = torch.randint(0, 512, (batch, seq), device=run.device)

        def step():
            # a training step (M = batch·seq: the dequantize branch by default) and a short no-grad
            # forward (M = 4: the fused decode kernels)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            with torch.no_grad():
                model(input_ids=ids[:1, :4])
            return loss

        step()  # compiles / autotunes outside the profile
        run.sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.cuda else [])
        with profile(activities=activities) as prof, dispatch.record() as decisions:
            loss = step()
            run.sync()
        events = prof.key_averages()
        qtune_ops = {e.key: e.count for e in events if e.key.startswith("qtune::")}
        branches: dict = {}
        for fam, direction, _, branch in decisions:
            key_ = f"{fam}.{direction}.{branch}"
            branches[key_] = branches.get(key_, 0) + 1
        families = sorted({op.split("::")[1].removeprefix("linear_").removesuffix("_grad_input")
                           for op in qtune_ops if op.startswith("qtune::linear_")})
        # a family whose linear op ran without a dispatch decision never reached the device kernels
        # (kernels/routing.py): it ran the reference; on CUDA its Triton kernels must also be in the trace
        # (the interpreter leaves no kernel trace)
        kernels = ({e.key: e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA}
                   if run.cuda else {})
        reference = [f for f in families if not any(d[0] == f for d in decisions)
                     or (run.cuda and not any(p in kname for p in _FAMILY_KERNELS[f] for kname in kernels))]
        lora_grads = [p.grad for n_, p in model.named_parameters() if "lora_" in n_ and p.requires_grad]
        finite = bool(lora_grads) and all(g is not None and bool(torch.isfinite(g).all()) for g in lora_grads)
        ok = not reference and finite and bool(torch.isfinite(loss))
        row = run.check("dispatch", {"compute": _DTYPE_NAMES[compute], "qtune_ops": qtune_ops,
                                     "kernels": kernels, "branches": branches, "families": families,
                                     "reference_on_device": reference,
                                     "lora_grads_finite": finite, "loss": loss.item(), "ok": ok})
        triton_names = sorted(k for k in kernels if any(p in k for pats in _FAMILY_KERNELS.values() for p in pats))
        print(f"   {_DTYPE_NAMES[compute]}: qtune ops {sorted(qtune_ops)}\n   branches {branches}"
              f"\n   Triton kernels {triton_names}"
              f"\n   reference path on {run.device.type}: {reference or 'none'}", flush=True)
        out["runs"].append(row)
        del model
    out["ok"] = all(r["ok"] for r in out["runs"]) and out["slow_path_reason"] is None
    out["seconds"] = round(time.time() - t0, 1)
    return out


# --------------------------------------------------------------------------------------------- stage: step
STEP_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  num_hidden_layers=2, vocab_size=32000)
STEP_SEQ = 2048


def _bnb_cuda() -> Optional[str]:
    """None when bitsandbytes with a CUDA build is importable, else why not."""
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes.cextension import lib
    except Exception as e:  # noqa: BLE001  (any import failure is a reason to skip, reported)
        return f"bitsandbytes is not importable ({type(e).__name__}: {e})"
    if not getattr(lib, "compiled_with_cuda", False):
        return "bitsandbytes has no CUDA build here"
    return None


def _step_time(model, ids: torch.Tensor, run: Run, steps: int) -> dict:
    """Median ms of forward + backward + AdamW step over ``steps`` after one warm-up step, peak memory."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, first = [], None
    if run.cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    for i in range(steps + 1):
        run.sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.sync()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"ms": times[len(times) // 2], "first_loss": first, "loss": loss.item(),
            "peak_gib": torch.cuda.max_memory_allocated(run.device) / 2**30 if run.cuda else None}


def stage_step(run: Run) -> dict:
    """qtune NF4+DQ + LoRA against transformers + bitsandbytes + peft: one training step each."""
    print("\n== step: one QLoRA training step of a Llama-8B-shaped stack, qtune vs bitsandbytes", flush=True)
    if not run.cuda:
        return {"skipped": "the step stage compares CUDA training steps (no CUDA device in this run)"}
    return step_compare(run, STEP_SHAPE, STEP_SEQ, _bnb_cuda())


def step_compare(run: Run, shape: dict, seq: int, bnb_skip: Optional[str], steps: int = 3) -> dict:
    """Median step time and peak memory of qtune and (unless ``bnb_skip`` says why not) transformers +
    bitsandbytes + peft, both loading the same random bf16 Llama checkpoint of ``shape``."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    import qtune

    t0 = time.time()
    out: dict = {"shape": {**shape, "seq": seq, "batch": 1}, "lora": {"r": 16, "target": "all-linear"}}
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    ids = torch.randint(0, shape["vocab_size"], (1, seq), device=run.device)
    device_map = {"": str(run.device)}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=seq)).to(torch.bfloat16).save_pretrained(folder)
        model = qtune.load_model(folder, qtune.QTuneConfig("nf4", double_quant=True, compute_dtype="bfloat16"),
                                 dtype=torch.bfloat16, device_map=device_map)
        model = qtune.get_peft_model(model, LoraConfig(**lora))
        out["qtune"] = _step_time(model, ids, run, steps)
        print(f"   qtune: {out['qtune']['ms']:.1f} ms/step, peak {out['qtune']['peak_gib']} GiB", flush=True)
        del model
        if run.cuda:
            torch.cuda.empty_cache()
        if bnb_skip is not None:
            out["bitsandbytes"] = {"skipped": bnb_skip}
            print(f"   bitsandbytes skipped: {bnb_skip}", flush=True)
        else:
            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.bfloat16)
            model = LlamaForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map=device_map)
            model = get_peft_model(model, LoraConfig(**lora))
            out["bitsandbytes"] = _step_time(model, ids, run, steps)
            print(f"   transformers+bitsandbytes+peft: {out['bitsandbytes']['ms']:.1f} ms/step, peak "
                  f"{out['bitsandbytes']['peak_gib']} GiB", flush=True)
            out["qtune_vs_bitsandbytes"] = out["bitsandbytes"]["ms"] / out["qtune"]["ms"]
            # same checkpoint, same NF4+DQ bytes, same seed: the first losses agree up to bf16 rounding
            out["loss_difference"] = abs(out["qtune"]["first_loss"] - out["bitsandbytes"]["first_loss"])
            del model
            if run.cuda:
                torch.cuda.empty_cache()
    out["seconds"] = round(time.time() - t0, 1)
    return out


# ---------------------------------------------------------------------------------------------- summary
def summary(results: dict) -> dict:
    """The closing note's headline numbers, where the stages that give them ran."""
    s: dict = {}
    bench = results.get("bench")
    if bench and bench.get("rows"):
        rows = bench["rows"]
        big = max(r["m"] for r in rows)
        for fam in ("4bit", "gptq"):
            sel = [r for r in rows if r["family"] == fam and r["m"] == big and r["dtype"] == "bf16"]
            fwd = {(r["n"], r["k"]): r for r in sel if r["direction"] == "forward"}
            bwd = {(r["n"], r["k"]): r for r in sel if r["direction"] == "grad_input"}
            # the faster branch of each direction (what a measured crossover makes the dispatcher pick)
            def best(r: dict) -> float:
                return min(r["ms"], r["ms_dequant_matmul"])

            ratios = [(best(fwd[s_]) + best(bwd[s_])) / (fwd[s_]["ms_dense"] + bwd[s_]["ms_dense"])
                      for s_ in fwd if s_ in bwd]
            if ratios:
                s[f"{fam}_fwd_bwd_M{big}_time_over_bf16_matmul_worst_shape"] = max(ratios)
        m1 = [r for r in rows if r["m"] == 1 and r["direction"] == "forward" and r["family"] == "4bit"]
        if m1:
            s["nf4_M1_fwd_gbps_best"] = max(r["gbps"] for r in m1)
            s["peak_gbps"] = bench.get("peak_gbps")
    step = results.get("step")
    if step and "qtune_vs_bitsandbytes" in step:
        s["step_ms_qtune"] = step["qtune"]["ms"]
        s["step_ms_bitsandbytes"] = step["bitsandbytes"]["ms"]
    return s


# ------------------------------------------------------------------------------------------------- main
def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qtune.bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    p.add_argument("--quick", action="store_true", help="bench only 4096x4096 and 4096x14336 at M in {1, 4096}")
    p.add_argument("--rep", type=int, default=20, help="do_bench budget per measurement, ms (default 20)")
    p.add_argument("--formats", default=",".join(FAMILIES),
                   help=f"op families to check and time, subset of {','.join(FAMILIES)} (default: all)")
    p.add_argument("--save-crossovers", action="store_true",
                   help="also store the bench's crossovers for this GPU architecture in qtune.ops.dispatch's "
                        "crossover file ($QTUNE_DISPATCH_FILE or ~/.cache/qtune/dispatch.json), which the "
                        "dispatcher then uses")
    p.add_argument("--out", default=None, help="JSON file or folder (default bench/results/gpu.json)")
    p.add_argument("--interpret", action="store_true",
                   help="TEST ONLY: CPU tensors under the Triton interpreter, tiny shapes, no timing meaning")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        p.error(f"--stages: unknown stage(s) {bad or '(none given)'}; choose from {','.join(STAGES)}")
    args.stages = [s for s in STAGES if s in stages]
    families = [f for f in args.formats.split(",") if f]
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        p.error(f"--formats: unknown op family {bad or '(none given)'}; choose from {','.join(FAMILIES)}")
    args.families = tuple(f for f in FAMILIES if f in families)
    return args


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    if args.interpret and not _interpreter_on():
        # Triton reads TRITON_INTERPRET when kernels are defined: re-run with it set from the start
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, "-m", "qtune.bench.gpu",
                                *(argv if argv is not None else sys.argv[1:])], env=env)
    if not args.interpret:
        # keep autotuning results on disk next to the compiled kernels (Triton's TRITON_CACHE_DIR): a second
        # run neither recompiles nor re-tunes; set TRITON_CACHE_AUTOTUNING=0 to tune afresh
        os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    if not args.interpret and not torch.cuda.is_available():
        print("qtune.bench.gpu: no CUDA device is present; the Triton kernels run only on CUDA GPUs "
              "(nothing measured, nothing written)")
        return 0
    from .. import kernels

    if not kernels.triton_available():
        print("qtune.bench.gpu: Triton is not installed; the kernels cannot run (nothing measured, nothing written)")
        return 0
    import triton

    from .results import write_results

    if args.interpret:
        # test-only hook: the ops' device kernels (routing -> Triton wrappers) registered for CPU tensors
        kernels.register(device="cpu", _testing=True)
        # no bf16: the interpreter converts to bf16 by truncation (numpy has no bf16), the GPU rounds
        run = Run(torch.device("cpu"), True, shapes=((96, 64), (64, 160)), tokens=(1, 33),
                  dtypes=(torch.float16, torch.float32), variant_dtypes=(torch.float16,),
                  bench_dtypes=(torch.float16,), rep_ms=1, families=args.families)
    else:
        kernels.register()
        shapes = (SHAPES[0], SHAPES[4]) if args.quick else SHAPES
        tokens = (1, 4096) if args.quick else TOKENS
        run = Run(torch.device("cuda", torch.cuda.current_device()), False, shapes=shapes, tokens=tokens,
                  dtypes=(torch.float16, torch.bfloat16, torch.float32),
                  variant_dtypes=(torch.float16,),  # fp16's bound is the tighter; main formats cover bf16
                  bench_dtypes=(torch.float16, torch.bfloat16), rep_ms=args.rep, families=args.families)
    where = (f"{torch.cuda.get_device_name(run.device)} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
             if run.cuda else "cpu under the Triton interpreter (test only: no timing meaning)")
    print(f"qtune.bench.gpu on {where}; torch {torch.__version__}, triton {triton.__version__}; "
          f"stages {','.join(args.stages)}", flush=True)
    t0 = time.time()
    results: dict[str, Any] = {"device": where, "interpret": run.interpret, "stages": args.stages,
                               "shapes": [list(s) for s in run.shapes], "tokens": list(run.tokens)}
    for stage in args.stages:
        results[stage] = globals()[f"stage_{stage}"](run)
    if args.save_crossovers and "bench" in results:
        from ..ops import dispatch

        arch, table = next(iter(results["bench"]["crossover"]["crossovers"].items()))
        results["crossover_file"] = str(dispatch.save_crossovers(arch, table))
        print(f"stored the crossovers of {arch} in {results['crossover_file']}", flush=True)
    results["summary"] = summary(results)
    results["failures"] = run.failures
    results["ok"] = not run.failures
    results["seconds"] = round(time.time() - t0, 1)
    path = write_results("gpu", results, args.out)
    print(f"\n{'all checks passed' if results['ok'] else f'{len(run.failures)} check(s) FAILED'} in "
          f"{results['seconds']:.0f}s; wrote {path}", flush=True)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
