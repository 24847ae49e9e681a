"""safetensors files read without loading them: headers checked against the file size, lazily read tensors.

Everything that opens a checkpoint goes through here, so a corrupt or truncated file is refused with one
line naming the file and key before any model is built:

* :func:`read_safetensors_header` / :func:`headers_by_key`: the header of one file / of all the weight
  files of a folder, each entry's byte span checked against its dtype and shape and against the file size.
* :func:`safetensors_files`: the weight files of a model folder (through the sharding index if any).
* :class:`TensorReader` / :class:`LazyTensor`: single tensors read (and translated) only when transformers
  materializes them, so loading a translated checkpoint holds one tensor at a time.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable

import torch

# safetensors dtype strings -> torch dtypes (for header validation)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

Headers = dict[str, tuple[str, dict[str, Any]]]  # {key: (file, header entry)}


def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's header, validated against the file size.

    Returns:
        ``{key: {"dtype": str, "shape": [...], "data_offsets": [begin, end]}}`` (``__metadata__`` dropped).
    Raises:
        ValueError: unreadable, truncated or malformed file (the message names the file and, where it
            applies, the key).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, file of {size})")
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for key, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry for key {key!r}") from None
        if end > data_size:
            raise ValueError(f"{path}: truncated safetensors file: key {key!r} needs bytes [{begin}, {end}) of the "
                             f"data section, which holds {data_size}")
        if dtype in SAFETENSORS_DTYPES:
            numel = 1
            for s in shape:
                numel *= int(s)
            if end - begin != numel * SAFETENSORS_DTYPES[dtype].itemsize:
                raise ValueError(f"{path}: corrupt safetensors file: key {key!r} ({dtype} {shape}) spans "
                                 f"{end - begin} bytes")
    return header


def headers_by_key(files: list[str] | None) -> Headers:
    """``{key: (file, header entry)}`` over all safetensors ``files`` (non-safetensors files are skipped)."""
    out: Headers = {}
    for f in files or ():
        if str(f).endswith(".safetensors"):
            for k, v in read_safetensors_header(f).items():
                out[k] = (str(f), v)
    return out


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors weight files of a model folder (through ``model.safetensors.index.json`` if sharded).

    Raises:
        ValueError: no safetensors files (``.bin`` pickles are refused), or an index naming a missing shard.
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: invalid index ({type(e).__name__}: {e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{index}: shard {f.name} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        extra = f" (found {pickles[0]}: qtune reads safetensors only)" if pickles else ""
        raise ValueError(f"{path}: no .safetensors weights{extra}")
    return files


def header_shape(headers: Headers, key: str) -> tuple[int, ...]:
    """The shape of ``key`` as the header declares it."""
    return tuple(int(s) for s in headers[key][1]["shape"])


def key_where(headers: Headers, key: str) -> str:
    """``"<file>: key '<key>'"`` for error messages."""
    return f"{headers[key][0]}: key {key!r}"


class LazyTensor:
    """A checkpoint tensor read (and translated) only when transformers materializes it (``t[...]``)."""

    def __init__(self, fn: Callable[[], torch.Tensor], dtype: str, shape: list[int]) -> None:
        self._fn, self._dtype, self._shape = fn, dtype, list(shape)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        t = self._fn()
        return t if idx is Ellipsis else t[idx]

    def get_dtype(self) -> str:
        return self._dtype

    def get_shape(self) -> list[int]:
        return list(self._shape)


class TensorReader:
    """Reads single tensors from a set of safetensors files (one ``safe_open`` per file, opened lazily)."""

    def __init__(self, headers: Headers) -> None:
        self.headers = headers
        self._handles: dict[str, Any] = {}

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.headers[key][0]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt", device="cpu")
        try:
            return self._handles[file].get_tensor(key)
        except Exception as e:  # safetensors raises its own error type for corrupt data
            raise ValueError(f"{file}: cannot read key {key!r} ({type(e).__name__}: {e})") from None

    def lazy(self, key: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
             dtype: str | None = None, shape: list[int] | None = None) -> LazyTensor:
        entry = self.headers[key][1]
        fn = (lambda: self.get(key)) if transform is None else (lambda: transform(self.get(key)))
        return LazyTensor(fn, dtype or entry["dtype"], shape if shape is not None else entry["shape"])


__all__ = ["SAFETENSORS_DTYPES", "Headers", "read_safetensors_header", "headers_by_key", "safetensors_files",
           "header_shape", "key_where", "LazyTensor", "TensorReader"]
