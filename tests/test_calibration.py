"""Calibration data (datasets: txt/json/jsonl/parquet/csv) and sequential block-by-block GPTQ."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qtune import GPTQConfig, NF4Config, RTNConfig, quantize_model
from qtune.calibration import (calibration_texts, calibration_windows, check_group_sizes, find_blocks,
                               gptq_quantize_model, plan_layers)
from qtune.nn import Linear4bit, LinearGPTQ, QuantLinear
from tests.integrations.tiny_models import make_tiny, make_tokenizer, tokens

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal_models")
    return {arch: make_tiny(arch, root / arch) for arch in ("llama", "gpt2", "opt")}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from qtune.assets import austen_text

    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok"), austen_text("emma")[:50_000]))


def calib(n=16, length=32, seed=3):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def mse(model, ref, x):
    with torch.no_grad():
        return float((model(x).logits - ref).pow(2).mean())


# ------------------------------------------------------------------------------------------------
# calibration text
# ------------------------------------------------------------------------------------------------
def test_calibration_texts_from_local_files(tmp_path):
    import pandas as pd

    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["x y", "z"])))
    (tmp_path / "c.json").write_text(json.dumps([{"content": "hello"}, {"content": "world"}]))
    pd.DataFrame({"text": ["p", "q"]}).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame({"body": ["u", "v"]}).to_csv(tmp_path / "e.csv", index=False)
    assert calibration_texts(tmp_path / "a.txt") == ["first line\nsecond line\n"]  # one document per file
    assert calibration_texts(tmp_path / "b.jsonl") == ["x y", "z"]
    assert calibration_texts(tmp_path / "c.json") == ["hello", "world"]  # first string column
    assert calibration_texts(tmp_path / "d.parquet") == ["p", "q"]
    assert calibration_texts(tmp_path / "e.csv", text_field="body") == ["u", "v"]


def test_missing_calibration_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"calibration file .*nope\.txt does not exist"):
        calibration_texts(tmp_path / "nope.txt")
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="unsupported extension '.bin'"):
        calibration_texts(tmp_path / "x.bin")


def test_calibration_windows(tmp_path, tokenizer):
    (tmp_path / "c.txt").write_text(TEXT)
    w = calibration_windows(tmp_path / "c.txt", tokenizer, samples=8, seq_len=24, seed=1)
    assert w.shape == (8, 24) and w.dtype == torch.long and int(w.max()) < 128
    assert torch.equal(w, calibration_windows(tmp_path / "c.txt", tokenizer, samples=8, seq_len=24, seed=1))
    assert not torch.equal(w, calibration_windows(tmp_path / "c.txt", tokenizer, samples=8, seq_len=24, seed=2))
    with pytest.raises(ValueError, match="at least 100001 are needed"):
        calibration_windows(tmp_path / "c.txt", tokenizer, samples=1, seq_len=100_000)


# ------------------------------------------------------------------------------------------------
# GPTQ driver
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_gptq_beats_rtn_block_by_block(arch, tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny[arch])
    x = tokens(4, 32, seed=9)
    with torch.no_grad():
        ref = model(x).logits
    rtn = copy.deepcopy(model)
    quantize_model(rtn, RTNConfig(bits=3, group_size=32))
    g = copy.deepcopy(model)
    report = gptq_quantize_model(g, calib(64), GPTQConfig(bits=3, group_size=32), batch_size=16, progress=False)
    layers = {n: m for n, m in g.named_modules() if isinstance(m, QuantLinear)}
    assert len(report.layers) == len(layers) and all(isinstance(m, LinearGPTQ) for m in layers.values())
    assert not isinstance(g.get_output_embeddings(), QuantLinear)
    assert mse(g, ref, x) < 0.85 * mse(rtn, ref, x)
    _, blocks = find_blocks(g)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in g.modules()), "hooks left behind"
    assert report.seconds > 0 and len(blocks) == 2


def test_true_sequential_act_order_and_mixed_formats(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    x = tokens(4, 32, seed=9)
    with torch.no_grad():
        ref = model(x).logits
    results = {}
    for ts in (True, False):
        g = copy.deepcopy(model)
        gptq_quantize_model(g, calib(), GPTQConfig(bits=4, group_size=32, static_groups=False), true_sequential=ts,
                            overrides={"down_proj": NF4Config()}, batch_size=8, progress=False)
        assert isinstance(g.model.layers[1].mlp.down_proj, Linear4bit)
        q = g.model.layers[0].self_attn.q_proj
        assert isinstance(q, LinearGPTQ) and not torch.equal(q.g_idx, torch.arange(64, dtype=torch.int32) // 32)
        results[ts] = mse(g, ref, x)
    assert results[True] != results[False]  # a different calibration order, both close to the float model
    assert max(results.values()) < 0.01 * float(ref.pow(2).mean())


def test_gptq_model_saves_and_reloads(tiny, tmp_path):
    from qtune.integrations import mark_quantized
    from qtune.integrations.layouts import load_model, save_quantized

    g = AutoModelForCausalLM.from_pretrained(tiny["gpt2"])
    gptq_quantize_model(g, calib(), GPTQConfig(bits=4, group_size=32, static_groups=False), progress=False)
    mark_quantized(g)
    save_quantized(g, tmp_path / "q")
    save_quantized(g, tmp_path / "g", layout="gptq")
    x = tokens()
    with torch.no_grad():
        expected = g(x).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(x).logits, expected)
        assert torch.allclose(load_model(tmp_path / "g")(x).logits, expected, atol=1e-3)  # fp16 biases


def test_partial_groups_quantize_but_gptq_layout_needs_whole_groups(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    plan = plan_layers(model, GPTQConfig(bits=4, group_size=48))
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj: group_size 48 does not divide "
                                         r"in_features 64 \(the GPTQ layout needs whole groups"):
        check_group_sizes(model, plan)
    check_group_sizes(model, plan_layers(model, GPTQConfig(group_size=-1)))
    gptq_quantize_model(model, calib(), GPTQConfig(bits=4, group_size=48), progress=False)  # qtune: partial groups
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LinearGPTQ) and q.scales.shape == (2, 64)
    with pytest.raises(ValueError, match="calibration must be an integer tensor"):
        gptq_quantize_model(model, torch.randn(2, 8), GPTQConfig(), progress=False)


def test_calibration_texts_read_the_one_source_syntax():
    import json

    from qtune.assets import austen_text, demo_path
    from qtune.calibration import calibration_texts

    assert calibration_texts("qtune:austen/emma", max_chars=1000) == [austen_text("emma")[:1000]]
    with pytest.warns(FutureWarning, match="qtune:austen/emma"):
        assert calibration_texts("austen:emma", max_chars=50) == [austen_text("emma")[:50]]
    prompts = [json.loads(line)["prompt"] for line in demo_path("austen-prompts").read_text().splitlines() if line]
    assert calibration_texts("qtune:demo/austen-prompts") == [p for p in prompts if p]
