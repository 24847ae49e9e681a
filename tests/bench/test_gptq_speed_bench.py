"""``python -m qtune.bench.gptq_speed`` on a tiny random model (qtune's side; GPTQModel's needs its folder)."""
from __future__ import annotations

from qtune.bench import gptq_speed
from tests.bench.conftest import check_results_file


def test_gptq_speed_bench_times_qtune_per_part(tiny_model_dir, tmp_path, one_thread):
    model, out = tiny_model_dir / "model", tmp_path / "gptq-speed.json"
    argv = ["--model", str(model), "--calibration", str(model.parent / "train.txt"), "--samples", "2",
            "--seq-len", "32", "--batch-size", "2", "--spec", "gptq:bits=4,group_size=32", "--skip-gptqmodel",
            "--out", str(out)]
    assert gptq_speed.main(argv) == 0
    r = check_results_file(out, "gptq-speed", f"python -m qtune.bench.gptq_speed --model {model}")["results"]
    q = r["qtune"]
    assert r["settings"]["samples"] == 2 and "gptqmodel" not in r and r["cpu"]
    assert q["config"]["desc_act"] is True and q["config"]["static_groups"] is True  # the default ordering
    assert q["config"]["group_size"] == 32
    assert set(q["parts_s"]) == {"forwards", "hessians", "solve"} and len(q["block_s"]) >= 1
    assert q["quantize_s"] > 0 and q["quantize_cpu_s"] > 0
    assert sum(q["parts_s"].values()) <= q["quantize_s"] + 0.05
