"""``qtune.bench.qalora`` on a tiny GGUF file, one step (its numbers mean nothing here; the pipeline is checked:
the demo recipe's runs, the real GGUF export, and the written files read back by qtune and by transformers)."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from qtune.bench import qalora


@pytest.mark.slow  # ~60 s: two runs, two exports, eight evaluations; tests/train/test_qalora_run.py covers the path faster
def test_qalora_bench_on_a_tiny_gguf(tmp_path, monkeypatch):
    import gguf
    from gguf import GGMLQuantizationType as T

    from tests.integrations.test_gguf import write_tiny_llama

    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    gguf_file = write_tiny_llama(tmp_path / "tiny.gguf", {k: T.Q4_1 for k in kinds})
    text = tmp_path / "train.txt"
    text.write_text("abc def ghi! " * 200)
    base = yaml.safe_load(open(qalora.DEMO_RECIPE, encoding="utf-8"))
    assert base["lora"]["quantization_aware"] is True and base["quantization"]["format"] == "pretrained"
    base["model"] = {"path": str(gguf_file), "dtype": "float32"}
    base["quantization"]["compute_dtype"] = "float32"
    # block 1's q_proj is Q4_0 in this file (no offsets, so a QA adapter on it is refused): left out
    base["lora"]["target_modules"] = ["k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base["dataset"] = {"train": {"source": str(text), "chunk_chars": 300},
                       "perplexity": {"source": str(text), "max_tokens": 128, "window": 64, "before": True}}
    base["training"].update(max_length=64, per_device_train_batch_size=2, warmup_steps=0)  # step 1 moves B
    read: list[tuple[str, str]] = []  # (reader, file) of every model the bench evaluated
    for reader in ("qtune_model", "transformers_model"):
        original = getattr(qalora.Evaluator, reader)

        def spy(self, file, _original=original, _reader=reader):
            read.append((_reader, str(file)))
            return _original(self, file)

        monkeypatch.setattr(qalora.Evaluator, reader, spy)

    res = qalora.bench(base, steps=1, workdir=tmp_path / "work", eval_dtype=torch.float32)

    qa, lora = res["runs"]["qalora"], res["runs"]["lora"]
    assert res["eval_dtype"] == "float32" and qa["train_dtype"] == lora["train_dtype"] == "float32"
    assert qa["merge"] == "exact (offsets)" and lora["merge"] == "re-quantized"
    assert qa["steps"] == lora["steps"] == 1 and res["perplexity_base"] > 0
    assert 0.99 < qa["kept_mean"] < 1.01 and lora["kept_mean"] < 0.5
    # the rows: base, then trained / exported (qtune) / exported (transformers) for each adapter
    assert [r["row"] for r in res["table"]] == [
        "base (Q4_1 GGUF)",
        "QA-LoRA trained (adapter on the base)", "QA-LoRA exported GGUF, exact merge (qtune)",
        "QA-LoRA exported GGUF, exact merge (transformers)",
        "standard LoRA trained (adapter on the base)", "standard LoRA exported GGUF, re-quantized (qtune)",
        "standard LoRA exported GGUF, re-quantized (transformers)"]
    assert res["table"][2]["perplexity"] == qa["perplexity_exported_qtune"]
    assert res["qalora_over_lora_trained"] == qa["perplexity_trained"] / lora["perplexity_trained"]
    # the exported files themselves were read back, by both readers, and they are GGUF files the adapters changed
    for row in (qa, lora):
        assert ("qtune_model", row["file"]) in read and ("transformers_model", row["file"]) in read
        assert row["file_sha256"] != res["base_sha256"]
        assert {t.tensor_type for t in gguf.GGUFReader(row["file"]).tensors} >= {T.Q4_1}
    assert ("qtune_model", str(gguf_file)) in read  # the base, and the trained models' base
    # the number is the file's: measured again from the file alone, it is the same
    again = qalora.Evaluator(gguf_file, base["dataset"]["perplexity"], torch.float32)
    assert again.measure(again.qtune_model(qa["file"]), "again")["perplexity"] == qa["perplexity_exported_qtune"]
    # two readers of one file agree (transformers dequantizes with the gguf package)
    assert abs(qa["perplexity_exported_transformers"] / qa["perplexity_exported_qtune"] - 1) < 1e-3
    # a random model's perplexity (~1e29) magnifies the offsets' fp16 rounding; still far below the re-quantized loss
    assert abs(math.log(qa["exported_over_trained"])) < 0.1 * abs(math.log(lora["exported_over_trained"]))
