"""Text sources: one syntax (qtune:austen/<novel>, qtune:demo/<set>, files, hf:<id>) and one reader; the old
austen:<novel> spelling still reads, with a warning."""
from __future__ import annotations

import gzip
import json
import warnings

import pytest

from qtune import assets, sources


def test_bundled_novel_in_the_one_syntax():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling never warns
        assert sources.read_text("qtune:austen/emma") == assets.austen_text("emma")
    with pytest.raises(ValueError, match="'pride' is not one of"):
        sources.read_text("qtune:austen/pride")
    with pytest.raises(ValueError, match="unknown bundled source 'qtune:poe/raven'"):
        sources.read_text("qtune:poe/raven")


def test_old_spelling_reads_with_a_deprecation_message():
    with pytest.warns(FutureWarning, match=r"'austen:persuasion' is deprecated spelling; "
                                           r"write 'qtune:austen/persuasion'"):
        text = sources.read_text("austen:persuasion")
    assert text == assets.austen_text("persuasion")
    with pytest.warns(FutureWarning):
        assert sources.normalize("austen:emma") == "qtune:austen/emma"


def test_files_and_records(tmp_path):
    (tmp_path / "a.txt").write_text("plain\n\ntext", encoding="utf-8")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress("héllo".encode()))
    (tmp_path / "notes").write_text("no suffix", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("x", "y")), encoding="utf-8")
    assert sources.read_text(tmp_path / "a.txt") == "plain\n\ntext"
    assert sources.read_text(str(tmp_path / "b.txt.gz")) == "héllo"
    assert sources.read_text(tmp_path / "notes") == "no suffix"
    assert sources.read_text(tmp_path / "c.jsonl") == "x\n\ny"
    assert sources.is_plain_text("qtune:austen/emma") and not sources.is_plain_text("qtune:demo/austen-kto")
    assert not sources.is_plain_text(tmp_path / "c.jsonl") and not sources.is_plain_text("hf:some/dataset")
    with pytest.raises(FileNotFoundError, match="text file .*missing.txt does not exist"):
        sources.read_text(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="held-out text .*gone.txt does not exist"):
        sources.check_exists(str(tmp_path / "gone.txt"), "held-out text")
    assert sources.check_exists("hf:some/dataset") == "hf:some/dataset"


def test_demo_records_in_the_one_syntax():
    ds = sources.load_records("qtune:demo/austen-preference")
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert assets.demo_path("austen-kto").name == "austen-kto.jsonl"
    with pytest.raises(ValueError, match="unknown demo set 'nope'"):
        assets.demo_path("nope")


def test_every_reader_takes_both_spellings():
    from qtune.evaluate import read_text as eval_read_text
    from qtune.export.report import read_heldout
    from qtune.train.data import read_text as train_read_text

    persuasion = assets.austen_text("persuasion")
    for read in (eval_read_text, read_heldout, train_read_text, sources.read_text):
        assert read("qtune:austen/persuasion") == persuasion
        with pytest.warns(FutureWarning):
            assert read("austen:persuasion") == persuasion
