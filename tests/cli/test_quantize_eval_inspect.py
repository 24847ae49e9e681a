"""``qtune quantize`` / ``qtune eval`` / ``qtune inspect`` end to end on a tiny model with a tiny tokenizer."""
from __future__ import annotations

import json

import pytest

from qtune.cli.main import main
from qtune.integrations.layouts import load_model
from qtune.nn import Linear4bit, LinearGPTQ, QuantLinear
from tests.integrations.tiny_models import make_tiny, make_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from qtune.assets import austen_text

    path = make_tiny("llama", tmp_path_factory.mktemp("cli") / "llama")
    make_tokenizer(path, austen_text("emma")[:60_000])
    return path


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    from qtune.assets import austen_text

    root = tmp_path_factory.mktemp("texts")
    (root / "cal.txt").write_text(austen_text("emma")[:40_000])
    (root / "eval.txt").write_text(austen_text("persuasion")[:20_000])
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_rtn_formats_and_layouts(model_dir, tmp_path, capsys):
    code, out, _ = run(capsys, "quantize", model_dir, "--format", "nf4", "--double-quant", "--out", tmp_path / "nf4")
    assert code == 0 and "layers quantized to nf4" in out
    q = load_model(tmp_path / "nf4")
    assert all(isinstance(m, Linear4bit) and m.nested_absmax is not None
               for m in q.modules() if isinstance(m, QuantLinear))
    assert (tmp_path / "nf4" / "tokenizer.json").exists()
    code, _, _ = run(capsys, "quantize", model_dir, "--format", "llm_int8", "--layout", "bnb", "--out", tmp_path / "b")
    assert code == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    code, _, _ = run(capsys, "quantize", model_dir, "--format", "rtn", "--bits", "8", "--group-size", "32",
                     "--override", "down_proj=skip", "--layout", "gptq", "--out", tmp_path / "r")
    assert code == 0
    r = load_model(tmp_path / "r")
    assert not isinstance(r.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(r.model.layers[0].mlp.up_proj, LinearGPTQ) and r.model.layers[0].mlp.up_proj.bits == 8
    # qtune's own layout takes a group size that does not divide in_features (a partial last group)
    code, _, err = run(capsys, "quantize", model_dir, "--format", "rtn", "--group-size", "48", "--out", tmp_path / "p")
    assert code == 0, err
    assert load_model(tmp_path / "p").model.layers[0].self_attn.q_proj.scales.shape == (2, 64)


def test_quantize_gptq_then_eval_and_inspect(model_dir, texts, tmp_path, capsys):
    out_dir = tmp_path / "gptq"
    code, out, err = run(capsys, "quantize", model_dir, "--format", "gptq", "--bits", "4", "--group-size", "32",
                         "--no-static-groups", "--no-sym", "--calibration", texts / "cal.txt", "--samples", "16",
                         "--seq-len", "64", "--out", out_dir, "--layout", "gptq")
    assert code == 0, err
    assert "GPTQ" in err  # the per-block progress bar
    qc = json.loads((out_dir / "quantize_config.json").read_text())
    # classic act-order: the checkpoint's g_idx is permuted, and says so
    assert qc["desc_act"] is True and qc["static_groups"] is False and qc["sym"] is False and qc["group_size"] == 32
    code, out, err = run(capsys, "eval", out_dir, "--text", texts / "eval.txt", "--tokens", "1024", "--seq-len", "128")
    assert code == 0, err
    assert "gptq 4-bit g32" in out and "perplexity on 1024 tokens" in out
    code, out, _ = run(capsys, "inspect", out_dir, "--reference", model_dir, "--plot", tmp_path / "p.png")
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 10_000
    assert "model.layers.0.self_attn.q_proj" in out and "gptq" in out and "rel.err" in out and "total (15 layers)" in out


def _gptq_checkpoint(folder) -> tuple[dict, dict[str, "torch.Tensor"]]:
    """``quantize_config.json`` and the ``qweight``/``g_idx`` tensors of a GPTQ-layout folder."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    return (json.loads((folder / "quantize_config.json").read_text()),
            {k: v for k, v in tensors.items() if k.endswith((".qweight", ".g_idx"))})


def test_quantize_gptq_default_ordering_and_its_switches(model_dir, texts, tmp_path, capsys):
    """``qtune quantize --format gptq`` quantizes in act-order with static groups unless told otherwise: trivial
    ``g_idx`` (``desc_act: false`` in the checkpoint) and codes other than group-aware order's; ``--no-act-order``
    gives group-aware order, where ``static_groups`` (on by default) changes nothing."""
    import torch

    runs = {"default": (), "explicit": ("--act-order", "--static-groups"), "no-act-order": ("--no-act-order",),
            "no-act-order-no-static": ("--no-act-order", "--no-static-groups")}
    got = {}
    for name, flags in runs.items():
        code, _, err = run(capsys, "quantize", model_dir, "--format", "gptq", "--group-size", "32", *flags,
                           "--calibration", texts / "cal.txt", "--samples", "8", "--seq-len", "32", "--no-progress",
                           "--out", tmp_path / name, "--layout", "gptq")
        assert code == 0, err
        got[name] = _gptq_checkpoint(tmp_path / name)
    qc, tensors = got["default"]
    assert (qc["desc_act"], qc["static_groups"], qc["act_group_aware"]) == (False, True, False)
    g_idx = {k: v for k, v in tensors.items() if k.endswith(".g_idx")}
    assert g_idx and all(torch.equal(v, torch.arange(v.numel(), dtype=v.dtype) // 32) for v in g_idx.values())
    assert all(torch.equal(v, got["explicit"][1][k]) for k, v in tensors.items())
    qc_gar, gar = got["no-act-order"]
    assert (qc_gar["desc_act"], qc_gar["static_groups"], qc_gar["act_group_aware"]) == (False, False, True)
    assert all(torch.equal(v, got["no-act-order-no-static"][1][k]) for k, v in gar.items())
    differs = [k for k in tensors if k.endswith(".qweight") and not torch.equal(tensors[k], gar[k])]
    assert len(differs) == len(g_idx), differs  # act-order found other codes in every layer
    assert load_model(tmp_path / "default").model.layers[0].self_attn.q_proj.config.ordering == "act-order-static"


def test_eval_compares_formats_side_by_side(model_dir, texts, capsys):
    code, out, err = run(capsys, "eval", model_dir, "--text", texts / "eval.txt", "--tokens", "1024", "--seq-len",
                         "128", "--quant", "nf4", "nf4-dq", "llm_int8", "rtn:bits=4,group_size=32", "gptq:group_size=32",
                         "--calibration", texts / "cal.txt", "--samples", "8", "--cal-seq-len", "64", "--no-progress")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"float32", "nf4", "nf4-dq", "llm_int8", "rtn:bits=4,group_size=32", "gptq:group_size=32"}
    assert float(rows["float32"][1]) == 32.0
    assert all(float(r[2]) > 1 for r in rows.values())  # perplexities


def test_eval_float_model_alone(model_dir, texts, capsys):
    # without --quant the float model is the only row (this once failed on iterating a missing --quant)
    code, out, err = run(capsys, "eval", model_dir, "--text", texts / "eval.txt", "--tokens", "256", "--seq-len", "128")
    assert code == 0, err
    rows = out.splitlines()[2:]
    assert len(rows) == 1 and rows[0].split()[0] == "float32" and float(rows[0].split()[2]) > 1


def test_inspect_float_model_quantizes_in_memory(model_dir, tmp_path, capsys):
    code, out, _ = run(capsys, "inspect", model_dir, "--format", "fp4", "--layer", "model.layers.1.mlp.up_proj",
                       "--plot", tmp_path / "h.png")
    assert code == 0 and "fp4" in out and (tmp_path / "h.png").exists()


@pytest.mark.parametrize("argv,message", [
    (["--format", "gptq", "--calibration", "{tmp}/missing.txt"], "calibration file .*missing.txt does not exist"),
    (["--format", "gptq", "--group-size", "48", "--calibration", "{cal}", "--layout", "gptq"],
     r"layer model\.layers\.0\.self_attn\.q_proj: group_size 48 does not divide in_features 64"),
    (["--format", "rtn", "--group-size", "48", "--layout", "gptq"], "group_size 48 does not divide"),
    (["--format", "gptq"], "needs --calibration"),
    (["--format", "nf4", "--layout", "gptq"], "--layout gptq holds gptq/rtn layers"),
])
def test_bad_input_one_line_error_nothing_written(argv, message, model_dir, texts, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, cal=texts / "cal.txt") for a in argv]
    code, out, err = run(capsys, "quantize", model_dir, *argv, "--out", tmp_path / "out")
    assert code == 1
    lines = err.splitlines()  # exactly one line: no traceback, usage block, progress bar or warning
    assert len(lines) == 1 and lines[0].startswith("qtune quantize: error: "), err
    assert __import__("re").search(message, lines[0]), err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary folder left behind"


def test_existing_output_and_corrupt_model(model_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    code, _, err = run(capsys, "quantize", model_dir, "--format", "nf4", "--out", tmp_path / "taken")
    assert code == 1 and "already exists" in err and (tmp_path / "taken" / "x").read_text() == "keep"
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "quantize", broken, "--format", "nf4", "--out", tmp_path / "o")
    assert code == 1 and "model.safetensors: truncated safetensors file" in err and not (tmp_path / "o").exists()
    code, _, err = run(capsys, "eval", model_dir, "--text", tmp_path / "none.txt")
    assert code == 1 and "none.txt does not exist" in err


def test_quantize_flags_come_from_the_format_registry(capsys):
    import argparse

    from qtune.cli.quantize import add_format_options
    from qtune.formats import GPTQConfig, format_names, get_format

    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    for title, flags in {"nf4/fp4:": ("--double-quant", "--blocksize"), "gptq/rtn/affine:": ("--bits", "--group-size"),
                         "gptq/rtn:": ("--sym",), "affine:": ("--iters",),
                         "gptq:": ("--act-order", "--damp-percent"), "llm_int8:": ("--threshold",),
                         "calibration (gptq):": ("--calibration",)}.items():
        section = out[out.index("\n" + title):]
        assert all(f in section.split("\n\n")[0] for f in flags), (title, section[:300])
    for name in format_names():
        for opt in get_format(name).cli_options:
            assert opt.cli_flag in out
    assert GPTQConfig.cli_options[3].cli_flag == "--act-order"
    for flag in ("--no-act-order", "--no-static-groups", "--no-act-group-aware"):  # the defaults can be turned off
        assert flag in out
    p = argparse.ArgumentParser()
    add_format_options(p)
    args = p.parse_args(["--act-order", "--no-sym", "--bits", "3"])
    assert (args.desc_act, args.sym, args.bits, args.blocksize, args.true_sequential) == (True, False, 3, None, None)
    args = p.parse_args(["--no-act-order", "--no-static-groups"])
    assert (args.desc_act, args.static_groups, args.act_group_aware) == (False, False, None)
