"""``qtune.bench.qalora`` on a tiny GGUF file, one step (its numbers mean nothing here; the pipeline is checked)."""
from __future__ import annotations

import math

import pytest
import yaml

from qtune.bench import qalora


@pytest.mark.slow  # ~50 s: two runs and two exports; tests/train/test_qalora_run.py covers the same path faster
def test_qalora_bench_variant_on_a_tiny_gguf(tmp_path):
    from gguf import GGMLQuantizationType as T

    from tests.integrations.test_gguf import write_tiny_llama

    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    gguf_file = write_tiny_llama(tmp_path / "tiny.gguf", {k: T.Q4_1 for k in kinds})
    text = tmp_path / "train.txt"
    text.write_text("abc def ghi! " * 200)
    base = yaml.safe_load(open(qalora.DEMO_RECIPE, encoding="utf-8"))
    base["model"]["dtype"] = "float32"
    base["quantization"]["compute_dtype"] = "float32"
    # block 1's q_proj is Q4_0 in this file (no offsets): left out, so the QA adapter merges exactly
    base["lora"]["target_modules"] = ["k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base["dataset"] = {"train": {"source": str(text), "chunk_chars": 300},
                       "perplexity": {"source": str(text), "max_tokens": 128, "window": 64, "before": True}}
    base["training"].update(max_length=64, per_device_train_batch_size=2, warmup_steps=0)  # step 1 moves B
    heldout = base["dataset"]["perplexity"]
    runs = {}
    for name, qa in (("qalora", True), ("lora", False)):
        data = qalora.recipe_data(base, gguf_file, tmp_path / name, quantization_aware=qa, steps=1)
        runs[name] = qalora.run_variant(name, data, tmp_path, heldout)
    qa_row, lora_row = runs["qalora"], runs["lora"]
    assert qa_row["merge"] == "exact (offsets)" and lora_row["merge"] == "re-quantized"
    assert qa_row["steps"] == lora_row["steps"] == 1 and qa_row["perplexity_base"] > 0
    assert 0.99 < qa_row["kept_mean"] < 1.01 and lora_row["kept_mean"] < 0.5
    # a random model's perplexity (~1e29) magnifies the offsets' fp16 rounding; still far below the re-quantized loss
    assert abs(math.log(qa_row["quantized_over_trained"])) < 0.1 * abs(math.log(lora_row["quantized_over_trained"]))
    assert lora_row["perplexity_base"] is None  # measured once, in the QA run
