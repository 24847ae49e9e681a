r"""LoftQ initialisation (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization") for qtune's LoRA layers.

A standard LoRA starts with ``B = 0``: the fine-tune begins at the quantized weight ``Q(W)`` and must first undo
the quantization error. LoftQ chooses the quantized base *and* the adapter together, so that
``deq(Q) + s·B A ≈ W`` at step 0. For every LoRA layer on a qtune ``QuantLinear`` with float weight ``W``
[N, K], LoRA rank ``r`` and scaling ``s`` (``alpha / r``, or ``alpha / √r`` with rsLoRA), with ``B A = 0`` at
the start, ``T`` times::

    Q     = quantize(W − s·B A)                    (the layer's own format and config)
    R     = W − deq(Q)
    U Σ Vᵀ = R                                      (SVD, fp32)
    B     = U[:, :r] · √Σ_r / √s,   A = √Σ_r · Vᵀ[:r] / √s      (so s·B A is the best rank-r approximation of R)

The base layer then holds the last ``Q`` (same format, same buffers and dtypes), and ``lora_A``/``lora_B`` the
last factors. ``T = 1`` gives ``Q(W)`` with the adapter fitted to its error (peft's ``replace_lora_weights_loftq``);
more steps let the quantizer see the part of ``W`` the adapter will carry. This follows peft's
``peft.utils.loftq_utils.loftq_init`` (same split of ``√Σ`` between the factors), written for any qtune format
instead of bitsandbytes NF4/int8 only.

Which formats: every format that quantizes without calibration (NF4/FP4, int8, LLM.int8, RTN, ``affine``, the GGUF
types qtune can quantize). GPTQ is **refused**: re-quantizing ``W − s·B A`` would need GPTQ's calibration
Hessian, which is not kept, and re-rounding on GPTQ's old grid would not be LoftQ (use RTN with the same bits and
group size, or no LoftQ). GGUF K-quants (no quantizer) are refused too. LoRA layers on float (unquantized)
modules keep peft's default initialisation, as in peft: their residual is zero.

The float weights come from the float checkpoint the model was quantized from (a folder of safetensors, read one
tensor at a time), a mapping ``{layer name: weight}``, or a callable ``name -> weight``; layer names are the base
model's (``model.layers.0.self_attn.q_proj``). A model loaded from an already quantized folder or a GGUF file has
no float weights to start from, so LoftQ needs that original checkpoint.

The result is deterministic (an SVD of the same matrices), so a resumed run that re-applies LoftQ to a freshly
quantized base reproduces the same base before the checkpoint's adapter weights are loaded over it.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..nn import QuantLinear

__all__ = ["loftq_init_", "LoftQReport", "loftq_factors", "float_weight_source"]


@dataclasses.dataclass
class LoftQReport:
    """What :func:`loftq_init_` did.

    Attributes:
        layers: LoRA layers initialised.
        iters: alternating steps per layer.
        error_before: ``Σ ‖W − deq(Q(W))‖²`` over those layers (the default init: ``B = 0``).
        error_after: ``Σ ‖W − (deq(Q) + s·B A)‖²`` after LoftQ.
        skipped: LoRA layers on float modules, left at the default init.
    """

    layers: int = 0
    iters: int = 1
    error_before: float = 0.0
    error_after: float = 0.0
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def relative_error(self) -> float:
        """``error_after / error_before`` (< 1: the adapter corrects part of the quantization error)."""
        return self.error_after / self.error_before if self.error_before > 0 else 0.0

    def summary(self) -> str:
        return (f"LoftQ ({self.iters} step{'s' if self.iters != 1 else ''}) on {self.layers} layers: "
                f"‖W − (deq(Q) + s·BA)‖² is {100 * self.relative_error:.1f}% of the default init's "
                f"‖W − deq(Q)‖²" + (f"; {len(self.skipped)} float layers keep the default init" if self.skipped else ""))


def loftq_factors(residual: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor]:
    """``(B, A)`` with ``scaling · B A`` the best rank-``rank`` approximation of ``residual`` (truncated SVD).

    Args:
        residual: float [N, K] (computed in fp32).
        rank: LoRA rank ``r`` (at most ``min(N, K)`` factors are non-zero).
        scaling: LoRA's ``s`` (> 0).
    Returns:
        ``B`` fp32 [N, r], ``A`` fp32 [r, K].
    """
    u, sv, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    k = min(rank, sv.numel())
    root = sv[:k].sqrt() / math.sqrt(scaling)
    b = torch.zeros(residual.shape[0], rank, dtype=torch.float32, device=residual.device)
    a = torch.zeros(rank, residual.shape[1], dtype=torch.float32, device=residual.device)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a


def float_weight_source(source: Any) -> Callable[[str, QuantLinear], Tensor]:
    """``(layer name, layer) -> float weight [out_features, in_features]`` from a checkpoint folder, a mapping or a
    callable (see the module docstring).

    Raises:
        TypeError: another kind of source.
        ValueError: a folder without safetensors weights.
    """
    if callable(source) and not isinstance(source, (str, Path)):
        return lambda name, layer: source(name)
    if isinstance(source, Mapping):
        def from_mapping(name: str, layer: QuantLinear) -> Tensor:
            if name not in source:
                raise ValueError(f"LoftQ: no float weight for layer {name} in the mapping given")
            return source[name]
        return from_mapping
    if isinstance(source, (str, Path)):
        from .safetensors_header import TensorReader, headers_by_key, safetensors_files

        folder = Path(source)
        headers = headers_by_key([str(f) for f in safetensors_files(folder)])
        reader = TensorReader(headers)

        def from_folder(name: str, layer: QuantLinear) -> Tensor:
            key = f"{name}.weight"
            if key not in headers:
                raise ValueError(f"LoftQ: {folder} has no tensor {key!r} for layer {name} (LoftQ needs the float "
                                 "checkpoint the model was quantized from)")
            w = reader.get(key)
            return w.t() if layer.from_conv1d else w  # GPT-2's Conv1D stores [in, out]
        return from_folder
    raise TypeError(f"LoftQ: float weights must come from a checkpoint folder, a mapping or a callable, got "
                    f"{type(source).__name__}")


def _check_format(name: str, layer: QuantLinear) -> None:
    cfg = layer.config
    if cfg.needs_calibration:
        raise ValueError(f"LoftQ: layer {name} is {cfg.format}, which needs calibration data to quantize; LoftQ "
                         "re-quantizes the base weight at every step (use a format without calibration, e.g. rtn with "
                         "the same bits and group size, or drop lora.init: loftq)")
    if not getattr(cfg, "can_quantize", True):
        raise ValueError(f"LoftQ: layer {name} is {cfg.format}, which qtune can read but not quantize")


def _quantize_into(layer: QuantLinear, weight: Tensor, name: str) -> None:
    """Quantize ``weight`` into ``layer`` with its own config (``quantize_``), keeping its buffers' dtypes and
    device (e.g. fp16 scales after a dtype cast)."""
    before = {k: (b.dtype, b.device) for k, b in layer.named_buffers(recurse=False) if b is not None}
    layer.quantize_(weight, name=name)
    for k, b in list(layer.named_buffers(recurse=False)):
        if k in before and b is not None and (b.dtype, b.device) != before[k]:
            setattr(layer, k, b.to(dtype=before[k][0], device=before[k][1]))


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora.layer import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")]


def _base_name(name: str) -> str:
    # peft's names: base_model.model.<model's own name>
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


@torch.no_grad()
def loftq_init_(model: nn.Module, weights: Any, *, iters: int = 1, adapter_name: str = "default",
                log: Callable[[str], None] | None = None) -> LoftQReport:
    """Apply LoftQ to every LoRA layer of ``model`` (a peft model on a qtune-quantized base), in place.

    Args:
        model: a ``PeftModel`` (or any module holding peft LoRA layers) whose LoRA layers wrap qtune ``QuantLinear``
            layers; the adapter ``adapter_name`` must exist.
        weights: the float weights: a checkpoint folder, ``{layer name: Tensor [N, K]}`` or ``name -> Tensor``.
        iters: alternating steps ``T`` (≥ 1).
        adapter_name: the adapter to initialise.
        log: called with one line per 30 layers (progress) and the summary.
    Returns:
        :class:`LoftQReport`.
    Raises:
        ValueError: ``iters < 1``; a layer of a format LoftQ cannot re-quantize (GPTQ, K-quants), a missing or
            mis-shaped float weight (the message names the layer); DoRA adapters (their magnitude would need
            re-initialising too) or LoRA on fused experts.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"LoftQ: iters={iters!r} must be an integer >= 1")
    source = float_weight_source(weights)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"LoftQ: {type(model).__name__} has no LoRA layers (call qtune.get_peft_model first)")
    targets: list[tuple[str, nn.Module, QuantLinear]] = []
    report = LoftQReport(iters=iters)
    for name, lora in layers:
        base = lora.get_base_layer()
        if adapter_name not in getattr(lora, "lora_A", {}):
            continue
        if not isinstance(base, QuantLinear):
            if isinstance(base, (nn.Linear,)) or type(base).__name__ == "Conv1D":
                report.skipped.append(_base_name(name))
                continue
            raise ValueError(f"LoftQ: layer {_base_name(name)} wraps {type(base).__name__}; LoftQ supports LoRA on "
                             "qtune's quantized linear layers (not fused experts)")
        if getattr(lora, "use_dora", {}).get(adapter_name, False):
            raise ValueError(f"LoftQ: layer {_base_name(name)} uses DoRA; LoftQ initialises plain LoRA only")
        _check_format(_base_name(name), base)  # every layer is checked before any is changed
        targets.append((_base_name(name), lora, base))
    for name, lora, base in targets:
        w = source(name, base)
        if tuple(w.shape) != (base.out_features, base.in_features):
            raise ValueError(f"LoftQ: float weight of layer {name} has shape {tuple(w.shape)}, expected "
                             f"{(base.out_features, base.in_features)}")
        device = base.packed().device
        w = w.to(device=device, dtype=torch.float32)
        lora_a, lora_b = lora.lora_A[adapter_name].weight, lora.lora_B[adapter_name].weight
        rank, scaling = lora_a.shape[0], float(lora.scaling[adapter_name])
        target = w
        for step in range(iters):
            _quantize_into(base, target, name)
            residual = w - base.dequantize(torch.float32)
            if step == 0:  # Q(W) itself: the default init's error (B = 0)
                report.error_before += float(residual.pow(2).sum())
            b, a = loftq_factors(residual, rank, scaling)
            target = w - scaling * (b @ a)
        report.error_after += float((residual - scaling * (b @ a)).pow(2).sum())
        lora_a.copy_(a.to(device=lora_a.device, dtype=lora_a.dtype))
        lora_b.copy_(b.to(device=lora_b.device, dtype=lora_b.dtype))
        report.layers += 1
        if log is not None and report.layers % 30 == 0:
            log(f"LoftQ: {report.layers}/{len(targets)} layers")
    if log is not None:
        log(report.summary())
    return report

