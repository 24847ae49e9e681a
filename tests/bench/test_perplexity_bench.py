"""``python -m qtune.bench.perplexity`` on a tiny random model: every row runs and lands in the results file."""
from __future__ import annotations

import json
import math

import pytest

from qtune.bench import perplexity
from tests.bench.conftest import check_results_file
from tests.conftest import bnb_available

QTUNE_ROWS = ["fp32", "qtune nf4", "qtune nf4+dq", "qtune fp4", "qtune int8", "qtune llm_int8", "qtune rtn-4 g128",
              "qtune gptq-4 g128", "qtune rtn-4 g128 asym", "qtune gptq-4 g128 asym",
              "qtune gptq-4 g128 asym act-order", "qtune gptq-4 g128 asym group-aware", "qtune gptq-4 g128 act-order",
              "qtune gptq-4 g128 group-aware", "qtune gptq-4 g128 no-order", "qtune affine-4 g64",
              "qtune affine-4 g64 min-max", "qtune affine-4 g128", "qtune affine-4 g128 min-max",
              "qtune affine-4 g64 scale+offset",
              "qtune affine-3 g64", "qtune affine-3 g64 min-max", "qtune affine-2 g64", "qtune gptq-3 g128",
              "qtune gptq-3 g128 act-order", "qtune gptq-3 g128 no-order", "qtune gptq-3 g128 group-aware",
              "qtune gptq-8 g128", "qtune gptq-8 g128 group-aware", "qtune gptq-3 g128 damp 0.05",
              "qtune gptq-2 g128", "qtune gptq-2 g128 act-order", "qtune gptq-2 g128 group-aware"]
BNB_ROWS = ["bnb nf4", "bnb nf4+dq", "bnb fp4", "bnb llm_int8", "qtune llm_int8 on bnb bytes",
            "qtune nf4+dq on bnb bytes"]


def _argv(model, out, *extra):
    return ["--model", str(model), "--text", str(model.parent / "train.txt"), "--calibration",
            str(model.parent / "train.txt"), "--tokens", "256", "--seq-len", "64", "--samples", "2",
            "--cal-seq-len", "64", "--batch-size", "2", "--out", str(out), "--skip-gptqmodel", *extra]


def test_perplexity_bench_writes_every_row_and_merges(tiny_model_dir, tmp_path, one_thread):
    model, out = tiny_model_dir / "model", tmp_path / "perplexity.json"
    assert perplexity.main(_argv(model, out)) == 0
    payload = check_results_file(out, "perplexity", f"python -m qtune.bench.perplexity --model {model}")
    r = payload["results"]
    # the calibration size is in the file, so a table states the settings that produced it
    assert r["settings"]["samples"] == 2 and r["settings"]["tokens"] == 256 and r["complete"] is True
    assert r["eval_tokens"] == 256
    names = [row["name"] for row in r["rows"]]
    assert names == QTUNE_ROWS + (BNB_ROWS if bnb_available() else [])
    fp32 = r["rows"][0]["perplexity"]
    for row in r["rows"]:
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1 and row["predicted_tokens"] > 0
        assert row["vs_fp32"] == pytest.approx(row["perplexity"] / fp32 - 1)
        assert row["bits_per_param"] == 32 if row["name"] == "fp32" else 2 < row["bits_per_param"] < 10
        # GPTQ rows carry the quantization's own wall and CPU seconds
        assert ("quantize_s" in row) == (" gptq-" in row["name"])

    # rerunning one row replaces it in place and keeps the others as the file has them (marked here with
    # impossible values); the recorded command then reproduces the whole file
    measured_int8 = next(row["perplexity"] for row in r["rows"] if row["name"] == "qtune int8")
    for row in r["rows"]:
        row["perplexity"] = 999.0 if row["name"] == "qtune int8" else row["perplexity"]
        row["nll"] = 888.0 if row["name"] == "qtune nf4" else row["nll"]
    out.write_text(json.dumps(payload))
    before = {row["name"]: row for row in r["rows"]}
    assert perplexity.main(_argv(model, out, "--only", "qtune int8", "--merge")) == 0
    merged = check_results_file(out, "perplexity", payload["command"] + " && python -m qtune.bench.perplexity")
    assert merged["command"].endswith("--only 'qtune int8' --merge")
    rows = {row["name"]: row for row in merged["results"]["rows"]}
    assert list(rows) == names and merged["results"]["complete"] is True
    assert rows["qtune int8"]["perplexity"] == pytest.approx(measured_int8, rel=1e-6)
    assert rows["qtune nf4"]["nll"] == 888.0
    assert {k: v for k, v in rows.items() if k != "qtune int8"} == {k: v for k, v in before.items()
                                                                    if k != "qtune int8"}


def test_perplexity_merge_refuses_other_settings(tiny_model_dir, tmp_path):
    out = tmp_path / "perplexity.json"
    with pytest.raises(SystemExit, match="does not exist"):
        perplexity.main(_argv(tiny_model_dir / "model", out, "--only", "qtune nf4", "--merge"))
    out.write_text(json.dumps({"benchmark": "perplexity", "command": "python -m qtune.bench.perplexity",
                               "created": "2026-01-01T00:00:00Z", "machine": {}, "complete": True,
                               "results": {"settings": {"samples": 128}, "complete": True, "rows": []}}))
    with pytest.raises(SystemExit, match="other settings.*samples"):
        perplexity.main(_argv(tiny_model_dir / "model", out, "--only", "qtune nf4", "--merge"))


@pytest.mark.slow
def test_gptqmodel_row_quantizes_in_a_child_and_qtune_reads_it(tiny_model_dir, tmp_path, one_thread):
    """The ``gptqmodel ...`` rows: GPTQModel 7.7 (``.deps/gptqmodel``) quantizes the same windows in its own process,
    saves, and qtune evaluates that checkpoint; the row carries GPTQModel's own quantize seconds."""
    from qtune.bench.gptq_speed import default_gptqmodel_path

    if not (default_gptqmodel_path() / "gptqmodel").is_dir():
        pytest.skip(f"GPTQModel not found in {default_gptqmodel_path()} (.ci/run installs it)")
    model, out = tiny_model_dir / "model", tmp_path / "perplexity.json"
    argv = [a for a in _argv(model, out) if a != "--skip-gptqmodel"]
    assert perplexity.main(argv + ["--only", "gptqmodel gptq-4 g128"]) == 0
    rows = {row["name"]: row for row in json.loads(out.read_text())["results"]["rows"]}
    assert list(rows) == ["fp32", "gptqmodel gptq-4 g128"]
    row = rows["gptqmodel gptq-4 g128"]
    assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
    assert 4 < row["bits_per_param"] < 5 and row["quantize_s"] > 0 and row["quantize_cpu_s"] > 0
