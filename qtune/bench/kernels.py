"""Kernel timings only: ``python -m qtune.bench.kernels [args]`` is ``python -m qtune.bench.gpu --stages bench [args]``.

The kernel benchmark became the ``bench`` stage of :mod:`qtune.bench.gpu` (GB/s, TFLOP/s, ratios to
dequantize + ``torch.matmul`` and to a dense ``torch.matmul``, and the crossover they imply); this name stays
for the commands already written down. Any ``--stages`` given is passed on unchanged.
"""
from __future__ import annotations

import sys
from typing import Optional

from .gpu import device_peaks, main as gpu_main

__all__ = ["main", "device_peaks"]


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--stages" or a.startswith("--stages=") for a in args):
        args = ["--stages", "bench", *args]
    return gpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
