"""``python -m qtune.bench.formats`` at a tiny size: it runs and writes its results file (nothing about speed)."""
from __future__ import annotations

import math

import pytest

from qtune.bench import formats
from tests.bench.conftest import check_results_file
from tests.conftest import bnb_available

# the formats bitsandbytes also has, so their rows carry its times and the ratio
BNB_FORMATS = {"nf4", "nf4-dq", "fp4", "int8", "llm_int8"}


def test_formats_bench_writes_results(tmp_path, one_thread):
    out = tmp_path / "formats.json"
    argv = ["--out-features", "64", "--in-features", "128", "--tokens", "8", "--repeat", "1", "--dtype", "fp32",
            "--out", str(out)]
    assert formats.main(argv) == 0
    payload = check_results_file(out, "formats", "python -m qtune.bench.formats --out-features 64")
    r = payload["results"]
    assert r["settings"] == {"out_features": 64, "in_features": 128, "tokens": 8, "dtype": "fp32", "repeat": 1}
    assert [row["format"] for row in r["rows"]] == ["nf4", "nf4-dq", "fp4", "int8", "llm_int8", "int8-zp-g128",
                                                    "rtn4-g128", "gptq4-g128"]
    assert set(r["dense_ms"]) == {"forward", "fwd+bwd"}
    for row in r["rows"]:
        assert set(row["qtune_ms"]) == set(formats.METRICS)
        assert all(math.isfinite(v) and v > 0 for v in row["qtune_ms"].values())
        assert row["fwd_bwd_over_dense"] == pytest.approx(row["qtune_ms"]["fwd+bwd"] / r["dense_ms"]["fwd+bwd"])
        if bnb_available() and row["format"] in BNB_FORMATS:
            assert set(row["bnb_ms"]) == set(formats.METRICS)
            assert row["ratio"] == pytest.approx({c: row["qtune_ms"][c] / row["bnb_ms"][c] for c in formats.METRICS})
        else:
            assert row["bnb_ms"] is None and row["ratio"] is None


def test_formats_bench_only_and_env_recorded(tmp_path, one_thread, monkeypatch):
    # an emulated AVX2-only run must say so in its file: the variables that lower the kernels are recorded
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    out = tmp_path / "formats-avx2.json"
    assert formats.main(["--out-features", "64", "--in-features", "64", "--tokens", "4", "--repeat", "1",
                         "--dtype", "fp32", "--skip-gptq", "--only", "nf4", "int8", "--out", str(out)]) == 0
    payload = check_results_file(out, "formats", "python -m qtune.bench.formats")
    assert [row["format"] for row in payload["results"]["rows"]] == ["nf4", "int8"]
    assert payload["machine"]["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    with pytest.raises(SystemExit, match="unknown formats"):
        formats.main(["--only", "nf5", "--out", str(out)])
