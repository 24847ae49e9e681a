"""One results file per benchmark run: the numbers, the exact command, and the machine they came from.

Every number the README quotes traces back to a file written here (``bench/results/<name>.json``) and the
command stored inside it. The schema is the same for every benchmark::

    {
      "benchmark": "formats",                 # which bench wrote it
      "command": "python -m qtune.bench.formats --skip-gptq",
      "created": "2026-11-30T23:30:00Z",      # UTC, ISO 8601
      "machine": {...},                       # :func:`machine_info`
      "results": {...}                        # the bench's own numbers (JSON-serialisable)
    }
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_KEYS = ("benchmark", "command", "created", "machine", "results")

# versions worth knowing when a number is compared across machines
_PACKAGES = ("torch", "triton", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "gguf")


def default_dir() -> Path:
    """``bench/results/`` under the current directory (run benches from the repository root)."""
    return Path("bench") / "results"


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict[str, Any]:
    """CPU kind and capability, cores, GPUs, and package versions of this process."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": None,
        "versions": {p: _version(p) for p in _PACKAGES},
    }
    if torch.cuda.is_available():
        info["cuda"] = {
            "runtime": torch.version.cuda,
            "devices": [{"name": torch.cuda.get_device_name(i),
                         "capability": list(torch.cuda.get_device_capability(i))}
                        for i in range(torch.cuda.device_count())],
        }
    return info


def command_line() -> str:
    """How this process was started, as a shell command (``python -m pkg.mod args`` for ``-m`` runs)."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return shlex.join(["python", "-m", name, *argv[1:]])
    return shlex.join(["python", *argv])


def write_results(benchmark: str, results: Any, out: str | os.PathLike | None = None,
                  command: str | None = None) -> Path:
    """Write ``results`` with the command and machine to a JSON file, atomically.

    Args:
        benchmark: short name of the bench (``"formats"``, ``"gpu"``, ...).
        results: the bench's numbers; anything ``json.dumps`` accepts.
        out: a file path, or a folder (the file is then ``<folder>/<benchmark>.json``); default
            ``bench/results/<benchmark>.json``.
        command: the command to record; default :func:`command_line`.

    Returns:
        The path written.
    """
    path = Path(out) if out is not None else default_dir()
    if path.suffix != ".json":
        path = path / f"{benchmark}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": benchmark,
        "command": command if command is not None else command_line(),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "results": results,
    }
    text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Load a results file and check that it has the common schema.

    Raises:
        ValueError: a key of :data:`SCHEMA_KEYS` is missing (names the file and the key).
    """
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    missing = [k for k in SCHEMA_KEYS if k not in payload]
    if missing:
        raise ValueError(f"{path}: not a qtune results file (missing key(s) {', '.join(missing)})")
    return payload
