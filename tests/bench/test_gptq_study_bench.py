"""``python -m qtune.bench.gptq_study`` on a tiny random model: the rows given on the command line, with their specs."""
from __future__ import annotations

import math

import pytest

from qtune.bench import gptq_study
from tests.bench.conftest import check_results_file


def test_gptq_study_measures_the_rows_it_is_given(tiny_model_dir, tmp_path, one_thread):
    model, out = tiny_model_dir / "model", tmp_path / "study.json"
    text = str(model.parent / "train.txt")
    rows = ["natural=qtune:gptq:bits=3,group_size=32,desc_act=false,act_group_aware=false",
            "static damp 0.1=qtune:gptq:bits=3,group_size=32,desc_act=true,static_groups=true,damp_percent=0.1"]
    argv = ["--model", str(model), "--text", text, "--calibration", text, "--tokens", "256", "--seq-len", "64",
            "--samples", "2", "--cal-seq-len", "64", "--batch-size", "2", "--out", str(out)]
    assert gptq_study.main(argv + [a for r in rows for a in ("--row", r)]) == 0
    r = check_results_file(out, "perplexity", f"python -m qtune.bench.gptq_study --model {model}")["results"]
    assert r["complete"] is True and r["settings"]["samples"] == 2 and r["eval_tokens"] == 256
    assert [row["name"] for row in r["rows"]] == ["fp32", "natural", "static damp 0.1"]
    assert [row["spec"] for row in r["rows"]] == ["float"] + ["qtune:" + row.split("=qtune:")[1] for row in rows]
    natural, static = r["rows"][1]["config"], r["rows"][2]["config"]
    assert (natural["format"], natural["bits"], natural["group_size"], natural["act_group_aware"], natural["desc_act"],
            natural["damp_percent"]) == ("gptq", 3, 32, False, False, 0.01)
    assert (static["desc_act"], static["static_groups"], static["damp_percent"]) == (True, True, 0.1)
    for row in r["rows"][1:]:
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1 and row["quantize_cpu_s"] > 0
        assert 3 < row["bits_per_param"] < 5  # 3-bit codes, a scale and zero per 32 weights, g_idx (tiny layers)


def test_gptq_study_parses_gptqmodel_specs_and_refuses_bad_rows():
    assert gptq_study.parse_gptqmodel_spec("bits=3,damp_percent=0.01,desc_act=true,act_group_aware=False") == \
        {"bits": 3, "damp_percent": 0.01, "desc_act": True, "act_group_aware": False}
    with pytest.raises(SystemExit, match="not a bool or a number"):
        gptq_study.parse_gptqmodel_spec("bits=three")
    with pytest.raises(SystemExit, match="NAME=qtune"):
        gptq_study.parse_row("gptq:bits=3")
    with pytest.raises(SystemExit, match="names must be unique"):
        gptq_study.main(["--row", "a=qtune:gptq", "--row", "a=qtune:gptq"])
