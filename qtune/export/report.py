"""What an export measured: per-layer errors, logits differences, held-out perplexity; and the result object."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .verify import LogitsDiff

__all__ = ["LayerError", "ExportResult", "read_heldout", "Heldout", "format_layer_table"]


@dataclasses.dataclass(frozen=True)
class LayerError:
    """Re-quantization error of one layer against the merged full-precision weight ``W`` (fp32).

    Attributes:
        name: module name.
        format: qtune format of the re-quantized layer.
        bits: stored bits per weight (packed weight plus scales).
        rel_weight: ``‖Q(W) − W‖_F / ‖W‖_F``.
        rel_delta: ``‖Q(W) − W‖_F / ‖ΔW‖_F`` with ``ΔW`` the LoRA delta folded into this layer (``None``
            for a layer without adapter).
        kept: share of the LoRA change the quantized weight kept, ``1 + ⟨Q(W') − W', ΔW⟩/‖ΔW‖²``: ≈ 1 when the
            quantization noise is unrelated to ``ΔW``, ≈ 0 when ``W'`` was rounded back to the base weights.: above 1 the quantization noise is larger than what training changed.
    """

    name: str
    format: str
    bits: float
    rel_weight: float
    rel_delta: float | None = None
    kept: float | None = None
    err_sq: float = 0.0   # ‖Q(W) − W‖², for the total
    w_sq: float = 0.0     # ‖W‖²


def format_layer_table(layers: list[LayerError], total: float) -> str:
    """Per-layer error table (one line per layer) and the total line."""
    width = max([len(l.name) for l in layers] + [5])
    fw = max([len(l.format) for l in layers] + [6])
    lines = [f"{'layer':<{width}}  {'format':<{fw}}  bits   ‖Q(W)−W‖/‖W‖  ‖Q(W)−W‖/‖ΔW‖  ΔW kept"]
    for l in layers:
        rd = "-" if l.rel_delta is None else f"{l.rel_delta:.3f}"
        kept = "-" if l.kept is None else f"{100 * l.kept:.0f}%"
        lines.append(f"{l.name:<{width}}  {l.format:<{fw}}  {l.bits:4.2f}   {l.rel_weight:12.4e}  {rd:>13}  {kept:>7}")
    lines.append(f"{'total':<{width}}  {'':<{fw}}  {'':4}   {total:12.4e}")
    return "\n".join(lines)


@dataclasses.dataclass
class ExportResult:
    """What an export wrote and measured (also written to ``qtune_export.json`` in the folder).

    Attributes:
        mode: ``adapter``, ``merged`` or ``quantized``.
        out: the export folder.
        files: file names written.
        dtype: dtype of the float tensors written (merged/quantized).
        verify: logits of the reloaded export against the model it was made from (``None`` with no verify).
        probe: logits differences on the short probe input, e.g. ``{"merged vs trained": LogitsDiff}``.
        heldout: held-out perplexity by model (``{"trained": {...}, "merged": {...}, "quantized": {...}}``) and
            logits differences on its first window.
        layers: per-layer re-quantization errors (quantized mode).
        total_rel_weight: ``sqrt(Σ‖Q(W)−W‖² / Σ‖W‖²)`` over those layers.
        hub_url: where ``--push-to-hub`` uploaded it.
        warnings: e.g. a re-quantization that rounds the adapter away.
    """

    mode: str
    out: Path
    files: list[str] = dataclasses.field(default_factory=list)
    dtype: str | None = None
    format: str | None = None
    layout: str | None = None
    verify: LogitsDiff | None = None
    probe: dict[str, LogitsDiff] = dataclasses.field(default_factory=dict)
    heldout: dict[str, Any] = dataclasses.field(default_factory=dict)
    layers: list[LayerError] = dataclasses.field(default_factory=list)
    total_rel_weight: float | None = None
    merged_layers: int = 0
    hub_url: str | None = None
    seconds: float = 0.0
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {"mode": self.mode, "out": str(self.out), "files": list(self.files), "dtype": self.dtype,
             "format": self.format, "layout": self.layout, "merged_layers": self.merged_layers,
             "verify": dataclasses.asdict(self.verify) if self.verify else None,
             "probe": {k: dataclasses.asdict(v) for k, v in self.probe.items()},
             "heldout": {k: (dataclasses.asdict(v) if isinstance(v, LogitsDiff) else v)
                         for k, v in self.heldout.items()},
             "total_rel_weight": self.total_rel_weight,
             "layers": [{k: v for k, v in dataclasses.asdict(l).items() if k not in ("err_sq", "w_sq")}
                        for l in self.layers],
             "warnings": list(self.warnings), "hub_url": self.hub_url, "seconds": round(self.seconds, 2)}
        return json.loads(json.dumps(d, default=str))  # paths, dtypes

    def summary(self) -> str:
        lines = [f"qtune export: wrote {self.out} ({self.mode}"
                 + (f", {self.format}" if self.format else "") + (f", {self.layout} layout" if self.layout else "")
                 + (f", {self.dtype}" if self.dtype else "") + f") in {self.seconds:.1f} s"]
        if self.merged_layers:
            lines.append(f"  LoRA folded into {self.merged_layers} layers in fp32")
        if self.total_rel_weight is not None:
            lines.append(f"  re-quantization error vs the merged full-precision model: ‖Q(W)−W‖/‖W‖ "
                         f"{self.total_rel_weight:.4e} over {len(self.layers)} layers")
        lines.extend("  " + w.removeprefix("qtune export: ") for w in self.warnings)
        for k, v in self.probe.items():
            lines.append(f"  logits {k} (probe input): {v}")
        for k, v in self.heldout.items():
            if isinstance(v, LogitsDiff):
                lines.append(f"  logits {k} (held-out window): {v}")
            elif isinstance(v, dict) and "perplexity" in v:
                lines.append(f"  held-out perplexity, {k}: {v['perplexity']:.3f} ({v['predicted']:,} tokens)")
        if self.verify is not None:
            lines.append(f"  verified: reloaded export vs in-memory model: {self.verify}")
        else:
            lines.append("  not verified (--no-verify)")
        if self.hub_url:
            lines.append(f"  uploaded to {self.hub_url}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Held-out text
# ------------------------------------------------------------------------------------------------
def read_heldout(source: str) -> str:
    """Text of a held-out source (:mod:`qtune.sources`: ``qtune:austen/<novel>``, a ``.txt``/``.gz`` file, a
    dataset as in recipes).

    Raises:
        FileNotFoundError: a path that does not exist.
    """
    from ..sources import check_exists, read_text

    return read_text(check_exists(source, "held-out text"))


@dataclasses.dataclass
class Heldout:
    """Perplexity of a model on held-out text, and its logits on the first window (for comparisons)."""

    text: str
    tokenizer: Any
    max_tokens: int = 2048
    window: int = 512

    def __post_init__(self) -> None:
        from ..evaluate import tokenize_text

        try:
            ids = tokenize_text(self.text, self.tokenizer, tokens=self.max_tokens)
        except ValueError:
            ids = tokenize_text(self.text, self.tokenizer)
        if ids.numel() < 2:
            raise ValueError("the held-out text has fewer than 2 tokens")
        self.ids = ids
        self.first_window = ids[: self.window].reshape(1, -1)

    def measure(self, model: torch.nn.Module, log: Callable[[str], None] | None = None,
                label: str = "") -> tuple[dict[str, Any], Tensor]:
        """``(perplexity dict, fp32 logits of the first window)``."""
        from ..evaluate import perplexity
        from .verify import logits

        res = dataclasses.asdict(perplexity(model, self.ids, seq_len=self.window))
        if log is not None:
            log(f"qtune export: held-out perplexity, {label}: {res['perplexity']:.3f} ({res['predicted']:,} tokens, "
                f"{res['seconds']:.0f} s)")
        return res, logits(model, self.first_window)
