"""Training data for recipes: plain text, prompt/completion and conversational datasets.

A recipe's ``dataset.train`` / ``dataset.eval`` names a *source*:

- ``qtune:austen/<novel>``: a public-domain novel bundled with qtune (``emma``, ``persuasion``);
- a local file: ``.txt`` (plain text), ``.json``/``.jsonl``/``.csv``/``.parquet`` (records);
- ``hf:<dataset id>`` (or a bare id): a Hugging Face Hub dataset, read with ``datasets.load_dataset``.

Plain text is cut at blank lines into paragraphs (line breaks inside a paragraph become spaces), and
consecutive paragraphs are joined up to ``chunk_chars`` characters per example; trl's packing then
fills the training sequences. Records keep the columns trl understands: ``text`` (or ``text_field``),
``prompt``/``completion`` (loss on the completion only, trl's default) and ``messages``
(conversational, rendered with the tokenizer's chat template; ``training.assistant_only_loss``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .recipe import ASSET_PREFIX

RECORD_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
FORMAT_COLUMNS = {"text": None, "prompt_completion": ("prompt", "completion"), "conversational": ("messages",)}


def read_text(source: str, *, text_field: str = "text", split: str = "train") -> str:
    """The raw text of a source (a bundled novel, a .txt file, or the text column of a dataset)."""
    if source.startswith(ASSET_PREFIX):
        return _asset_text(source)
    path = Path(source)
    if path.suffix == ".txt" and path.is_file():
        return path.read_text(encoding="utf-8")
    ds = _load_records(source, split)
    if text_field not in ds.column_names:
        raise ValueError(f"{source}: no {text_field!r} column to read text from (columns: {ds.column_names})")
    return "\n\n".join(ds[text_field])


def _asset_text(source: str) -> str:
    name = source[len(ASSET_PREFIX):]
    kind, _, item = name.partition("/")
    if kind != "austen" or not item:
        raise ValueError(f"unknown bundled source {source!r}; use {ASSET_PREFIX}austen/<novel>, e.g. "
                         f"{ASSET_PREFIX}austen/emma")
    from .. import assets
    return assets.austen_text(item)


def paragraphs(text: str) -> list[str]:
    """Paragraphs of a plain text (split at blank lines, inner line breaks joined with spaces)."""
    parts = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    return [" ".join(p.split()) for p in parts if p.strip()]


def chunk_paragraphs(paras: list[str], chunk_chars: int) -> list[str]:
    """Join consecutive paragraphs into examples of at most ``chunk_chars`` characters (a longer
    paragraph stays whole)."""
    out: list[str] = []
    cur = ""
    for p in paras:
        if cur and len(cur) + 2 + len(p) > chunk_chars:
            out.append(cur)
            cur = p
        else:
            cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        out.append(cur)
    return out


def _load_records(source: str, split: str):
    import datasets

    path = Path(source)
    if path.suffix in RECORD_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {path} does not exist")
        return datasets.load_dataset(RECORD_SUFFIXES[path.suffix], data_files=str(path), split=split)
    name = source.removeprefix("hf:")
    return datasets.load_dataset(name, split=split)


def detect_format(columns: list[str], text_field: str = "text") -> str:
    """``text``, ``prompt_completion`` or ``conversational`` from a dataset's columns."""
    if "messages" in columns:
        return "conversational"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if text_field in columns:
        return "text"
    raise ValueError(f"cannot tell the dataset format from its columns {columns}: expected {text_field!r} "
                     "(plain text), 'prompt'+'completion', or 'messages' (conversational)")


def load_dataset(spec: dict[str, Any]):
    """A ``datasets.Dataset`` for one ``dataset.train``/``dataset.eval`` recipe entry.

    Returns:
        ``Dataset`` with the columns trl expects for the format.
    Raises:
        ValueError: the columns do not match the requested ``format``.
    """
    import datasets

    source, fmt, text_field = spec["source"], spec.get("format", "auto"), spec.get("text_field", "text")
    path = Path(source)
    if source.startswith(ASSET_PREFIX) or (path.suffix == ".txt"):
        if fmt not in ("auto", "text"):
            raise ValueError(f"{source}: plain text can only be used with format 'text', not {fmt!r}")
        chunks = chunk_paragraphs(paragraphs(read_text(source)), spec.get("chunk_chars", 2000))
        ds = datasets.Dataset.from_dict({"text": chunks})
        text_field, fmt = "text", "text"
    else:
        ds = _load_records(source, spec.get("split", "train"))
        found = detect_format(ds.column_names, text_field)
        if fmt == "auto":
            fmt = found
        needed = FORMAT_COLUMNS[fmt] or (text_field,)
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise ValueError(f"{source}: format {fmt!r} needs column(s) {missing}; the dataset has {ds.column_names}")
    if text_field != "text" and fmt == "text":
        ds = ds.rename_column(text_field, "text")
    skip, limit = spec.get("skip_examples", 0) or 0, spec.get("max_examples")
    end = len(ds) if limit is None else min(len(ds), skip + limit)
    if skip or end < len(ds):
        ds = ds.select(range(min(skip, len(ds)), end))
    if len(ds) == 0:
        raise ValueError(f"{source}: no examples left (skip_examples={skip}, max_examples={limit})")
    return ds


def perplexity(model, tokenizer, text: str, *, max_tokens: int = 4096, window: int = 512) -> dict[str, float]:
    """Held-out perplexity on the first ``max_tokens`` tokens of ``text`` (all of it if shorter), in
    non-overlapping ``window``-token windows (:func:`qtune.evaluate.perplexity`).

    Returns:
        ``{"perplexity", "nll", "predicted", "tokens", "seconds"}``.
    """
    import dataclasses

    from ..evaluate import perplexity as _perplexity
    from ..evaluate import tokenize_text

    try:
        ids = tokenize_text(text, tokenizer, tokens=max_tokens)
    except ValueError:  # shorter than max_tokens
        ids = tokenize_text(text, tokenizer)
    return dataclasses.asdict(_perplexity(model, ids, seq_len=window))
