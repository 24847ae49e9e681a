"""Reload an export and compare its logits with the model it was made from.

Merged exports are checked twice: the in-memory merged model against the trained model (tolerance by
dtype, ``TOLERANCE``), and the reloaded folder against the in-memory merged model (``RELOAD_TOLERANCE``).
Quantized exports: the reloaded folder against the in-memory re-quantized model (tolerance by dtype: qtune's
loader may hold some float buffers in the model dtype). The comparison is on a short input (a fixed English sentence through the tokenizer, or fixed token ids
when there is none): ``rel = ‖a − b‖_F / ‖b‖_F`` over the logits, plus the largest absolute difference
and the share of positions whose top-1 token agrees. The tolerance follows the coarser dtype of the two
sides (``TOLERANCE``): an fp32 export must match to ~1e-6 and gets 1e-3; bf16 (8 mantissa bits, errors
compounding through the layers) gets 5e-2.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

PROBE_TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
              "must be in want of a wife.")
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# a reloaded export against the in-memory model it was saved from: the same tensors, so only op-order noise
RELOAD_TOLERANCE = 1e-3

__all__ = ["LogitsDiff", "probe_ids", "logits", "compare_logits", "check_logits", "tolerance", "verify_merged",
           "verify_quantized", "VerificationError", "TOLERANCE", "RELOAD_TOLERANCE"]


class VerificationError(ValueError):
    """The reloaded export does not reproduce the logits it should."""


@dataclasses.dataclass(frozen=True)
class LogitsDiff:
    """How far logits ``a`` are from reference logits ``b``."""

    rel: float
    max_abs: float
    top1_agree: float

    def __str__(self) -> str:
        return f"rel {self.rel:.2e}, max |Δ| {self.max_abs:.3g}, top-1 agreement {100 * self.top1_agree:.1f}%"


def probe_ids(tokenizer: Any, vocab_size: int, length: int = 24) -> Tensor:
    """Token ids [1, L] of :data:`PROBE_TEXT` (or a fixed pattern when there is no tokenizer), all < vocab_size."""
    ids: list[int] = []
    if tokenizer is not None:
        try:
            ids = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])[:length]
        except (TypeError, ValueError, KeyError):
            ids = []
    if len(ids) < 4 or max(ids) >= vocab_size:
        ids = [(7 * i + 3) % vocab_size for i in range(length)]
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def logits(model: nn.Module, ids: Tensor) -> Tensor:
    """fp32 logits [B, L, V] of a causal LM, or the scores [B, num_labels] of a sequence classifier (eval
    mode, no cache)."""
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(input_ids=ids.to(device), use_cache=False)
    finally:
        model.train(was)
    return (out.logits if hasattr(out, "logits") else out).float().cpu()


def compare_logits(a: Tensor, b: Tensor) -> LogitsDiff:
    """Difference of logits ``a`` against the reference ``b`` (same shape)."""
    if a.shape != b.shape:
        raise VerificationError(f"logits have shape {tuple(a.shape)}, expected {tuple(b.shape)}")
    a, b = a.float(), b.float()
    diff = a - b
    rel = float(diff.norm() / b.norm().clamp_min(1e-30))
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return LogitsDiff(rel=rel, max_abs=float(diff.abs().max()), top1_agree=agree)


def tolerance(*dtypes: torch.dtype) -> float:
    """Relative logits tolerance for the coarsest of ``dtypes``."""
    return max(TOLERANCE.get(d, 1e-3) for d in dtypes)


def check_logits(diff: LogitsDiff, tol: float, what: str) -> LogitsDiff:
    """Raise :class:`VerificationError` when ``diff.rel`` exceeds ``tol`` (or is NaN)."""
    if not diff.rel <= tol:  # also catches NaN
        raise VerificationError(f"{what}: the logits differ from the expected ones ({diff}; tolerance rel "
                                f"{tol:.0e}); nothing was written")
    return diff


def verify_merged(folder: Path, reference: Tensor, ids: Tensor, *, dtype: torch.dtype, tol: float,
                  auto_class: Any = None) -> LogitsDiff:
    """Reload a merged export with plain ``transformers`` (no qtune code path) and check its logits.

    Args:
        auto_class: the transformers auto class of the model (default ``AutoModelForCausalLM``; a reward
            model's is ``AutoModelForSequenceClassification``, whose "logits" are the ``(batch, 1)`` scores).
    Raises:
        VerificationError: the logits differ by more than ``tol`` (relative), or the folder still carries a
            ``quantization_config``.
    """
    from transformers import AutoModelForCausalLM

    model = (auto_class or AutoModelForCausalLM).from_pretrained(folder, dtype=dtype, use_safetensors=True)
    if getattr(model.config, "quantization_config", None) is not None or getattr(model, "hf_quantizer", None):
        raise VerificationError(f"{folder}: the merged export still declares a quantization_config")
    return check_logits(compare_logits(logits(model, ids), reference), tol, f"{folder} (reloaded)")


def verify_quantized(folder: Path, reference: Tensor, ids: Tensor, *, dtype: torch.dtype, tol: float,
                     auto_class: Any = None) -> LogitsDiff:
    """Reload a quantized export with qtune's loader (any layout) and check its logits (``auto_class``: as for
    :func:`verify_merged`).

    Raises:
        VerificationError: the logits differ by more than ``tol`` (relative).
    """
    from ..integrations.layouts import load_model

    model = load_model(folder, dtype=dtype, auto_class=auto_class)
    return check_logits(compare_logits(logits(model, ids), reference), tol, f"{folder} (reloaded)")
