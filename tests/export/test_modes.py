"""Each export mode on tiny models: adapter × base format, merged × base format × dtype (reloaded without qtune),
quantized × target format × layout, and GPTQ base → merged → GPTQ."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtune.export import export_adapter, export_merged, export_quantized, load_source
from qtune.export.verify import compare_logits, logits, probe_ids, tolerance
from qtune.formats.base import parse_dtype
from qtune.integrations.layouts import load_model
from qtune.nn import QuantLinear
from tests.conftest import bnb_available

quiet = lambda s: None  # noqa: E731


def _reference(run: Path):
    """The trained model as training had it: (source, probe ids, its logits)."""
    src = load_source(run)
    ids = probe_ids(src.tokenizer, src.model.get_base_model().config.vocab_size)
    return src, ids, logits(src.model, ids)


# ------------------------------------------------------------------------------------------------
# adapter
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["nf4", "fp4", "int8", "gptq"])
def test_adapter_export_reloads_on_qtune_base(key, run_for, export_root):
    run = run_for(key)
    src, ids, ref = _reference(run)
    out = export_root / f"adapter-{key}"
    res = export_adapter(src, out, log=quiet)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "qtune_base.json"} <= names
    assert "tokenizer.json" in names
    assert res.verify is not None and res.verify.rel == 0.0
    card = (out / "README.md").read_text()
    assert "Base quantization during training" in card and "## Use" in card
    if key == "gptq":
        assert "pre-quantized checkpoint (gptq" in card
        assert "No training metrics" in card
    else:
        assert f"qtune {key}" in card and "| train loss | 4.25 |" in card and "## Recipe" in card
    # the exported folder alone rebuilds the base (qtune_base.json) and reloads through PeftModel.from_pretrained
    again = load_source(out)
    assert again.run_dir is None and again.adapter_dir == out
    diff = compare_logits(logits(again.model, ids), ref)
    assert diff.rel == 0.0, diff


@pytest.mark.skipif(not bnb_available(), reason="bitsandbytes is not installed (test dependency)")
def test_nf4_adapter_loads_on_transformers_bitsandbytes_base(run_for, export_root):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    run = run_for("nf4")
    src, ids, ref = _reference(run)
    out = export_root / "adapter-nf4-for-bnb"
    export_adapter(src, out, verify=False, log=quiet)
    bc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(src.base_path, dtype=torch.float32, quantization_config=bc)
    model = PeftModel.from_pretrained(base, out)
    # the same NF4 bytes; bitsandbytes' CPU kernel rounds differently (~1e-3)
    assert compare_logits(logits(model, ids), ref).rel < 2e-2


# ------------------------------------------------------------------------------------------------
# merged
# ------------------------------------------------------------------------------------------------
MERGED = [("nf4", "fp32"), ("fp4", "bf16"), ("int8", "fp16"), ("gptq", "fp32"), ("dora", "fp32"), ("gpt2", "fp16")]


@pytest.fixture(scope="module")
def merged_exports(run_for, export_root):
    made = {}
    for key, dtype in MERGED:
        src, ids, ref = _reference(run_for(key))
        compute = src.compute_dtype
        out = export_root / f"merged-{key}-{dtype}"
        res = export_merged(src, out, dtype=dtype, max_shard_size="100KB", log=quiet)
        made[(key, dtype)] = (out, res, ids, ref, compute)
    return made


@pytest.mark.parametrize("key,dtype", MERGED)
def test_merged_export_is_a_plain_checkpoint(key, dtype, merged_exports):
    out, res, ids, ref, compute = merged_exports[(key, dtype)]
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == str(parse_dtype(dtype)).removeprefix("torch.")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not any("qtune" in k or "absmax" in k or "qweight" in k for k in index["weight_map"])
    assert res.merged_layers == (8 if key == "gpt2" else 14)
    tol = tolerance(parse_dtype(dtype), compute)
    assert res.verify is not None and res.verify.rel <= tol
    assert res.probe["merged vs trained"].rel <= tol
    report = json.loads((out / "qtune_export.json").read_text())
    assert report["mode"] == "merged" and report["verify"]["rel"] <= tol
    assert "merged (" in (out / "README.md").read_text()


def test_merged_exports_load_without_qtune(merged_exports, tmp_path):
    jobs = []
    for (key, dtype), (out, _, ids, _, _) in merged_exports.items():
        jobs.append({"folder": str(out), "dtype": str(parse_dtype(dtype)).removeprefix("torch."),
                     "ids": ids.tolist(), "out": str(tmp_path / f"{key}-{dtype}.pt")})
    code = (
        "import sys\n"
        "sys.modules['qtune'] = None  # qtune is not importable in this process\n"
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "for job in json.loads(sys.argv[1]):\n"
        "    model = AutoModelForCausalLM.from_pretrained(job['folder'], dtype=getattr(torch, job['dtype']))\n"
        "    assert getattr(model, 'hf_quantizer', None) is None\n"
        "    with torch.no_grad():\n"
        "        torch.save(model(input_ids=torch.tensor(job['ids'])).logits.float(), job['out'])\n"
        "loaded = sorted(k for k in sys.modules if k.startswith('qtune') and sys.modules[k] is not None)\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (key, dtype), (_, _, _, ref, compute) in merged_exports.items():
        got = torch.load(tmp_path / f"{key}-{dtype}.pt")
        diff = compare_logits(got, ref)
        assert diff.rel <= tolerance(parse_dtype(dtype), compute), (key, dtype, diff)


# ------------------------------------------------------------------------------------------------
# quantized
# ------------------------------------------------------------------------------------------------
QUANTIZED = [  # (target format, layout, expected layer format, total relative weight error range)
    ("nf4", "qtune", "nf4", (0.05, 0.15)),
    ("nf4:double_quant=true", "bnb", "nf4", (0.05, 0.15)),
    ("fp4", "bnb", "fp4", (0.05, 0.2)),
    ("int8", "qtune", "int8", (1e-3, 2e-2)),
    ("int8", "bnb", "llm_int8", (1e-3, 2e-2)),
    ("rtn:bits=4,group_size=32", "gptq", "rtn", (0.05, 0.2)),
]


@pytest.mark.parametrize("fmt,layout,layer_format,bounds", QUANTIZED)
def test_quantized_export_reloads_and_reports(fmt, layout, layer_format, bounds, run_for, export_root, lines):
    src, ids, ref = _reference(run_for("nf4"))
    out = export_root / f"quantized-{fmt.replace(':', '-').replace(',', '-')}-{layout}"
    res = export_quantized(src, out, format=fmt, layout=layout, dtype="fp32", log=lines.append)
    text = "\n".join(lines)
    assert "‖Q(W)−W‖/‖W‖" in text and "\ntotal " in text and "model.layers.1.mlp.down_proj" in text
    assert len(res.layers) == 14 and bounds[0] < res.total_rel_weight < bounds[1]
    assert all(l.rel_delta is not None and l.rel_delta > 0 and l.kept is not None for l in res.layers)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == {"qtune": "qtune", "bnb": "bitsandbytes", "gptq": "gptq"}[layout]
    model = load_model(out)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and {m.config.format for m in layers} == {layer_format if layout != "gptq" else "gptq"}
    # the reported logits difference is the written model's
    diff = compare_logits(logits(model, ids), ref)
    assert abs(diff.rel - res.probe["quantized vs trained"].rel) < 1e-4
    assert res.verify is not None and res.verify.rel < 1e-5
    report = json.loads((out / "qtune_export.json").read_text())
    assert len(report["layers"]) == 14 and report["total_rel_weight"] == pytest.approx(res.total_rel_weight)
    assert "## Per-layer error" in (out / "README.md").read_text()


def test_gptq_base_merged_then_gptq_again(run_for, export_root, text_file, lines):
    """A fine-tune of a GPTQ base ships as GPTQ: merge in fp32, GPTQ on the merged weights, GPTQ v1 layout."""
    adapter = run_for("gptq")
    src, ids, ref = _reference(adapter)
    assert {m.config.format for m in src.model.modules() if isinstance(m, QuantLinear)} == {"gptq"}
    out = export_root / "gptq-roundtrip"
    res = export_quantized(src, out, format="gptq", layout="gptq", calibration=str(text_file), samples=8, seq_len=32,
                           heldout=str(text_file), heldout_tokens=256, heldout_window=64, log=lines.append)
    # a bare "gptq" keeps the base's settings (4 bits, group 32)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["bits"], cfg["group_size"], cfg["checkpoint_format"]) == ("gptq", 4, 32, "gptq")
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4
    assert len(res.layers) == 14 and 0.01 < res.total_rel_weight < 0.3
    model = load_model(out)
    assert {m.config.format for m in model.modules() if isinstance(m, QuantLinear)} == {"gptq"}
    assert compare_logits(logits(model, ids), ref).rel < 0.5
    held = res.heldout
    assert {"trained", "merged fp32", "quantized", "quantized vs merged fp32"} <= set(held)
    assert held["merged fp32"]["perplexity"] == pytest.approx(held["trained"]["perplexity"], rel=1e-4)
    assert held["quantized"]["perplexity"] == pytest.approx(held["trained"]["perplexity"], rel=0.2)
    assert any("held-out perplexity, re-quantized gptq" in s for s in lines)

    # GPTQ's error compensation, on the calibration text itself, beats round-to-nearest on the same grid
    rtn = export_quantized(load_source(adapter), export_root / "gptq-roundtrip-rtn", format="rtn:bits=4,group_size=32",
                           layout="gptq", heldout=str(text_file), heldout_tokens=256, heldout_window=64, log=quiet)
    assert held["quantized vs merged fp32"].rel < rtn.heldout["quantized vs merged fp32"].rel


def test_requantization_that_erases_the_adapter_is_flagged(export_root, tmp_path, lines):
    """A LoRA delta far below the NF4 step is rounded back onto the base's grid: the export says so."""
    from qtune import Int8Config as int8_config
    from qtune.export.quantized import erased_warning
    from tests.export.helpers import QUANT, make_run

    run = make_run(export_root, "run-nf4-small-delta", QUANT["nf4"], lora_scale=0.01)
    res = export_quantized(run, tmp_path / "q", format="nf4", log=lines.append)
    assert res.warnings and "rounded back onto the base's grid" in res.warnings[0]
    assert any("WARNING" in s for s in lines)
    assert sorted(l.kept for l in res.layers)[7] < 0.5
    assert "> **Warning:**" in (tmp_path / "q" / "README.md").read_text()
    assert json.loads((tmp_path / "q" / "qtune_export.json").read_text())["warnings"] == res.warnings
    # the same layers re-quantized to int8 keep the delta: no warning
    int8 = export_quantized(run, tmp_path / "i", format="int8", log=quiet)
    assert not int8.warnings and erased_warning(int8.layers, int8_config()) is None
    assert all(0.5 < l.kept < 1.5 for l in int8.layers)


def test_export_files_are_readable_by_others(run_for, tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        export_merged(run_for("nf4"), tmp_path / "m", log=quiet)
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    for p in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p.name
