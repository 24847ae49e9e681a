"""CPU benchmark of every format against bitsandbytes, measured in the same run.

``python -m qtune.bench.formats [--out-features 4096] [--in-features 4096] [--tokens 1024] [--dtype bf16]``

For one weight and each format it prints: quantize time, dequantize time, forward and forward+backward
(gradient to the input) time of a layer at ``--tokens`` tokens (8×128 by default), and where
bitsandbytes has the same format, its figures and the ratio qtune/bitsandbytes (< 1 means qtune is
faster). A dense layer of the same dtype is the baseline.
"""
from __future__ import annotations

import argparse
import warnings
import statistics
import time
from typing import Callable

import torch
from torch import nn

from ..formats import FP4Config, GPTQConfig, Int8Config, LLMInt8Config, NF4Config, RTNConfig, parse_dtype
from ..formats.gptq import GPTQHessian
from ..nn import layer_class_for


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _layer_times(layer: nn.Module, x: torch.Tensor, repeat: int) -> tuple[float, float]:
    with torch.no_grad():
        fwd = timeit(lambda: layer(x), repeat)

    def fwd_bwd():
        xi = x.detach().requires_grad_(True)
        layer(xi).sum().backward()

    return fwd, timeit(fwd_bwd, repeat)


def _qtune_row(cfg, linear: nn.Linear, x: torch.Tensor, repeat: int, **kw) -> dict:
    cls = layer_class_for(cfg)
    q = timeit(lambda: cls.from_float(linear, cfg, **kw), repeat=max(1, repeat // 2))
    layer = cls.from_float(linear, cfg, **kw)
    deq = timeit(lambda: layer.dequantize(x.dtype), repeat)
    fwd, fb = _layer_times(layer, x, repeat)
    return {"quantize": q, "dequantize": deq, "forward": fwd, "fwd+bwd": fb}


def _bnb_rows(linear: nn.Linear, x: torch.Tensor, repeat: int) -> dict[str, dict]:
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as BF
    except Exception as e:  # not installed: print qtune's figures alone
        print(f"(bitsandbytes unavailable: {e})")
        return {}
    rows: dict[str, dict] = {}
    w = linear.weight.detach()
    n, k = w.shape
    for name, qt, dq in (("nf4", "nf4", False), ("nf4-dq", "nf4", True), ("fp4", "fp4", False)):
        q = timeit(lambda: BF.quantize_4bit(w, quant_type=qt, compress_statistics=dq), repeat=max(1, repeat // 2))
        packed, state = BF.quantize_4bit(w, quant_type=qt, compress_statistics=dq)
        deq = timeit(lambda: BF.dequantize_4bit(packed, state), repeat)
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=x.dtype, quant_type=qt, compress_statistics=dq)
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=qt, compress_statistics=dq).to("cpu")
        layer.train()  # eval() on CPU repacks the weight and drops the input gradient
        fwd, fb = _layer_times(layer, x, repeat)
        rows[name] = {"quantize": q, "dequantize": deq, "forward": fwd, "fwd+bwd": fb}
    for name, threshold in (("int8", 0.0), ("llm_int8", 6.0)):
        q = timeit(lambda: BF.int8_vectorwise_quant(w.half()), repeat=max(1, repeat // 2))
        cb, scb, _ = BF.int8_vectorwise_quant(w.half())
        deq = timeit(lambda: BF.int8_vectorwise_dequant(cb, scb).to(x.dtype), repeat)
        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=threshold)
        layer.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
        layer = layer.to("cpu").eval()  # eval: the int8 matmul path (train() on CPU dequantizes instead)
        fwd, fb = _layer_times(layer, x, repeat)
        rows[name] = {"quantize": q, "dequantize": deq, "forward": fwd, "fwd+bwd": fb}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=8 * 128)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--skip-gptq", action="store_true", help="GPTQ quantization of a 4096² weight takes a while on CPU")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")  # bitsandbytes, once per call
    dtype = parse_dtype(args.dtype)
    torch.manual_seed(0)
    linear = nn.Linear(args.in_features, args.out_features, bias=False, dtype=dtype)
    x = torch.randn(args.tokens, args.in_features, dtype=dtype)
    print(f"weight {args.out_features}x{args.in_features} {args.dtype}, x {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    dense_fwd, dense_fb = _layer_times(linear.requires_grad_(False), x, args.repeat)
    print(f"dense {args.dtype}: forward {dense_fwd:.1f} ms, fwd+bwd {dense_fb:.1f} ms\n")

    formats = {
        "nf4": NF4Config(), "nf4-dq": NF4Config(double_quant=True), "fp4": FP4Config(),
        "int8": LLMInt8Config(threshold=0.0), "llm_int8": LLMInt8Config(), "int8-zp-g128": Int8Config(symmetric=False, group_size=128),
        "rtn4-g128": RTNConfig(bits=4, group_size=128),
    }
    kwargs: dict[str, dict] = {}
    if not args.skip_gptq:
        h = GPTQHessian(args.in_features)
        h.add_batch(torch.randn(2048, args.in_features))
        formats["gptq4-g128"] = GPTQConfig(bits=4, group_size=128)
        kwargs["gptq4-g128"] = {"hessian": h}
    bnb_rows = _bnb_rows(linear, x, args.repeat)

    cols = ("quantize", "dequantize", "forward", "fwd+bwd")
    print(f"{'format':<14}" + "".join(f"{c + ' ms':>14}{'vs bnb':>8}" for c in cols) + f"{'fb/dense':>10}")
    for name, cfg in formats.items():
        row = _qtune_row(cfg, linear, x, args.repeat, **kwargs.get(name, {}))
        ref = bnb_rows.get(name)
        cells = ""
        for c in cols:
            ratio = f"{row[c] / ref[c]:.2f}x" if ref else "-"
            cells += f"{row[c]:>14.1f}{ratio:>8}"
        print(f"{name:<14}{cells}{row['fwd+bwd'] / dense_fb:>9.2f}x")
    if bnb_rows:
        print("\nbitsandbytes (same run):")
        for name, row in bnb_rows.items():
            print(f"{name:<14}" + "".join(f"{row[c]:>14.1f}{'':>8}" for c in cols) + f"{row['fwd+bwd'] / dense_fb:>9.2f}x")
    print("\nratio = qtune / bitsandbytes; < 1 means qtune is faster.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
