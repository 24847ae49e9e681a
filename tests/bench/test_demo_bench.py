"""``python -m qtune.bench.demo`` with the demo recipe shrunk to a tiny model and one step (nothing about speed)."""
from __future__ import annotations

import pytest

from qtune.bench import demo
from tests.bench.conftest import check_results_file
from tests.conftest import bnb_available


def _tiny_overrides(root):
    text = str(root / "train.txt")
    return [f"model.path={root / 'model'}", "model.dtype=auto", "quantization.compute_dtype=auto",
            f"dataset.train.source={text}", "dataset.train.chunk_chars=300", f"dataset.perplexity.source={text}",
            "dataset.perplexity.max_tokens=256", "dataset.perplexity.window=64", "training.max_steps=1",
            "training.max_length=64", "training.logging_steps=1", "output.plot=false", "output.report_to=none"]


@pytest.mark.skipif(not bnb_available(), reason="the bitsandbytes row needs bitsandbytes")
def test_demo_bench_both_backends(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children: one thread each on a shared CPU
    out = tmp_path / "demo.json"
    argv = ["--backend", "bitsandbytes", "--workdir", str(tmp_path / "runs"), "--out", str(out), "--",
            *_tiny_overrides(tiny_model_dir)]
    assert demo.main(argv) == 0
    payload = check_results_file(out, "demo", "python -m qtune.bench.demo --backend bitsandbytes")
    r = payload["results"]
    assert r["recipe"] == demo.DEMO_RECIPE and r["overrides"] == _tiny_overrides(tiny_model_dir)
    ours, theirs = r["runs"]
    assert (ours["backend"], theirs["backend"]) == ("qtune", "bitsandbytes")
    for run in (ours, theirs):
        assert run["status"] == "finished" and run["steps"] == 1
        assert run["wall_s"] > run["train_s"] > 0 and run["step_s"] > 0
        # the child's own peak: the whole process with torch and the model, far above nothing, far below 4 GiB
        assert 0.1 < run["peak_rss_gib"] < 4
        # the dtypes the run resolved from auto, and its stated reason, as the run's own log gives them
        assert run["model_dtype"] in ("float32", "bfloat16") and run["compute_dtype"] == run["model_dtype"]
        assert [line.split(" (")[0] for line in run["dtype_choice"]] == [
            f"model.dtype: auto -> {run['model_dtype']}", f"quantization.compute_dtype: auto -> {run['compute_dtype']}"]
        assert run["perplexity_after"] > 1
        assert (tmp_path / "runs" / run["backend"] / "summary.json").exists()
    assert ours["command"].startswith(f"qtune train {demo.DEMO_RECIPE} model.path=")
    assert "quantization.backend=bitsandbytes" in theirs["command"]
    assert ours["perplexity_before"] > 1 and theirs["perplexity_before"] is None  # bitsandbytes on CPU: skipped
    assert r["ratios_qtune_over_bitsandbytes"] == pytest.approx(
        {k: ours[k] / theirs[k] for k in ("step_s", "wall_s", "peak_rss_gib")})


def test_demo_bench_failed_run_names_its_log(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "demo.json"
    with pytest.raises(RuntimeError, match=r"backend qtune exited with \d+ \(log .*qtune\.log\)"):
        demo.main(["--workdir", str(tmp_path / "runs"), "--out", str(out), "--",
                   *_tiny_overrides(tiny_model_dir), "training.max_steps=many"])
    assert not out.exists()
