"""Shared pieces of the bench tests: a tiny model folder with a tokenizer, and the results-file checks."""
from __future__ import annotations

from pathlib import Path

import pytest

from qtune.bench.results import SCHEMA_KEYS, read_results
from tests.train.models import CORPUS, save_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A float tiny Llama (hidden 64, 2 layers, 256 positions) + BPE tokenizer, and ``train.txt`` beside it."""
    root = tmp_path_factory.mktemp("bench-tiny")
    save_tiny_model_dir(root / "model")
    (root / "train.txt").write_text("\n\n".join(CORPUS[i:i + 300] for i in range(0, len(CORPUS) - 300, 37)) * 2)
    return root


def check_results_file(path: Path, benchmark: str, command_prefix: str) -> dict:
    """The file at ``path`` has the common schema, was written by ``benchmark``, records its command and the machine."""
    payload = read_results(path, benchmark=benchmark)
    assert list(payload) == list(SCHEMA_KEYS)
    assert payload["command"].startswith(command_prefix), payload["command"]
    m = payload["machine"]
    for key in ("cpu_capability", "cores", "torch_threads", "load_average", "env", "versions", "qtune"):
        assert key in m, key
    assert m["versions"]["torch"] and m["cores"] >= 1
    assert m["qtune"]["auto_dtype"] in ("float32", "bfloat16") and m["qtune"]["int8_matmul"] in ("int_mm", "fp32")
    assert m["qtune"]["auto_dtype_reason"] and m["qtune"]["int8_matmul_reason"]
    return payload
