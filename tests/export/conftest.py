"""Session fixtures: tiny bases and runs to export (built once; each export reloads its own copy)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.export.helpers import QUANT, make_adapter_dir, make_base, make_gptq_base, make_run


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every export test module runs its tiny models on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def export_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    make_base(root)
    return root


@pytest.fixture(scope="session")
def text_file(export_root) -> Path:
    return export_root / "text.txt"


@pytest.fixture(scope="session")
def run_for(export_root):
    """``run_for(key)`` → a run folder whose adapter was trained on the base of ``QUANT[key]``; ``"gptq"`` is a
    bare adapter folder on a pre-quantized GPTQ base (calibrated once); ``"dora"``/``"gpt2"`` are NF4/FP4 variants."""
    made: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in made:
            if key == "gptq":
                base = make_gptq_base(export_root, make_base(export_root), export_root / "text.txt")
                made[key] = make_adapter_dir(export_root, "peft-adapter-gptq", base)
            elif key == "dora":
                made[key] = make_run(export_root, "run-dora", QUANT["fp4"], use_dora=True)
            elif key == "gpt2":
                made[key] = make_run(export_root, "run-gpt2", QUANT["nf4"], arch="gpt2")
            else:
                made[key] = make_run(export_root, f"run-{key}", QUANT[key])
        return made[key]

    return get


@pytest.fixture
def lines():
    """Collects an export's output lines (pass ``log=lines.append``)."""
    return []
