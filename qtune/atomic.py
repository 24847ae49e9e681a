"""All-or-nothing output folders for the exporters and the checkpoint writers.

Every export is written into a temporary folder next to ``--out`` (same file system, so the final
``os.replace`` is a rename) and renamed into place only after everything was written and verified.
On any exception, including ``KeyboardInterrupt`` and a full disk, the temporary folder is removed and
``--out`` is exactly as before: absent, or the previous export when ``overwrite=True``. A process
killed outright (SIGKILL, power loss) can leave a ``.<name>.tmp-*`` folder behind, never a partial
``--out``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["check_output", "atomic_output", "atomic_file", "check_free_space"]


def _occupied(out: Path) -> bool:
    # an empty folder counts as free (``mkdir out && qtune export ... --out out``), as in ``qtune quantize``
    if out.is_symlink() or out.is_file():
        return True
    return out.is_dir() and any(out.iterdir())


def check_output(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Check ``out`` before any work is done; return it as an absolute path.

    Raises:
        FileExistsError: ``out`` exists (a file, or a non-empty folder) and ``overwrite`` is False.
        ValueError: ``out`` is empty or names the file system root.
    """
    if not str(out):
        raise ValueError("--out is empty")
    path = Path(out).expanduser().absolute()
    if path.parent == path:
        raise ValueError(f"--out {out} names the file system root")
    if _occupied(path) and not overwrite:
        raise FileExistsError(f"{path}: already exists and is not empty; it was left untouched "
                              "(pass --overwrite / overwrite=True to replace it)")
    return path


def check_free_space(folder: str | os.PathLike, needed_bytes: int, *, what: str = "the export") -> None:
    """Refuse to start when the file system holding ``folder`` has less than ``needed_bytes`` (+5%) free.

    Raises:
        OSError: ``ENOSPC``, with the sizes in the message.
    """
    folder = Path(folder)
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    need = int(needed_bytes * 1.05)
    if free < need:
        raise OSError(errno.ENOSPC, f"not enough free space for {what} in {folder}: needs about "
                                    f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; rename it to ``out`` when the block succeeds.

    Args:
        out: the destination folder.
        overwrite: replace an existing ``out`` (only once the new folder is complete).
    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False (checked again at the rename, in case
            something appeared there meanwhile).
    """
    out = check_output(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _share(tmp)
        _replace(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``out`` (not yet created); rename it to ``out`` when the block succeeds.

    The single-file counterpart of :func:`atomic_output` (a GGUF export is one file). On any exception the
    temporary file is removed and ``out`` is as before.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False (checked before and again at the rename).
        ValueError: ``out`` is an existing folder.
    """
    out = check_output(out, overwrite=overwrite)
    if out.is_dir() and not out.is_symlink():
        raise ValueError(f"{out}: is a folder; expected a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        if _occupied(out) and not overwrite:
            raise FileExistsError(f"{out}: appeared while exporting; it was left untouched")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _share(folder: Path) -> None:
    """Permissions as a plain ``mkdir``/``open`` would give under the umask: ``mkdtemp`` (and writers that go
    through their own temporary files) leave 0700/0600, and an export is meant to be read by others."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _replace(tmp: Path, out: Path, *, overwrite: bool) -> None:
    if not _occupied(out):
        if out.is_dir():
            out.rmdir()  # empty; os.replace would also do, but not over a folder on every platform
        os.replace(tmp, out)
        return
    if not overwrite:
        raise FileExistsError(f"{out}: appeared while exporting; it was left untouched")
    backup = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(backup, out)
        raise
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink(missing_ok=True)
