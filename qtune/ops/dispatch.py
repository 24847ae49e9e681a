"""Which GPU implementation a quantized linear op runs: the fused Triton kernel, or dequantize + cuBLAS.

The device kernels registered for ``qtune::linear_<family>`` and ``qtune::linear_<family>_grad_input``
(``kernels/routing.py``) ask :func:`choose` once per call, with ``M`` = rows of the activation (all
leading dimensions flattened):

- ``"fused"``: the fused Triton kernel (tiles dequantized in registers, fed to ``tl.dot``). It reads
  the packed weight once per row tile, so it wins where the weight's bytes dominate: decode and small
  batches.
- ``"dequant"``: the Triton dequantize kernel writes ``Ŵ`` [N, K] into a reusable per-device, per-stream
  workspace (:func:`workspace`) and ``torch.matmul`` (cuBLAS) multiplies. At training sizes the fused
  kernel re-dequantizes every weight tile once per row tile (32× at M = 4096 with 128-row tiles); one
  dequantize (≈ 2.5 bytes per weight) plus cuBLAS's GEMM is faster there. Nothing dense outlives the
  call: backward dequantizes again.

The fused kernel runs when ``M ≤ fused_max_m(family, direction, device)``. That bound comes from, in
order: :func:`force` (a context), :func:`set_fused_max_m` (the process), ``$QTUNE_FUSED_MAX_M`` (the
environment), the crossover file written by ``python -m qtune.bench.gpu`` for this GPU architecture
(:func:`save_crossovers`), then :data:`DEFAULT_FUSED_MAX_M`.

Default table, and why (no measurement of qtune's kernels on a GPU exists yet, so it is conservative
and follows the designs measured elsewhere): bitsandbytes 0.50 (``backends/cuda/ops.py``) runs its fused
4-bit kernel only for small M (always for M ≤ 4; per-arch caps that are tight on sm_90 and never above
1536) and its backward always dequantizes then calls ``torch.matmul``; Unsloth's ``matmul_lora``
dequantizes once into a buffer and calls cuBLAS. So: forward fused for M ≤ 16 (the decode shapes the
split-K kernels were written for), grad_input always dequantize + cuBLAS. On sm_100 (Blackwell)
bitsandbytes finds dequantize + matmul "significantly faster" than its fused MMA kernel: fused only
for M ≤ 4 there. LLM.int8's forward is an int8×int8 tensor-core GEMM whose inner loop dequantizes
nothing (the scaling is its epilogue) and a dense path would change the arithmetic (LLM.int8
quantizes the activations), so it is always its own kernel; its grad_input (``dy · CB·SCB/127``)
follows the int8 rule.

Example::

    from qtune.ops import dispatch
    dispatch.set_fused_max_m("4bit", "forward", 64)      # this process
    with dispatch.force("dequant"):                      # this block, every family and direction
        y = model(x)
    # shell: QTUNE_FUSED_MAX_M="4bit.forward=64,gptq=32"  (bare "64": every family and direction)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Iterator, Optional

import torch

FAMILIES = ("4bit", "int8", "llm_int8", "gptq", "gguf", "affine")
DIRECTIONS = ("forward", "grad_input")
BRANCHES = ("fused", "dequant")
ALWAYS = math.inf  # a bound meaning "fused at every M"

# (family, direction) -> largest M that runs the fused kernel (0: never). See the module docstring.
DEFAULT_FUSED_MAX_M: dict[tuple[str, str], float] = {
    ("4bit", "forward"): 16, ("4bit", "grad_input"): 0,
    ("int8", "forward"): 16, ("int8", "grad_input"): 0,
    ("gptq", "forward"): 16, ("gptq", "grad_input"): 0,
    ("gguf", "forward"): 16, ("gguf", "grad_input"): 0,
    ("affine", "forward"): 16, ("affine", "grad_input"): 0,
    ("llm_int8", "forward"): ALWAYS, ("llm_int8", "grad_input"): 0,
}
# architecture -> overrides of the default table (bitsandbytes: dequantize + matmul wins on sm_100 above M = 4)
ARCH_DEFAULTS: dict[str, dict[tuple[str, str], float]] = {
    arch: {("4bit", "forward"): 4, ("int8", "forward"): 4, ("gptq", "forward"): 4, ("gguf", "forward"): 4,
           ("affine", "forward"): 4}
    for arch in ("sm_100", "sm_103")
}
# families whose forward has no dequantize + matmul branch (see the module docstring)
FUSED_ONLY_FORWARD = ("llm_int8",)

ENV_MAX_M = "QTUNE_FUSED_MAX_M"
ENV_FILE = "QTUNE_DISPATCH_FILE"
CROSSOVER_VERSION = 1

# force() is process-wide, not a context variable: on CUDA, autograd runs backward in its own device
# threads, which would not see a context variable set by the thread that called .backward()
_forced: list[Optional[str]] = []
_user: dict[tuple[str, str], float] = {}
_file_cache: dict[str, dict] = {}  # path -> crossovers, read once per process (see load_crossovers)
_env_cache: dict[str, dict] = {}   # $QTUNE_FUSED_MAX_M -> parsed bounds


def _check_key(family: str, direction: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown op family {family!r}; expected one of {FAMILIES}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")


def _as_bound(value, what: str) -> float:
    if (isinstance(value, str) and value.strip().lower() in ("inf", "always")) or value == ALWAYS:
        return ALWAYS
    try:
        m = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {value!r} is not an integer M (or 'inf')") from None
    if m < 0:
        raise ValueError(f"{what}: M bound {m} must be ≥ 0")
    return m


# -- overrides ------------------------------------------------------------------------------------------
def set_fused_max_m(family: str, direction: str, m: int | float | None) -> None:
    """Run the fused kernel of ``family``/``direction`` for ``M ≤ m`` in this process (``None``: undo).

    Args:
        family: ``"4bit"``, ``"int8"``, ``"llm_int8"``, ``"gptq"``, ``"gguf"`` or ``"affine"``.
        direction: ``"forward"`` or ``"grad_input"``.
        m: the bound; 0 = never fused, ``math.inf`` = always fused.

    Raises:
        ValueError: unknown family/direction, a negative bound, or a dequantize branch asked of a
            fused-only op (LLM.int8 forward).
    """
    _check_key(family, direction)
    if m is None:
        _user.pop((family, direction), None)
        return
    bound = _as_bound(m, f"set_fused_max_m({family!r}, {direction!r})")
    if direction == "forward" and family in FUSED_ONLY_FORWARD and bound != ALWAYS:
        raise ValueError(f"{family} forward has no dequantize + matmul branch (its int8 GEMM dequantizes nothing)")
    _user[(family, direction)] = bound


@contextlib.contextmanager
def force(branch: Optional[str]) -> Iterator[None]:
    """Within the block, every family and direction runs ``branch`` (``"fused"``/``"dequant"``; ``None``:
    the policy). LLM.int8 forward has only its fused GEMM and ignores ``"dequant"``.

    Process-wide (it also holds in autograd's backward threads); blocks nest.

    Raises:
        ValueError: an unknown branch.
    """
    if branch is not None and branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; expected one of {BRANCHES} or None")
    _forced.append(branch)
    try:
        yield
    finally:
        _forced.pop()


def _env_bounds() -> dict[tuple[str, str], float]:
    """``$QTUNE_FUSED_MAX_M``: ``"64"`` (everything) or ``"4bit.forward=64,gptq=32"`` (a family alone:
    both directions).

    Raises:
        ValueError: a malformed entry (named).
    """
    raw = os.environ.get(ENV_MAX_M, "").strip()
    if not raw:
        return {}
    hit = _env_cache.get(raw)
    if hit is not None:
        return hit
    out: dict[tuple[str, str], float] = {}
    for item in (p.strip() for p in raw.split(",") if p.strip()):
        if "=" not in item:
            bound = _as_bound(item, f"${ENV_MAX_M}")
            out.update({k: bound for k in DEFAULT_FUSED_MAX_M if k[0] not in FUSED_ONLY_FORWARD or k[1] != "forward"})
            continue
        key, value = (s.strip() for s in item.split("=", 1))
        family, _, direction = key.partition(".")
        directions = (direction,) if direction else DIRECTIONS
        for d in directions:
            try:
                _check_key(family, d)
            except ValueError as e:
                raise ValueError(f"${ENV_MAX_M}={raw!r}: {e}") from None
            if d == "forward" and family in FUSED_ONLY_FORWARD:
                continue
            out[(family, d)] = _as_bound(value, f"${ENV_MAX_M} entry {item!r}")
    _env_cache.clear()
    _env_cache[raw] = out
    return out


# -- measured crossovers --------------------------------------------------------------------------------
def crossover_file() -> Path:
    """Where measured crossovers live: ``$QTUNE_DISPATCH_FILE``, else ``~/.cache/qtune/dispatch.json``.

    Format (written by :func:`save_crossovers`; the largest M at which the fused kernel won)::

        {"version": 1, "crossovers": {"sm_90": {"4bit": {"forward": 64, "grad_input": 0}, ...}, ...}}
    """
    env = os.environ.get(ENV_FILE)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qtune" / "dispatch.json"


def load_crossovers(path: Optional[Path] = None) -> dict[str, dict[str, dict[str, float]]]:
    """The crossover table of ``path`` (default :func:`crossover_file`), ``{}`` when there is none.

    Read once per process and path (the decision runs on every linear call): a file another process
    writes later is seen by the next process, or after :func:`reload`; :func:`save_crossovers` of this
    process is seen at once.

    Raises:
        ValueError: the file exists but is not a crossover table (named, with what is wrong).
    """
    path = Path(path) if path is not None else crossover_file()
    hit = _file_cache.get(str(path))
    if hit is not None:
        return hit
    try:
        text = path.read_text()
    except FileNotFoundError:
        _file_cache[str(path)] = {}
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); delete it or rerun python -m qtune.bench.gpu") from None
    if not isinstance(data, dict) or data.get("version") != CROSSOVER_VERSION or not isinstance(data.get("crossovers"), dict):
        raise ValueError(f"{path}: expected {{'version': {CROSSOVER_VERSION}, 'crossovers': {{arch: {{family: "
                         "{direction: M}}}}}")
    table: dict[str, dict[str, dict[str, float]]] = {}
    for arch, fams in data["crossovers"].items():
        for family, dirs in fams.items():
            for direction, m in dirs.items():
                try:
                    _check_key(family, direction)
                except ValueError as e:
                    raise ValueError(f"{path}: crossovers[{arch!r}]: {e}") from None
                table.setdefault(arch, {}).setdefault(family, {})[direction] = _as_bound(
                    m, f"{path}: crossovers[{arch!r}][{family!r}][{direction!r}]")
    _file_cache[str(path)] = table
    return table


def reload() -> None:
    """Forget the crossover files read so far (the next decision reads them again)."""
    _file_cache.clear()


def save_crossovers(arch: str, crossovers: dict[str, dict[str, float]], path: Optional[Path] = None) -> Path:
    """Store measured crossovers of one architecture (merged into the file; other archs are kept).

    Args:
        arch: e.g. ``"sm_90"`` (:func:`device_arch`).
        crossovers: ``{family: {direction: largest M at which the fused kernel won}}``.
        path: default :func:`crossover_file`.

    Returns:
        The file written.
    """
    path = Path(path) if path is not None else crossover_file()
    for family, dirs in crossovers.items():
        for direction, m in dirs.items():
            _check_key(family, direction)
            _as_bound(m, f"save_crossovers({arch!r})[{family!r}][{direction!r}]")
    data = {"version": CROSSOVER_VERSION, "crossovers": {}}
    if path.exists():
        _file_cache.pop(str(path), None)
        load_crossovers(path)  # validates
        data = json.loads(path.read_text())
    data["crossovers"].setdefault(arch, {})
    for family, dirs in crossovers.items():
        for direction, m in dirs.items():
            data["crossovers"][arch].setdefault(family, {})[direction] = "inf" if m == ALWAYS else int(m)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    _file_cache.pop(str(path), None)
    return path


def device_arch(device: torch.device | str) -> str:
    """``"sm_<major><minor>"`` of a CUDA device; the device type otherwise (e.g. ``"cpu"``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


# -- the decision ---------------------------------------------------------------------------------------
def fused_max_m(family: str, direction: str, device: torch.device | str | None = None) -> float:
    """Largest M that runs the fused kernel, for ``device``'s architecture (no :func:`force` applied)."""
    _check_key(family, direction)
    key = (family, direction)
    if direction == "forward" and family in FUSED_ONLY_FORWARD:
        return ALWAYS
    if key in _user:
        return _user[key]
    env = _env_bounds()
    if key in env:
        return env[key]
    arch = device_arch(device) if device is not None else None
    if arch is not None:
        measured = load_crossovers().get(arch, {}).get(family, {})
        if direction in measured:
            return measured[direction]
        if key in ARCH_DEFAULTS.get(arch, {}):
            return ARCH_DEFAULTS[arch][key]
    return DEFAULT_FUSED_MAX_M[key]


def choose(family: str, direction: str, m: int, device: torch.device | str | None = None) -> str:
    """``"fused"`` or ``"dequant"`` for an activation of ``m`` rows on ``device``."""
    _check_key(family, direction)
    forced = _forced[-1] if _forced else None
    if direction == "forward" and family in FUSED_ONLY_FORWARD:
        branch = "fused"
    elif forced is not None:
        branch = forced
    else:
        branch = "fused" if m <= fused_max_m(family, direction, device) else "dequant"
    for log in _recorders:
        log.append((family, direction, int(m), branch))
    return branch


_recorders: list[list] = []


@contextlib.contextmanager
def record() -> Iterator[list[tuple[str, str, int, str]]]:
    """Collect ``(family, direction, M, branch)`` of every decision made in the block (tests, benchmarks)."""
    log: list[tuple[str, str, int, str]] = []
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


# -- the workspace --------------------------------------------------------------------------------------
_workspaces: dict[tuple, torch.Tensor] = {}
_ws_lock = threading.Lock()


def _stream_key(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.current_stream(device).stream_id
    return None


def workspace(shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A [N, K] ``dtype`` view of this (device, current stream, thread)'s reusable dequantize buffer.

    One byte buffer per key grows to the largest weight seen and is reused by every layer after it, so
    the dequantize branch allocates nothing per call. Work queued on one stream runs in order, so a
    layer's dequantize cannot overwrite a buffer an earlier matmul on the same stream still reads; the
    thread is part of the key because two threads could interleave their launches on one stream (so
    autograd's CUDA backward thread holds a second buffer beside the forward thread's). The
    contents are valid only until the next call on the same key: callers use the view at once and keep
    nothing (backward dequantizes again).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    nbytes = int(shape[0]) * int(shape[1]) * dtype.itemsize
    key = (device, _stream_key(device), threading.get_ident())
    with _ws_lock:
        buf = _workspaces.get(key)
        if buf is None or buf.numel() < nbytes:
            _workspaces.pop(key, None)
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            _workspaces[key] = buf
    return buf[:nbytes].view(dtype).view(int(shape[0]), int(shape[1]))


def workspace_bytes() -> int:
    """Bytes held by all dequantize workspaces of this process."""
    with _ws_lock:
        return sum(b.numel() for b in _workspaces.values())


def release_workspaces() -> None:
    """Free every dequantize workspace (the next dequantize-branch call allocates again)."""
    with _ws_lock:
        _workspaces.clear()


__all__ = ["FAMILIES", "DIRECTIONS", "BRANCHES", "DEFAULT_FUSED_MAX_M", "ARCH_DEFAULTS", "ALWAYS", "ENV_MAX_M",
           "ENV_FILE", "set_fused_max_m", "force", "fused_max_m", "choose", "record", "crossover_file",
           "load_crossovers", "save_crossovers", "reload", "device_arch", "workspace", "workspace_bytes", "release_workspaces"]
