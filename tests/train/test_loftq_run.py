"""``lora.init: loftq`` through the training runner on a tiny model (quantized while loading, 2-bit affine)."""
from __future__ import annotations

from qtune.train import load_recipe
from qtune.train.runner import run
from tests.train.conftest import base_recipe, write_recipe


def test_recipe_with_loftq_trains(tiny_dir, tmp_path, capsys):
    data = base_recipe(tiny_dir, tmp_path / "run")
    data["quantization"] = {"format": "affine", "bits": 2, "group_size": 32}
    data["lora"].update(init="loftq", loftq_iters=2)
    data["training"].update(max_steps=2, save_steps=100)
    data["dataset"]["perplexity"] = None
    summary = run(load_recipe(write_recipe(tmp_path / "r.yaml", data)))
    assert summary["status"] == "finished" and summary["global_step"] == 2
    out = capsys.readouterr().out
    assert "LoftQ (2 steps) on 14 layers" in out, out[-2000:]
