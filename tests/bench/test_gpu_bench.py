"""``python -m qtune.bench.gpu`` on a CPU-only machine: the no-CUDA exit, and a tiny run under the Triton
interpreter (``--interpret``, test only) whose JSON has the stages' schema and whose checks all pass.
Nothing here is about speed: the interpreter's timings mean nothing."""
import json
import os
import subprocess
import sys

import pytest
import torch

from qtune.bench.gpu import crossover, crossover_table
from qtune.bench.results import read_results


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_without_cuda_exits_0_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "qtune.bench.gpu", "--out", str(out)], env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "qtune.bench.gpu: no CUDA device is present; the Triton kernels run only on CUDA GPUs "
        "(nothing measured, nothing written)"]
    assert not out.exists()


def test_unknown_stage_is_refused():
    proc = subprocess.run([sys.executable, "-m", "qtune.bench.gpu", "--stages", "correct,speed"], env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown stage(s) ['speed']" in proc.stderr


@pytest.fixture(scope="module")
def interpreter_run(tmp_path_factory):
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("gpu")
    out = folder / "gpu.json"
    env = {**clean_env(), "QTUNE_DISPATCH_FILE": str(folder / "dispatch.json")}
    proc = subprocess.run([sys.executable, "-m", "qtune.bench.gpu", "--interpret", "--formats", "4bit,int8",
                           "--save-crossovers", "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, read_results(out)


def test_interpreter_run_schema(interpreter_run):
    stdout, payload = interpreter_run
    assert payload["benchmark"] == "gpu" and "--interpret" in payload["command"]
    res = payload["results"]
    assert res["interpret"] is True and res["stages"] == ["dispatch", "correct", "bench", "step"]
    assert res["ok"] is True and res["failures"] == []
    for stage in ("dispatch", "correct", "bench", "step"):
        assert stage in res and f"== {stage}" in stdout, stage
    # the step compares CUDA training steps: skipped with its reason here
    assert "CUDA" in res["step"]["skipped"]
    bench = res["bench"]
    row_keys = {"format", "family", "direction", "dtype", "m", "n", "k", "ms", "ms_dequant_matmul", "ms_dense",
                "gbps", "tflops", "vs_dequant_matmul", "vs_dense"}
    assert bench["rows"] and all(row_keys <= set(r) for r in bench["rows"])
    measured = {(r["family"], r["direction"], r["m"], (r["n"], r["k"])) for r in bench["rows"]}
    assert measured == {(f, d, m, tuple(s)) for f in ("4bit", "int8") for d in ("forward", "grad_input")
                        for m in res["tokens"] for s in res["shapes"]}
    assert {r["format"] for r in bench["dequantize"]} == {"nf4_dq", "int8_row"}
    from qtune.ops import dispatch
    table = bench["crossover"]
    assert table["version"] == dispatch.CROSSOVER_VERSION and set(table["crossovers"]) == {"cpu"}
    assert set(table["crossovers"]["cpu"]) == {"4bit", "int8"}


def test_interpreter_run_crossover_loads_in_dispatch(interpreter_run, tmp_path):
    from qtune.ops import dispatch

    res = interpreter_run[1]["results"]
    path = tmp_path / "dispatch.json"
    path.write_text(json.dumps(res["bench"]["crossover"]))
    loaded = dispatch.load_crossovers(path)
    assert set(loaded["cpu"]["4bit"]) == {"forward", "grad_input"}
    # --save-crossovers stored the same table in the dispatcher's file ($QTUNE_DISPATCH_FILE here)
    saved = dispatch.load_crossovers(res["crossover_file"])
    assert saved == loaded


def test_interpreter_run_correct_stage_all_true(interpreter_run):
    correct = interpreter_run[1]["results"]["correct"]
    rows = [r for r in correct["rows"] if "ok" in r]
    assert correct["ok"] is True and correct["checked"] == len(rows) and all(r["ok"] for r in rows)
    whats = " | ".join(r["what"] for r in rows)
    # every 4-bit and int8 variant, both branches, both directions, views and bias, op-level forced branches
    for needle in ("nf4_dq", "fp4_bs128_dq", "nf4_bs64", "nf4_dq_odd_k", "nf4_k_not_blocksize", "int8_row",
                   "int8_zp_g128", "int8_sym_g100", "fused fwd", "fused bwd", "dequant fwd", "dequant bwd",
                   "view+bias", "transposed dy", "op fused", "op dequant", "fp16", "fp32"):
        assert needle in whats, needle
    kinds = {r["check"] for r in rows}
    assert kinds == {"dequantize", "matmul", "op_branch"}


def test_interpreter_run_dispatch_lists_the_chain(interpreter_run):
    dispatch_stage = interpreter_run[1]["results"]["dispatch"]
    assert dispatch_stage["ok"] is True
    assert all(dispatch_stage["registered"].values()) and dispatch_stage["slow_path_reason"] is None
    for run in dispatch_stage["runs"]:
        assert run["families"] == ["4bit", "affine", "gguf", "gptq", "int8", "llm_int8"]
        assert run["reference_on_device"] == [] and run["lora_grads_finite"]
        for family in run["families"]:
            assert any(k.startswith(f"{family}.forward.") for k in run["branches"]), family


def _row(family, direction, m, shape, fused_ms, dequant_ms, dtype="bf16"):
    return {"family": family, "direction": direction, "dtype": dtype, "m": m, "n": shape[0], "k": shape[1],
            "ms": fused_ms, "ms_dequant_matmul": dequant_ms}


def test_crossover_is_the_last_m_where_fused_wins_on_every_shape():
    rows = [_row("4bit", "forward", 1, (8, 8), 1.0, 2.0), _row("4bit", "forward", 1, (8, 16), 1.0, 2.0),
            _row("4bit", "forward", 16, (8, 8), 1.0, 2.0), _row("4bit", "forward", 16, (8, 16), 3.0, 2.0),
            _row("4bit", "forward", 64, (8, 8), 1.0, 2.0), _row("4bit", "forward", 64, (8, 16), 1.0, 2.0),
            _row("4bit", "grad_input", 1, (8, 8), 3.0, 2.0), _row("4bit", "grad_input", 16, (8, 8), 1.0, 2.0),
            _row("4bit", "forward", 1, (8, 8), 1.0, 2.0, "fp16"), _row("4bit", "forward", 16, (8, 8), 1.0, 2.0, "fp16"),
            _row("4bit", "forward", 64, (8, 8), 1.0, 2.0, "fp16"),
            _row("llm_int8", "forward", 1, (8, 8), 9.0, 1.0)]  # LLM.int8's forward has no dequant branch
    per_dtype = crossover(rows, (1, 16, 64))
    # bf16: 16 loses on one shape, so 64 (won again) does not count; grad_input loses at M = 1
    assert per_dtype == {"4bit": {"forward": {"bf16": 1, "fp16": 64}, "grad_input": {"bf16": 0}}}
    assert crossover_table(per_dtype) == {"4bit": {"forward": 1, "grad_input": 0}}


def test_step_compare_runs_qtune_and_bitsandbytes_on_cpu(one_thread):
    # the step stage's body at a tiny shape on CPU: qtune's reference path against bitsandbytes' CPU backend
    # (the real stage runs on CUDA only); same checkpoint and NF4+DQ bytes, so the first losses agree
    pytest.importorskip("bitsandbytes")
    from qtune.bench import gpu

    run = gpu.Run(torch.device("cpu"), False, shapes=(), tokens=(), dtypes=(), variant_dtypes=(), bench_dtypes=(),
                  rep_ms=1)
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=256)
    out = gpu.step_compare(run, shape, 32, None, steps=1)
    assert out["qtune"]["ms"] > 0 and out["bitsandbytes"]["ms"] > 0 and out["qtune_vs_bitsandbytes"] > 0
    assert out["loss_difference"] < 1e-2, out
    skipped = gpu.step_compare(run, shape, 32, "bitsandbytes has no CUDA build here", steps=1)
    assert skipped["bitsandbytes"] == {"skipped": "bitsandbytes has no CUDA build here"}


def test_interpreter_run_checks_every_gguf_type(tmp_path):
    # the correct stage for the gguf family alone: every GGUF type (the main weights' Q4_1, the variants' others;
    # Q4_K joins the main weights where 256 divides K, as on the GPU shapes), both branches, views, forced ops
    pytest.importorskip("triton")
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "qtune.bench.gpu", "--interpret", "--stages", "correct",
                           "--formats", "gguf", "--out", str(out)], env=clean_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    correct = read_results(out)["results"]["correct"]
    rows = [r for r in correct["rows"] if "ok" in r]
    assert correct["ok"] is True and rows and all(r["ok"] for r in rows)
    whats = " | ".join(r["what"] for r in rows)
    for name in ("gguf_q4_0", "gguf_q4_1", "gguf_q5_0", "gguf_q5_1", "gguf_q8_0", "gguf_q5_k", "gguf_q6_k"):
        for needle in (f"fused fwd {name}", f"dequant bwd {name}"):
            assert needle in whats, needle
    assert {r["check"] for r in rows} == {"dequantize", "matmul", "op_branch"}
    assert all(r["family"] == "gguf" for r in correct["rows"] if "family" in r)


@pytest.mark.slow  # ~20 s of CPU (90 s wall on a loaded 2-core machine): two stages under the interpreter
def test_interpreter_run_checks_and_times_the_affine_kernels(tmp_path):
    # the correct and bench stages for the affine family alone: the main weights' 4-bit g64 and the variants'
    # 2/3/8-bit, groups 32/64/128, packed rows not 16-byte aligned; both branches, views, forced ops; the bench
    # times the fused kernels and dequantize + matmul in both directions and derives the affine crossover
    pytest.importorskip("triton")
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "qtune.bench.gpu", "--interpret", "--stages", "correct,bench",
                           "--formats", "affine", "--out", str(out)], env=clean_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = read_results(out)["results"]
    correct = res["correct"]
    rows = [r for r in correct["rows"] if "ok" in r]
    assert correct["ok"] is True and rows and all(r["ok"] for r in rows)
    whats = " | ".join(r["what"] for r in rows)
    for name in ("affine4_g64", "affine2_g32", "affine3_g128_odd_k", "affine8_g64_odd_k", "affine3_g32_odd_k",
                 "affine4_g128_odd_k"):
        for needle in (f"fused fwd {name}", f"fused bwd {name}", f"dequant fwd {name}", f"dequant bwd {name}"):
            assert needle in whats, needle
    for needle in ("op fused affine4_g64", "op dequant affine4_g64", "view+bias", "transposed dy"):
        assert needle in whats, needle
    assert {r["check"] for r in rows} == {"dequantize", "matmul", "op_branch"}
    bench = res["bench"]
    measured = {(r["family"], r["direction"], r["m"], (r["n"], r["k"])) for r in bench["rows"]}
    assert measured == {("affine", d, m, tuple(s)) for d in ("forward", "grad_input") for m in res["tokens"]
                        for s in res["shapes"]}
    assert all(r["ms"] > 0 and r["ms_dequant_matmul"] > 0 for r in bench["rows"])
    assert {r["format"] for r in bench["dequantize"]} == {"affine4_g64"}
    assert set(bench["crossover"]["crossovers"]["cpu"]) == {"affine"}

