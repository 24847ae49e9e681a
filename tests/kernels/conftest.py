"""The kernel tests run the Triton kernels on CPU tensors under the Triton interpreter.

Triton decides between compiling and interpreting when a ``@triton.jit`` decorator runs, i.e. when a
kernel module is imported, so ``TRITON_INTERPRET=1`` is set here, at conftest import, before any test
imports a kernel module. Kernel modules already imported in compiled mode (by something collected
earlier) are dropped so that they are re-imported under the interpreter. The ahead-of-time compile,
report and benchmark tests run in subprocesses without the variable.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"


def _drop_compiled_kernel_modules() -> None:
    common = sys.modules.get("qtune.kernels._common")
    if common is None or getattr(common, "INTERPRET", True):
        return
    pkg = sys.modules.get("qtune.kernels")
    for name in [n for n in sys.modules if n.startswith("qtune.kernels.")]:
        del sys.modules[name]
        if pkg is not None and hasattr(pkg, name.rsplit(".", 1)[1]):
            delattr(pkg, name.rsplit(".", 1)[1])


_drop_compiled_kernel_modules()
