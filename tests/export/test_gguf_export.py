"""``qtune export RUN --mode quantized --format gguf``: merge, quantize into GGUF types, one GGUF file.

Runs on a Hugging Face base (NF4 during training; ``--gguf-type`` chooses the GGUF type) and on a GGUF base
(``model.path: base.gguf``, written by qtune from the tiny model; the export keeps its types, and an adapter that
changes nothing gives back the base file byte for byte). The file reads back with transformers' GGUF loader
with the logits of qtune's reload, which the export itself checked against the in-memory quantized model.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import qtune  # noqa: E402
from qtune.export import export  # noqa: E402
from qtune.export.gguf import write_gguf  # noqa: E402
from tests.export.helpers import QUANT, make_base, make_run  # noqa: E402


@pytest.fixture(scope="module")
def gguf_base(export_root) -> Path:
    """The tiny float base quantized to Q4_1 and written as a GGUF file by qtune."""
    from transformers import AutoTokenizer

    path = export_root / "base-q4_1.gguf"
    if not path.is_file():
        folder = make_base(export_root)
        model = qtune.load_model(folder, qtune.QTuneConfig("gguf_q4_1", compute_dtype="float32"), dtype=torch.float32)
        write_gguf(model, path, tokenizer=AutoTokenizer.from_pretrained(folder))
    return path


def _transformers_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def _qtune_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = qtune.load_model(path, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 17, 33, 90, 120, 7, 64, 250, 3, 11, 42, 19]])


def test_hf_base_exports_gguf_of_the_chosen_type(run_for, tmp_path, text_file, lines):
    out = tmp_path / "gguf"
    result = export(run_for("nf4"), out, mode="quantized", format="gguf", gguf_type="q5_1", heldout=str(text_file),
                    heldout_tokens=256, heldout_window=64, log=lines.append)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.gguf", "qtune_export.json"]
    assert result.format == "gguf_q5_1" and result.layout == "gguf" and len(result.layers) == 14
    assert result.verify is not None and result.verify.rel == 0.0  # qtune's reload vs the in-memory model
    assert all(0.9 < e.kept < 1.1 for e in result.layers)  # Q5_1 keeps the (large, random) LoRA change
    assert set(result.heldout) >= {"trained", "merged fp32", "quantized"}
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == "Q5_1" and types["token_embd.weight"] == "F16"
    torch.testing.assert_close(_transformers_logits(out / "model.gguf", IDS), _qtune_logits(out / "model.gguf", IDS),
                               rtol=1e-4, atol=1e-4)
    assert "model.gguf" in (out / "README.md").read_text() and any("Q5_1" in line for line in lines)


def test_gguf_base_unchanged_adapter_gives_back_the_base_file(export_root, gguf_base, tmp_path):
    run = make_run(export_root, "run-gguf-zero", {"format": "pretrained"}, model=gguf_base, lora_scale=0.0)
    result = export(run, tmp_path / "o", mode="quantized", format="gguf")
    assert result.layers == [] and result.format == "gguf"
    assert (tmp_path / "o" / "model.gguf").read_bytes() == gguf_base.read_bytes()


def test_gguf_base_trained_adapter_back_into_its_types(export_root, gguf_base, tmp_path):
    run = make_run(export_root, "run-gguf", {"format": "pretrained"}, model=gguf_base)
    result = export(run, tmp_path / "o", mode="quantized", format="gguf")
    file = tmp_path / "o" / "model.gguf"
    assert len(result.layers) == 14 and {e.format for e in result.layers} == {"gguf_q4_1"}
    assert all(e.kept is not None and 0.9 < e.kept < 1.1 for e in result.layers)
    assert result.verify.rel == 0.0
    src, new = gguf.GGUFReader(str(gguf_base)), gguf.GGUFReader(str(file))
    assert [(t.name, t.tensor_type) for t in src.tensors] == [(t.name, t.tensor_type) for t in new.tensors]
    changed = {t.name for a, t in zip(src.tensors, new.tensors) if not np.array_equal(a.data, t.data)}
    assert {n.rsplit(".", 2)[-2] for n in changed} == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                      "ffn_up", "ffn_down"}  # norms/embeddings untouched
    assert {k for k in src.fields} == {k for k in new.fields}
    torch.testing.assert_close(_transformers_logits(file, IDS), _qtune_logits(file, IDS), rtol=1e-4, atol=1e-4)


# -- refusals: one line, nothing written ------------------------------------------------------------------
def test_gguf_base_quantization_aware_adapter_merges_exactly_into_the_offsets(export_root, gguf_base, tmp_path):
    # a QA-LoRA adapter on Q4_1 layers: the change goes into each block's fp16 offset m; d and the codes keep their
    # bytes, and the written file computes the trained model's logits up to the offsets' fp16 rounding
    run = make_run(export_root, "run-gguf-qa", {"format": "pretrained"}, model=gguf_base, quantization_aware=True)
    lines: list[str] = []
    src = qtune.export.load_source(run)
    with torch.no_grad():
        trained = src.model(IDS).logits
    result = export(src, tmp_path / "o", mode="quantized", format="gguf", log=lines.append)
    assert any("exactly into the offsets" in line for line in lines)
    assert len(result.layers) == 14 and all(0.99 < e.kept < 1.01 for e in result.layers)
    file = tmp_path / "o" / "model.gguf"
    before = {t.name: t for t in gguf.GGUFReader(str(gguf_base)).tensors}
    changed = 0
    for t in gguf.GGUFReader(str(file)).tensors:
        old = np.asarray(before[t.name].data).view(np.uint8)
        new = np.asarray(t.data).view(np.uint8)
        assert t.tensor_type == before[t.name].tensor_type, t.name
        if t.tensor_type.name != "Q4_1":
            assert np.array_equal(old, new), t.name  # float tensors: the source's bytes
            continue
        blocks_old, blocks_new = old.reshape(-1, 20), new.reshape(-1, 20)
        assert np.array_equal(blocks_old[:, :2], blocks_new[:, :2]), t.name     # d
        assert np.array_equal(blocks_old[:, 4:], blocks_new[:, 4:]), t.name     # the codes
        changed += int(not np.array_equal(blocks_old[:, 2:4], blocks_new[:, 2:4]))  # m moved
    assert changed == 14
    got = _qtune_logits(file, IDS)
    scale = trained.abs().max()
    assert (got - trained).abs().max() / scale < 2e-3  # fp16 rounding of the offsets only
    torch.testing.assert_close(_transformers_logits(file, IDS), got, rtol=1e-4, atol=1e-4)


def test_gguf_type_for_a_gguf_base_and_missing_for_hf_base(export_root, gguf_base, run_for, tmp_path):
    run = make_run(export_root, "run-gguf-zero", {"format": "pretrained"}, model=gguf_base, lora_scale=0.0)
    with pytest.raises(ValueError, match=r"--gguf-type applies to Hugging Face bases; the base base-q4_1\.gguf"):
        export(run, tmp_path / "a", mode="quantized", format="gguf", gguf_type="q8_0")
    with pytest.raises(ValueError, match=r"on a Hugging Face base needs --gguf-type"):
        export(run_for("nf4"), tmp_path / "b", mode="quantized", format="gguf")
    with pytest.raises(ValueError, match=r"--gguf-type applies with --format gguf only"):
        export(run_for("nf4"), tmp_path / "c", mode="quantized", format="nf4", gguf_type="q8_0")
    assert not list(tmp_path.iterdir())


def test_changed_k_quant_layer_is_refused(export_root, tmp_path):
    from tests.integrations.test_gguf import write_tiny_llama

    base = write_tiny_llama(export_root / "k-quants.gguf")
    run = make_run(export_root, "run-kquants", {"format": "pretrained"}, model=base)
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.k_proj: the adapter changed it, and its "
                                         r"source type Q4_K has no quantizer") as e:
        export(run, tmp_path / "o", mode="quantized", format="gguf")
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


def test_quantization_aware_adapter_on_a_base_without_offsets_is_refused(export_root, gguf_base, tmp_path, capsys):
    """The QA adapter trained on the Q4_1 file, exported onto the float folder quantized to Q4_0 (same shapes, no
    offsets): refused while the adapter loads, naming its adapter_config.json and the layer; nothing written."""
    from qtune.cli.main import main

    run = make_run(export_root, "run-gguf-qa", {"format": "pretrained"}, model=gguf_base, quantization_aware=True)
    folder = make_base(export_root)
    with pytest.raises(ValueError) as e:
        export(run, tmp_path / "o", mode="quantized", format="gguf", base=str(folder), base_format="gguf_q4_0")
    msg = str(e.value)
    assert msg.startswith(f"{run / 'adapter' / 'adapter_config.json'}: quantization-aware LoRA: layer "
                          "model.layers.0.self_attn.q_proj (format gguf_q4_0) has no per-group float offset"), msg
    assert "\n" not in msg and not list(tmp_path.iterdir())  # no output folder, no temporary folder
    code = main(["export", str(run), "--mode", "quantized", "--format", "gguf", "--base", str(folder),
                 "--base-format", "gguf_q4_0", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code != 0 and "adapter_config.json: quantization-aware LoRA: layer model.layers.0" in err
    assert _one_error_line(err) and not list(tmp_path.iterdir())


def _one_error_line(err: str) -> bool:
    """One ``qtune ...: error`` line and no traceback (progress bars of model loading aside)."""
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    return len(lines) == 1 and "Traceback" not in err


def test_cli_gguf_export_and_refusals(run_for, tmp_path, capsys):
    from qtune.cli.main import main

    out = tmp_path / "o"
    code = main(["export", str(run_for("none")), "--mode", "quantized", "--format", "gguf", "--gguf-type", "q8_0",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert gguf.GGUFReader(str(out / "model.gguf")).fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    before = (out / "model.gguf").read_bytes()
    code = main(["export", str(run_for("none")), "--mode", "quantized", "--format", "gguf", "--gguf-type", "q8_0",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "already exists" in err and _one_error_line(err)
    assert (out / "model.gguf").read_bytes() == before
    code = main(["export", str(run_for("gpt2")), "--mode", "quantized", "--format", "gguf", "--gguf-type", "q8_0",
                 "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert code != 0 and "architecture 'gpt2': qtune writes GGUF for llama, mistral, qwen2" in err
    assert _one_error_line(err) and not (tmp_path / "g").exists()
    code = main(["export", str(run_for("none")), "--mode", "merged", "--gguf-type", "q8_0",
                 "--out", str(tmp_path / "m")])
    assert code != 0 and "--gguf-type applies to --mode quantized only" in capsys.readouterr().err


def test_help_documents_gguf(capsys):
    from qtune.cli.main import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert "--gguf-type" in text and "--format gguf" in text
