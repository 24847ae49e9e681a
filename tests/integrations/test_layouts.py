"""Checkpoint layouts as plug-ins: the registry (names, detection, which layouts store a config, refusals),
and a layout defined in this module, registered through the public registry only, used by save_quantized,
load_model and export without any qtune code naming it."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from qtune.formats import FP4Config, GPTQConfig, Int8Config, LLMInt8Config, NF4Config, RTNConfig
from qtune.integrations import layouts
from qtune.integrations.layouts import (Layout, detect_layout, get_layout, layout_names, load_model, register_layout,
                                        save_quantized, storing_layouts)
from tests.integrations.tiny_models import tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_names_and_errors():
    assert layout_names()[:3] == ("qtune", "bnb", "gptq")
    with pytest.raises(ValueError, match=r"layout='awq' is not one of 'qtune', 'bnb', 'gptq'"):
        get_layout("awq")
    with pytest.raises(ValueError, match=r"x/config.json: quant_method 'awq' is not supported "
                                         r"\(qtune, bitsandbytes, gptq\)"):
        detect_layout({"quant_method": "awq"}, where="x/config.json")
    assert detect_layout({"quant_method": "qtune"}).name == "qtune"
    assert detect_layout({"load_in_4bit": True, "quant_method": "bitsandbytes"}).name == "bnb"
    assert detect_layout({"quant_method": "gptq", "bits": 4}).name == "gptq"


def test_which_layouts_store_a_config():
    assert storing_layouts(NF4Config()) == storing_layouts(FP4Config(double_quant=True)) == ("qtune", "bnb")
    assert storing_layouts(LLMInt8Config()) == storing_layouts(Int8Config()) == ("qtune", "bnb")
    assert storing_layouts(Int8Config(symmetric=False)) == storing_layouts(Int8Config(group_size=32)) == ("qtune",)
    assert storing_layouts(GPTQConfig()) == storing_layouts(RTNConfig(bits=3)) == ("qtune", "gptq")
    with pytest.raises(ValueError, match="--layout gptq holds gptq/rtn layers, not nf4"):
        get_layout("gptq").check(NF4Config())
    with pytest.raises(ValueError, match="--layout bnb holds nf4/fp4/int8/llm_int8 layers, not gptq"):
        get_layout("bnb").check(GPTQConfig())
    with pytest.raises(ValueError, match=r"symmetric per-row int8 only"):
        get_layout("bnb").check(Int8Config(symmetric=False))
    # bitsandbytes reads its 8-bit weights back as LLM.int8 with its own arithmetic
    assert get_layout("bnb").stored_config(Int8Config(compute_dtype="float32")) == \
        LLMInt8Config(compute_dtype="float32", arithmetic="bitsandbytes")
    assert get_layout("qtune").stored_config(Int8Config()) == Int8Config()


# -- a layout that lives in this module: qtune's own files under another quant_method -----------------
TOY_METHOD = "toy_copy"


def _toy_write(model, folder: Path) -> None:
    get_layout("qtune").write(model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = TOY_METHOD
    (folder / "config.json").write_text(json.dumps(cfg))


def _toy_read(path: Path, qc, headers, *, dtype, kwargs, auto_class):
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copytree(path, Path(tmp) / "m"))
        cfg = json.loads((copy / "config.json").read_text())
        cfg["quantization_config"]["quant_method"] = "qtune"
        (copy / "config.json").write_text(json.dumps(cfg))
        return get_layout("qtune").read(copy, cfg["quantization_config"], headers, dtype=dtype, kwargs=kwargs,
                                        auto_class=auto_class)


TOY = Layout(name="toy", quant_method=TOY_METHOD, holds="nf4 layers", can_store=lambda cfg: isinstance(cfg, NF4Config),
             detects=lambda qc: qc.get("quant_method") == TOY_METHOD, read=_toy_read, write=_toy_write)


@pytest.fixture
def toy_layout(monkeypatch):
    monkeypatch.setattr(layouts.base, "_LAYOUTS", dict(layouts.base._LAYOUTS))  # registered for this test only
    return register_layout(TOY)


def test_a_layout_registered_from_outside_saves_and_loads(toy_layout, tiny_path, tmp_path):
    assert "toy" in layout_names() and storing_layouts(NF4Config()) == ("qtune", "bnb", "toy")
    model = load_model(tiny_path("llama"), NF4Config(compute_dtype="float32"), dtype=torch.float32)
    with torch.no_grad():
        expected = model(tokens()).logits
    save_quantized(model, tmp_path / "toy", layout="toy")
    cfg = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == TOY_METHOD
    reloaded = load_model(tmp_path / "toy")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens()).logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="--layout toy holds nf4 layers, not int8"):
        toy_layout.check(Int8Config())


def test_export_writes_a_registered_layout(toy_layout, tmp_path):
    from tests.export.helpers import QUANT, make_run

    from qtune.export import export_quantized

    run = make_run(tmp_path, "run-nf4", QUANT["nf4"])
    res = export_quantized(run, tmp_path / "q", format="nf4", layout="toy", log=lambda s: None)
    assert res.layout == "toy" and res.verify.rel <= 1e-3  # reloaded through the toy layout's reader
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == TOY_METHOD
    with pytest.raises(ValueError, match="--layout toy holds nf4 layers, not fp4"):
        export_quantized(run, tmp_path / "q2", format="fp4", layout="toy", log=lambda s: None)
