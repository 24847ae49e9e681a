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
