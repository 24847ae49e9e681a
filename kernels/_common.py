"""Pieces shared by every kernel file: interpreter detection, launch configs, small jit helpers.

Every kernel module is written once and runs two ways:

- on a CUDA device through ``@triton.autotune`` (configs keyed by shape), and
- on CPU tensors under ``TRITON_INTERPRET=1`` (the test suite), where autotuning is impossible (it
  times kernels on a GPU), so the wrappers launch the bare ``@triton.jit`` function with one fixed
  config (:func:`launch`).

Triton decides between its compiler and its interpreter when a ``@triton.jit`` decorator runs, i.e. when
a kernel module is imported; :data:`INTERPRET` records what the kernels of this process were built as.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, ContextManager, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def _interpret_setting() -> bool:
    """Triton's own reading of ``TRITON_INTERPRET``: ``triton.knobs`` from Triton 3.4 on, the environment
    variable before (Triton 3.2/3.3 read ``os.environ["TRITON_INTERPRET"] in ("1", "true", "on", ...)``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# How the @triton.jit functions below were built (Triton reads TRITON_INTERPRET at decoration time).
INTERPRET: bool = _interpret_setting()

# Launch options of a triton.Config that are not kernel arguments.
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def interpreting(kernel: Any = None) -> bool:
    """True when ``kernel`` (or this process's kernels) run under the Triton interpreter."""
    if kernel is not None:
        while hasattr(kernel, "fn") and not isinstance(kernel, InterpretedFunction):
            kernel = kernel.fn  # unwrap Autotuner/Heuristics
        return isinstance(kernel, InterpretedFunction)
    return INTERPRET


def config(num_warps: int = 4, num_stages: int = 3, **meta: int) -> triton.Config:
    """A ``triton.Config`` from keyword meta-parameters (CAPS) and launch options."""
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def config_kwargs(cfg: triton.Config | dict) -> dict[str, Any]:
    """Meta-parameters and launch options of ``cfg`` as one keyword dict for ``kernel[grid](...)``."""
    if isinstance(cfg, triton.Config):
        return cfg.all_kwargs()
    return dict(cfg)


def meta_of(cfg: triton.Config | dict) -> dict[str, Any]:
    """Only the kernel meta-parameters of ``cfg`` (what a grid lambda sees)."""
    return {k: v for k, v in config_kwargs(cfg).items() if k not in _LAUNCH_OPTIONS}


def device_guard(t: torch.Tensor) -> ContextManager:
    """Make ``t``'s device the current CUDA device for a launch (a no-op for CPU tensors).

    Triton launches on the current device's current stream; without the guard a layer on ``cuda:1``
    (e.g. ``device_map="auto"``) would launch from ``cuda:0``. Inside the guard the current stream is
    ``t``'s device's current stream, the one PyTorch queues that device's work on.
    """
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def launch(jit_fn: Any, autotuned: Any, grid: Callable[[dict], tuple], args: Sequence[Any],
           kwargs: dict[str, Any], cfg: triton.Config | dict | None,
           interpreter_cfg: Callable[[], dict] | None = None) -> None:
    """Launch ``jit_fn`` with a fixed config, or ``autotuned`` (its ``@triton.autotune`` wrapper), on the
    device (and its current stream) of the first tensor in ``args`` (:func:`device_guard`).

    A fixed config is used when the caller gives one, and always under the interpreter (which cannot
    time configs); ``interpreter_cfg()`` supplies large tiles there, since the interpreter's cost grows
    with the number of program instances.
    """
    if cfg is None and interpreting(jit_fn):
        if interpreter_cfg is None:
            raise ValueError(f"{jit_fn.__name__}: the interpreter needs a fixed launch config")
        cfg = interpreter_cfg()
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None:
        raise ValueError(f"{jit_fn.__name__}: a launch needs at least one tensor argument")
    with device_guard(first):
        if cfg is None:
            autotuned[grid](*args, **kwargs)
            return
        kw = config_kwargs(cfg)
        meta = meta_of(kw)
        jit_fn[lambda _: grid(meta)](*args, **kwargs, **kw)


def dot_in_fp32(dtype: torch.dtype, kernel: Any) -> bool:
    """Whether a bf16 ``tl.dot`` must run on fp32 operands: only under the interpreter.

    The interpreter stores bf16 as raw uint16 and multiplies those integers in ``tl.dot`` (the result is
    garbage); bf16 → fp32 is exact, so an fp32 dot of the same operands is the exact product the GPU's
    bf16 MMA (fp32 accumulation) computes.
    """
    return dtype == torch.bfloat16 and interpreting(kernel)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` for fp32 activations.

    ``torch.matmul`` in fp32 is IEEE fp32 unless TF32 is allowed; ``tf32x3`` (three TF32 MMAs per
    product) keeps fp32 accuracy on tensor cores. 16-bit operands ignore this.
    """
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def output_buffer(out: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                  what: str) -> torch.Tensor:
    """``out`` after checking it can hold the result (a dequantize workspace), or a new tensor.

    Raises:
        ValueError: ``out`` of another shape, dtype or device, or not contiguous.
    """
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"{what}: out is {out.dtype} {tuple(out.shape)} on {out.device} "
                         f"(contiguous={out.is_contiguous()}), expected a contiguous {dtype} {tuple(shape)} on {device}")
    return out


def check_device(*tensors: torch.Tensor | None, kernel: Any = None) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter.

    Raises:
        ValueError: a tensor on the wrong device for how the kernels were built.
    """
    interp = interpreting(kernel)
    for t in tensors:
        if t is None:
            continue
        if not interp and t.device.type != "cuda":
            raise ValueError(f"Triton kernels need CUDA tensors (got a tensor on {t.device}); "
                             "set TRITON_INTERPRET=1 before importing triton to run them on CPU")


@triton.jit
def round_half_even(x):
    """Round fp32 ``x`` (|x| < 2²²) to the nearest integer, ties to even — ``torch.round``.

    Adding 1.5·2²³ leaves no fraction bits, so the IEEE addition itself rounds (to nearest even); the
    subtraction is exact. Works under the interpreter (libdevice's ``rint`` does not). A kernel using it
    must be compiled without FMA contraction (``enable_fp_fusion=False``) when ``x`` is a product.
    """
    return (x + 12582912.0) - 12582912.0


@triton.jit
def swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order (Triton's matmul tutorial): GROUP_M row-tiles share each column sweep in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def reduction_buffer(m: int, n: int, like: torch.Tensor, split: int) -> torch.Tensor:
    """Output of a matmul launch: ``like.dtype`` when one program owns each output tile, fp32 zeros
    when ``split`` > 1 programs ``atomic_add`` partial sums into it (the caller casts afterwards)."""
    if split > 1:
        return torch.zeros((m, n), device=like.device, dtype=torch.float32)
    return torch.empty((m, n), device=like.device, dtype=like.dtype)


def fixed_config(cfg: dict | None, split_name: str, m: int, n: int, k: int) -> dict | None:
    """The launch config of a matmul wrapper: the caller's (defaults filled in), the interpreter's large
    tiles, or None (autotuned)."""
    if cfg is not None:
        return {"GROUP_M": 8, split_name: 1, **cfg}
    if INTERPRET:
        return interpreter_config(m, n, k, split_name)
    return None


def deterministic() -> bool:
    """``torch.use_deterministic_algorithms(True)`` is in force: no launch may ``atomic_add`` partial sums
    (their order, hence the last bits of the result, would vary from run to run)."""
    return torch.are_deterministic_algorithms_enabled()


def split_of(cfg: dict | None, name: str, m: int, decode_max_m: int) -> int:
    """Split factor of a fixed config, or (autotuned) 2 for decode shapes whose configs may split
    (1 in deterministic mode, whose decode configs never split).

    Raises:
        RuntimeError: a fixed config that splits (atomics) while deterministic algorithms are enforced.
    """
    if cfg is not None:
        split = int(cfg.get(name, 1))
        if split > 1 and deterministic():
            raise RuntimeError(f"{name}={split} accumulates partial sums with atomic_add, which is not deterministic, "
                               "and torch.use_deterministic_algorithms(True) is set: use a config with "
                               f"{name}=1")
        return split
    return 2 if m <= decode_max_m and not deterministic() else 1


def interpreter_config(m: int, n: int, k: int, split_name: str) -> dict:
    """Large tiles for interpreter runs: its cost is per program instance, not per element."""
    return {"BLOCK_M": max(16, min(64, next_pow2(m))), "BLOCK_N": max(16, min(256, next_pow2(n))),
            "BLOCK_K": max(32, min(256, next_pow2(k))), "GROUP_M": 4, split_name: 1}


def config_set(direction: str, m: int, dtype: torch.dtype, decode_max_m: int, odd_k: bool = False) -> str:
    """Name of the autotune config list for a launch: ``<direction>[_decode[_det]|_odd_k|_fp32]``.

    Decode shapes (M ≤ ``decode_max_m``) use split-K/N configs, or in deterministic mode
    (:func:`deterministic`) ``_decode_det`` configs that never split (one program per output tile: no
    atomics, no zero fill, no cast launch); fp32 activations (3×TF32 MMAs, about three times the operand
    registers) and odd-K 4-bit rows use smaller tiles so that no config spills.
    """
    if m <= decode_max_m:
        return f"{direction}_decode_det" if deterministic() else f"{direction}_decode"
    if odd_k:
        return f"{direction}_odd_k"
    if dtype == torch.float32:
        return f"{direction}_fp32"
    return direction


def deterministic_decode(split_name: str) -> list[triton.Config]:
    """The ``_decode_det`` list: the decode tile shape with one program per output tile (no split)."""
    return [config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3, **{split_name: 1})]


def autotuners(configs: dict[str, list], fwd: Any, bwd: Any, key: list[str], fwd_out: str, bwd_out: str) -> dict:
    """One ``@triton.autotune`` wrapper per config list; split decode lists accumulate with atomics, so
    their output is zeroed before every timing run (``reset_to_zero``)."""
    tuners = {}
    for name, cfgs in configs.items():
        fn, out = (fwd, fwd_out) if name.startswith("fwd") else (bwd, bwd_out)
        reset = [out] if name.endswith("_decode") else None
        tuners[name] = triton.autotune(configs=cfgs, key=key, reset_to_zero=reset)(fn)
    return tuners
