"""The scripts in examples/ run end to end on the tiny Llama (with its Emma tokenizer) through their ``main``."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NAMES = ("quantize_and_evaluate", "gptq_with_calibration", "qlora_python_api", "export_adapter")
# the tiny model has 64 positions; 256 held-out tokens give 4 windows
SMALL_EVAL = ["--tokens", "256", "--seq-len", "64"]


pytestmark = pytest.mark.usefixtures("one_thread")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"qtune_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name: str, argv: list[str]) -> tuple[int, str]:
    """``(return code of main(argv), what it printed)``."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = load_example(name).main(argv)
    return rc, buf.getvalue()


def floats_after(label: str, text: str) -> list[float]:
    return [float(x) for x in re.findall(re.escape(label) + r"\s*([0-9.]+)", text)]


@pytest.mark.parametrize("name", NAMES)
def test_docstring_shows_the_command(name):
    module = load_example(name)
    assert f"python examples/{name}.py" in module.__doc__
    with contextlib.redirect_stdout(io.StringIO()) as help_text, pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert ("--source" if name == "export_adapter" else "--model") in help_text.getvalue()


def test_quantize_and_evaluate(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "nf4"
    rc, text = run_example("quantize_and_evaluate", ["--model", str(tiny_with_tokenizer), *SMALL_EVAL,
                                                     "--out", str(out)])
    assert rc == 0, text
    assert "identical logits: True" in text
    (fp32_ppl, nf4_ppl) = floats_after("perplexity", text)
    assert fp32_ppl > 1 and nf4_ppl > 1
    (fp32_bits, nf4_bits) = [float(x) for x in re.findall(r"([0-9.]+) bits/param", text)]
    # 4-bit codes plus absmaxes; the fixed per-layer overhead of double quantization weighs more on a tiny model
    assert fp32_bits == 32.0 and 4.0 < nf4_bits < 6.0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qtune" and qc["format"] == "nf4" and qc["double_quant"] is True
    assert (out / "tokenizer.json").is_file()


def test_gptq_with_calibration(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "gptq"
    rc, text = run_example("gptq_with_calibration", ["--model", str(tiny_with_tokenizer), "--group-size", "32",
                                                     "--samples", "4", "--calib-seq-len", "32", *SMALL_EVAL,
                                                     "--out", str(out)])
    assert rc == 0, text
    assert "max |Δlogits| 0.00e+00" in text  # no biases in Llama: the GPTQ layout round-trips exactly
    for label in ("fp32", "RTN  4-bit g32", "GPTQ 4-bit g32"):
        assert re.search(re.escape(label) + r".*\s[0-9.]+$", text, re.M), label
    assert json.loads((out / "quantize_config.json").read_text())["group_size"] == 32
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    tensors = load_file(out / "model.safetensors")
    assert {"model.layers.0.mlp.down_proj.qweight", "model.layers.0.mlp.down_proj.g_idx"} <= set(tensors)
    # 4-bit codes, 8 per int32, by input rows: down_proj has 128 inputs
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (128 // 8, 64)


def test_group_size_that_does_not_divide_fails_before_calibrating(tiny_with_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="group_size 48 does not divide in_features 64"):
        run_example("gptq_with_calibration", ["--model", str(tiny_with_tokenizer), "--group-size", "48",
                                              *SMALL_EVAL, "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def qlora_run(tiny_with_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    rc, text = run_example("qlora_python_api", ["--model", str(tiny_with_tokenizer), "--max-steps", "3",
                                                "--batch-size", "2", "--max-length", "64", "--chunk-chars", "200",
                                                *SMALL_EVAL, "--out", str(out)])
    return rc, text, out


def test_qlora_python_api(qlora_run, tiny_with_tokenizer):
    rc, text, out = qlora_run
    assert rc == 0, text
    assert "reloaded on a fresh NF4 base: identical logits: True" in text
    assert re.search(r"before [0-9.]+, after [0-9.]+", text)
    assert re.search(r"training loss every 1 steps: \[[0-9.]+, [0-9.]+, [0-9.]+\]", text), text
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == str(tiny_with_tokenizer)
    # 2 blocks × 7 linear layers, each with lora_A and lora_B; B starts at zero, so non-zero B means it trained
    weights = load_file(adapter / "adapter_model.safetensors")
    b = {k: v for k, v in weights.items() if ".lora_B." in k}
    assert len(b) == 14 and sum(".lora_A." in k for k in weights) == 14
    assert all(v.abs().max() > 0 for v in b.values())


def test_export_adapter(qlora_run, tmp_path):
    rc, _, run = qlora_run
    assert rc == 0
    out = tmp_path / "exports"
    rc, text = run_example("export_adapter", ["--source", str(run / "adapter"),
                                              "--base-format", "nf4:double_quant=true,compute_dtype=bfloat16",
                                              "--base-dtype", "bfloat16", "--heldout-tokens", "256",
                                              "--heldout-window", "64", "--out", str(out)])
    assert rc == 0, text
    merged = json.loads((out / "merged-bf16" / "config.json").read_text())
    assert "quantization_config" not in merged and merged["dtype"] == "bfloat16"
    quantized = json.loads((out / "quantized-nf4" / "config.json").read_text())["quantization_config"]
    assert quantized["quant_method"] == "qtune" and quantized["format"] == "nf4"
    for folder in ("merged-bf16", "quantized-nf4"):
        report = json.loads((out / folder / "qtune_export.json").read_text())
        assert report["verify"] is not None, folder  # each export reloaded itself and matched
        assert "perplexity" in report["heldout"]["trained"]
    assert re.search(r"merged-bf16 \(merged, bfloat16\): \d+ files, reload verified: True; perplexity trained "
                     r"[0-9.]+; perplexity merged [0-9.]+$", text, re.M), text
    assert re.search(r"quantized-nf4 \(quantized, nf4\): .*reload verified: True.*perplexity quantized [0-9.]+$",
                     text, re.M), text
