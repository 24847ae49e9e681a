"""``lora.quantization_aware: true``: a recipe trains a QA-LoRA adapter, resumes it, and exports it exactly."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import qtune
from qtune.formats.gguf import GGUFQ4_1Config

from qtune.train import RecipeError, load_recipe
from qtune.train.runner import run
from tests.train.conftest import base_recipe, write_recipe
from tests.train.test_runner import _adapter, _assert_adapters_close, _SigintAt


def _qa_recipe(tiny_dir, out, **lora):
    data = base_recipe(tiny_dir, out)
    data["quantization"] = {"format": "gguf_q4_1"}
    data["lora"].update(quantization_aware=True, dtype="float32", **lora)
    data["dataset"]["perplexity"] = None
    data["training"].update(max_steps=3, save_steps=100)
    return data


def test_recipe_trains_resumes_and_exports_exactly(tiny_dir, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", _qa_recipe(tiny_dir, tmp_path / "run"))
    assert run(load_recipe(path), callbacks=[_SigintAt(1)])["status"] == "interrupted"
    assert run(load_recipe(path), resume=True)["global_step"] == 3
    ref = tmp_path / "ref"
    assert run(load_recipe(path, ["output.dir=" + str(ref)]))["global_step"] == 3
    _assert_adapters_close(_adapter(tmp_path / "run"), _adapter(ref), rtol=1e-6, atol=1e-6)
    saved = json.loads((ref / "adapter" / "adapter_config.json").read_text())
    assert saved["use_qalora"] is True and saved["qalora_group_size"] == 32
    assert all(v.shape[1] == 64 // 32 for k, v in _adapter(ref).items() if "lora_A" in k and "q_proj" in k)

    # `qtune export RUN --mode quantized` without --format: the base's Q4_1, the change in the offsets
    from qtune.export import export
    from qtune.integrations.layouts import load_model
    from qtune.nn import QuantLinear

    lines = []
    result = export(ref, tmp_path / "q4_1", mode="quantized", log=lines.append)
    assert result.format == "gguf_q4_1" and len(result.layers) == 14
    assert any("14 exactly into the float offsets, codes unchanged; 0 re-quantized" in l for l in lines), lines
    assert all(0.99 < l.kept < 1.01 and l.rel_delta < 0.05 for l in result.layers), result.layers
    assert result.verify is not None
    out = load_model(tmp_path / "q4_1")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
    qtune.quantize_model(base, GGUFQ4_1Config())  # what the run trained on
    layers = {n: m for n, m in out.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        old = base.get_submodule(name).weight.view(-1, 20)
        new = layer.weight.view(-1, 20)
        assert torch.equal(new[:, :2], old[:, :2]) and torch.equal(new[:, 4:], old[:, 4:]), name  # d, codes
        assert not torch.equal(new[:, 2:4], old[:, 2:4]), name  # m moved
    # --mode merged folds the pooled adapter into float weights (its verification compares logits with the trained model)
    merged = export(ref, tmp_path / "merged", mode="merged", log=lambda *_: None)
    assert merged.probe["merged vs trained"].rel < 1e-3
    # asking for another format still re-quantizes, and says how much of the change it kept
    other = export(ref, tmp_path / "nf4", mode="quantized", format="nf4", log=lambda *_: None)
    assert all(l.kept is not None for l in other.layers) and other.layers[0].format == "nf4"


def test_recipe_refusals(tiny_dir, tmp_path):
    data = _qa_recipe(tiny_dir, tmp_path / "run", use_dora=True)
    with pytest.raises(RecipeError, match="lora.use_dora.*quantization_aware"):
        load_recipe(write_recipe(tmp_path / "a.yaml", data))
    # a format without per-group float offsets: refused when the recipe is read, naming the key
    for fmt in ("int8", "nf4", "gguf_q4_0", "gguf_q4_k"):
        data = _qa_recipe(tiny_dir, tmp_path / "run2")
        data["quantization"] = {"format": fmt}
        with pytest.raises(RecipeError, match=rf"b\.yaml:\d+: lora\.quantization_aware: quantization\.format {fmt} "
                                              "has no per-group float offset.*GGUF Q4_1/Q5_1 or affine"):
            load_recipe(write_recipe(tmp_path / "b.yaml", data))
    data["quantization"] = {"format": "affine", "group_size": 32}
    load_recipe(write_recipe(tmp_path / "b.yaml", data))  # affine has float offsets


def test_layers_without_offsets_fail_at_setup_before_training(tiny_dir, tmp_path):
    """Layers known only once the base is loaded (``overrides``; a GGUF file's own types): the run stops at setup,
    naming the recipe key and the layer, before any step or checkpoint."""
    data = _qa_recipe(tiny_dir, tmp_path / "run")
    data["quantization"]["overrides"] = {"down_proj": "nf4"}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", data))  # nothing to say from the recipe alone
    with pytest.raises(RecipeError) as e:
        run(recipe)
    msg = str(e.value)
    assert "r.yaml" in msg and "lora.quantization_aware: quantization-aware LoRA: layer model.layers.0.mlp.down_proj " \
        "(format nf4) has no per-group float offset" in msg and "\n" not in msg
    assert not (tmp_path / "run" / "adapter").exists() and not list((tmp_path / "run").glob("checkpoint-*"))


def test_export_from_a_gguf_file_base_is_exact(tmp_path):
    """A run whose base is a GGUF file (``quantization.format: pretrained``) exports into its Q4_1 offsets."""
    from gguf import GGMLQuantizationType as T

    from qtune.export import export
    from qtune.integrations.peft import get_peft_model
    from qtune.train.base_model import load_base
    from qtune.train.runner import attach_adapter
    from tests.export.helpers import randomize_lora
    from tests.integrations.test_gguf import write_tiny_llama

    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    gguf_file = write_tiny_llama(tmp_path / "tiny.gguf", {k: T.Q4_1 for k in kinds})
    (tmp_path / "train.txt").write_text("abc def " * 50)
    run_dir = tmp_path / "run"
    data = {"model": {"path": str(gguf_file), "dtype": "float32"}, "quantization": {"format": "pretrained"},
            # block 1's q_proj is Q4_0 in this file (no offsets): left out, so every adapted layer merges exactly
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "quantization_aware": True,
                     "target_modules": ["k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
            "dataset": {"train": {"source": str(tmp_path / "train.txt")}},
            "training": {"max_steps": 1}, "output": {"dir": str(run_dir), "report_to": "none"}}
    recipe_file = write_recipe(tmp_path / "r.yaml", data)
    recipe = load_recipe(recipe_file)
    base = load_base(recipe)
    model, config = attach_adapter(recipe, base.model)
    peft_model = get_peft_model(model, config)
    randomize_lora(peft_model)
    peft_model.save_pretrained(run_dir / "adapter")
    base.tokenizer.save_pretrained(run_dir / "adapter")
    (run_dir / "summary.json").write_text(json.dumps({"recipe": str(recipe_file), "overrides": [], "status": "finished",
                                                      "format": "pretrained", "model": str(gguf_file)}))
    lines = []
    result = export(run_dir, tmp_path / "out", mode="quantized", log=lines.append)
    assert result.format == "gguf_q4_1" and len(result.layers) == 6 * 2
    assert any("12 exactly into the float offsets" in l for l in lines), lines
    assert all(0.99 < l.kept < 1.01 for l in result.layers)
    assert result.probe["quantized vs trained"].rel < 1e-3
