"""GPU benchmark of qtune's Triton kernels (``qtune.kernels``).

``python -m qtune.bench.kernels [--quick] [--dtype fp16|bf16] [--ms 100]``

For each kernel it prints the time, the achieved bandwidth (GB/s) or throughput (TFLOP/s) and the
percentage of the device's peak, and for the fused matmuls the speed ratio against
dequantize-then-``torch.matmul`` and against a dense fp16/bf16 ``torch.matmul``, at
M ∈ {1, 16, 512, 4096} tokens for the weights (out × in) 4096×4096, 4096×14336 and 14336×4096.
Ratios are ``baseline time / kernel time`` (> 1: the kernel is faster). The issue's targets are
checked and flagged: dequantize ≥ 80 % of peak bandwidth; fused NF4/GPTQ forward at M ≤ 16 at
least 2.5× faster than fp16 ``torch.matmul``; forward+backward at M = 4096 within 1.3× of bf16
``torch.matmul``.

Without a CUDA device (or without Triton) it says so and exits with status 0.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

import torch

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (out_features N, in_features K)
TOKENS = (1, 16, 512, 4096)

# Dense fp16/bf16 tensor-core TFLOP/s and memory GB/s of common devices (vendor datasheets).
_PEAKS = (
    ("H200", 989.0, 4800.0), ("H100 PCIe", 756.0, 2000.0), ("H100", 989.0, 3350.0),
    ("A100-SXM4-80GB", 312.0, 2039.0), ("A100 80GB PCIe", 312.0, 1935.0), ("A100", 312.0, 1555.0),
    ("L40S", 362.0, 864.0), ("L40", 181.0, 864.0), ("L4", 121.0, 300.0), ("A10G", 70.0, 600.0),
    ("A10", 125.0, 600.0), ("RTX 4090", 165.0, 1008.0), ("RTX 3090", 71.0, 936.0), ("V100", 125.0, 900.0),
    ("T4", 65.0, 320.0),
)


def device_peaks(device: torch.device) -> tuple[Optional[float], Optional[float]]:
    """(peak dense 16-bit TFLOP/s, peak memory GB/s) of ``device``; None where unknown."""
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


def _pct(value: float, peak: Optional[float]) -> str:
    return f"{100 * value / peak:5.1f}%" if peak else "   n/a"


def _flag(ok: bool) -> str:
    return "ok" if ok else "MISS"


class Bench:
    """The benchmark sections; ``device``/``timer`` are replaceable so the code paths can be exercised on
    CPU under the Triton interpreter (the test suite does, with a dummy timer)."""

    def __init__(self, dtype: torch.dtype, rep_ms: int, device: str = "cuda",
                 timer: Optional[Callable[[Callable[[], object]], float]] = None) -> None:
        self.dtype = dtype
        self.device = torch.device(device)
        self.rep = rep_ms
        self.peak_tflops, self.peak_gbps = device_peaks(self.device) if self.device.type == "cuda" else (None, None)
        self._timer = timer

    def time(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn`` (Triton's do_bench: L2 flushed between runs)."""
        if self._timer is not None:
            return self._timer(fn)
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=max(5, self.rep // 4), rep=self.rep, return_mode="median"))

    # -- weights ---------------------------------------------------------------------------------------
    def weights(self, n: int, k: int) -> dict[str, tuple]:
        from ..formats import gptq, int8, nf4

        torch.manual_seed(0)
        w = torch.randn(n, k, device=self.device) * 0.02
        t4 = nf4.quantize_4bit(w, nf4.NF4Config(blocksize=64, double_quant=True))
        tg = gptq.quantize_rtn(w, gptq.RTNConfig(bits=4, group_size=128, sym=True))
        t8 = int8.quantize_int8(w, int8.LLMInt8Config())
        return {
            "nf4": (t4.packed, t4.absmax, t4.code, t4.nested_absmax, t4.nested_code, t4.nested_offset, 64, [n, k]),
            "gptq": (tg.qweight, tg.qzeros, tg.scales, tg.g_idx, 4, k),
            "int8": (t8.weight, t8.scale, None, -1),
            "llm_int8": (t8.weight, t8.scale[:, 0].contiguous(), 6.0),
            "dense": (w.to(self.dtype),),
        }

    @staticmethod
    def weight_bytes(fmt: str, args: tuple) -> int:
        return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))

    # -- sections ----------------------------------------------------------------------------------------
    def dequantize(self, shapes) -> None:
        from .. import kernels as K

        print(f"\n== dequantize -> {self.dtype} (bytes read + written; target ≥ 80% of peak bandwidth)")
        print(f"{'kernel':<18} {'weight':>12} {'ms':>8} {'GB/s':>8} {'% peak':>7}  target")
        fns = {"nf4": K.dequantize_4bit, "int8": K.dequantize_int8, "gptq": K.dequantize_gptq}
        for n, k in shapes:
            ws = self.weights(n, k)
            for fmt, fn in fns.items():
                args = ws[fmt]
                ms = self.time(lambda: fn(*args, self.dtype))
                moved = self.weight_bytes(fmt, args) + n * k * torch.tensor([], dtype=self.dtype).element_size()
                gbps = moved / ms / 1e6
                ok = self.peak_gbps is None or gbps >= 0.8 * self.peak_gbps
                print(f"dequantize_{fmt:<7} {n:>5}x{k:<6} {ms:8.3f} {gbps:8.0f} {_pct(gbps, self.peak_gbps)}  "
                      f"{_flag(ok)}")
            del ws
            torch.cuda.empty_cache()

    def forward(self, shapes, tokens) -> None:
        from .. import kernels as K

        print(f"\n== fused forward y = x·Ŵᵀ, x {self.dtype} (ratios: baseline ms / fused ms; "
              "target at M ≤ 16: ≥ 2.5× dense)")
        print(f"{'kernel':<16} {'M':>5} {'weight':>12} {'ms':>8} {'TFLOP/s':>8} {'GB/s':>7} {'% peak':>7} "
              f"{'vs deq+mm':>9} {'vs dense':>9}  target")
        deq = {"nf4": K.dequantize_4bit, "gptq": K.dequantize_gptq, "int8": K.dequantize_int8}
        fused = {"nf4": K.linear_4bit, "gptq": K.linear_gptq, "int8": K.linear_int8}
        for n, k in shapes:
            ws = self.weights(n, k)
            dense_w = ws["dense"][0]
            for m in tokens:
                x = torch.randn(m, k, device=self.device, dtype=self.dtype)
                t_dense = self.time(lambda: torch.matmul(x, dense_w.t()))
                for fmt in ("nf4", "gptq", "int8"):
                    args = ws[fmt]
                    t = self.time(lambda: fused[fmt](x, *args, None))
                    t_dm = self.time(lambda: torch.matmul(x, deq[fmt](*args, self.dtype).t()))
                    self._row(f"linear_{fmt}", m, n, k, t, self.weight_bytes(fmt, args), t_dm, t_dense,
                              check=m <= 16 and fmt != "int8")
                args = ws["llm_int8"]
                t = self.time(lambda: K.linear_llm_int8(x, *args, None))
                t_dm = self.time(lambda: torch.matmul(x, deq["int8"](args[0], args[1].view(-1, 1), None, -1,
                                                                     self.dtype).t()))
                self._row("linear_llm_int8", m, n, k, t, self.weight_bytes("llm_int8", args), t_dm, t_dense)
            del ws, dense_w
            torch.cuda.empty_cache()

    def _row(self, name, m, n, k, ms, wbytes, t_dm, t_dense, check=False) -> None:
        tflops = 2 * m * n * k / ms / 1e9
        moved = wbytes + (m * k + m * n) * torch.tensor([], dtype=self.dtype).element_size()
        gbps = moved / ms / 1e6
        pct = _pct(gbps, self.peak_gbps) if m <= 16 else _pct(tflops, self.peak_tflops)
        target = _flag(t_dense / ms >= 2.5) if check else ""
        print(f"{name:<16} {m:>5} {n:>5}x{k:<6} {ms:8.3f} {tflops:8.1f} {gbps:7.0f} {pct} "
              f"{t_dm / ms:8.2f}x {t_dense / ms:8.2f}x  {target}")

    def forward_backward(self, shapes, tokens) -> None:
        from .. import kernels as K

        print("\n== forward + backward (dx) vs bf16 torch.matmul (target at M = 4096: fused ≤ 1.3× bf16 time)")
        print(f"{'kernel':<16} {'M':>5} {'weight':>12} {'fused ms':>9} {'bf16 ms':>8} {'fused/bf16':>10}  target")
        for n, k in shapes:
            ws = self.weights(n, k)
            wb = ws["dense"][0].to(torch.bfloat16)
            for m in tokens:
                x = torch.randn(m, k, device=self.device, dtype=torch.bfloat16)
                dy = torch.randn(m, n, device=self.device, dtype=torch.bfloat16)
                t_ref = self.time(lambda: (torch.matmul(x, wb.t()), torch.matmul(dy, wb)))
                for fmt, fwd, bwd in (("nf4", K.linear_4bit, K.linear_4bit_grad_input),
                                      ("gptq", K.linear_gptq, K.linear_gptq_grad_input)):
                    args = ws[fmt]
                    t = self.time(lambda: (fwd(x, *args, None), bwd(dy, *args)))
                    target = _flag(t / t_ref <= 1.3) if m == 4096 else ""
                    print(f"linear_{fmt:<9} {m:>5} {n:>5}x{k:<6} {t:9.3f} {t_ref:8.3f} {t / t_ref:9.2f}x  {target}")
            del ws, wb
            torch.cuda.empty_cache()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qtune.bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the 4096x4096 weight, M in {1, 4096}")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"), help="activation dtype")
    parser.add_argument("--ms", type=int, default=100, help="timing budget per measurement (ms)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("qtune.bench.kernels: no CUDA device is present; the Triton kernels run only on CUDA GPUs "
              "(nothing to benchmark)")
        return 0
    from .. import kernels

    if not kernels.triton_available():
        print("qtune.bench.kernels: Triton is not installed; nothing to benchmark")
        return 0
    kernels.register()
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    bench = Bench(dtype, args.ms)
    props = torch.cuda.get_device_properties(bench.device)
    print(f"device: {props.name} (sm_{props.major}{props.minor}), peak {bench.peak_tflops or 'n/a'} TFLOP/s dense "
          f"16-bit, {bench.peak_gbps and round(bench.peak_gbps)} GB/s; torch {torch.__version__}")
    shapes = SHAPES[:1] if args.quick else SHAPES
    tokens = (1, 4096) if args.quick else TOKENS
    bench.dequantize(shapes)
    bench.forward(shapes, tokens)
    bench.forward_backward(shapes, tuple(t for t in tokens if t >= 512))
    return 0


if __name__ == "__main__":
    sys.exit(main())
