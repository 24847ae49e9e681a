"""Mixture-of-experts models end to end: quantized fused experts through quantize_model, quantize-on-load,
the qtune layout, a QLoRA step and inspection (tiny Mixtral, Qwen3-MoE and OLMoE built from configs)."""
from __future__ import annotations

import copy

import pytest
import torch

import qtune
from qtune.formats import GPTQConfig, NF4Config
from qtune.integrations import QTuneConfig
from qtune.integrations.layouts import load_model, save_quantized
from qtune.nn import QuantExperts, QuantLinear, dequantize_model, fused_experts_modules, quantize_model

E, H, I = 4, 64, 96  # experts, hidden, expert intermediate size
MOE_ARCHS = ("mixtral", "qwen3_moe", "olmoe")


def moe_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=128, num_hidden_layers=2, hidden_size=H, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=64)
    if arch == "mixtral":
        return tf.MixtralConfig(intermediate_size=I, num_local_experts=E, **common)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(moe_intermediate_size=I, intermediate_size=128, num_experts=E, head_dim=16,
                                 **common)
    if arch == "olmoe":
        return tf.OlmoeConfig(intermediate_size=I, num_experts=E, pad_token_id=1, eos_token_id=0, bos_token_id=0,
                              **common)
    raise ValueError(arch)


@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe_dir(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(request.param), dtype=torch.float32)
    assert len(fused_experts_modules(model)) == 2
    path = tmp_path_factory.mktemp("moe") / request.param
    model.save_pretrained(path)  # transformers writes its original per-expert checkpoint layout
    return path


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


NF4_DQ = dict(format="nf4", double_quant=True, compute_dtype="float32")


def float_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_quantize_on_load_equals_quantize_model_and_the_dequantized_model(moe_dir):
    q = load_model(moe_dir, QTuneConfig(**NF4_DQ)).eval()
    experts = [(n, m) for n, m in q.named_modules() if isinstance(m, QuantExperts)]
    assert [n for n, _ in experts] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert not fused_experts_modules(q)  # no float experts left
    assert all(m.gate_up_proj.weight.shape[0] == E and m.gate_up_proj.nested_absmax is not None for _, m in experts)
    assert q.is_loaded_in_4bit

    ref = float_model(moe_dir)
    report = quantize_model(ref, NF4Config(double_quant=True, compute_dtype="float32"))
    assert sum(r.name.endswith("experts") for r in report.layers) == 2
    sd_q, sd_ref = q.state_dict(), ref.state_dict()
    assert set(sd_q) == set(sd_ref)
    for k in sd_q:
        assert torch.equal(sd_q[k], sd_ref[k]), k

    ids = tokens()
    with torch.no_grad():
        logits = q(ids).logits
        dense = dequantize_model(copy.deepcopy(q))
        assert not any(isinstance(m, QuantExperts) for m in dense.modules()) and len(fused_experts_modules(dense)) == 2
        torch.testing.assert_close(logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        # quantization changed the experts (the comparison above is not float vs float)
        assert (float_model(moe_dir)(ids).logits - logits).abs().max() > 1e-4


def test_save_reload_identical_logits(moe_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    q = load_model(moe_dir, QTuneConfig(**NF4_DQ)).eval()
    ids = tokens()
    with torch.no_grad():
        logits = q(ids).logits
    out = save_quantized(q, tmp_path / "q")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj.weight" in keys
    assert "model.layers.1.mlp.experts.down_proj.nested_absmax" in keys
    assert not any(".experts.0." in k or k.endswith("experts.gate_up_proj") for k in keys)
    r = load_model(out).eval()
    assert isinstance(r.model.layers[1].mlp.experts, QuantExperts)
    with torch.no_grad():
        assert torch.equal(r(ids).logits, logits)
    # plain transformers save/load of the quantized model too (after `import qtune`)
    q.save_pretrained(tmp_path / "plain")
    r2 = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        assert torch.equal(r2(ids).logits, logits)


def test_qlora_step_on_attention_with_frozen_quantized_experts(moe_dir):
    from peft import LoraConfig

    q = load_model(moe_dir, QTuneConfig(**NF4_DQ))
    q = qtune.prepare_model_for_kbit_training(q)
    peft_model = qtune.get_peft_model(q, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    lora_dropout=0.0))
    peft_model.train()
    experts = [m for m in peft_model.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == 2
    before = {id(m): {k: v.clone() for k, v in m.state_dict().items()} for m in experts}
    assert not any(p.requires_grad for m in experts for p in m.parameters())
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = tokens(batch=2, length=16, seed=3)
    losses, start = [], [p.detach().clone() for p in trainable]
    for _ in range(6):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None for p in trainable)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, p0) for p, p0 in zip(trainable, start))  # every adapter tensor learned
    for m in experts:
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[id(m)][k]), k


def test_inspect_counts_expert_weights(moe_dir, capsys):
    from qtune.cli.main import main
    from qtune.inspection import float_weights, layer_table

    ref = float_model(moe_dir)
    per_module = E * (2 * I * H + H * I)
    rows = {i.name: i for i in layer_table(ref)}
    assert rows["model.layers.0.mlp.experts"].params == per_module and rows["model.layers.0.mlp.experts"].bits == 32
    q = copy.deepcopy(ref)
    quantize_model(q, NF4Config())
    rows = {i.name: i for i in layer_table(q, float_weights(ref))}
    row = rows["model.layers.1.mlp.experts"]
    assert row.format == "nf4" and row.params == per_module and 4.0 < row.bits_per_param < 4.6
    assert 0.0 < row.error < 0.2
    assert main(["inspect", str(moe_dir), "--format", "nf4"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("model.layers.0.mlp.experts"))
    assert "nf4" in line and f"{per_module:,}" in line
    from qtune.inspection import parameter_counts

    total = sum(p.numel() for p in ref.parameters())
    assert parameter_counts(ref) == parameter_counts(q) == (total, total - 2 * per_module + 2 * per_module * 2 // E)
    assert f"parameters: {total:,} total, {total - per_module:,} active per token" in out  # top-2 of 4 experts


def test_experts_can_be_skipped_and_gptq_is_refused_with_a_clear_error(moe_dir):
    q = load_model(moe_dir, QTuneConfig("nf4", compute_dtype="float32", skip_modules=["lm_head", "experts"]))
    assert len(fused_experts_modules(q)) == 2 and any(isinstance(m, QuantLinear) for m in q.modules())
    plan = QTuneConfig("nf4", skip_modules=["lm_head", "experts"]).layer_plan(float_model(moe_dir))
    assert plan.skipped["model.layers.0.mlp.experts"] == "skip_modules pattern 'experts'" and not plan.experts
    with pytest.raises(ValueError, match="model.layers.0.mlp.experts: format 'gptq' needs calibration"):
        quantize_model(float_model(moe_dir), None, overrides={"experts": GPTQConfig(bits=4)})
    with pytest.raises(ValueError, match="needs calibration data"):
        load_model(moe_dir, QTuneConfig("gptq"))


def test_reload_rejects_expert_tensors_that_disagree_with_the_config(moe_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    q = load_model(moe_dir, QTuneConfig(**NF4_DQ))
    out = save_quantized(q, tmp_path / "q")
    sd = load_file(str(out / "model.safetensors"))
    key = "model.layers.1.mlp.experts.down_proj.absmax"
    sd[key] = sd[key][:, :-1].contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"key 'model\.layers\.1\.mlp\.experts\.down_proj\.absmax' has shape"):
        load_model(out)
    sd = load_file(str(out / "model.safetensors"))  # one expert fewer in the packed gate_up_proj than the config
    sd["model.layers.1.mlp.experts.down_proj.absmax"] = sd["model.layers.0.mlp.experts.down_proj.absmax"].clone()
    key = "model.layers.1.mlp.experts.gate_up_proj.weight"
    shape = list(sd[key].shape)
    sd[key] = sd[key][:-1].contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        load_model(out)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{out / 'model.safetensors'}: key '{key}' has shape "
                                                      f"{[shape[0] - 1, *shape[1:]]}")
    assert f"layer model.layers.1.mlp.experts" in message and f"expects {shape}" in message


def test_quantize_model_then_save_writes_the_experts_into_the_layers_map(moe_dir, tmp_path):
    import json

    from qtune.formats import Int8Config

    q = float_model(moe_dir)
    quantize_model(q, NF4Config(compute_dtype="float32"), overrides={"layers.1.mlp.experts": Int8Config()})
    ids = tokens()
    with torch.no_grad():
        logits = q(ids).logits
    out = save_quantized(q, tmp_path / "q")
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert layers["model.layers.0.mlp.experts"]["format"] == "nf4"
    assert layers["model.layers.1.mlp.experts"]["format"] == "int8"
    r = load_model(out).eval()
    assert isinstance(r.model.layers[1].mlp.experts.quant_config, Int8Config)
    with torch.no_grad():
        assert torch.equal(r(ids).logits, logits)


def more_family_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=128, num_hidden_layers=2, hidden_size=H, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=64)
    if arch == "gpt_oss":  # transposed [E, in, out], interleaved gate/up, biases
        return tf.GptOssConfig(intermediate_size=I, num_local_experts=E, head_dim=16, **common)
    if arch == "qwen2_moe":  # plus a shared expert (nn.Linear) and its gate
        return tf.Qwen2MoeConfig(moe_intermediate_size=I, shared_expert_intermediate_size=128, num_experts=E, **common)
    if arch == "deepseek_v3":  # MLA attention, a dense first layer, shared experts
        return tf.DeepseekV3Config(moe_intermediate_size=I, intermediate_size=128, n_routed_experts=E, n_shared_experts=1,
                                   first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                   qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, **common)
    if arch == "phimoe":  # its router is an nn.Linear subclass with its own forward
        return tf.PhimoeConfig(intermediate_size=I, num_local_experts=E, **common)
    if arch == "granitemoe":
        return tf.GraniteMoeConfig(intermediate_size=I, num_local_experts=E, **common)
    raise ValueError(arch)


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen2_moe", "deepseek_v3", "phimoe", "granitemoe"])
def test_more_moe_families_quantize_reload_and_match_their_dequantized_model(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(more_family_config(arch), dtype=torch.float32)
    n_experts = len(fused_experts_modules(model))
    assert n_experts >= 1
    model.save_pretrained(tmp_path / "float")
    q = load_model(tmp_path / "float", QTuneConfig("nf4", compute_dtype="float32")).eval()
    assert sum(isinstance(m, QuantExperts) for m in q.modules()) == n_experts
    assert not [n for n, p in q.named_parameters() if p.dim() == 3]  # no float expert stack left
    ids = tokens()
    with torch.no_grad():
        logits = q(ids).logits
        r = load_model(save_quantized(q, tmp_path / "q")).eval()
        assert torch.equal(r(ids).logits, logits)
        torch.testing.assert_close(dequantize_model(r)(ids).logits, logits, rtol=1e-5, atol=1e-5)
    if arch == "phimoe":
        plan = QTuneConfig("nf4").layer_plan(model)
        assert "own forward" in plan.skipped["model.layers.0.mlp.router"]


def test_all_linear_lora_targets_attention_not_the_experts():
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config("qwen3_moe"), dtype=torch.float32)
    quantize_model(model, NF4Config(compute_dtype="float32"))
    peft_model = qtune.get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    wrapped = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert sum(isinstance(m, QuantExperts) for m in peft_model.modules()) == 2


def test_memory_plan_counts_the_quantized_experts(moe_dir):
    from qtune.plan import plan_recipe
    from qtune.train.base_model import load_base_model
    from qtune.train.recipe import validate

    recipe = validate({"model": {"path": str(moe_dir), "dtype": "float32"}, "quantization": {"format": "nf4"},
                       "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "dtype": "float32", "target_modules": "all-linear"},
                       "dataset": {"train": {"source": "x.txt"}},
                       "training": {"per_device_train_batch_size": 2, "max_length": 32, "optim": "adamw_torch"},
                       "output": {"dir": "unused"}})
    plan = plan_recipe(recipe)
    model, _ = load_base_model(recipe, moe_dir)
    quantized = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantExperts))]
    experts = [m for m in quantized if isinstance(m, QuantExperts)]
    assert len(experts) == 2 and plan.details["quantized_layers"] == len(quantized)
    linear_bytes = sum(t.numel() * t.element_size() for m in quantized if isinstance(m, QuantLinear)
                       for t in (*m.buffers(), *m.parameters()))
    assert plan.quantized_weights == linear_bytes + sum(m.quantized_bytes() for m in experts)
    q_ids = {id(p) for m in quantized if isinstance(m, QuantLinear) for p in m.parameters()}
    assert plan.float_weights == sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in q_ids)
    assert plan.quantized_params == (sum(m.in_features * m.out_features for m in quantized if isinstance(m, QuantLinear))
                                     + sum(m.num_weights() for m in experts))


def test_merged_float_model_saves_as_a_plain_transformers_checkpoint(moe_dir, tmp_path):
    """LoRA on attention over quantized experts, folded by the exporter: no qtune module or tensor is left, the
    experts are the family's float module again, and transformers writes and reads its own checkpoint layout."""
    from peft import LoraConfig
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qtune.export.merged import merge_to_float

    q = load_model(moe_dir, QTuneConfig(**NF4_DQ)).eval()
    peft_model = qtune.get_peft_model(q, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = tokens()
    with torch.no_grad():
        ref = peft_model(ids).logits
    merged, layers, plan = merge_to_float(peft_model)
    assert len(layers) == 4 and plan["model.layers.0.mlp.experts"].format == "nf4"
    assert not any(isinstance(m, (QuantExperts, QuantLinear)) for m in merged.modules())
    assert len(fused_experts_modules(merged)) == 2
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("absmax" in k for k in keys)
    original = {k for k in safe_open(str(moe_dir / "model.safetensors"), "pt").keys()}
    assert keys == original  # transformers' own (per-expert) checkpoint names again
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)


def test_requantize_merged_experts_and_layouts_that_cannot_store_them(moe_dir, tmp_path):
    from qtune.export.quantized import requantize_model

    model = float_model(moe_dir)
    names = ["model.layers.0.mlp.experts", "model.layers.0.self_attn.q_proj"]
    errors = requantize_model(model, names, NF4Config(compute_dtype="float32"))
    assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    err = {e.name: e for e in errors}["model.layers.0.mlp.experts"]
    assert err.format == "nf4" and 0.0 < err.rel_weight < 0.2 and err.rel_delta is None
    gptq_model = float_model(moe_dir)  # GPTQ per expert (tests/integrations/test_moe_gptq.py)
    errors = requantize_model(gptq_model, names, GPTQConfig(bits=4, group_size=32),
                              calibration=tokens(batch=4, length=32, seed=3))
    assert isinstance(gptq_model.model.layers[0].mlp.experts, QuantExperts)
    err = {e.name: e for e in errors}["model.layers.0.mlp.experts"]
    assert err.format == "gptq" and 0.0 < err.rel_weight < 0.3
    with pytest.raises(ValueError, match="model.layers.0.mlp.experts: the bnb layout cannot store quantized fused"):
        save_quantized(model, tmp_path / "bnb", layout="bnb")
    assert not (tmp_path / "bnb").exists()


def test_quantize_on_load_refuses_expert_tensors_that_disagree_with_the_config(tmp_path, caplog):
    """transformers skips its own shape check for tensors a quantizer claims; QuantExpertStack checks the merged
    stack. transformers then stops with a generic RuntimeError and its conversion report; qtune.load_model raises
    qtune's reason instead, as one line naming the folder, the tensor and both shapes."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(moe_config("qwen3_moe")).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    for e in range(E):
        key = f"model.layers.1.mlp.experts.{e}.down_proj.weight"
        sd[key] = sd[key][:, :-2].contiguous()
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with pytest.raises(ValueError) as info:
            load_model(tmp_path, QTuneConfig("nf4"))
    finally:
        hf_logging.disable_propagation()
    reason = (f"model.layers.1.mlp.experts.down_proj: expert weights have shape ({E}, {H}, {I - 2}), expected "
              f"({E}, {H}, {I})")
    assert str(info.value) == f"{tmp_path}: {reason}"
    assert reason in caplog.text  # and transformers' own report still carries it
    from qtune.integrations.transformers import CONVERSION_ERRORS

    assert CONVERSION_ERRORS == []  # nothing left over for the next load


def test_plan_and_inspect_report_total_and_active_parameters_by_hand(tmp_path, capsys):
    """Qwen3-MoE, 2 layers, E=4 experts of intermediate I=96, top-2, hidden 64, 4 query heads and 2 KV heads of
    16, vocab 128, untied head: the counts written out term by term."""
    from qtune.cli.main import main
    from qtune.plan import plan_recipe
    from qtune.train.recipe import validate

    moe_config("qwen3_moe").save_pretrained(tmp_path)  # the config is all `qtune plan` reads
    embed = head = 128 * H
    attention = H * 64 + 2 * (H * 32) + 64 * H + 2 * 16  # q, k, v, o, q_norm and k_norm (head_dim 16)
    norms, router = 2 * H, E * H
    experts = E * (2 * I * H) + E * (H * I)  # gate_up_proj [E, 2I, H] + down_proj [E, H, I]
    total = embed + head + H + 2 * (attention + norms + router + experts)
    active = total - 2 * experts + 2 * experts * 2 // E  # top-2 of 4 experts
    assert (total, active) == (189_312, 115_584)
    recipe = validate({"model": {"path": str(tmp_path), "dtype": "float32"}, "quantization": {"format": "nf4"},
                       "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
                       "dataset": {"train": {"source": "x.txt"}}, "output": {"dir": "unused"}})
    plan = plan_recipe(recipe)
    assert (plan.total_params, plan.active_params) == (total, active)
    assert f"parameters          {total:,} total, {active:,} active per token (routed experts)" in plan.report()
    assert plan.to_dict()["active_params"] == active
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(moe_config("qwen3_moe")).save_pretrained(tmp_path / "model")
    assert main(["inspect", str(tmp_path / "model"), "--format", "nf4"]) == 0
    assert f"parameters: {total:,} total, {active:,} active per token" in capsys.readouterr().out


def test_experts_per_token_under_the_names_transformers_configs_use():
    import transformers as tf

    from qtune.inspection import experts_per_token

    assert experts_per_token(tf.MixtralConfig(num_experts_per_tok=3)) == 3
    assert experts_per_token(tf.Ernie4_5_MoeConfig(moe_k=5)) == 5  # attribute_map num_experts_per_tok -> moe_k
    assert experts_per_token(tf.AriaTextConfig(moe_topk=4)) == 4  # moe_topk, no alias
    assert experts_per_token(tf.HunYuanMoEV1Config(moe_topk=[2, 2, 2])) == 2  # one per layer, all equal
    assert experts_per_token(tf.HunYuanMoEV1Config(moe_topk=[1, 2])) is None  # they differ: no single top-k
    assert experts_per_token(tf.DbrxConfig(ffn_config={"moe_top_k": 6})) == 6  # nested ffn_config
    assert experts_per_token(tf.LlamaConfig()) is None
