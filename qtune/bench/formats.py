"""CPU benchmark of every format against bitsandbytes, measured in the same run.

``python -m qtune.bench.formats [--out-features 4096] [--in-features 4096] [--tokens 1024] [--dtype bf16] [--out FILE]``

For one weight and each format it prints: quantize time, dequantize time, forward and forward+backward
(gradient to the input) time of a layer at ``--tokens`` tokens (8×128 by default), and where
bitsandbytes has the same format, its figures and the ratio qtune/bitsandbytes (< 1 means qtune is
faster). A dense layer of the same dtype is the baseline.

The numbers (median milliseconds per metric, ratios, settings) go to ``bench/results/formats.json``
(``--out`` elsewhere, e.g. ``bench/results/formats-avx2.json`` for a run under
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``; the file records those variables).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from ..formats import (FP4Config, GPTQConfig, Int8Config, LLMInt8Config, NF4Config, QuantConfig, RTNConfig,
                       parse_dtype)
from ..formats.gptq import GPTQHessian
from ..nn import layer_class_for
from .results import load_average, write_and_report


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' per-call "inputs will be cast" log line (a logger warning, not a warning)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    return timeit_interleaved([fn], repeat, warmup)[0]


def timeit_interleaved(fns: list[Callable[[], object]], repeat: int = 5, warmup: int = 1) -> list[float]:
    """Median wall times (ms) of several functions, called in turn within each repetition.

    Interleaving puts qtune and bitsandbytes under the same conditions (other load on the machine,
    the allocator's state), so their ratio is steadier than that of two separate timing loops.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(ts) for ts in times]


METRICS = ("quantize", "dequantize", "forward", "fwd+bwd")


def _layer_fns(layer: nn.Module, x: torch.Tensor) -> tuple[Callable, Callable]:
    def fwd():
        with torch.no_grad():
            layer(x)

    def fwd_bwd():
        xi = x.detach().requires_grad_(True)
        layer(xi).sum().backward()

    return fwd, fwd_bwd


def _qtune_fns(cfg, linear: nn.Linear, x: torch.Tensor, **kw) -> dict[str, Callable]:
    cls = layer_class_for(cfg)
    layer = cls.from_float(linear, cfg, **kw)
    fwd, fb = _layer_fns(layer, x)
    return {"quantize": lambda: cls.from_float(linear, cfg, **kw), "dequantize": lambda: layer.dequantize(x.dtype),
            "forward": fwd, "fwd+bwd": fb}


def _bnb_fns(cfg: QuantConfig, linear: nn.Linear, x: torch.Tensor) -> dict[str, Callable] | None:
    """bitsandbytes' callables for the config ``cfg``; None where it has no such format or is absent."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as BF
    except Exception:
        return None
    w = linear.weight.detach()
    n, k = w.shape
    if isinstance(cfg, (NF4Config, FP4Config)):
        qt, dq = cfg.quant_type, cfg.double_quant
        packed, state = BF.quantize_4bit(w, quant_type=qt, compress_statistics=dq)
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=x.dtype, quant_type=qt, compress_statistics=dq)
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=qt, compress_statistics=dq).to("cpu")
        layer.train()  # eval() on CPU repacks the weight and drops the input gradient
        fwd, fb = _layer_fns(layer, x)
        return {"quantize": lambda: BF.quantize_4bit(w, quant_type=qt, compress_statistics=dq),
                "dequantize": lambda: BF.dequantize_4bit(packed, state), "forward": fwd, "fwd+bwd": fb}
    if isinstance(cfg, LLMInt8Config):
        cb, scb, _ = BF.int8_vectorwise_quant(w.half())
        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=cfg.threshold)
        layer.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
        layer = layer.to("cpu").eval()  # eval: the int8 matmul path (train() on CPU dequantizes instead)
        fwd, fb = _layer_fns(layer, x)
        return {"quantize": lambda: BF.int8_vectorwise_quant(w.half()),
                "dequantize": lambda: BF.int8_vectorwise_dequant(cb, scb).to(x.dtype), "forward": fwd, "fwd+bwd": fb}
    return None


def bench_formats(skip_gptq: bool = False) -> dict[str, Any]:
    """The formats timed, by the name printed (bitsandbytes has the first five)."""
    formats: dict[str, Any] = {
        "nf4": NF4Config(), "nf4-dq": NF4Config(double_quant=True), "fp4": FP4Config(),
        "int8": LLMInt8Config(threshold=0.0), "llm_int8": LLMInt8Config(),
        "int8-zp-g128": Int8Config(symmetric=False, group_size=128), "rtn4-g128": RTNConfig(bits=4, group_size=128),
    }
    if not skip_gptq:
        formats["gptq4-g128"] = GPTQConfig(bits=4, group_size=128)
    return formats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=8 * 128)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--skip-gptq", action="store_true", help="GPTQ quantization of a 4096² weight takes a while on CPU")
    p.add_argument("--only", nargs="+", metavar="FORMAT", help="time only these formats (names as printed)")
    p.add_argument("--out", help="results file (default bench/results/formats.json)")
    args = p.parse_args(argv)
    formats = bench_formats(args.skip_gptq)
    if args.only:
        unknown = sorted(set(args.only) - set(formats))
        if unknown:
            raise SystemExit(f"--only: unknown formats {unknown}; choose from {list(formats)}")
        formats = {k: v for k, v in formats.items() if k in args.only}
    load_start = load_average()
    quiet_bitsandbytes()
    dtype = parse_dtype(args.dtype)
    torch.manual_seed(0)
    linear = nn.Linear(args.in_features, args.out_features, bias=False, dtype=dtype)
    x = torch.randn(args.tokens, args.in_features, dtype=dtype)
    print(f"weight {args.out_features}x{args.in_features} {args.dtype}, x {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    dense_fwd, dense_fb = (timeit(f, args.repeat) for f in _layer_fns(linear.requires_grad_(False), x))
    print(f"dense {args.dtype}: forward {dense_fwd:.1f} ms, fwd+bwd {dense_fb:.1f} ms\n")

    kwargs: dict[str, dict] = {}
    if "gptq4-g128" in formats:
        h = GPTQHessian(args.in_features)
        h.add_batch(torch.randn(2048, args.in_features))
        kwargs["gptq4-g128"] = {"hessian": h}
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # not installed: print qtune's figures alone
        print(f"(bitsandbytes unavailable: {e})")

    print(f"{'format':<14}" + "".join(f"{c + ' ms':>14}{'vs bnb':>8}" for c in METRICS) + f"{'fb/dense':>10}")
    bnb_rows: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    for name, cfg in formats.items():
        ours = _qtune_fns(cfg, linear, x, **kwargs.get(name, {}))
        theirs = _bnb_fns(cfg, linear, x)
        row, ref = {}, {}
        for c in METRICS:
            reps = max(1, args.repeat // 2) if c == "quantize" else args.repeat
            if theirs is None:
                row[c] = timeit(ours[c], reps)
            else:
                row[c], ref[c] = timeit_interleaved([ours[c], theirs[c]], reps)
        if ref:
            bnb_rows[name] = ref
        rows.append({"format": name, "qtune_ms": row, "bnb_ms": ref or None,
                     "ratio": {c: row[c] / ref[c] for c in METRICS} if ref else None,
                     "fwd_bwd_over_dense": row["fwd+bwd"] / dense_fb})
        cells = "".join(f"{row[c]:>14.1f}{(f'{row[c] / ref[c]:.2f}x' if ref else '-'):>8}" for c in METRICS)
        print(f"{name:<14}{cells}{row['fwd+bwd'] / dense_fb:>9.2f}x", flush=True)
    if bnb_rows:
        print("\nbitsandbytes (same run, timed alternately with qtune):")
        for name, ref in bnb_rows.items():
            print(f"{name:<14}" + "".join(f"{ref[c]:>14.1f}{'':>8}" for c in METRICS) + f"{ref['fwd+bwd'] / dense_fb:>9.2f}x")
    print("\nratio = qtune / bitsandbytes; < 1 means qtune is faster.")
    results = {"settings": {"out_features": args.out_features, "in_features": args.in_features, "tokens": args.tokens,
                            "dtype": args.dtype, "repeat": args.repeat},
               "threads": torch.get_num_threads(), "load_average_start": load_start,
               "dense_ms": {"forward": dense_fwd, "fwd+bwd": dense_fb}, "rows": rows}
    return write_and_report("formats", results, args.out, argv)


if __name__ == "__main__":
    raise SystemExit(main())
