"""Training data for recipes: plain text, prompt/completion and conversational datasets.

A recipe's ``dataset.train`` / ``dataset.eval`` names a text *source* (:mod:`qtune.sources`: one syntax
everywhere): ``qtune:austen/<novel>`` (bundled novel), ``qtune:demo/<set>`` (bundled demo set for the
preference and RL tasks, see :mod:`qtune.train.demo_data`: demo data, not a benchmark), a local file
(``.txt`` plain text; ``.json``/``.jsonl``/``.csv``/``.parquet`` records) or ``hf:<dataset id>``.

Plain text is cut at blank lines into paragraphs (line breaks inside a paragraph become spaces), and
consecutive paragraphs are joined up to ``chunk_chars`` characters per example; trl's packing then
fills the training sequences. Records keep the columns trl understands: ``text`` (or ``text_field``),
``prompt``/``completion`` (loss on the completion only, trl's default) and ``messages``
(conversational, rendered with the tokenizer's chat template; ``training.assistant_only_loss``).
The other tasks read records with the columns their trl trainer needs (``required=``, e.g. ``prompt``,
``chosen``, ``rejected`` for DPO), which trl then formats itself.
"""
from __future__ import annotations

import re
from typing import Any

from ..sources import is_plain_text, load_records, read_text  # noqa: F401  (read_text: the one text reader)
FORMAT_COLUMNS = {"text": None, "prompt_completion": ("prompt", "completion"), "conversational": ("messages",)}


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


class MissingColumns(ValueError):
    """A dataset without the columns its task needs (the runner names the recipe line)."""

    def __init__(self, source: str, missing: list[str], columns: list[str], required: tuple[str, ...]) -> None:
        self.source, self.missing, self.columns = source, missing, columns
        super().__init__(f"{source}: needs column(s) {', '.join(missing)} (required: {', '.join(required)}); "
                         f"it has {', '.join(columns) or 'none'}")


def load_dataset(spec: dict[str, Any], *, required: tuple[str, ...] | None = None):
    """A ``datasets.Dataset`` for one ``dataset.train``/``dataset.eval`` recipe entry.

    Args:
        spec: the recipe entry (``source``, ``format``, ``split``, ...).
        required: for tasks other than SFT, the columns the trainer needs (records only; ``format`` is not
            used).
    Returns:
        ``Dataset`` with the columns trl expects for the format.
    Raises:
        ValueError: the columns do not match the requested ``format``.
        MissingColumns: ``required`` columns are missing (plain text has only ``text``).
    """
    import datasets

    source, fmt, text_field = spec["source"], spec.get("format", "auto"), spec.get("text_field", "text")
    if required:
        if is_plain_text(source):
            raise MissingColumns(source, list(required), ["text"], required)
        ds = load_records(source, spec.get("split", "train"))
        missing = [c for c in required if c not in ds.column_names]
        if missing:
            raise MissingColumns(source, missing, list(ds.column_names), required)
        return _select(ds, spec, source)
    if is_plain_text(source):
        if fmt not in ("auto", "text"):
            raise ValueError(f"{source}: plain text can only be used with format 'text', not {fmt!r}")
        chunks = chunk_paragraphs(paragraphs(read_text(source)), spec.get("chunk_chars", 2000))
        ds = datasets.Dataset.from_dict({"text": chunks})
        text_field, fmt = "text", "text"
    else:
        ds = load_records(source, spec.get("split", "train"))
        found = detect_format(ds.column_names, text_field)
        if fmt == "auto":
            fmt = found
        needed = FORMAT_COLUMNS[fmt] or (text_field,)
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise ValueError(f"{source}: format {fmt!r} needs column(s) {missing}; the dataset has {ds.column_names}")
    if text_field != "text" and fmt == "text":
        ds = ds.rename_column(text_field, "text")
    return _select(ds, spec, source)


def _select(ds, spec: dict[str, Any], source: str):
    """``skip_examples``/``max_examples`` of a recipe entry."""
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


def preference_margin(model, tokenizer, records, *, max_pairs: int | None = None) -> dict[str, float]:
    """How much more likely a causal LM finds the chosen continuation than the rejected one, on held-out pairs.

    For each record (``prompt``, ``chosen``, ``rejected``, strings), with the prompt and each continuation
    tokenized apart and concatenated as trl's DPO does::

        logp(c) = Σ_t log p(c_t | prompt, c_<t)       (summed over the continuation's tokens)
        margin  = logp(chosen) − logp(rejected)

    DPO's implicit reward margin is ``β · (margin − margin_ref)``: training should raise ``margin``.

    Returns:
        ``{"margin": mean margin (nats), "accuracy": fraction of pairs with margin > 0, "pairs": n}``.
    """
    import torch

    def logp(prompt_ids: list[int], completion: str) -> float:
        comp = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + comp], device=next(model.parameters()).device)
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
        return float(torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids):, None]).sum())

    margins = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, r in enumerate(records):
                if max_pairs is not None and i >= max_pairs:
                    break
                p = tokenizer(r["prompt"])["input_ids"]
                margins.append(logp(p, r["chosen"]) - logp(p, r["rejected"]))
    finally:
        model.train(was_training)
    if not margins:
        raise ValueError("preference_margin: no pairs")
    return {"margin": sum(margins) / len(margins), "accuracy": sum(m > 0 for m in margins) / len(margins),
            "pairs": len(margins)}
