"""Fixtures: tiny random models of every supported architecture, saved once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.integrations.tiny_models import ARCHS, make_tiny, make_tokenizer


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_path(tiny_root):
    """``tiny_path(arch)`` → folder of a saved tiny float model of ``arch`` (built on first use)."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny(arch, tiny_root / arch)
        return made[arch]

    return get


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tiny_path) -> Path:
    """A tiny Llama folder with a 128-token BPE tokenizer trained on Emma."""
    from qtune.assets import austen_text

    path = tiny_path("llama")
    make_tokenizer(path, austen_text("emma")[:100_000])
    return path


__all__ = ["ARCHS"]
