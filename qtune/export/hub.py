"""``--push-to-hub REPO_ID``: upload an export folder with ``huggingface_hub``.

* The token comes from the ``token`` argument, else ``HF_TOKEN``, else the stored login
  (``huggingface_hub.get_token()``, i.e. ``hf auth login``). It is handed to ``HfApi`` only: never printed,
  logged or written into the folder, and scrubbed from any error message.
* The repo is created when missing (``private`` applies then). A repo holding files other than
  ``.gitattributes`` is refused unless ``overwrite``; with ``overwrite`` the upload is one commit that also
  deletes the remote files the export does not have (``.gitattributes`` is kept).
* :func:`check_repo` runs the same refusal before an export starts, so a long export is not wasted.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

__all__ = ["resolve_token", "check_repo", "push_folder", "push_after_export", "HubError"]

KEEP = (".gitattributes",)


class HubError(ValueError):
    """An upload problem (no token, refused overwrite, Hub error), with any token scrubbed."""


def resolve_token(token: str | None = None) -> str:
    """The Hub token: ``token``, else ``HF_TOKEN``, else the stored login.

    Raises:
        HubError: none is available.
    """
    if token:
        return token
    env = os.environ.get("HF_TOKEN")
    if env:
        return env
    from huggingface_hub import get_token

    stored = get_token()
    if stored:
        return stored
    raise HubError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or log in with `hf auth login`")


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def _api(token: str):
    from huggingface_hub import HfApi

    from .. import __version__

    return HfApi(token=token, library_name="qtune", library_version=__version__)


def _remote_files(api, repo_id: str, token: str) -> list[str] | None:
    """Files of the repo, ``None`` when it does not exist."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return list(api.list_repo_files(repo_id, repo_type="model", token=token))
    except RepositoryNotFoundError:
        return None


def _exact_pattern(path: str) -> str:
    """An fnmatch pattern that matches ``path`` only: ``upload_folder`` reads ``delete_patterns`` as globs
    (``huggingface_hub.utils.filter_repo_objects``), so ``*``, ``?`` and ``[`` in a file name are escaped as
    ``[*]``, ``[?]`` and ``[[]``."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _refuse(repo_id: str, files: list[str] | None, overwrite: bool) -> None:
    content = [f for f in files or () if f not in KEEP]
    if content and not overwrite:
        shown = ", ".join(sorted(content)[:5]) + (" ..." if len(content) > 5 else "")
        raise FileExistsError(f"Hub repo {repo_id} is not empty ({len(content)} files: {shown}); pass --overwrite "
                              "to replace its contents")


def _wrap(e: Exception, token: str, what: str) -> HubError:
    return HubError(f"{what}: {type(e).__name__}: {_scrub(str(e), token)}")


def check_repo(repo_id: str, *, overwrite: bool = False, token: str | None = None) -> None:
    """Fail early: no token, an invalid repo id, or a non-empty repo without ``overwrite``.

    Raises:
        HubError / FileExistsError.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"--push-to-hub {repo_id!r}: not a valid repo id ({e})") from None
    tok = resolve_token(token)
    api = _api(tok)
    try:
        files = _remote_files(api, repo_id, tok)
    except Exception as e:  # huggingface_hub raises many error types (HTTP, connection, auth)
        raise _wrap(e, tok, f"cannot read Hub repo {repo_id}") from None
    _refuse(repo_id, files, overwrite)


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, overwrite: bool = False,
                token: str | None = None, commit_message: str | None = None,
                log: Callable[[str], None] = print) -> str:
    """Upload every file of ``folder`` to the model repo ``repo_id`` (created if needed).

    Args:
        folder: the export folder.
        repo_id: ``user/name``.
        private: create the repo private (an existing repo keeps its visibility).
        overwrite: allow a non-empty repo; its files that ``folder`` lacks are deleted in the same commit.
        token: Hub token (default: ``HF_TOKEN`` or the stored login).
        commit_message: default ``"Upload <folder name> with qtune export"``.
    Returns:
        The repo URL.
    Raises:
        FileExistsError: the repo is not empty and ``overwrite`` is False.
        HubError: no token, or the Hub refused (the message never holds the token).
    """
    folder = Path(folder)
    tok = resolve_token(token)
    api = _api(tok)
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True, token=tok)
        remote = _remote_files(api, repo_id, tok) or []
    except Exception as e:
        raise _wrap(e, tok, f"cannot create Hub repo {repo_id}") from None
    _refuse(repo_id, remote, overwrite)
    local = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    stale = sorted(f for f in remote if f not in local and f not in KEEP)
    try:
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", token=tok,
                          commit_message=commit_message or f"Upload {folder.name} with qtune export",
                          delete_patterns=[_exact_pattern(f) for f in stale] or None)
    except Exception as e:
        raise _wrap(e, tok, f"upload to Hub repo {repo_id} failed") from None
    url = str(getattr(url, "url", None) or url or f"https://huggingface.co/{repo_id}")
    log(f"qtune export: uploaded {len(local)} files to {url}"
        + (f" (deleted {len(stale)} stale files)" if stale else ""))
    return url


def push_after_export(out: Path, repo_id: str, **kwargs) -> str:
    """:func:`push_folder` for a finished export: a failed upload says that the local folder is complete."""
    try:
        return push_folder(out, repo_id, **kwargs)
    except (HubError, FileExistsError) as e:
        raise type(e)(f"{e} (the export itself is complete in {out}; upload it again with "
                      f"`hf upload {repo_id} {out}`)") from None
