"""Forward replay for sequential GPTQ: a block's submodules whose outputs can no longer change are computed once.

Sequential GPTQ runs a decoder block's forward over the calibration windows once per group of layers (q/k/v,
then o, then gate/up, then down, then the whole block for the next block's inputs), each forward stopping at the
group it calibrates. Without replay every forward recomputes everything before its stop, so the attention of a
Llama block runs four times and each quantized linear up to four times. With replay, a submodule's output is
stored the first time it is computed *final* and returned as is by the later forwards of the same window:

- a submodule is a candidate when it holds at least one quantized layer of the block and no layer still waiting
  for its calibration (pending);
- its output is final when, in that forward, no pending layer has run before it completed (the forwards are
  deterministic and the block's call structure is the same for every window, so nothing that ran before it
  can change any more);
- stored outputs are keyed by (submodule, window batch, call number in that forward), checked against the shapes
  of the call's tensor arguments, and dropped if a later op modified them in place (``Tensor._version``);
- when an output is stored, the stored outputs of the submodule's own descendants for that batch are freed
  (an output that does not fit the budget leaves them in place);
- the store keeps to a byte budget; past it, outputs are simply computed again.

Replay changes no arithmetic: a replayed output is the tensor the same ops produced before, so the Hessians,
codes and next-block inputs are bit-identical to those of the plain forwards (tested).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import Tensor, nn


def _tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _signature(args: tuple, kwargs: dict) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in _tensors(args) + _tensors(kwargs))


def default_budget(device: torch.device) -> int:
    """Bytes the replay store may hold on ``device``: half the free accelerator memory, or half the host's
    available memory (``MemAvailable``) for the CPU; 0 where it cannot be read (replay off)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024 // 2
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
        except (ValueError, OSError, AttributeError):
            return 0
    return 0


class _Forward:
    """State of one block forward on one batch of windows."""

    def __init__(self, batch: int, store: bool) -> None:
        self.batch = batch
        self.store = store
        self.calls: dict[str, int] = {}
        self.pending_ran = False


class BlockReplay:
    """Replay store of one block's calibration (see the module docstring).

    Args:
        block (nn.Module): the decoder block.
        budget (int): bytes of stored outputs at most.

    Use: :meth:`update` after each group of layers is quantized (with the layer names done and still pending),
    :meth:`forward` around each block call, :meth:`close` when the block is done.
    """

    def __init__(self, block: nn.Module, budget: int) -> None:
        self.block = block
        self.budget = budget
        self.bytes = 0
        self.hits = 0
        self._entries: dict[tuple[str, int, int], tuple[Any, tuple, list[int], int]] = {}
        self._wrapped: dict[str, tuple[nn.Module, Any, bool]] = {}  # name -> (module, saved forward, had own)
        self._pending_hooks: list[Any] = []
        self._active: _Forward | None = None

    # -- which submodules -----------------------------------------------------------------------------
    def update(self, done: set[str], pending: set[str]) -> None:
        """Replay the submodules holding a layer of ``done`` and none of ``pending`` (names relative to the block);
        watch the ``pending`` layers (and experts modules) so that outputs computed after one ran are not stored."""
        for h in self._pending_hooks:
            h.remove()
        self._pending_hooks = []
        if self.budget <= 0:
            return
        for name in pending:
            module = self.block.get_submodule(name)
            self._pending_hooks.append(module.register_forward_pre_hook(self._pending_ran))

        def holds(prefix: str, names: set[str]) -> bool:
            return any(n == prefix or n.startswith(prefix + ".") for n in names)

        for name, module in self.block.named_modules():
            if name and name not in self._wrapped and holds(name, done) and not holds(name, pending):
                self._wrap(name, module)

    def _pending_ran(self, module, args) -> None:
        if self._active is not None:
            self._active.pending_ran = True

    def _wrap(self, name: str, module: nn.Module) -> None:
        had_own = "forward" in module.__dict__
        saved = module.__dict__.get("forward")
        inner = module.forward  # bound method, or an instance attribute set by e.g. accelerate's hooks

        def forward(*args, **kwargs):
            return self._call(name, inner, args, kwargs)

        module.forward = forward
        self._wrapped[name] = (module, saved, had_own)

    # -- one forward ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def forward(self, batch: int, *, store: bool = True) -> Iterator[None]:
        """Around one block call on batch ``batch``; ``store=False`` for the block's last forward (its outputs are
        not needed again)."""
        self._active = _Forward(batch, store)
        try:
            yield
        finally:
            self._active = None

    def _call(self, name: str, inner: Any, args: tuple, kwargs: dict) -> Any:
        fwd = self._active
        if fwd is None:  # a forward outside the driver's loops (e.g. finding the layer order): plain
            return inner(*args, **kwargs)
        call = fwd.calls[name] = fwd.calls.get(name, -1) + 1
        key = (name, fwd.batch, call)
        sig = _signature(args, kwargs)
        entry = self._entries.get(key)
        if entry is not None:
            out, esig, versions, _ = entry
            if esig == sig and versions == [t._version for t in _tensors(out)]:
                self.hits += 1
                return out
            self._drop(key)
        out = inner(*args, **kwargs)
        if fwd.store and not fwd.pending_ran:
            tensors = _tensors(out)
            size = sum(t.numel() * t.element_size() for t in tensors)
            # a descendant's output is not read again once this one is stored: it makes room for it
            below = [k for k in self._entries if k[1] == fwd.batch and k[0].startswith(name + ".")]
            if self.bytes - sum(self._entries[k][3] for k in below) + size <= self.budget:
                for k in below:
                    self._drop(k)
                self._entries[key] = (out, sig, [t._version for t in tensors], size)
                self.bytes += size
        return out

    def _drop(self, key: tuple[str, int, int]) -> None:
        self.bytes -= self._entries.pop(key)[3]

    def close(self) -> None:
        """Free the store and give every submodule its own forward back."""
        for h in self._pending_hooks:
            h.remove()
        self._pending_hooks = []
        for module, saved, had_own in self._wrapped.values():
            if had_own:
                module.forward = saved
            else:
                del module.forward
        self._wrapped.clear()
        self._entries.clear()
        self.bytes = 0
