"""``qtune export`` from the command line, including a run folder written by the real ``qtune train``."""
from __future__ import annotations

import json

import pytest
import yaml

from qtune.cli.main import main
from tests.export.helpers import QUANT, make_base, recipe_data


def test_quantized_prints_per_layer_error_and_heldout(run_for, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["export", str(run_for("nf4")), "--mode", "quantized", "--format", "fp4", "--out", str(out),
               "--dtype", "fp32", "--heldout", str(text_file), "--heldout-tokens", "256", "--heldout-window", "64"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    text = captured.out
    assert "model.layers.0.self_attn.q_proj  fp4" in text and "\ntotal " in text
    for label in ("trained (quantized base + adapter)", "merged fp32", "re-quantized fp4"):
        assert f"held-out perplexity, {label}:" in text
    assert "logits quantized vs merged fp32 (held-out window)" in text and "verified:" in text
    report = json.loads((out / "qtune_export.json").read_text())
    assert report["format"] == "fp4" and report["heldout"]["quantized"]["predicted"] == 252


def test_options_that_do_not_apply_are_refused(run_for, tmp_path, capsys):
    out = str(tmp_path / "o")
    src = str(run_for("nf4"))
    assert main(["export", src, "--mode", "merged", "--format", "nf4", "--out", out]) == 1
    assert "--format applies to --mode quantized only" in capsys.readouterr().err
    assert main(["export", src, "--mode", "adapter", "--dtype", "bf16", "--out", out]) == 1
    assert "--dtype applies to --mode merged/quantized only" in capsys.readouterr().err
    assert main(["export", src, "--mode", "adapter", "--private", "--out", out]) == 1
    assert "--private applies with --push-to-hub only" in capsys.readouterr().err
    assert main(["export", src, "--mode", "quantized", "--format", "q5", "--out", out]) == 1
    assert "q5" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_then_export_every_mode(export_root, tmp_path, capsys):
    """The run folder of a real (2-step) ``qtune train``, exported as adapter, merged bf16 and NF4 (bnb layout)."""
    model = make_base(export_root)
    run = tmp_path / "run"
    data = recipe_data(model, QUANT["nf4"], run, export_root / "text.txt")
    data["training"].update(max_steps=2, logging_steps=1, save_steps=100, disable_tqdm=True, seed=0)
    data["output"]["plot"] = False
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# qtune train r.yaml\n" + yaml.safe_dump(data, sort_keys=False))
    assert main(["train", str(recipe)]) == 0
    trained = json.loads((run / "summary.json").read_text())
    capsys.readouterr()

    assert main(["export", str(run), "--mode", "adapter", "--out", str(tmp_path / "a")]) == 0
    card = (tmp_path / "a" / "README.md").read_text()
    assert f"{trained['train_loss']:.4g}" in card and "qtune nf4 (blocksize=64" in card
    assert main(["export", str(run), "--mode", "merged", "--dtype", "bf16", "--out", str(tmp_path / "m"),
                 "--heldout", str(export_root / "text.txt")]) == 0
    merged = json.loads((tmp_path / "m" / "qtune_export.json").read_text())
    # the recipe's perplexity settings apply; the trained model's perplexity is what training measured after
    assert merged["heldout"]["trained"]["perplexity"] == \
        pytest.approx(trained["perplexity_after"]["perplexity"], rel=1e-5)
    assert merged["heldout"]["merged"]["perplexity"] == \
        pytest.approx(trained["perplexity_after"]["perplexity"], rel=2e-2)
    assert main(["export", str(run), "--mode", "quantized", "--format", "nf4", "--layout", "bnb",
                 "--out", str(tmp_path / "q")]) == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
