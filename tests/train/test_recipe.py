"""Recipe reading and validation: every error names the file, the line, the key and the allowed values."""
from __future__ import annotations

import textwrap

import pytest

from qtune.cli.main import main
from qtune.train.recipe import RecipeError, header_command, load_recipe, validate

GOOD = """\
# qtune train recipe.yaml
model:
  path: some/model
quantization:
  format: nf4
  double_quant: true
lora:
  r: 8
dataset:
  train:
    source: data.jsonl
training:
  max_steps: 3
  learning_rate: 0.0002
output:
  dir: /tmp/out
"""


def _write(tmp_path, text: str):
    p = tmp_path / "recipe.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def _error(tmp_path, text: str, overrides=()) -> RecipeError:
    p = _write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p, overrides)
    return e.value


def test_good_recipe_fills_defaults(tmp_path):
    r = load_recipe(_write(tmp_path, GOOD))
    assert r.model["dtype"] == "bfloat16" and r.lora["target_modules"] == "all-linear" and r.lora["alpha"] == 32
    assert r.dataset["train"]["format"] == "auto" and r.dataset["eval"] is None
    assert r.training == {"max_steps": 3, "learning_rate": 0.0002}
    cfg = r.quant_config()
    assert cfg.format == "nf4" and cfg.double_quant is True
    assert header_command(r.path) == "qtune train recipe.yaml"


def test_unknown_key_names_line_and_allowed(tmp_path):
    e = _error(tmp_path, GOOD.replace("  r: 8", "  r: 8\n  use_dorra: true"))
    msg = str(e)
    assert msg.startswith(f"{tmp_path / 'recipe.yaml'}:9: lora.use_dorra: unknown key")
    assert "did you mean 'use_dora'?" in msg and "allowed: alpha, bias, dropout" in msg


def test_bad_choice_lists_allowed_values(tmp_path):
    e = _error(tmp_path, GOOD.replace("  r: 8", "  r: 8\n  bias: some"))
    assert ":9: lora.bias: 'some' is not one of 'none', 'all', 'lora_only'" in str(e)


def test_bad_type_and_range(tmp_path):
    e = _error(tmp_path, GOOD.replace("  r: 8", "  r: eight"))
    assert ":8: lora.r: expected integer, got 'eight'" in str(e)
    e = _error(tmp_path, GOOD.replace("  r: 8", "  r: 0"))
    assert "lora.r: must be > 0" in str(e)
    e = _error(tmp_path, GOOD.replace("  r: 8", "  r: true"))  # a bool is not an integer here
    assert "lora.r: expected integer" in str(e)


def test_unknown_section_and_missing(tmp_path):
    e = _error(tmp_path, GOOD + "extras:\n  a: 1\n")
    assert ":17: extras: unknown key" in str(e) and "quantization" in str(e)
    e = _error(tmp_path, GOOD.replace("    source: data.jsonl", "    split: train"))
    assert "dataset.train.source: is required" in str(e)
    e = _error(tmp_path, GOOD.replace("output:\n  dir: /tmp/out\n", ""))
    assert "output: section is required" in str(e)


def test_a_format_registered_after_import_is_a_recipe_format(tmp_path, monkeypatch):
    import dataclasses
    from typing import ClassVar

    from qtune.formats import NF4Config, registry

    @dataclasses.dataclass(frozen=True)
    class LateConfig(NF4Config):
        format: ClassVar[str] = "late"

    monkeypatch.setitem(registry._FORMATS, "late", LateConfig)  # registered for this test only
    r = load_recipe(_write(tmp_path, GOOD.replace("  format: nf4", "  format: late")))
    assert isinstance(r.quant_config(), LateConfig) and r.quant_config().double_quant is True
    monkeypatch.delitem(registry._FORMATS, "late")
    e = _error(tmp_path, GOOD.replace("  format: nf4", "  format: late"))
    assert ":5: quantization.format: 'late' is not one of 'nf4', 'fp4'" in str(e)


def test_quantization_format_fields(tmp_path):
    e = _error(tmp_path, GOOD.replace("  format: nf4", "  format: nf5"))
    assert ":5: quantization.format: 'nf5' is not one of 'nf4', 'fp4'" in str(e) and "'pretrained'" in str(e)
    e = _error(tmp_path, GOOD.replace("  double_quant: true", "  group_size: 64"))
    assert ":6: quantization.group_size: unknown key" in str(e) and "blocksize" in str(e)
    e = _error(tmp_path, GOOD.replace("  double_quant: true", "  blocksize: 100"))
    assert "quantization.blocksize" in str(e) and "not supported" in str(e)
    e = _error(tmp_path, GOOD.replace("  format: nf4\n  double_quant: true", "  format: gptq"))
    assert "gptq needs quantization.calibration" in str(e)


def test_training_keys_checked_against_sftconfig(tmp_path):
    e = _error(tmp_path, GOOD.replace("  max_steps: 3", "  max_step: 3"))
    assert ":13: training.max_step: unknown key (did you mean 'max_steps'?)" in str(e)
    e = _error(tmp_path, GOOD.replace("  max_steps: 3", "  packing_strategy: best"))
    assert "training.packing_strategy: 'best' is not one of 'bfd', 'bfd_split', 'wrapped'" in str(e)
    e = _error(tmp_path, GOOD.replace("  learning_rate: 0.0002", "  learning_rate: fast"))
    assert "training.learning_rate: expected number" in str(e)
    e = _error(tmp_path, GOOD.replace("  max_steps: 3", "  output_dir: x"))
    assert "training.output_dir: set output.dir instead" in str(e)


def test_overrides(tmp_path):
    p = _write(tmp_path, GOOD)
    r = load_recipe(p, ["training.max_steps=2", "output.dir=/tmp/run", "dataset.train.max_examples=5",
                        "lora.target_modules=[q_proj, v_proj]"])
    assert r.training["max_steps"] == 2 and r.output["dir"] == "/tmp/run"
    assert r.dataset["train"]["max_examples"] == 5 and r.lora["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(RecipeError, match=r"command line \(lora.dropout=2\): lora.dropout: must be in \[0, 1\)"):
        load_recipe(p, ["lora.dropout=2"])
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(p, ["max_steps"])


def test_duplicate_key_and_bad_yaml(tmp_path):
    e = _error(tmp_path, GOOD.replace("  r: 8", "  r: 8\n  r: 4"))
    assert ":9: lora.r: duplicate key" in str(e)
    e = _error(tmp_path, GOOD.replace("  r: 8", "  r: [8"))
    assert "invalid YAML" in str(e)


def test_validate_dict_without_file():
    with pytest.raises(RecipeError, match="<recipe>: model: section is required"):
        validate({"quantization": {"format": "nf4"}})


def test_cli_reports_error_and_exit_code(tmp_path, capsys):
    p = _write(tmp_path, GOOD.replace("  r: 8", "  r: 8\n  bias: some"))
    assert main(["train", str(p)]) == 1
    err = capsys.readouterr().err
    assert "qtune train: error:" in err and "recipe.yaml:9: lora.bias" in err
    assert main(["train", str(_write(tmp_path, GOOD)), "--check", "training.max_steps=7"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out
