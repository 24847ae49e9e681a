"""``--push-to-hub`` against a stand-in for the Hub: ``huggingface_hub.HfApi``'s methods replaced by a fake that
records what it is sent. The token must reach HfApi and nothing else (files, stdout/stderr, logs)."""
from __future__ import annotations

import logging
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError

from qtune.cli.main import main
from qtune.export import hub

SECRET = "hf_qtuneTestSecretToken0123456789"


class FakeHub:
    """In-memory model repos; each method checks it got the token and records its call."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.calls: list[tuple[str, dict]] = []

    def install(self, monkeypatch) -> "FakeHub":
        fake = self

        def create_repo(api, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kw):
            fake._auth(api, token)
            fake.calls.append(("create_repo", {"repo_id": repo_id, "private": private, "repo_type": repo_type}))
            if repo_id in fake.repos and not exist_ok:
                raise AssertionError("repo exists")
            fake.repos.setdefault(repo_id, {"private": private, "files": {".gitattributes": b"*.safetensors lfs\n"}})
            return f"https://huggingface.co/{repo_id}"

        def list_repo_files(api, repo_id, *, token=None, repo_type=None, revision=None):
            fake._auth(api, token)
            fake.calls.append(("list_repo_files", {"repo_id": repo_id}))
            if repo_id not in fake.repos:
                request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
                raise RepositoryNotFoundError("404 Repository Not Found",
                                              response=httpx2.Response(404, request=request))
            return sorted(fake.repos[repo_id]["files"])

        def upload_folder(api, *, repo_id, folder_path, token=None, repo_type=None, commit_message=None,
                          delete_patterns=None, **kw):
            fake._auth(api, token)
            folder = Path(folder_path)
            files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
            fake.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": str(folder),
                                                 "files": sorted(files), "delete_patterns": delete_patterns,
                                                 "commit_message": commit_message}))
            repo = fake.repos[repo_id]["files"]
            for pattern in delete_patterns or ():
                repo.pop(pattern, None)
            repo.update(files)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
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
