"""Exports of a trained adapter: the adapter itself, merged full-precision, or merged and re-quantized.

>>> from qtune.export import export
>>> export("runs/smollm2-135m-qlora-nf4", "out/merged", mode="merged", dtype="bf16")
>>> export("runs/smollm2-135m-qlora-nf4", "out/gptq", mode="quantized", format="gptq", layout="gptq",
...        calibration="qtune:austen/emma", heldout="qtune:austen/persuasion")

* :func:`export_adapter` (``adapter``): PEFT folder + model card + ``qtune_base.json``.
* :func:`export_merged` (``merged``): LoRA folded into the dequantized base in fp32; a plain transformers
  checkpoint (no qtune needed to load it).
* :func:`export_quantized` (``quantized``): merged, then quantized again (RTN formats directly, GPTQ with
  calibration data), with the per-layer error against the merged full-precision model; ``format="gguf"``
  writes one GGUF file (:mod:`qtune.export.quantized_gguf`).
* :func:`write_gguf`: any qtune/transformers model (or one loaded from a GGUF file) as a GGUF file.

Every export is written to a temporary folder next to ``out`` and renamed at the end (nothing partial is
ever left at ``out``; an existing ``out`` is only replaced with ``overwrite=True``), reloads itself and
checks logits before reporting success (``verify=False`` skips that), and can be uploaded to the Hugging
Face Hub (``push_to_hub="user/name"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapter import export_adapter
from .gguf import GGUFWritten, write_gguf
from .merged import export_merged, merge_to_float
from .quantized import export_quantized
from .quantized_gguf import export_gguf
from .report import ExportResult, LayerError
from .source import ExportSource, load_source
from .verify import LogitsDiff, VerificationError

MODES = ("adapter", "merged", "quantized")

__all__ = ["export", "export_adapter", "export_merged", "export_quantized", "export_gguf", "load_source",
           "merge_to_float", "write_gguf",
           "GGUFWritten",
           "ExportSource", "ExportResult", "LayerError", "LogitsDiff", "VerificationError", "MODES"]


def export(source: str | Path | ExportSource, out: str | Path, *, mode: str = "adapter", **kwargs: Any) -> ExportResult:
    """Export ``source`` (a run or adapter folder) to ``out`` in ``mode`` (``adapter``/``merged``/``quantized``).

    ``kwargs`` go to :func:`export_adapter`, :func:`export_merged` or :func:`export_quantized`.

    ``mode="quantized", format="gguf"`` writes one GGUF file (:func:`export_gguf`, ``gguf_type`` for Hugging Face
    bases).

    Raises:
        ValueError: unknown mode, or an option the mode does not take (named).
    """
    funcs = {"adapter": export_adapter, "merged": export_merged, "quantized": export_quantized}
    if mode not in funcs:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    import inspect

    func = funcs[mode]
    if mode == "quantized" and str(kwargs.get("format") or "").strip().lower() == "gguf":
        func = export_gguf
        kwargs = _gguf_kwargs(kwargs)
    elif kwargs.get("gguf_type") is not None:
        raise ValueError("--gguf-type applies with --format gguf only")
    else:
        kwargs.pop("gguf_type", None)
    allowed = set(inspect.signature(func).parameters)
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        raise ValueError(f"--mode {mode} does not take {', '.join(unknown)}")
    return func(source, out, **kwargs)


def _gguf_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``export_quantized``'s arguments for ``format="gguf"`` → :func:`export_gguf`'s (refusing what cannot apply)."""
    kwargs = dict(kwargs)
    kwargs.pop("format")
    kwargs.pop("progress", None)
    layout = kwargs.pop("layout", None)
    if layout not in (None, "qtune", "gguf"):
        raise ValueError(f"--layout {layout} does not apply to --format gguf (one GGUF file)")
    for key in ("calibration", "samples", "seq_len"):
        if kwargs.pop(key, None) is not None:
            raise ValueError(f"--{key.replace('_', '-')} does not apply to --format gguf (no calibration)")
    return kwargs
