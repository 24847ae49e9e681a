"""LoRA on quantized fused experts (issue 14 item 4): peft ``target_parameters`` on qtune ``QuantExperts``.

A QLoRA step with expert adapters lowers the loss and trains them; the saved adapter is plain peft's (same
keys and config as peft builds on the float model) and loads with plain peft on the float model; merging
(quantized in memory, and the merged float export) folds the expert deltas in."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import qtune
from qtune.formats import NF4Config
from qtune.integrations import QTuneConfig
from qtune.integrations.layouts import load_model
from qtune.integrations.peft import QuantLoraExperts, add_adapter, all_experts_names
from qtune.nn import QuantExperts, dequantize_model

from .test_moe import NF4_DQ, float_model, moe_config, tokens

ARCHS = ("mixtral", "qwen3_moe")


@pytest.fixture(scope="module", params=ARCHS)
def moe_dir(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(request.param), dtype=torch.float32)
    path = tmp_path_factory.mktemp("moelora") / request.param
    model.save_pretrained(path)
    return path


def lora_config(**kw):
    from peft import LoraConfig

    return LoraConfig(**{**dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                target_parameters=["all-experts"]), **kw})


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def expert_lora_params(model):
    return {n: p for n, p in model.named_parameters() if "experts" in n and "lora_" in n}


def test_qlora_step_trains_the_expert_adapters(moe_dir):
    q = qtune.prepare_model_for_kbit_training(load_model(moe_dir, QTuneConfig(**NF4_DQ)))
    pm = qtune.get_peft_model(q, lora_config())
    wrappers = [m for m in pm.modules() if isinstance(m, QuantLoraExperts)]
    assert len(wrappers) == 4 and {w.parameter_name for w in wrappers} == {"gate_up_proj", "down_proj"}
    assert sorted(pm.peft_config["default"].target_parameters) == sorted(all_experts_names(q))
    stacks = {n: b.clone() for n, b in pm.named_buffers() if ".experts." in n}
    experts_params = expert_lora_params(pm)
    assert len(experts_params) == 8 and all(p.requires_grad for p in experts_params.values())
    trainable = [p for p in pm.parameters() if p.requires_grad]
    start = {n: p.detach().clone() for n, p in experts_params.items()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = tokens(batch=2, length=16, seed=3)
    pm.train()
    losses = []
    for _ in range(6):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(experts_params[n].grad is not None and experts_params[n].grad.abs().sum() > 0
                   for n in experts_params if "lora_B" in n)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, start[n]) for n, p in experts_params.items())  # every expert adapter learned
    assert all(torch.equal(b, stacks[n]) for n, b in pm.named_buffers() if n in stacks)  # packed weights frozen


def test_saved_adapter_is_plain_peft_and_loads_on_the_float_model(moe_dir, tmp_path):
    from peft import PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict

    q = load_model(moe_dir, QTuneConfig(**NF4_DQ)).eval()
    pm = qtune.get_peft_model(q, lora_config())
    randomize_lora(pm)
    ids = tokens()
    with torch.no_grad():
        ours = pm(ids).logits
        base = pm.get_base_model()
        with pm.disable_adapter():
            assert not torch.allclose(pm(ids).logits, ours, atol=1e-3)  # the expert deltas matter
    pm.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(all_experts_names(base))

    # the same config on the float model with plain peft: same state-dict keys and shapes
    plain = get_peft_model(float_model(moe_dir), lora_config(target_modules=cfg["target_modules"],
                                                             target_parameters=cfg["target_parameters"]))
    ref_sd = {k: v.shape for k, v in get_peft_model_state_dict(plain).items()}
    our_sd = {k: v.shape for k, v in get_peft_model_state_dict(pm).items()}
    assert our_sd == ref_sd and any(".experts.base_layer.lora_A" in k for k in our_sd)

    # plain peft on the float model holding the dequantized weights: the same function
    dense = dequantize_model(copy.deepcopy(load_model(moe_dir, QTuneConfig(**NF4_DQ)))).eval()
    loaded = PeftModel.from_pretrained(dense, tmp_path / "adapter")
    assert not any(isinstance(m, QuantExperts) for m in loaded.modules())
    with torch.no_grad():
        theirs = loaded(ids).logits
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)
    # and on the original float model: the same up to the quantization error
    loaded_float = PeftModel.from_pretrained(float_model(moe_dir), tmp_path / "adapter")
    with torch.no_grad():
        diff = (loaded_float(ids).logits - ours).abs().max()
    assert diff < 0.2 * ours.abs().max()

    # qtune reload on a fresh quantized model: identical
    again = qtune.load_adapter(load_model(moe_dir, QTuneConfig(**NF4_DQ)).eval(), str(tmp_path / "adapter"))
    assert sum(isinstance(m, QuantLoraExperts) for m in again.modules()) == 4
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours)


def test_merges_fold_the_expert_deltas(moe_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from qtune.export.merged import merge_to_float

    ids = tokens()

    def trained():
        torch.manual_seed(0)  # lora_A's initialisation
        pm = qtune.get_peft_model(load_model(moe_dir, QTuneConfig(**NF4_DQ)).eval(), lora_config())
        randomize_lora(pm)
        return pm

    pm = trained()
    with torch.no_grad():
        ref = pm(ids).logits
    # merged float export: fp32 fold, then plain transformers save/load
    merged, layers, plan = merge_to_float(pm)
    assert sum(".experts." in l.name for l in layers) == 4 and all(l.delta_norm > 0 for l in layers)
    assert "model.layers.0.mlp.experts" in plan
    with torch.no_grad():
        in_memory = merged(ids).logits
    torch.testing.assert_close(in_memory, ref, atol=2e-4, rtol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, in_memory)

    # quantized merge (experts re-quantized in place, one at a time) = quantizing the merged float model
    qm, report = qtune.merge_and_unload(trained())
    assert sum(".experts" in n for n in report.layers) == 4
    assert all(0 < e.rel_delta < 1 for n, e in report.layers.items() if ".experts" in n)
    assert any(isinstance(m, QuantExperts) for m in qm.modules())
    assert not any(isinstance(m, QuantLoraExperts) for m in qm.modules())
    requantized = copy.deepcopy(reloaded)
    qtune.quantize_model(requantized, NF4Config(double_quant=True, compute_dtype="float32"))
    sd_a, sd_b = qm.state_dict(), requantized.state_dict()
    assert set(sd_a) == set(sd_b)
    for k in sd_a:
        if ".experts." in k:
            assert torch.equal(sd_a[k], sd_b[k]), k
    with torch.no_grad():
        torch.testing.assert_close(qm(ids).logits, requantized(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(qm(ids).logits, ref, atol=1e-6)  # re-quantization moved it, a little
    # unmerge is exact
    pm2 = trained()
    with torch.no_grad():
        before = pm2(ids).logits
        pm2.merge_adapter()
        pm2.unmerge_adapter()
        assert torch.equal(pm2(ids).logits, before)


def test_bad_target_parameter_is_named(moe_dir):
    q = load_model(moe_dir, QTuneConfig(**NF4_DQ))
    with pytest.raises(ValueError, match="'experts.gate_proj'.*names no parameter"):
        qtune.get_peft_model(q, lora_config(target_parameters=["experts.gate_proj"]))
    with pytest.raises(ValueError, match="lora_dropout=0"):
        qtune.get_peft_model(q, lora_config(lora_dropout=0.1))


def test_adapter_whose_target_parameters_the_model_lacks_is_refused_by_name(moe_dir, tmp_path):
    """peft alone would warn and load the adapter without that weight's LoRA; qtune.load_adapter refuses it,
    naming the file and the parameter, on the base model and on a PeftModel."""
    q = load_model(moe_dir, QTuneConfig(**NF4_DQ))
    pm = qtune.get_peft_model(q, lora_config())
    pm.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["target_parameters"] = [*cfg["target_parameters"], "model.layers.7.mlp.experts.down_proj"]
    path.write_text(json.dumps(cfg))
    for base in (load_model(moe_dir, QTuneConfig(**NF4_DQ)), pm):
        with pytest.raises(ValueError) as info:
            qtune.load_adapter(base, str(tmp_path / "adapter"), adapter_name="again")
        assert str(info.value).startswith(f"{path}: target_parameters: 'model.layers.7.mlp.experts.down_proj' names "
                                          "no parameter of the model")


def test_trainer_trains_expert_adapters(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from qtune.formats import NF4Config
    from qtune.integrations.trl import QTuneSFTTrainer
    from qtune.nn import quantize_model
    from tests.train.models import CORPUS, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = moe_config("mixtral")
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    quantize_model(model, NF4Config(compute_dtype="float32"))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
                     logging_steps=1, report_to="none", max_length=64, save_strategy="no", disable_tqdm=True,
                     seed=0, data_seed=0, bf16=False)
    ds = Dataset.from_dict({"text": [CORPUS[i:i + 200] for i in range(0, len(CORPUS) - 200, 40)]})
    trainer = QTuneSFTTrainer(model, args, train_dataset=ds, processing_class=tok,
                              peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                     target_parameters=["all-experts"]))
    assert sum(isinstance(m, QuantLoraExperts) for m in trainer.model.modules()) == 4
    params = expert_lora_params(trainer.model)
    assert params and all(p.requires_grad for p in params.values())
    start = {n: p.detach().clone() for n, p in params.items()}
    trainer.train()
    assert all(not torch.equal(p, start[n]) for n, p in params.items()), [n for n, p in params.items() if torch.equal(p, start[n])]


def test_recipe_switch():
    from qtune.train.recipe import RecipeError, validate
    from qtune.train.runner import lora_config as recipe_lora_config

    data = {"model": {"path": "x"}, "quantization": {"format": "nf4"}, "dataset": {"train": {"source": "hf:trl-lib/Capybara"}},
            "lora": {"experts": True, "dropout": 0.0}, "output": {"dir": "runs/x"}}
    recipe = validate(data)
    assert recipe_lora_config(recipe).target_parameters == ["all-experts"]
    assert recipe_lora_config(validate({**data, "lora": {}})).target_parameters is None
    with pytest.raises(RecipeError, match="dropout"):
        validate({**data, "lora": {"experts": True}})


def test_export_merged_and_quantized_from_an_adapter_folder(moe_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from qtune.export import export_merged
    from qtune.export.quantized import export_quantized

    torch.manual_seed(0)
    pm = qtune.get_peft_model(load_model(moe_dir, QTuneConfig(format="nf4", compute_dtype="float32")), lora_config())
    randomize_lora(pm)
    pm.save_pretrained(tmp_path / "adapter")
    quiet = lambda *a: None  # noqa: E731
    res = export_merged(str(tmp_path / "adapter"), tmp_path / "merged", base=str(moe_dir), base_format="nf4",
                        dtype="fp32", log=quiet)
    assert res.merged_layers >= 4  # verify=True checked merged vs trained logits and the plain reload
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ref = float_model(moe_dir)
    w, w0 = merged.model.layers[0].mlp.experts.down_proj, ref.model.layers[0].mlp.experts.down_proj
    assert not torch.allclose(w, w0, atol=1e-3)  # the expert delta is in the export
    export_quantized(str(tmp_path / "adapter"), tmp_path / "quant", format="nf4", base=str(moe_dir),
                     base_format="nf4", log=quiet)
    q = load_model(tmp_path / "quant")
    assert sum(isinstance(m, QuantExperts) for m in q.modules()) == 2


def test_float_experts_under_peft_paramwrapper_fold_in_the_merged_export(moe_dir):
    from peft.tuners.lora.layer import ParamWrapper

    from qtune.export.merged import merge_to_float

    torch.manual_seed(0)
    q = load_model(moe_dir, QTuneConfig(**NF4_DQ, skip_modules=["lm_head", "experts"])).eval()
    pm = qtune.get_peft_model(q, lora_config())
    wrappers = [m for m in pm.modules() if isinstance(m, ParamWrapper)]
    assert wrappers and not any(isinstance(m, QuantLoraExperts) for m in wrappers)
    randomize_lora(pm)
    ids = tokens()
    with torch.no_grad():
        ref = pm(ids).logits
        merged, layers, _ = merge_to_float(pm)
        assert sum(".experts." in l.name for l in layers) == 4
        torch.testing.assert_close(merged(ids).logits, ref, atol=2e-4, rtol=1e-4)


def test_memory_plan_counts_the_expert_adapters(moe_dir):
    from qtune.plan import plan_recipe
    from qtune.train.recipe import validate

    def plan(experts):
        return plan_recipe(validate({
            "model": {"path": str(moe_dir), "dtype": "float32"}, "quantization": {"format": "nf4"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "dtype": "float32", "experts": experts},
            "dataset": {"train": {"source": "x.txt"}}, "output": {"dir": "unused"},
            "training": {"per_device_train_batch_size": 2, "max_length": 32, "optim": "adamw_torch"}}))

    pm = qtune.get_peft_model(load_model(moe_dir, QTuneConfig(**NF4_DQ)), lora_config())
    n_experts = sum(p.numel() for p in expert_lora_params(pm).values())
    assert plan(True).trainable_params - plan(False).trainable_params == n_experts


def test_second_adapter_on_the_same_expert_wrappers(moe_dir, tmp_path):
    torch.manual_seed(0)
    pm = qtune.get_peft_model(load_model(moe_dir, QTuneConfig(**NF4_DQ)).eval(), lora_config())
    randomize_lora(pm, seed=1)
    pm.save_pretrained(tmp_path / "first")
    ids = tokens()
    with torch.no_grad():
        first = pm(ids).logits
    add_adapter(pm, "second", lora_config())
    assert sum(isinstance(m, QuantLoraExperts) for m in pm.modules()) == 4  # no extra nesting
    assert all(set(m.lora_A) == {"default", "second"} for m in pm.modules() if isinstance(m, QuantLoraExperts))
    pm.set_adapter("second")  # zero-initialised B: the base model's output
    with torch.no_grad(), pm.disable_adapter():
        base = pm(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, base)
    # load the first adapter again, under a third name, onto the PeftModel
    qtune.load_adapter(pm, str(tmp_path / "first"), adapter_name="again")
    pm.set_adapter("again")
    with torch.no_grad():
        assert torch.equal(pm(ids).logits, first)


def test_experts_only_adapter(moe_dir, tmp_path):
    """target_modules=[] and only quantized expert weights: peft alone would find no target and refuse."""
    from peft import PeftModel

    pm = qtune.get_peft_model(load_model(moe_dir, QTuneConfig(**NF4_DQ)).eval(),
                              lora_config(target_modules=[], target_parameters=["experts.gate_up_proj",
                                                                                "experts.down_proj"]))
    assert sum(isinstance(m, QuantLoraExperts) for m in pm.modules()) == 4
    assert all("experts" in n for n, p in pm.named_parameters() if p.requires_grad)
    randomize_lora(pm)
    pm.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == []
    plain = PeftModel.from_pretrained(float_model(moe_dir), tmp_path / "a")
    assert sum(type(m).__name__ == "ParamWrapper" for m in plain.modules()) == 4
    again = qtune.load_adapter(load_model(moe_dir, QTuneConfig(**NF4_DQ)).eval(), str(tmp_path / "a"))
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, pm(ids).logits)
