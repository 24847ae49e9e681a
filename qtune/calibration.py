"""Calibration data and sequential (block-by-block) GPTQ for causal LMs.

:func:`gptq_quantize_model` follows the reference GPTQ driver (IST-DASLab/gptq, AutoGPTQ):

1. Run the model on the calibration windows until the first decoder block, capturing the block's
   inputs (hidden states and keyword arguments: attention mask, rotary embeddings...).
2. For each block: hook its linear layers, run the block on every captured input to accumulate each
   layer's Hessian ``H = 2/n·Σ x xᵀ`` (:class:`qtune.formats.gptq.GPTQHessian`), quantize the layers
   with :func:`qtune.formats.gptq.gptq_quantize` and swap in ``LinearGPTQ``. With ``true_sequential`` the
   block's layers are processed in groups in execution order (layers reading the same input form one
   group: q/k/v, then o, then gate/up, then down), each group calibrated on the outputs of the
   already-quantized groups.
3. Run the quantized block on its inputs; its outputs are the next block's inputs.

While a block is calibrated its quantized layers are replaced by stand-ins holding the dequantized weight
(``x Ŵᵀ``, what the layer computes), so later forwards do not dequantize again per batch. The block is
moved to ``device`` (CUDA when available) for its forwards, Hessians and solve, and back afterwards.

Peak memory is one block (on ``device``) plus the calibration activations (two
``samples × seq_len × hidden`` fp32 tensors) plus one ``K × K`` Hessian per layer of the block. Linear
layers outside the decoder blocks (rarely quantized) are calibrated by one final full forward pass.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .block_replay import BlockReplay, default_budget
from .formats import QuantConfig
from .formats.gptq import GPTQHessian
from .nn import (QuantizationReport, QuantLinear, float_weight_of, linear_modules, plan_layers, quantize_experts,
                 quantize_layer)
from .nn.experts import QuantExperts
from .nn.replace import LayerReport, set_submodule

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                 ".parquet": "parquet", ".csv": "csv"}


# ------------------------------------------------------------------------------------------------
# Calibration data
# ------------------------------------------------------------------------------------------------
def calibration_texts(source: str | Path, *, text_field: str | None = None, split: str = "train",
                      max_chars: int | None = None) -> list[str]:
    """Texts from a local file (``.txt``, ``.json``/``.jsonl``, ``.parquet``, ``.csv``) or a dataset name,
    read with the ``datasets`` library.

    Args:
        source: a file path, ``qtune:austen/emma``/``qtune:austen/persuasion`` (bundled; the old
            ``austen:<novel>`` spelling still reads, with a warning), or a Hub dataset name (needs a network).
        text_field: the column holding text (default: ``"text"``, else the first string column).
        split: dataset split for a dataset name.
        max_chars: stop after this many characters.
    Raises:
        FileNotFoundError: ``source`` looks like a path and does not exist.
        ValueError: no text column, or no text at all.
    """
    import datasets

    from . import sources

    source = sources.normalize(source)  # the old austen:<novel> spelling warns and becomes qtune:austen/<novel>
    if str(source).startswith(sources.BUNDLED_TEXT):  # a bundled novel, handy for demos and tests
        return [sources.bundled_text(str(source))[:max_chars]]
    hub = str(source).startswith("hf:")  # the one source syntax: hf:<dataset> is a Hub dataset, never a path
    if str(source).startswith(sources.DEMO_PREFIX):  # a bundled demo set: its records file
        from .assets import demo_path

        source = str(demo_path(str(source)[len(sources.DEMO_PREFIX):]))
    source = str(source).removeprefix("hf:")
    path = Path(source)
    looks_like_path = not hub and (path.suffix.lower() in TEXT_SUFFIXES or "/" in source or source.startswith("."))
    if path.exists() and not hub:
        if path.is_dir():
            raise ValueError(f"calibration source {source} is a folder; give a .txt/.json/.jsonl/.parquet file")
        builder = TEXT_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"calibration file {source}: unsupported extension {path.suffix!r} "
                             f"(use one of {sorted(TEXT_SUFFIXES)})")
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except Exception as e:  # datasets raises many types for malformed files
            raise ValueError(f"calibration file {source}: cannot be read ({type(e).__name__}: {e})") from None
    elif looks_like_path:
        raise FileNotFoundError(f"calibration file {source} does not exist")
    else:
        try:
            ds = datasets.load_dataset(str(source), split=split)
        except Exception as e:
            raise ValueError(f"calibration dataset {source!r} cannot be loaded ({type(e).__name__}: {e})") from None
    columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    field = text_field or ("text" if "text" in columns else (columns[0] if columns else None))
    if field is None or field not in ds.column_names:
        raise ValueError(f"calibration source {source}: no text column (columns: {ds.column_names})")
    texts, total = [], 0
    for t in ds[field]:
        if t:
            texts.append(t)
            total += len(t)
            if max_chars is not None and total >= max_chars:
                break
    if not texts:
        raise ValueError(f"calibration source {source}: holds no text")
    return texts


def calibration_windows(source: str | Path | list[str], tokenizer: Any, *, samples: int = 128, seq_len: int = 512,
                        seed: int = 0, text_field: str | None = None) -> Tensor:
    """``samples`` random windows of ``seq_len`` tokens from the calibration text (as in the GPTQ paper).

    The texts are joined with blank lines and tokenized once; window starts are drawn uniformly with
    ``seed``.

    Returns:
        int64 ``[samples, seq_len]`` token ids.
    Raises:
        ValueError: non-positive sizes, or fewer than ``seq_len + 1`` tokens of text.
    """
    if samples < 1 or seq_len < 2:
        raise ValueError(f"samples={samples} must be ≥ 1 and seq_len={seq_len} ≥ 2")
    texts = source if isinstance(source, list) else calibration_texts(
        source, text_field=text_field, max_chars=max(samples * seq_len * 12, 200_000))
    ids = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens; at least {seq_len + 1} are needed for "
                         f"--seq-len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


# ------------------------------------------------------------------------------------------------
# Model structure
# ------------------------------------------------------------------------------------------------
def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ``nn.ModuleList`` of ``config.num_hidden_layers`` identical modules holding linear
    layers (else the longest such list).

    Raises:
        ValueError: none found.
    """
    best: tuple[str, nn.ModuleList] | None = None
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1 \
                and (linear_modules(m[0]) or any(isinstance(x, QuantLinear) for x in m[0].modules())):
            if n_layers is not None and len(m) == n_layers:
                return name, m
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no decoder block list (nn.ModuleList of layers) found")
    return best


class _StopForward(Exception):
    pass


def _first(x: Any) -> Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[Tensor]) -> list[tuple[Tensor, dict]]:
    """(hidden states, kwargs) given to ``block`` for each batch of token ids."""
    captured: list[tuple[Tensor, dict]] = []

    def hook(module, args, kwargs):
        # positional inputs (GPT-2 passes past/mask positionally) become keywords, so that the hidden
        # states can be swapped per block while the rest is replayed as is
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        rest = dict(bound)
        first = next(iter(rest))
        hidden = rest.pop(first)
        extra = rest.pop("kwargs", None)
        if isinstance(extra, dict):
            rest.update(extra)
        rest["_hidden_name"] = first
        rest.pop("past_key_values", None)
        rest.pop("past_key_value", None)
        rest.pop("layer_past", None)
        rest["use_cache"] = False
        captured.append((hidden.detach(), rest))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _call(block: nn.Module, hidden: Tensor, kwargs: dict, device) -> Any:
    kw = {k: _to(v, device) for k, v in kwargs.items() if k != "_hidden_name"}
    kw[kwargs.get("_hidden_name", "hidden_states")] = hidden.to(device)
    return block(**kw)


def _run_block(block: nn.Module, inputs: list[tuple[Tensor, dict]], device: torch.device,
               storage: torch.device | str = "cpu", replay: BlockReplay | None = None) -> list[Tensor]:
    """The block's outputs (hidden states) for every captured input, run on ``device``, kept on ``storage``
    (reading the ``replay`` store, not adding to it: the block's last forward)."""
    outputs = []
    for b, (hidden, kwargs) in enumerate(inputs):
        with replay.forward(b, store=False) if replay is not None else contextlib.nullcontext():
            outputs.append(_first(_call(block, hidden, kwargs, device)).to(storage))
    return outputs


def _to(v: Any, device: torch.device) -> Any:
    if isinstance(v, Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_to(x, device) for x in v)
    return v


def _groups_in_order(block: nn.Module, names: list[str], sample: tuple[Tensor, dict], device,
                     alone: frozenset[str] = frozenset()) -> list[list[str]]:
    """Layers of ``block`` grouped by shared input tensor, in execution order (one forward on one sample);
    the modules in ``alone`` (fused experts) form groups of their own."""
    order: list[tuple[str, int]] = []
    alive: list[Tensor] = []  # keeps the inputs alive so their ids are not reused during the forward
    handles = []
    for n in names:
        def hook(module, args, kwargs, n=n):
            x = args[0] if args else next(iter(kwargs.values()))
            alive.append(x)
            order.append((n, id(x)))
        handles.append(block.get_submodule(n).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        hidden, kwargs = sample
        _call(block, hidden[:1], kwargs, device)
    except Exception:
        # a mask shaped for the whole batch may reject a 1-row slice: fall back to the whole batch
        order.clear()
        alive.clear()
        _call(block, hidden, kwargs, device)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: dict[int, int] = {}
    done: set[str] = set()
    for n, key in order:
        if n in done:
            continue
        done.add(n)
        if n in alone:  # a fused experts module: calibrated on its own (per-expert Hessians)
            groups.append([n])
        elif key in seen:
            groups[seen[key]].append(n)
        else:
            seen[key] = len(groups)
            groups.append([n])
    groups.extend([[n] for n in names if n not in done])  # layers the forward did not reach
    return groups


# ------------------------------------------------------------------------------------------------
# Fused experts: per-expert Hessians from the model's own routing
# ------------------------------------------------------------------------------------------------
def _routed_call(experts: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """``(hidden_states [T, H], top_k_index [T, k])`` of a call ``experts(hidden_states, top_k_index,
    top_k_weights)`` (the contract of transformers' ``use_experts_implementation``), positional or keyword."""
    bound = inspect.signature(experts.forward).bind_partial(*args, **kwargs).arguments
    values = list(bound.values())
    hidden = bound.get("hidden_states", values[0] if values else None)
    index = bound.get("top_k_index", values[1] if len(values) > 1 else None)
    if not isinstance(hidden, Tensor) or not isinstance(index, Tensor):
        raise ValueError(f"{type(experts).__name__}: called without (hidden_states, top_k_index, ...) tensors; qtune "
                         "cannot see which tokens the router sends to each expert")
    return hidden, index


def routed_tokens(top_k_index: Tensor, num_experts: int) -> dict[int, Tensor]:
    """``{expert: rows of the tokens routed to it}`` for a ``[T, k]`` routing (ids ``>= num_experts``, the
    expert-parallel sentinels, and negative ids are ignored), experts in ascending order."""
    ids = top_k_index.reshape(-1)
    hit = torch.unique(ids[(ids >= 0) & (ids < num_experts)]).tolist()
    return {e: torch.where(top_k_index == e)[0] for e in hit}


def expert_hidden(experts: nn.Module, e: int, x: Tensor, up: Callable[[int, Tensor], Tensor]) -> Tensor:
    """Expert ``e``'s intermediate activations on its routed tokens ``x`` [t, H]: the input of its
    ``down_proj``, ``_apply_gate(up(e, x) + b_up[e])`` (``act_fn(...)`` without a gate), as the model's eager loop
    computes it. ``up(e, x)`` is ``x W_up[e]ᵀ`` (float or quantized)."""
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    h = up(e, x)
    if experts.has_bias and getattr(experts, up_name + "_bias", None) is not None:
        h = h + getattr(experts, up_name + "_bias")[e]
    return experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)


def float_up(experts: nn.Module) -> Callable[[int, Tensor], Tensor]:
    """``up(e, x) = x W_up[e]ᵀ`` with the float experts module's own 3-D weight (either layout)."""
    w = experts._parameters["gate_up_proj" if experts.has_gate else "up_proj"]

    def up(e: int, x: Tensor) -> Tensor:
        we = w[e].t() if experts.is_transposed else w[e]
        return torch.nn.functional.linear(x.to(we.dtype), we)
    return up


def expert_hessians(block: nn.Module, name: str, inputs: list[tuple[Tensor, dict]], device: torch.device, *,
                    up: Callable[[int, Tensor], Tensor] | None = None) -> tuple[list[GPTQHessian], list[GPTQHessian] | None]:
    """Per-expert Hessians of the fused experts module ``name`` of ``block``, from the model's own routing.

    Each block forward on the calibration ``inputs`` is stopped when it reaches the experts module (nothing
    after it changes the experts' inputs); the call's ``hidden_states`` [T, H] and ``top_k_index`` [T, k] (the
    router's choice) give, for each expert ``e``, the rows ``X_e`` of the tokens routed to it:

        H_up[e]   = 2/n_e · X_eᵀ X_e                    (gate_up_proj / up_proj, in = H)
        H_down[e] = 2/n_e · Z_eᵀ Z_e,  Z_e = expert_hidden(e, X_e)   (down_proj, in = I; only with ``up``)

    ``n_e`` (``.nsamples``) is the number of tokens routed to ``e``; the routing weights do not enter (they scale
    the expert's output, not its inputs). The experts implementation (eager, batched_mm, grouped_mm) does not
    matter: the hook reads the module's inputs, which the router fixes.

    Returns:
        ``(H_up, H_down)``: one :class:`GPTQHessian` per expert each (``H_down`` is ``None`` without ``up``).
    """
    experts = block.get_submodule(name)
    num_experts = experts._parameters["down_proj"].shape[0]
    w_up, w_down = (experts._parameters[n] for n in ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj"))
    k_up = w_up.shape[1] if experts.is_transposed else w_up.shape[2]
    k_down = w_down.shape[1] if experts.is_transposed else w_down.shape[2]
    h_up = [GPTQHessian(int(k_up), device=device) for _ in range(num_experts)]
    h_down = [GPTQHessian(int(k_down), device=device) for _ in range(num_experts)] if up is not None else None

    def hook(module, args, kwargs):
        hidden, index = _routed_call(module, args, kwargs)
        for e, rows in routed_tokens(index, num_experts).items():
            x = hidden[rows].detach()
            h_up[e].add_batch(x)
            if h_down is not None:
                h_down[e].add_batch(expert_hidden(module, e, x, up).detach())
        raise _StopForward

    handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for hidden, kwargs in inputs:
            try:
                _call(block, hidden, kwargs, device)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if sum(h.nsamples for h in h_up) == 0:
        raise ValueError(f"experts module {name}: the block forward never reached it, so it has no calibration inputs")
    return h_up, h_down


@dataclasses.dataclass(frozen=True)
class ExpertFallback:
    """An expert that received too few calibration tokens for GPTQ and was quantized round-to-nearest."""

    module: str
    expert: int
    tokens: int

    def __str__(self) -> str:
        return f"{self.module}[{self.expert}] ({self.tokens} tokens)"


def gptq_experts(model: nn.Module, block: nn.Module, prefix: str, name: str, cfg: QuantConfig,
                 inputs: list[tuple[Tensor, dict]], device: torch.device, *, sequential: bool,
                 min_tokens: int) -> tuple[LayerReport, list[ExpertFallback]]:
    """GPTQ the fused experts module ``prefix + name`` (``name`` inside ``block``) expert by expert and swap in
    its :class:`~qtune.nn.experts.QuantExperts`.

    With ``sequential`` (true-sequential GPTQ) the ``down_proj`` Hessians are taken after ``gate_up_proj`` is
    quantized, on the quantized experts' activations; otherwise both come from one pass on the float experts.
    An expert that received fewer than ``min_tokens`` tokens is quantized round-to-nearest on the same grid
    (``cfg.without_calibration()``) in both weights; the fallbacks are returned.
    """
    experts = block.get_submodule(name)
    q = QuantExperts(experts, cfg, name=prefix + name)
    up_name, down_name = q.weight_names
    up_stack = q._modules[up_name]
    if sequential:
        h_up, _ = expert_hessians(block, name, inputs, device)
    else:
        h_up, h_down = expert_hessians(block, name, inputs, device, up=float_up(experts))
    counts = [h.nsamples for h in h_up]
    keep = [n >= min_tokens for n in counts]
    up_stack.quantize_(experts._parameters[up_name], name=f"{prefix}{name}.{up_name}",
                       hessians=[h if k else None for h, k in zip(h_up, keep)])
    del h_up
    if sequential:
        _, h_down = expert_hessians(block, name, inputs, device, up=lambda e, x: up_stack.expert(e)(x))
    q._modules[down_name].quantize_(experts._parameters[down_name], name=f"{prefix}{name}.{down_name}",
                                    hessians=[h if k else None for h, k in zip(h_down, keep)])
    before = sum(experts._parameters[n].numel() * experts._parameters[n].element_size() for n in q.weight_names)
    set_submodule(model, prefix + name, q)
    fallbacks = [ExpertFallback(prefix + name, e, n) for e, n in enumerate(counts) if not keep[e]]
    return LayerReport(prefix + name, cfg.format, q.bits_per_parameter(), before, q.quantized_bytes()), fallbacks


# ------------------------------------------------------------------------------------------------
# GPTQ driver
# ------------------------------------------------------------------------------------------------
class _Dequantized(nn.Module):
    """Stand-in for a quantized layer while its block is being calibrated: ``y = x Ŵᵀ + b`` with ``Ŵ``
    dequantized once, instead of once per forward.

    It computes what :meth:`QuantLinear.forward` computes on the reference path (inputs cast to the layer's
    ``compute_dtype``, ``F.linear`` with the dequantized weight, output cast back), so the calibration of the
    block's later layers sees the quantized layer's outputs. The driver puts the quantized layer back when the
    block is done.

    Args:
        layer (QuantLinear): the quantized layer; ``Ŵ`` is ``layer.dequantize()``, ``[N, K]`` in ``compute_dtype``.
    """

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        self.dtype = layer.compute_dtype
        self.weight = layer.dequantize(self.dtype)
        self.bias = None if layer.bias is None else layer.bias.to(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x.to(self.dtype), self.weight, self.bias).to(x.dtype)


def _move_block(block: nn.Module, device: torch.device) -> None:
    """Move one decoder block (its parameters and buffers) to ``device``; the one place the driver moves blocks."""
    block.to(device)


class _BlockTimes:
    """Seconds spent per part of one block's calibration (forwards, Hessians, solve), for the progress line.

    On CUDA the clock is read after a synchronize, so that asynchronous kernels count where they ran.
    """

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, part: str, since: float) -> float:
        t = self.now()
        self.seconds[part] = self.seconds.get(part, 0.0) + t - since
        return t


@dataclasses.dataclass(frozen=True)
class BlockProgress:
    """One calibrated block, as reported by :func:`gptq_quantize_model` (``progress=callable``).

    Attributes:
        index: the block's index (0-based); ``total`` blocks in all.
        seconds: the block's wall time; ``elapsed``: since the start of the calibration.
        parts: seconds per part of the block: ``forwards`` (block forwards over the calibration windows, Hessian
            accumulation excluded), ``hessians`` (``H += 2/n·XᵀX``), ``solve`` (GPTQ solve, packing and layer swap).
    """

    index: int
    total: int
    seconds: float
    elapsed: float
    parts: dict[str, float]

    @property
    def eta(self) -> float:
        """Seconds left, at the mean time per block so far."""
        return self.elapsed / (self.index + 1) * (self.total - self.index - 1)

    def line(self) -> str:
        """``GPTQ block 3/30 4.1 s (forwards 2.0 s, hessians 1.1 s, solve 0.9 s), elapsed 0:12, ETA 1:50``."""
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.parts.items())
        return (f"GPTQ block {self.index + 1}/{self.total} {self.seconds:.1f} s ({parts}), "
                f"elapsed {_clock(self.elapsed)}, ETA {_clock(self.eta)}")


def _clock(t: float) -> str:
    t = int(round(t))
    return f"{t // 3600}:{t // 60 % 60:02d}:{t % 60:02d}" if t >= 3600 else f"{t // 60}:{t % 60:02d}"


def default_device(model: nn.Module) -> torch.device:
    """Where GPTQ calibrates a block: CUDA when available (one block at a time; the model stays where it is),
    else the device of the model's first parameter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    return next(model.parameters()).device

def check_group_sizes(model: nn.Module, plan: Mapping[str, QuantConfig]) -> None:
    """The GPTQ checkpoint layout's check that ``group_size`` divides every planned layer's ``in_features``
    (:func:`qtune.integrations.layouts.gptq.check_plan`).

    Raises:
        ValueError: naming the first layer where it does not.
    """
    from .integrations.layouts.gptq import check_plan

    check_plan(model, plan)


def _quantize_layer(model: nn.Module, name: str, cfg: QuantConfig, hessian: GPTQHessian | None,
                    report: QuantizationReport) -> None:
    kwargs = {"hessian": hessian} if cfg.needs_calibration else {}
    report.layers.append(quantize_layer(model, name, cfg, **kwargs))


def _hessians_from(module_root: nn.Module, names: list[str], run: Callable[[], Any], device) -> dict[str, GPTQHessian]:
    hessians: dict[str, GPTQHessian] = {}
    handles = []
    for n in names:
        layer = module_root.get_submodule(n)
        w, _ = float_weight_of(layer, n)
        hessians[n] = GPTQHessian(w.shape[1], device=device)

        def hook(module, args, n=n):
            hessians[n].add_batch(args[0].detach())
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return hessians


def _shared_hessians(block: nn.Module, group: list[str], inputs: list[tuple[Tensor, dict]],
                     device: torch.device, times: _BlockTimes | None = None,
                     replay: BlockReplay | None = None) -> dict[str, GPTQHessian]:
    """Hessians of a group of layers that read the same input tensor (q/k/v, gate/up), in one pass.

    The group's layers see one tensor, so ``2/n·XᵀX`` is accumulated once and shared (every consumer
    copies it before damping). Each block forward stops as soon as the group's last layer has been
    reached: the rest of the block cannot change these inputs. The Hessian is bit-identical to one
    accumulated per layer over a full forward. ``times`` (optional) collects the seconds spent in the Hessians;
    ``replay`` (optional) returns the stored outputs of the block's finished submodules instead of recomputing them.
    """
    first = block.get_submodule(group[0])
    w, _ = float_weight_of(first, group[0])
    hessian = GPTQHessian(w.shape[1], device=device)
    seen: set[str] = set()

    def accumulate(module, args):
        if times is None:
            hessian.add_batch(args[0].detach())
        else:
            t = times.now()
            hessian.add_batch(args[0].detach())
            times.add("hessians", t)

    def stop_when_all_seen(name: str):
        def hook(module, args):
            seen.add(name)
            if seen.issuperset(group):
                raise _StopForward
        return hook

    handles = [first.register_forward_pre_hook(accumulate)]
    # registered after `accumulate`, so the first layer's input is taken before a stop
    handles += [block.get_submodule(n).register_forward_pre_hook(stop_when_all_seen(n)) for n in group]
    try:
        for b, (hidden, kwargs) in enumerate(inputs):
            seen.clear()
            try:
                with replay.forward(b) if replay is not None else contextlib.nullcontext():
                    _call(block, hidden, kwargs, device)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    if hessian.nsamples == 0:
        raise ValueError(f"layer {group[0]}: the block forward never reached it, so it has no calibration inputs")
    return {n: hessian for n in group}


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, calibration: Tensor, config: QuantConfig, *,
                        skip_modules=None, overrides: Mapping[str, QuantConfig | None] | None = None,
                        true_sequential: bool | None = None, batch_size: int = 8,
                        device: torch.device | str | None = None,
                        progress: bool | Callable[[BlockProgress], None] = True,
                        min_expert_tokens: int | None = None, replay_budget: int | None = None) -> QuantizationReport:
    """Quantize a causal LM in place with sequential, block-by-block GPTQ.

    Args:
        model: a transformers causal LM (float), any device (blocks are moved to ``device`` one at a time).
        calibration: int64 ``[samples, seq_len]`` token ids (:func:`calibration_windows`).
        config: default format; ``GPTQConfig`` layers are calibrated, others (RTN, NF4...) are quantized
            directly when their block is reached.
        skip_modules, overrides: as in :func:`qtune.quantize_model` (``skip_modules=None``: ``lm_head`` and
            the output embeddings).
        true_sequential: process each block's layers group by group (default: ``config.true_sequential``).
        batch_size: calibration windows per forward.
        device: where each block is calibrated (its forwards, Hessians and solve): the blocks are moved there one
            at a time and back to where they were, the calibration activations stay with the model.
            Default: CUDA when available, else the device of the model's first parameter (:func:`default_device`).
        progress: print one line per block to stderr (its time split into forwards, Hessians and solve, and an
            ETA: :meth:`BlockProgress.line`), or a callable that receives each :class:`BlockProgress`.
        min_expert_tokens: fused experts planned with GPTQ are calibrated expert by expert on the tokens the
            model's own router sends to each (:func:`expert_hessians`); an expert that receives fewer tokens is
            quantized round-to-nearest on the same grid and listed in ``report.expert_fallbacks`` (default:
            ``2 × group_size``, 256 for ``group_size=-1``).
        replay_budget: bytes that the forward replay (:mod:`qtune.block_replay`) may hold per block: the outputs of
            a block's finished submodules (its quantized linears, then its attention) are stored once and reused by
            the block's later forwards, so each is computed once instead of up to four times; the results are
            bit-identical. Default: half the free memory of ``device`` (:func:`qtune.block_replay.default_budget`);
            0 turns replay off.
    Returns:
        :class:`qtune.QuantizationReport` (``report.seconds`` holds the wall time).
    Raises:
        ValueError: bad calibration shape; a damped Hessian that is not positive definite; GPTQ experts outside
            the decoder blocks.
    """
    if not isinstance(calibration, Tensor) or calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
        raise ValueError("calibration must be an integer tensor [samples, seq_len] of token ids")
    start = time.perf_counter()
    plan = plan_layers(model, config, skip_modules=skip_modules, overrides=overrides)
    if min_expert_tokens is not None and (isinstance(min_expert_tokens, bool) or not isinstance(min_expert_tokens, int)
                                          or min_expert_tokens < 1):
        raise ValueError(f"min_expert_tokens={min_expert_tokens!r} must be a positive integer")
    if replay_budget is not None and (isinstance(replay_budget, bool) or not isinstance(replay_budget, int)
                                      or replay_budget < 0):
        raise ValueError(f"replay_budget={replay_budget!r} must be a number of bytes >= 0 (0 turns replay off)")
    if true_sequential is None:
        true_sequential = bool(getattr(config, "true_sequential", True))
    first = next(model.parameters())
    storage = first.device  # where the model and the calibration activations stay
    device = torch.device(device) if device is not None else default_device(model)
    if replay_budget is None:
        replay_budget = default_budget(device)
    was_training = model.training
    model.eval()
    report = QuantizationReport()
    for name, cfg in plan.experts.items():  # round-to-nearest experts need no Hessian
        if not cfg.needs_calibration:
            report.layers.append(quantize_experts(model, name, cfg))
    blocks_name, blocks = find_blocks(model)
    outside = [n for n, c in plan.experts.items() if c.needs_calibration and not n.startswith(blocks_name + ".")]
    if outside:
        raise ValueError(f"{outside[0]}: fused experts outside the decoder blocks ({blocks_name}) cannot be GPTQ "
                         "calibrated; quantize them with a format without calibration (e.g. rtn)")
    batches = [calibration[i:i + batch_size].to(storage) for i in range(0, calibration.shape[0], batch_size)]
    inputs = _capture_block_inputs(model, blocks[0], batches)

    for i, block in enumerate(blocks):
        block_start = time.perf_counter()
        times = _BlockTimes(device)
        home = next(block.parameters()).device
        _move_block(block, device)
        prefix = f"{blocks_name}.{i}."
        names = [n[len(prefix):] for n in plan if n.startswith(prefix)]
        experts = [n[len(prefix):] for n, c in plan.experts.items() if n.startswith(prefix) and c.needs_calibration]
        calibrated = [n for n in names if plan[prefix + n].needs_calibration]
        quantized: dict[str, QuantLinear] = {}  # replaced by stand-ins until the block is done
        replay = BlockReplay(block, replay_budget)
        pending = set(calibrated) | set(experts)  # layers and experts modules still to be calibrated
        done: set[str] = set()

        def quantize(n: str, hessian: GPTQHessian | None) -> None:
            t = times.now()
            _quantize_layer(model, prefix + n, plan[prefix + n], hessian, report)
            layer = block.get_submodule(n)
            if isinstance(layer, QuantLinear):  # the later forwards of this block read Ŵ once, not per batch
                quantized[n] = layer
                set_submodule(block, n, _Dequantized(layer))
            pending.discard(n)
            done.add(n)
            times.add("solve", t)

        def gptq_experts_module(n: str, sequential: bool) -> None:
            t = times.now()
            cfg = plan.experts[prefix + n]
            threshold = min_expert_tokens or (2 * cfg.group_size if cfg.group_size > 0 else 256)
            layer, fallbacks = gptq_experts(model, block, prefix, n, cfg, inputs, device, sequential=sequential,
                                            min_tokens=threshold)
            report.layers.append(layer)
            report.expert_fallbacks.extend(fallbacks)
            pending.discard(n)
            done.add(n)
            times.add("solve", t)

        try:
            for n in names:
                if n not in calibrated:
                    quantize(n, None)
            if calibrated or experts:
                if true_sequential:  # each group calibrated on the outputs of the already-quantized ones
                    # groups of layers that read one tensor, in execution order; each experts module on its own
                    for group in _groups_in_order(block, calibrated + experts, inputs[0], device, frozenset(experts)):
                        replay.update(done, pending)
                        if group[0] in experts:
                            gptq_experts_module(group[0], True)
                            continue
                        t = times.now()
                        hessians = _shared_hessians(block, group, inputs, device, times, replay)
                        times.add("forwards", t)
                        for n in group:
                            quantize(n, hessians.pop(n))
                else:  # every layer and expert calibrated on the float block's activations
                    t = times.now()
                    hessians = _hessians_from(block, calibrated, lambda: _run_block(block, inputs, device, storage),
                                              device) if calibrated else {}
                    times.add("forwards", t)
                    for n in experts:  # before any layer of the block is swapped
                        gptq_experts_module(n, False)
                    for n in calibrated:
                        quantize(n, hessians.pop(n))
            t = times.now()
            replay.update(done, pending)
            outputs = _run_block(block, inputs, device, storage, replay)
            times.add("forwards", t)
            inputs = [(out, kwargs) for out, (_, kwargs) in zip(outputs, inputs)]
        finally:  # also on an error: the quantized layers (not their stand-ins) go back, the block goes home
            replay.close()
            for n, layer in quantized.items():
                set_submodule(block, n, layer)
            _move_block(block, home)
        if progress:
            parts = {k: times.seconds.get(k, 0.0) for k in ("forwards", "hessians", "solve")}
            parts["forwards"] -= parts["hessians"]  # the Hessians are measured inside the forwards' hooks
            now = time.perf_counter()
            info = BlockProgress(i, len(blocks), now - block_start, now - start, parts)
            if callable(progress):
                progress(info)
            else:
                print(info.line(), file=sys.stderr, flush=True)

    if report.expert_fallbacks:  # always said: these experts are not GPTQ-calibrated
        print(f"GPTQ: {len(report.expert_fallbacks)} experts with fewer than the minimum calibration tokens were "
              "quantized round-to-nearest: " + ", ".join(map(str, report.expert_fallbacks)))
    rest = [n for n in plan if not isinstance(model.get_submodule(n), QuantLinear)]
    if rest:
        gptq_rest = [n for n in rest if plan[n].needs_calibration]
        hessians = _hessians_from(model, gptq_rest, lambda: [model(input_ids=b, use_cache=False) for b in batches],
                                  first.device) if gptq_rest else {}
        for n in rest:
            _quantize_layer(model, n, plan[n], hessians.pop(n, None), report)
    report.skipped.extend(n for n, _ in linear_modules(model))
    report.seconds = time.perf_counter() - start
    model.train(was_training)
    return report


def quantize_with_calibration(model: nn.Module, tokenizer: Any, source: str | Path | list[str], config: QuantConfig, *,
                              samples: int = 128, seq_len: int = 512, seed: int = 0, **kwargs: Any) -> QuantizationReport:
    """:func:`calibration_windows` then :func:`gptq_quantize_model`."""
    windows = calibration_windows(source, tokenizer, samples=samples, seq_len=seq_len, seed=seed)
    return gptq_quantize_model(model, windows, config, **kwargs)


__all__ = ["calibration_texts", "calibration_windows", "gptq_quantize_model", "quantize_with_calibration",
           "find_blocks", "plan_layers", "check_group_sizes", "expert_hessians", "routed_tokens", "ExpertFallback",
           "BlockProgress", "default_device"]
