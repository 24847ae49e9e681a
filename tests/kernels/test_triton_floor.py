"""The Triton floor pyproject.toml states is one on which every kernel compiles.

``.ci/run`` installs that Triton into ``.deps/triton-floor`` (``pip install --no-deps --target``, never into
the venv). A child process puts it first on ``sys.path`` and compiles every kernel in every variant (dtype,
bits, double quant, act-order, odd K) ahead of time for sm_80 and sm_90 through
``python -m qtune.kernels.report``'s job list, without a GPU.

Why 3.4 (found with this harness, Triton wheels 3.2.0–3.4.0 in a ``--target`` folder each):
- 3.2.0 has no ``tl.gather`` (the 4-bit kernels keep the NF4/FP4 code table on chip with it);
- 3.3.0 and 3.3.1 have it, but compiling ``dequant_4bit`` and ``linear_4bit`` aborts in
  ``TritonGPUOptimizeThreadLocality`` (``setOptimizedGatherLayout``: assertion
  ``GatherLoweringHelper(op).isWarpLocal()``); every other kernel compiles there;
- 3.4.0 compiles everything. torch 2.8.0 is the first torch that requires it (``triton==3.4.0``;
  torch 2.7.x requires 3.3.x), hence ``torch>=2.8``.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOOR_DIR = ROOT / ".deps" / "triton-floor"


def _floor(package: str) -> str:
    """The ``>=`` version of ``package`` in pyproject.toml's dependencies."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(rf'^\s*"{package}>=([0-9.]+)', text, re.M)
    assert found, f"pyproject.toml: no '{package}>=' dependency"
    return found.group(1)


# The child: the floor Triton first on sys.path, every kernel compiled for sm_80 and sm_90.
CHILD = r"""
import json, sys
floor_dir, want = sys.argv[1], sys.argv[2]
sys.path.insert(0, floor_dir)
import triton
assert triton.__file__.startswith(floor_dir), triton.__file__
assert triton.__version__.startswith(want), (triton.__version__, want)
from qtune.kernels import report

rows = report.run("default", (80, 90))
print(json.dumps({"triton": triton.__version__, "rows": rows}))
"""


@pytest.fixture(scope="module")
def floor_rows():
    want = _floor("triton")
    if not FLOOR_DIR.is_dir():
        pytest.skip(f"{FLOOR_DIR} is absent: .ci/run installs the floor Triton there "
                    f"(pip install --no-deps --target .deps/triton-floor triton=={want}.0)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the floor's own compile cache, apart from the venv Triton's
    env["TRITON_CACHE_DIR"] = str(FLOOR_DIR / ".cache")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(FLOOR_DIR), want], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_on_the_floor_triton(floor_rows):
    rows = floor_rows["rows"]
    failed = [(r["kernel"], r["variant"], r["arch"], r.get("error", "")[:300]) for r in rows if not r["ok"]]
    assert not failed, (floor_rows["triton"], failed)
    kernels = {(r["kernel"].split("[")[0], r["arch"]) for r in rows}
    for name in ("dequant_4bit", "dequant_int8", "dequant_gptq", "dequant_gguf", "dequant_affine", "linear_4bit",
                 "linear_gptq", "linear_int8", "linear_gguf", "linear_affine", "llm_int8"):
        for arch in ("sm_80", "sm_90"):
            assert (name, arch) in kernels, (name, arch)
    # every variant family the default level lists: 4-bit with and without double quant and odd K, GPTQ bits,
    # every GGUF type in the dequantize kernel and in the fused forward, every affine code width in the fused
    # forward and backward (odd K included)
    variants = " | ".join(r["variant"] for r in rows)
    for needle in ("nf4 dq", "odd K", "2-bit", "3-bit", "8-bit", "act-order", "zero-point", "bf16", "fp32",
                   "affine 3-bit"):
        assert needle in variants, needle
    from qtune.formats.gguf import GGUF_CONFIGS

    for cfg in GGUF_CONFIGS:
        for kernel in ("dequant_gguf", "linear_gguf"):
            assert any(r["kernel"].startswith(kernel) and cfg.type_name in r["variant"] for r in rows), (kernel, cfg)
    for bits in (2, 3, 4, 8):
        for direction in ("fwd", "bwd"):
            assert any(r["kernel"].startswith(f"linear_affine[{direction}") and f"affine {bits}-bit" in r["variant"]
                       for r in rows), (direction, bits)
    assert any(r["kernel"] == "linear_affine[fwd_odd_k]" and "odd K" in r["variant"] for r in rows)


def test_fused_matmuls_use_tensor_cores_on_the_floor(floor_rows):
    for r in floor_rows["rows"]:
        if r["matmul"]:
            assert r["mma_sync"] or r["wgmma"], (r["kernel"], r["variant"], r["arch"])


def test_ci_installs_the_floor_pyproject_states():
    triton_floor, torch_floor = _floor("triton"), _floor("torch")
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"--target .deps/triton-floor triton=={triton_floor}.0" in ci
    # torch ships a pinned Triton: torch 2.8 is the first with Triton 3.4 (see the module docstring)
    assert (triton_floor, torch_floor) == ("3.4", "2.8")
