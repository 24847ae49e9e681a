"""Text sources: one syntax and one reader for training data, calibration, held-out and ``qtune eval`` text.

A *source* is one of:

- ``qtune:austen/<novel>``: a public-domain novel bundled with qtune (``emma``, ``persuasion``);
- ``qtune:demo/<set>``: a bundled demo record set (:mod:`qtune.train.demo_data`);
- a local file: ``.txt``/``.text``/``.md`` (plain text, ``.gz`` of those decompressed) or
  ``.json``/``.jsonl``/``.csv``/``.parquet`` (records, read with ``datasets``);
- ``hf:<dataset id>`` (or a bare id): a Hugging Face Hub dataset.

The older spelling ``austen:<novel>`` still reads, with a ``FutureWarning`` naming the new one (a
``FutureWarning`` rather than a ``DeprecationWarning`` because Python shows it to command-line users).
"""
from __future__ import annotations

import warnings
from pathlib import Path

PREFIX = "qtune:"
BUNDLED_TEXT = PREFIX + "austen/"
DEMO_PREFIX = PREFIX + "demo/"
OLD_BUNDLED_TEXT = "austen:"
TEXT_SUFFIXES = (".txt", ".text", ".md")
RECORD_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def normalize(source: str | Path) -> str:
    """``source`` in the one syntax: ``austen:<novel>`` becomes ``qtune:austen/<novel>`` (with a warning)."""
    source = str(source)
    if source.startswith(OLD_BUNDLED_TEXT):
        new = BUNDLED_TEXT + source[len(OLD_BUNDLED_TEXT):]
        warnings.warn(f"text source {source!r} is deprecated spelling; write {new!r}", FutureWarning, stacklevel=3)
        return new
    return source


def is_plain_text(source: str | Path) -> bool:
    """Whether ``source`` reads as one plain text (a bundled novel, a text file, any other existing file that
    is not a record file), not as records."""
    source = normalize(source)
    if source.startswith(PREFIX):
        return not source.startswith(DEMO_PREFIX)
    path = Path(source).expanduser()
    if path.suffix in RECORD_SUFFIXES:
        return False
    return path.suffix in TEXT_SUFFIXES or path.suffix == ".gz" or path.is_file()


def check_exists(source: str | Path, what: str = "text file") -> str:
    """Refuse, before any work, a source that names a local file which does not exist; returns ``normalize(source)``.

    Raises:
        FileNotFoundError: ``<what> <source> does not exist``.
    """
    source = normalize(source)
    if source.startswith((PREFIX, "hf:")):
        return source
    path = Path(source).expanduser()
    if (path.suffix or "/" in source) and not path.exists():
        raise FileNotFoundError(f"{what} {source} does not exist")
    return source


def bundled_text(source: str) -> str:
    """The text of ``qtune:austen/<novel>``.

    Raises:
        ValueError: not a bundled text (the message shows the syntax), or an unknown novel.
    """
    from .assets import austen_text

    kind, _, item = source[len(PREFIX):].partition("/")
    if kind != "austen" or not item:
        raise ValueError(f"unknown bundled source {source!r}; use {BUNDLED_TEXT}<novel>, e.g. {BUNDLED_TEXT}emma")
    return austen_text(item)


def read_file_text(path: str | Path) -> str:
    """UTF-8 text of a file (``.gz`` is decompressed).

    Raises:
        FileNotFoundError: naming the file.
    """
    import gzip

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8")


def load_records(source: str, split: str = "train"):
    """A ``datasets.Dataset`` of a record source (``qtune:demo/<set>``, a record file, a Hub dataset).

    Raises:
        FileNotFoundError: a record file that does not exist.
    """
    import datasets

    source = normalize(source)
    if source.startswith(DEMO_PREFIX):
        from .assets import demo_path

        return datasets.load_dataset("json", data_files=str(demo_path(source[len(DEMO_PREFIX):])), split="train")
    path = Path(source)
    if path.suffix in RECORD_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {path} does not exist")
        return datasets.load_dataset(RECORD_SUFFIXES[path.suffix], data_files=str(path), split=split)
    return datasets.load_dataset(source.removeprefix("hf:"), split=split)


def read_text(source: str | Path, *, text_field: str = "text", split: str = "train") -> str:
    """The raw text of any source: a bundled novel, a text file, or the ``text_field`` column of records
    (joined with blank lines).

    Raises:
        FileNotFoundError: a local file that does not exist.
        ValueError: an unknown bundled source, or records without ``text_field``.
    """
    source = normalize(source)
    if source.startswith(PREFIX) and not source.startswith(DEMO_PREFIX):
        return bundled_text(source)
    if is_plain_text(source):
        return read_file_text(source)
    ds = load_records(source, split)
    if text_field not in ds.column_names:
        raise ValueError(f"{source}: no {text_field!r} column to read text from (columns: {ds.column_names})")
    return "\n\n".join(ds[text_field])


__all__ = ["read_text", "read_file_text", "load_records", "normalize", "check_exists", "is_plain_text",
           "bundled_text", "PREFIX", "DEMO_PREFIX", "RECORD_SUFFIXES", "TEXT_SUFFIXES"]
