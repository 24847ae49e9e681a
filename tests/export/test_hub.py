"""``--push-to-hub`` against a stand-in for the Hub: ``huggingface_hub.HfApi``'s methods replaced by a fake that
records what it is sent. Every call is bound to the signature of the installed ``HfApi`` method (a keyword
the real method does not take fails), and ``delete_patterns`` mean what ``upload_folder`` makes of them:
fnmatch globs over the repo's files (``huggingface_hub.utils.filter_repo_objects``), ``.gitattributes`` and
the uploaded files kept. The token must reach HfApi and nothing else (files, stdout/stderr, logs)."""
from __future__ import annotations

import inspect
import logging
import types
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects

from qtune.cli.main import main
from qtune.export import hub

SECRET = "hf_qtuneTestSecretToken0123456789"
FAKED = ("create_repo", "list_repo_files", "upload_folder")


def _not_found(repo_id: str) -> RepositoryNotFoundError:
    # what HfApi raises for a missing repo; its response only needs headers and the request
    response = types.SimpleNamespace(status_code=404, headers={}, request=None)
    return RepositoryNotFoundError(f"404 Repository Not Found for {repo_id}", response=response)


class FakeHub:
    """In-memory model repos; each method binds its call to the real signature, checks the token, records it."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.calls: list[tuple[str, dict]] = []
        self.signatures = {name: inspect.signature(getattr(HfApi, name)) for name in FAKED}

    def _bind(self, name: str, api, args: tuple, kwargs: dict) -> dict:
        try:
            bound = self.signatures[name].bind(api, *args, **kwargs)
        except TypeError as e:
            raise AssertionError(f"HfApi.{name}{self.signatures[name]} does not take {args} {kwargs}: {e}") from None
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop("self")
        self._auth(api, a["token"])
        return a

    def install(self, monkeypatch) -> "FakeHub":
        fake = self

        def create_repo(api, *args, **kwargs):
            a = fake._bind("create_repo", api, args, kwargs)
            fake.calls.append(("create_repo", {"repo_id": a["repo_id"], "private": a["private"],
                                               "repo_type": a["repo_type"]}))
            if a["repo_id"] in fake.repos and not a["exist_ok"]:
                raise AssertionError("repo exists")
            fake.repos.setdefault(a["repo_id"], {"private": a["private"],
                                                 "files": {".gitattributes": b"*.safetensors lfs\n"}})
            return f"https://huggingface.co/{a['repo_id']}"

        def list_repo_files(api, *args, **kwargs):
            a = fake._bind("list_repo_files", api, args, kwargs)
            fake.calls.append(("list_repo_files", {"repo_id": a["repo_id"]}))
            if a["repo_id"] not in fake.repos:
                raise _not_found(a["repo_id"])
            return sorted(fake.repos[a["repo_id"]]["files"])

        def upload_folder(api, *args, **kwargs):
            a = fake._bind("upload_folder", api, args, kwargs)
            assert a["path_in_repo"] is None and a["allow_patterns"] is None and a["ignore_patterns"] is None
            folder = Path(a["folder_path"])
            files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
            patterns = a["delete_patterns"]
            fake.calls.append(("upload_folder", {"repo_id": a["repo_id"], "folder_path": str(folder),
                                                 "files": sorted(files), "delete_patterns": patterns,
                                                 "commit_message": a["commit_message"]}))
            repo = fake.repos[a["repo_id"]]["files"]
            if patterns is not None:  # as HfApi._prepare_folder_deletions and upload_folder apply them
                for f in list(filter_repo_objects(sorted(repo), allow_patterns=patterns)):
                    if f != ".gitattributes" and f not in files:
                        del repo[f]
            repo.update(files)

        for name, fn in (("create_repo", create_repo), ("list_repo_files", list_repo_files),
                         ("upload_folder", upload_folder)):
            monkeypatch.setattr(HfApi, name, fn)
        return self

    @staticmethod
    def _auth(api, token) -> None:
        assert token == SECRET or api.token == SECRET, "the Hub call did not carry the token"

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def fake_hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return FakeHub().install(monkeypatch)


def _assert_no_secret(out: Path, *texts: str) -> None:
    for p in out.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), f"the token was written into {p}"
    for t in texts:
        assert SECRET not in t


@pytest.mark.parametrize("mode", ["adapter", "merged"])
def test_push_creates_repo_and_uploads_the_export(mode, fake_hub, run_for, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    rc = main(["export", str(run_for("nf4")), "--mode", mode, "--out", str(out), "--push-to-hub", "me/tiny-emma",
               "--private"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert fake_hub.names() == ["list_repo_files", "create_repo", "list_repo_files", "upload_folder"]
    create = fake_hub.calls[1][1]
    assert create == {"repo_id": "me/tiny-emma", "private": True, "repo_type": "model"}
    upload = fake_hub.calls[3][1]
    assert upload["repo_id"] == "me/tiny-emma" and Path(upload["folder_path"]) == out.absolute()
    assert upload["files"] == sorted(p.name for p in out.iterdir())
    expected = {"adapter": {"adapter_config.json", "adapter_model.safetensors", "README.md", "qtune_base.json"},
                "merged": {"config.json", "model.safetensors", "README.md", "generation_config.json",
                           "qtune_export.json"}}[mode]
    assert expected <= set(upload["files"]) and upload["delete_patterns"] is None
    assert "uploaded" in captured.out and "https://huggingface.co/me/tiny-emma" in captured.out
    _assert_no_secret(out, captured.out, captured.err, caplog.text)


def test_non_empty_repo_is_refused_before_any_work(fake_hub, run_for, tmp_path, capsys, monkeypatch):
    fake_hub.repos["me/taken"] = {"private": False, "files": {".gitattributes": b"", "README.md": b"old",
                                                            "old.bin": b"x"}}
    import qtune.export.adapter as adapter_mod

    monkeypatch.setattr(adapter_mod, "load_source", lambda *a, **k: pytest.fail("exported before checking the repo"))
    out = tmp_path / "out"
    rc = main(["export", str(run_for("nf4")), "--mode", "adapter", "--out", str(out), "--push-to-hub", "me/taken"])
    captured = capsys.readouterr()
    assert rc == 1 and "Hub repo me/taken is not empty" in captured.err and "--overwrite" in captured.err
    assert not out.exists() and fake_hub.names() == ["list_repo_files"]
    monkeypatch.undo()
    monkeypatch.setenv("HF_TOKEN", SECRET)
    fake_hub.install(monkeypatch)
    rc = main(["export", str(run_for("nf4")), "--mode", "adapter", "--out", str(out), "--push-to-hub", "me/taken",
               "--overwrite"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    upload = fake_hub.calls[-1][1]
    assert upload["delete_patterns"] == ["old.bin"]  # README.md is replaced; .gitattributes kept
    assert set(fake_hub.repos["me/taken"]["files"]) == {".gitattributes", *upload["files"]}
    _assert_no_secret(out, captured.out, captured.err)


def test_stale_files_are_deleted_by_exact_name(fake_hub, tmp_path):
    """delete_patterns are fnmatch globs: a stale name with glob characters must still delete exactly that file."""
    fake_hub.repos["me/odd"] = {"private": False, "files": {
        ".gitattributes": b"", "weights[1].bin": b"old", "weights1.bin": b"old", "a*b.txt": b"old", "keep.txt": b"old"}}
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "keep.txt").write_text("new")
    (folder / "config.json").write_text("{}")
    hub.push_folder(folder, "me/odd", overwrite=True, log=lambda s: None)
    assert fake_hub.repos["me/odd"]["files"] == {".gitattributes": b"", "keep.txt": b"new", "config.json": b"{}"}
    patterns = fake_hub.calls[-1][1]["delete_patterns"]
    assert len(patterns) == 3  # one pattern per stale file, each matching that file only
    stale = ["a*b.txt", "weights1.bin", "weights[1].bin"]
    for p, name in zip(patterns, stale):
        assert list(filter_repo_objects(stale + ["keep.txt", "axb.txt"], allow_patterns=[p])) == [name], p


def test_no_token_is_a_clear_error(run_for, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "out"
    rc = main(["export", str(run_for("nf4")), "--mode", "adapter", "--out", str(out), "--push-to-hub", "me/x"])
    assert rc == 1 and "needs a Hugging Face token: set HF_TOKEN" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(hub.HubError, match="not a valid repo id"):
        hub.check_repo("not a repo id!!", token=SECRET)


def test_hub_errors_never_show_the_token(fake_hub, tmp_path, monkeypatch):
    def broken(api, *a, **k):
        raise RuntimeError(f"401 Unauthorized for token {SECRET}")

    monkeypatch.setattr(HfApi, "upload_folder", broken)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    with pytest.raises(hub.HubError) as e:
        hub.push_folder(folder, "me/y", log=lambda s: None)
    assert SECRET not in str(e.value) and "***" in str(e.value)
