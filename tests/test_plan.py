"""``qtune plan``: predicted memory against the real tensor bytes of a tiny model."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from qtune.cli.main import main
from qtune.integrations.peft import get_peft_model
from qtune.nn import QuantLinear
from qtune.plan import KNOWN_CONFIGS, plan_recipe
from qtune.train.recipe import validate
from qtune.train.base_model import load_base_model
from tests.train.models import save_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("plan") / "model")


def _recipe(path, fmt="nf4", **lora):
    q = {"format": fmt}
    if fmt == "gptq":
        q = {"format": "rtn", "bits": 4, "group_size": 32}
    return validate({
        "model": {"path": str(path), "dtype": "float32"},
        "quantization": q,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "dtype": "float32", **lora},
        "dataset": {"train": {"source": "x.txt"}},
        "training": {"per_device_train_batch_size": 2, "max_length": 32, "optim": "adamw_torch"},
        "output": {"dir": "unused"},
    })


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("fmt,lora", [("nf4", {}), ("int8", {"use_dora": True}), ("gptq", {"bias": "all"})])
def test_plan_matches_tensor_bytes(model_dir, fmt, lora):
    recipe = _recipe(model_dir, fmt, **lora)
    plan = plan_recipe(recipe)
    model, _ = load_base_model(recipe, model_dir)
    qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qlayers) == plan.details["quantized_layers"] == 14
    q_ids = {id(p) for m in qlayers for p in m.parameters()}
    assert plan.quantized_weights == _nbytes([t for m in qlayers for t in (*m.buffers(), *m.parameters())])
    assert plan.float_weights == _nbytes(p for p in model.parameters() if id(p) not in q_ids)
    assert plan.quantized_params == sum(m.in_features * m.out_features for m in qlayers)

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=lora.get("use_dora", False),
                     bias=lora.get("bias", "none"))
    pm = get_peft_model(model, cfg)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert plan.trainable_params == sum(p.numel() for p in trainable)
    assert plan.lora_params == plan.gradients == _nbytes(trainable)

    # optimizer state after one step, and the tensors autograd keeps for backward (no checkpointing)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    params = {t.untyped_storage().data_ptr() for t in [*pm.parameters(), *pm.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, 300, (2, 32))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pm(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    state = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    assert plan.optimizer_state == _nbytes(state)
    measured = sum(saved.values())
    print(f"activations: predicted {plan.activations_full} B, saved by autograd {measured} B")
    assert 0.65 * measured < plan.activations_full < 1.5 * measured, (plan.activations_full, measured)
    assert plan.activations_checkpointed < plan.activations_full


def test_plan_8b_recipes_say_which_cards_fit(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: meta-llama/Llama-3.1-8B-Instruct}\nquantization: {format: nf4}\n"
                    "lora: {r: 16}\ndataset: {train: {source: hf:trl-lib/Capybara}}\n"
                    "training: {per_device_train_batch_size: 1, max_length: 2048}\noutput: {dir: x}\n")
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "quantized weights" in out and "optimizer state" in out and "without" in out
    for card in ("24 GB card", "16 GB card", "12 GB card"):
        assert card in out
    plan = plan_recipe(validate({"model": {"path": "meta-llama/Llama-3.1-8B-Instruct"},
                                 "quantization": {"format": "nf4"}, "lora": {},
                                 "dataset": {"train": {"source": "x"}},
                                 "training": {"per_device_train_batch_size": 1, "max_length": 2048},
                                 "output": {"dir": "x"}}))
    # 8B in 4 bits: ~7 B quantized parameters in ~3.5 GiB, bf16 embeddings + head ~2 GiB
    assert 6.5e9 < plan.quantized_params < 7.5e9 and 3.2 < plan.quantized_weights / 2**30 < 3.8
    assert plan.fits(24) and plan.fits(16)
    assert main(["plan", str(path), "training.max_length=16384"]) == 0
    assert "24 GB card: does NOT fit" in capsys.readouterr().out


def test_known_configs_build():
    from qtune.plan import model_config
    for name in KNOWN_CONFIGS:
        cfg, quant = model_config(name)
        assert cfg.hidden_size > 0 and (quant is None or quant["format"] in ("gptq", "gguf_q4_1"))


def test_unknown_model_error():
    with pytest.raises(ValueError, match="not a local folder and not a known config"):
        plan_recipe(validate({"model": {"path": "nobody/nothing"}, "quantization": {"format": "nf4"}, "lora": {},
                              "dataset": {"train": {"source": "x"}}, "output": {"dir": "x"}}))


def test_checkpoint_quantization_configs_as_their_layouts_declare():
    """The memory plan reads a quantized folder's format from config.json alone, through its layout."""
    from qtune.plan import _quant_dict

    assert _quant_dict(None) is None and _quant_dict({}) is None
    gptq = {"quant_method": "gptq", "bits": 3, "group_size": 64, "desc_act": True, "sym": False}
    assert _quant_dict(gptq) == {"format": "gptq", "bits": 3, "group_size": 64, "desc_act": True,
                                 "static_groups": False, "act_group_aware": False, "sym": False}
    # qtune writes desc_act for the layout; its static_groups (act-order with static groups) implies desc_act
    ours = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "static_groups": True,
            "act_group_aware": False, "quantizer": ["qtune:0.1.0"]}
    assert _quant_dict(ours)["desc_act"] is True and _quant_dict(ours)["static_groups"] is True
    assert _quant_dict({**ours, "quantizer": ["gptqmodel:7.7.0"]})["desc_act"] is False  # others: as written
    bnb4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True}
    assert _quant_dict(bnb4) == {"format": "nf4", "double_quant": True}
    assert _quant_dict({"quant_method": "bitsandbytes", "load_in_4bit": True}) == {"format": "fp4",
                                                                                   "double_quant": False}
    assert _quant_dict({"quant_method": "bitsandbytes", "load_in_8bit": True}) == {"format": "llm_int8"}
    own = {"quant_method": "qtune", "format": "int8"}
    assert _quant_dict(own) == {"qtune": own}
    with pytest.raises(ValueError, match="quant_method 'awq' is not supported"):
        _quant_dict({"quant_method": "awq"})
