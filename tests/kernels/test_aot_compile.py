"""Every kernel compiles ahead of time for sm_80 and sm_90 at every autotune config, without a GPU.

The interpreter accepts programs that real compilation rejects (layouts, shared memory, dot shapes),
so this runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` through
``python -m qtune.kernels.report --all`` in a subprocess without ``TRITON_INTERPRET`` (Triton reads it
when the kernels are defined). It also holds the report's targets: tensor-core instructions in every
fused matmul, no register spills, shared memory within the architecture's limit.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# Opt-in dynamic shared memory per block: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    proc = subprocess.run([sys.executable, "-m", "qtune.kernels.report", "--all", "--json", str(out)],
                          env=clean_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def _key(cfg) -> str:
    return json.dumps(dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages), sort_keys=True)


def test_every_kernel_and_config_compiles(rows):
    # imported under the interpreter here: only their config lists are read
    from qtune.kernels import dequant_4bit, dequant_affine, dequant_gguf, dequant_gptq, dequant_int8, matmul_4bit, \
        matmul_affine, matmul_gguf, matmul_gptq, matmul_int8, matmul_llm_int8

    failed = [(r["kernel"], r["variant"], r["arch"], r["config"], r.get("error", "")[:300])
              for r in rows if not r["ok"]]
    assert not failed, failed
    compiled = {(r["kernel"].split("[")[0], r["arch"], json.dumps(r["config"], sort_keys=True)) for r in rows}
    for arch in ("sm_80", "sm_90"):
        for op, module in (("linear_4bit", matmul_4bit), ("linear_gptq", matmul_gptq), ("linear_int8", matmul_int8),
                           ("linear_gguf", matmul_gguf), ("linear_affine", matmul_affine)):
            for cfgs in module.CONFIGS.values():
                for cfg in cfgs:
                    assert (op, arch, _key(cfg)) in compiled, (op, arch, cfg)
        for cfgs in matmul_llm_int8.CONFIGS.values():
            for cfg in cfgs:
                assert ("llm_int8", arch, _key(cfg)) in compiled, (arch, cfg)
        for name, module in (("dequant_4bit", dequant_4bit), ("dequant_int8", dequant_int8),
                             ("dequant_gptq", dequant_gptq), ("dequant_gguf", dequant_gguf),
                             ("dequant_affine", dequant_affine)):
            for cfg in module.CONFIGS:
                assert (name, arch, _key(cfg)) in compiled, (name, arch, cfg)


def test_fused_matmuls_use_tensor_cores(rows):
    for r in rows:
        if r["matmul"]:
            assert r["mma_sync"] or r["wgmma"], (r["kernel"], r["variant"], r["arch"], r["config"])
            if r["arch"] == "sm_90" and r["config"]["BLOCK_M"] >= 64:
                assert r["wgmma"], ("no wgmma on sm_90", r["kernel"], r["variant"], r["config"])


def test_no_spills_and_shared_memory_fits(rows):
    spills = [(r["kernel"], r["variant"], r["arch"], r["config"], r["registers"]) for r in rows
              if r["spill_stores"] + r["spill_loads"] > 0]
    assert not spills, spills
    too_big = [(r["kernel"], r["arch"], r["shared"]) for r in rows if r["shared"] > SHARED_LIMIT[r["arch"]]]
    assert not too_big, too_big


def test_weight_loads_are_vectorized(rows):
    # the addressing lets the compiler move the packed weight in 128-bit transactions (ld.global.v4 or
    # 16-byte cp.async) at the configs whose tiles give a thread 16 contiguous bytes
    best: dict = {}
    for r in rows:
        weight_kernel = r["kernel"].split("[")[0] in ("dequant_4bit", "dequant_int8", "dequant_affine") or r["matmul"]
        if weight_kernel and "odd K" not in r["variant"]:
            key = (r["kernel"], r["arch"])
            best[key] = max(best.get(key, 0), r["ld_v4"] + r["cp_async_16"])
    assert best and all(best.values()), [k for k, v in best.items() if not v]
