"""``python -m qtune.bench.moe`` at a tiny size: it runs the three models and writes its results file (nothing
about speed; the memory ratio is arithmetic on the tensors, checked against the tensors)."""
from __future__ import annotations

import math

from qtune.bench import moe
from tests.bench.conftest import check_results_file
from tests.conftest import bnb_available


def test_moe_bench_writes_results(tmp_path, one_thread):
    out = tmp_path / "moe.json"
    argv = ["--experts", "4", "--hidden", "128", "--intermediate", "64", "--layers", "1", "--vocab", "64",
            "--batch", "1", "--seq", "8", "--steps", "1", "--dtype", "fp32", "--out", str(out)]
    if not bnb_available():
        argv.append("--skip-bnb")
    assert moe.main(argv) == 0
    payload = check_results_file(out, "moe", "python -m qtune.bench.moe --experts 4")
    r = payload["results"]
    assert r["settings"]["dtype"] == "float32" and r["settings"]["experts"] == 4
    config = moe.moe_config(experts=4, hidden=128, intermediate=64, layers=1, top_k=2, vocab=64)
    assert r["parameters"] == moe.float_parameters(config) and r["bf16_bytes"] == 2 * r["parameters"]
    rows = {row["model"]: row for row in r["rows"]}
    assert set(rows) == {"float", "qtune"} | ({"bnb"} if bnb_available() else set())
    # fp32: every parameter, 4 bytes, and the rotary tables (buffers)
    assert 4 * r["parameters"] < rows["float"]["memory_bytes"] <= 4 * r["parameters"] + 1024
    assert rows["qtune"]["memory_bytes"] < rows["float"]["memory_bytes"] / 3  # experts and attention in NF4
    if "bnb" in rows:  # bitsandbytes quantizes the attention only: the experts stay in fp32
        assert rows["qtune"]["memory_bytes"] < rows["bnb"]["memory_bytes"] < rows["float"]["memory_bytes"]
    for row in rows.values():
        assert math.isfinite(row["step_s"]) and row["step_s"] > 0
        assert row["step_over_float"] == row["step_s"] / rows["float"]["step_s"]
        assert row["memory_over_bf16"] == row["memory_bytes"] / r["bf16_bytes"]
    assert set(r["met"]) == {"memory", "step"} and r["load_average_end"] is not None
