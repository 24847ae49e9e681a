"""Every YAML in recipes/ loads and validates; training recipes show their command and memory plan."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qtune.plan import plan_recipe
from qtune.train.recipe import header_command, load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TRAINING = sorted(p for p in RECIPES.rglob("*.yaml") if p.parent.name != "accelerate")
ACCELERATE = sorted((RECIPES / "accelerate").glob("*.yaml"))


def _rel(p: Path) -> str:
    return str(p.relative_to(RECIPES.parent))


def test_recipes_exist():
    names = {_rel(p) for p in TRAINING}
    assert "recipes/smollm2-135m/qlora-nf4.yaml" in names
    for model in ("llama-3.1-8b", "mistral-7b", "qwen2.5-7b"):
        assert {f"recipes/{model}/qlora-nf4.yaml", f"recipes/{model}/qlora-gptq4.yaml"} <= names
    assert {p.name for p in ACCELERATE} == {"single_gpu.yaml", "multi_gpu_ddp.yaml", "fsdp.yaml"}


@pytest.mark.parametrize("path", TRAINING, ids=_rel)
def test_training_recipe_validates(path):
    recipe = load_recipe(path)
    assert header_command(path) == f"qtune train {_rel(path)}"
    assert recipe.quantization["format"] in ("nf4", "pretrained")
    plan = plan_recipe(recipe)
    assert plan.quantized_params > 0 and plan.trainable_params > 0
    if "smollm2" not in path.parts[-2]:
        # consumer-GPU recipes: the header states the planned peak, and it fits a 24 GB card
        text = path.read_text()
        assert f"{plan.total_gpu() / 2**30:.1f} GiB" in text, "header's expected peak VRAM is out of date"
        assert plan.fits(24)


@pytest.mark.parametrize("path", ACCELERATE, ids=_rel)
def test_accelerate_config_loads(path):
    data = yaml.safe_load(path.read_text())
    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch --config_file " + _rel(path) + " -m qtune train ")
    assert data["distributed_type"] in ("NO", "MULTI_GPU", "FSDP") and data["num_processes"] >= 1
    if data["distributed_type"] == "FSDP":
        # FSDP2 (per-parameter sharding: bf16 packed storage and fp32 adapters may share a unit), and the
        # command stores the packed weights in FSDP's parameter dtype so they are sharded and never cast
        assert data["fsdp_config"]["fsdp_version"] == 2 and data["mixed_precision"] == "bf16"
        assert "quantization.storage_dtype=bfloat16" in first
    from accelerate.commands.config.config_args import load_config_from_file
    cfg = load_config_from_file(str(path))  # accelerate itself accepts every key
    assert cfg.num_processes == data["num_processes"]


@pytest.mark.parametrize("path", TRAINING, ids=_rel)
def test_training_recipes_default_to_auto_dtypes(path):
    """Every shipped recipe lets the machine pick bf16 or fp32 (issue 13): a pinned bf16 made the demo
    ~4× slower per matmul on CPUs without native bf16."""
    raw = yaml.safe_load(path.read_text())
    assert raw["model"]["dtype"] == "auto"
    assert raw["quantization"]["compute_dtype"] == "auto"


def test_moe_recipe_plans_quantized_experts_and_expert_adapters():
    plan = plan_recipe(load_recipe(RECIPES / "qwen3-30b-a3b" / "qlora-nf4.yaml"))
    layers, experts, h, moe_i, r = 48, 128, 2048, 768, 8
    attention = h * 32 * 128 * 2 + h * 4 * 128 * 2          # q, o and k, v (GQA) per layer
    expert_weights = experts * 3 * h * moe_i                # gate_up_proj [E, 2·I, H] + down_proj [E, H, I]
    # the expert stacks are packed with the attention layers, not left in bf16
    assert plan.quantized_params == layers * (attention + expert_weights)
    assert plan.float_weights < 1.5 * 2**30                 # embeddings, head, routers, norms
    # LoRA on attention (r·(in + out)) and on every expert weight (E·r·(in + out), peft's ParamWrapper)
    attn_lora = r * ((h + 4096) + 2 * (h + 512) + (4096 + h))
    expert_lora = experts * r * ((h + 2 * moe_i) + (moe_i + h))
    assert plan.trainable_params == layers * (attn_lora + expert_lora)
