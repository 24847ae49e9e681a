"""peft integration: LoRA (and DoRA) adapters on qtune's quantized, frozen ``QuantLinear`` layers.

peft builds a LoRA layer for ``nn.Linear``/``Conv1D`` and for the quantized layers of the libraries it
knows (bitsandbytes, GPTQ, HQQ, ...). ``QuantLinear`` is none of them, so qtune plugs its layer in through
peft's custom-module mapping, ``LoraConfig._register_custom_module({QuantLinear: QuantLoraLinear})``.
That API is experimental and the mapping is *not* saved with an adapter, so :func:`register_lora_config` is
the one place that calls it, and every way qtune builds or reloads a PEFT model goes through it:
:func:`get_peft_model`, :func:`load_adapter`, :func:`add_adapter` (and ``QTuneSFTTrainer``, which calls
:func:`prepare_lora_config`).

The LoRA layer computes ``y = Q(x) + s · B A dropout(x)`` with ``Q`` the quantized base layer (frozen,
its packed tensors untouched) and ``s = alpha / r`` (``alpha / √r`` with rsLoRA). Gradients reach ``A``,
``B`` (and the input) through the base layer's ``qtune::linear_*`` autograd rule, which re-dequantizes
the weight in backward instead of storing it.

Merging (``merge()``/``merge_and_unload()``) dequantizes the base weight, adds the delta ``s·BA`` (or
the DoRA-rescaled weight) and re-quantizes it into the same format, so the merged model stays
quantized. Re-quantization rounds the delta to the format's grid; the error it leaves
(``‖Q(W + ΔW) − (W + ΔW)‖``, also relative to ``‖ΔW‖``) is recorded per layer in
``layer.merge_errors`` and summed up by :func:`merge_report`.

- NF4/FP4, int8, LLM.int8: re-quantized from scratch with the layer's own config (new absmax/scales).
- GPTQ (and RTN in GPTQ layout): re-rounded **on the layer's existing grid** (its scales, zeros and
  ``g_idx`` are kept; only the codes change). GPTQ chose those codes with calibration data and error
  compensation; re-running GPTQ would need the layer's Hessian (K×K fp32, larger than the 4-bit layer
  itself), which is not kept after calibration. A fresh round-to-nearest would move *every* weight onto
  a new grid and throw that compensation away, while re-rounding on the kept grid changes a code only
  where the delta crosses half a step, so merging a zero delta is the identity and act-order ``g_idx``
  survives. Weights the delta pushes outside the group's range are clamped; their count is reported.

Quantization-aware LoRA (peft's ``use_qalora``, :func:`quantization_aware_config`): peft's QA-LoRA variant, whose
change is constant within each group of ``qalora_group_size`` inputs (:func:`qalora_delta`). On a layer with
per-group float offsets (``QuantLinear.offset_group_size``: GGUF Q4_1/Q5_1, ``affine``) covered by that group, the
merge adds the change to the offsets (``add_to_offsets_``): same codes and scales, exact up to the offsets' fp16
rounding (``RequantizationError.exact``). A QA adapter on any other targeted quantized layer (NF4, GPTQ, int8,
Q4_0/Q5_0/Q8_0, the K-quants) is refused wherever it is attached (:func:`quantization_aware_config`,
:func:`prepare_lora_config`, :func:`load_adapter`, the layer itself): one line naming the layer, its format and why
(:func:`qalora_offset_error`), since its merge could only re-quantize. See docs/qalora.md.

``unmerge()`` restores the packed tensors saved at merge time, so merge → unmerge is exact (cost: one
extra copy of the quantized layer while merged; set ``layer.keep_unmerged = False`` to re-quantize
``W − ΔW`` instead). :func:`merge_and_unload` never keeps those copies.

LoRA on quantized fused MoE experts goes through peft's ``target_parameters`` (``["all-experts"]`` expands to
every expert weight): :class:`QuantLoraExperts`, a peft ``ParamWrapper`` for ``QuantExperts`` stacks, which saves
and loads in plain peft's format (see docs/moe.md).

``target_modules="all-linear"`` only matches ``nn.Linear``/``Conv1D`` subclasses inside peft; qtune
expands it to the explicit names of every ``QuantLinear``, ``nn.Linear`` and ``Conv1D`` except the
output head (:func:`all_linear_names`), as peft does for dense models.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
from torch import Tensor, nn

import peft
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from peft.tuners.lora.variants import DoraLinearVariant, QALoraLinearVariant
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge, check_target_module_exists
from peft.utils.constants import DUMMY_TARGET_MODULES
from peft.utils.other import get_pattern_key

from ..nn import set_submodule
from ..nn.base import QuantLinear, is_conv1d
from ..nn.experts import QuantExperts, is_fused_experts

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
ALL_EXPERTS = "all-experts"
# heads peft leaves out of "all-linear" for sequence classification (peft.utils.constants.SEQ_CLS_HEAD_NAMES)
_SEQ_CLS_HEADS = ("score", "classifier")

__all__ = ["QuantLoraLinear", "QuantLoraExperts", "all_experts_names", "RequantizationError", "MergeReport", "register_lora_config", "prepare_lora_config",
           "all_linear_names", "get_peft_model", "load_adapter", "add_adapter", "merge_and_unload", "merge_report",
           "requantize_", "QuantQALoraLinearVariant", "quantization_aware_config", "qalora_delta"]


# --------------------------------------------------------------------------------------------------
# Re-quantization (merge / unmerge)
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RequantizationError:
    """What re-quantizing ``W + ΔW`` lost, for one layer and one merge.

    Attributes:
        max_abs: ``max |Q(W') − W'|`` with ``W' = W + ΔW`` the exact merged weight.
        rms: root mean square of ``Q(W') − W'``.
        rel_weight: ``‖Q(W') − W'‖ / ‖W'‖`` (Frobenius).
        rel_delta: ``‖Q(W') − W'‖ / ‖ΔW‖``: 0 means the delta survived exactly, ≈1 means it was
            rounded away (``inf`` for a zero delta that still moved the weight, ``0`` if nothing moved).
        clamped: weights outside the kept grid's range (GPTQ layers only; 0 otherwise).
        kept: share of ``ΔW`` the merged quantized weight kept, ``1 + ⟨Q(W') − W', ΔW⟩/‖ΔW‖²`` (as the
            exporter reports it): ≈ 1 when the change survived, ≈ 0 when it was rounded back onto the base's grid
            (``nan`` for a zero delta).
        exact: the change went into the format's per-group float offsets (:meth:`QuantLinear.add_to_offsets_`,
            a quantization-aware adapter): codes and scales untouched, the error is the offsets' fp16 rounding.
    """

    max_abs: float
    rms: float
    rel_weight: float
    rel_delta: float
    clamped: int = 0
    kept: float = math.nan
    exact: bool = False
    err_sq: float = dataclasses.field(default=0.0, repr=False)   # ‖Q(W') − W'‖², for totals over layers
    w_sq: float = dataclasses.field(default=0.0, repr=False)     # ‖W'‖²

    @classmethod
    def measure(cls, quantized: Tensor, exact: Tensor, delta: Tensor, clamped: int = 0, *,
                into_offsets: bool = False) -> "RequantizationError":
        err = (quantized.float() - exact.float())
        delta = delta.float()
        e = float(err.norm())
        d2 = float(delta.pow(2).sum())
        d = math.sqrt(d2)
        return cls(max_abs=float(err.abs().max()) if err.numel() else 0.0,
                   rms=e / math.sqrt(max(err.numel(), 1)),
                   rel_weight=e / max(float(exact.float().norm()), 1e-30),
                   rel_delta=(e / d) if d > 0 else (0.0 if e == 0 else math.inf),
                   clamped=int(clamped),
                   kept=(1.0 + float((err * delta).sum()) / d2) if d2 > 0 else math.nan,
                   exact=into_offsets, err_sq=e * e, w_sq=float(exact.float().pow(2).sum()))


def _quantized_state(layer: QuantLinear) -> dict[str, Tensor]:
    # the buffers themselves: re-quantization assigns new tensors, so no copy is needed to keep these
    return dict(layer.named_buffers(recurse=False))


def _restore_state(layer: QuantLinear, state: dict[str, Tensor]) -> None:
    for name, buf in state.items():
        setattr(layer, name, buf)


def requantize_(layer: QuantLinear, weight: Tensor, *, delta: Tensor | None = None,
                name: str = "") -> RequantizationError:
    """Replace the quantized weight of ``layer`` by the quantization of ``weight``, in place.

    Args:
        layer: any ``QuantLinear``.
        weight (Tensor): the new dense weight [out_features, in_features], float.
        delta (Tensor | None): the change this weight carries (for :attr:`RequantizationError.rel_delta`);
            default ``weight − layer.dequantize()`` before the call.
        name: the layer's name, for error messages.
    Returns:
        :class:`RequantizationError` of the new quantized weight against ``weight``.
    Raises:
        ValueError: ``weight`` has the wrong shape or holds NaN/Inf.
    """
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"{name or type(layer).__name__}: new weight has shape {tuple(weight.shape)}, "
                         f"expected {(layer.out_features, layer.in_features)}")
    weight = weight.detach().float()
    if delta is None:
        delta = weight - layer.dequantize(torch.float32)
    clamped = layer.requantize_(weight, name=name)  # GPTQ: onto its own grid; others: the format's quantizer
    return RequantizationError.measure(layer.dequantize(torch.float32), weight, delta, clamped)


# --------------------------------------------------------------------------------------------------
# DoRA on a quantized base
# --------------------------------------------------------------------------------------------------
class QuantDoraLinearLayer(DoraLinearLayer):
    """DoRA magnitude for a ``QuantLinear`` base: peft's, with the base weight from ``dequantize()``.

    peft's version reads ``base_layer.weight`` (packed bytes here, or absent for GPTQ).
    ``m`` is the learned magnitude; the column norm ``‖W + s·BA‖`` is detached (DoRA §4.3)::

        y = Q(x) + (m/‖W + s·BA‖ − 1)·Q(x)_nobias + (m/‖W + s·BA‖)·s·B A x
    """

    def update_layer(self, *, base_layer, lora_A, lora_B, scaling, place_on_cpu=False) -> None:
        weight = base_layer.dequantize(torch.float32).to(lora_A.device)
        lora_weight = lora_B.float() @ lora_A.float()
        weight_norm = self.get_weight_norm(weight=weight, lora_weight=lora_weight, scaling=scaling)
        if place_on_cpu:
            weight_norm = weight_norm.to("cpu")
        self.weight = nn.Parameter(weight_norm.to(lora_A.dtype), requires_grad=True)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        lora_weight = self.get_lora_weight(lora_A=lora_A, lora_B=lora_B, adapter_name=adapter_name).to(x.dtype)
        weight = base_layer.dequantize(x.dtype)
        weight_norm = self.get_weight_norm(weight=weight, lora_weight=lora_weight.detach(), scaling=scaling,
                                           adapter_name=adapter_name).detach()
        mag_norm_scale = (self.weight / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is not None:
            if base_layer.bias is not None:
                base_result = base_result - base_layer.bias.to(base_result.dtype)
        else:  # dropout was applied to x, so the base output must be recomputed on the dropped-out input
            base_result = nn.functional.linear(x, weight)
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling

    def __repr__(self) -> str:
        return "qtune.lora.dora." + super(DoraLinearLayer, self).__repr__()


class QuantDoraLinearVariant(DoraLinearVariant):
    """peft's DoRA variant with :class:`QuantDoraLinearLayer` and merges on the dequantized weight."""

    @staticmethod
    def init(module: "QuantLoraLinear", adapter_name: str, **kwargs: Any) -> None:
        if not module.lora_magnitude_vector:
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        dora_layer = QuantDoraLinearLayer(fan_in_fan_out=False)
        dora_layer.update_layer(base_layer=module.get_base_layer(), lora_A=module.lora_A[adapter_name].weight,
                                lora_B=module.lora_B[adapter_name].weight, scaling=module.scaling[adapter_name])
        module.lora_magnitude_vector[adapter_name] = dora_layer

    @staticmethod
    def merge_safe(module: "QuantLoraLinear", active_adapter: str, orig_weight: Tensor) -> Tensor:
        # ``orig_weight`` is the dequantized base (fp32); the norm is cached for unmerge, as peft does
        delta = module.get_delta_weight(active_adapter).float()
        magnitude = module.lora_magnitude_vector[active_adapter]
        weight_norm = magnitude.get_weight_norm(orig_weight, delta, scaling=1).detach()
        module._cache_store(f"{active_adapter}-weight_norm", weight_norm)
        return (magnitude.weight.float() / weight_norm).view(-1, 1) * (orig_weight + delta)

    @staticmethod
    def merge_unsafe(module: "QuantLoraLinear", active_adapter: str, orig_weight: Tensor) -> None:
        raise NotImplementedError("QuantLoraLinear merges through merge_safe (the base weight is packed)")


# --------------------------------------------------------------------------------------------------
# Quantization-aware LoRA (QA-LoRA, Xu et al. 2023) on a quantized base
# --------------------------------------------------------------------------------------------------
def qalora_delta(lora_A: Tensor, lora_B: Tensor, scaling: float, group_size: int, in_features: int,
                 *, pooled: bool = False) -> Tensor:
    """The weight change of peft's QA-LoRA, fp32.

    peft's ``QALoraLinearVariant.forward`` adds ``s · (P · mean_g(x)) Aᵀ Bᵀ`` with ``mean_g`` the mean over each
    group of ``g`` consecutive input features and ``P = in_features / g`` the number of groups (peft's scale).
    The mean is ``x`` times a [K, P] matrix of ``1/g`` blocks, so that is ``x ΔWᵀ`` with::

        ΔW[o, j] = s · (P / g) · (B A)[o, j // g]          (constant within each group of g inputs)

    Args:
        lora_A (Tensor): [r, in_features // g]. lora_B (Tensor): [out_features, r].
        scaling: ``s`` (``alpha / r``, or ``alpha / √r`` with rsLoRA).
        group_size: ``g`` (``qalora_group_size``). in_features: ``K``.
        pooled: return the per-group values [out_features, K // g] instead of the dense [out_features, K].
    """
    n_groups = in_features // group_size
    per_group = (lora_B.float() @ lora_A.float()) * (scaling * n_groups / group_size)
    return per_group if pooled else per_group.repeat_interleave(group_size, dim=1)


class QuantQALoraLinearVariant(QALoraLinearVariant):
    """peft's QA-LoRA variant (init: ``lora_A`` becomes [r, in_features / g]; forward: the pooled input) on a
    ``QuantLinear``, plus the dense delta that peft's GPTQ-only variant does not offer (:func:`qalora_delta`), so
    that the adapter merges: exactly into per-group float offsets (:meth:`QuantLoraLinear.merge`), else by
    re-quantizing ``W + ΔW`` as any adapter."""

    @staticmethod
    def get_delta_weight(module: "QuantLoraLinear", active_adapter: str) -> Tensor:
        return qalora_delta(module.lora_A[active_adapter].weight, module.lora_B[active_adapter].weight,
                            module.scaling[active_adapter], module.qalora_group_size[active_adapter],
                            module.in_features)

    @staticmethod
    def merge_safe(module: "QuantLoraLinear", active_adapter: str, orig_weight: Tensor) -> Tensor:
        delta = QuantQALoraLinearVariant.get_delta_weight(module, active_adapter)
        return orig_weight + delta.to(orig_weight.device)

    @staticmethod
    def merge_unsafe(module: "QuantLoraLinear", active_adapter: str, orig_weight: Tensor) -> None:
        raise NotImplementedError("QuantLoraLinear merges through merge_safe (the base weight is packed)")

    @staticmethod
    def unmerge(module: "QuantLoraLinear", active_adapter: str, orig_weight: Tensor) -> Tensor:
        delta = QuantQALoraLinearVariant.get_delta_weight(module, active_adapter)
        return orig_weight - delta.to(orig_weight.device)


# --------------------------------------------------------------------------------------------------
# The LoRA layer
# --------------------------------------------------------------------------------------------------
class QuantLoraLinear(nn.Module, LoraLayer):
    """LoRA around any qtune ``QuantLinear`` (NF4/FP4, int8, LLM.int8, GPTQ/RTN).

    ``y = Q(x) + Σ_adapters s · B A dropout(x)``, with ``x`` (..., in_features) in any float dtype, the
    LoRA branch computed in the adapter's dtype and the sum returned in the base output's dtype.

    Attributes:
        merge_errors (dict[str, RequantizationError]): re-quantization error of each merge, by adapter.
        keep_unmerged (bool): keep the pre-merge packed tensors so ``unmerge()`` is exact (default True).
    """

    keep_unmerged: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        # peft's flags for bitsandbytes' layers; not ours
        for key in ("loaded_in_8bit", "loaded_in_4bit", "device_map", "parameter_name"):
            kwargs.pop(key, None)
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False  # QuantLinear stores [out, in] even when it replaced a Conv1D
        self.merge_errors: dict[str, RequantizationError] = {}
        self._unmerged_state: dict[str, dict[str, Tensor | None]] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    @property
    def lora_variants(self):
        return {(): None, ("use_dora",): QuantDoraLinearVariant}

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any):
        # peft does not tag use_qalora as a variant field (only its GPTQ layer reads it), so resolve it here
        if getattr(config, "use_qalora", False):
            if config.use_dora:
                raise ValueError(f"{self._layer_name()}: DoRA and quantization-aware LoRA (use_qalora) cannot be "
                                 "combined (neither can peft)")
            # the last line of defence (plain PeftModel.from_pretrained with a registered config): qtune's own
            # entry points refuse earlier, naming the config file or recipe key
            error = qalora_offset_error(self._layer_name(), self.get_base_layer(), config.qalora_group_size)
            if error is not None:
                raise ValueError(error)
            return QuantQALoraLinearVariant()
        return super().resolve_lora_variant(config=config, **kwargs)

    def is_quantization_aware(self, adapter: str) -> bool:
        """``adapter`` is a QA-LoRA adapter (its input pooled over groups of ``qalora_group_size[adapter]``)."""
        return isinstance(self.lora_variant.get(adapter), QuantQALoraLinearVariant)

    def merges_exactly(self, adapter: str) -> bool:
        """``adapter`` folds into the base's per-group float offsets: a QA adapter whose group is a multiple of the
        base's :attr:`~qtune.nn.QuantLinear.offset_group_size` (so its change is constant within every offset
        group) and no LoRA bias beyond what the base bias takes."""
        g = self.get_base_layer().offset_group_size
        return (self.is_quantization_aware(adapter) and g is not None
                and self.qalora_group_size[adapter] % g == 0)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A.keys():
                continue
            lora_A, lora_B = self.lora_A[active_adapter], self.lora_B[active_adapter]
            xa = self._cast_input_dtype(x, lora_A.weight.dtype)
            if active_adapter not in self.lora_variant:
                dropout = self.lora_dropout[active_adapter]
                result = result + lora_B(lora_A(dropout(xa))) * self.scaling[active_adapter]
            else:
                result = self.lora_variant[active_adapter].forward(self, active_adapter=active_adapter, x=xa,
                                                                  result=result)
        return result.to(result_dtype)

    # -- merge -----------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> Tensor:
        """``s · B A`` [out_features, in_features] in fp32 (QA-LoRA: :func:`qalora_delta`)."""
        if self.is_quantization_aware(adapter):
            return QuantQALoraLinearVariant.get_delta_weight(self, adapter)
        return (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()) * self.scaling[adapter]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge adapters into the quantized base: dequantize, add the delta, re-quantize; or, for a
        quantization-aware adapter on a format with per-group float offsets (:meth:`merges_exactly`), add the
        per-group change to the offsets (same codes and scales; exact up to the offsets' fp16 rounding).

        Args:
            safe_merge: check the merged weight for NaN/Inf before writing it (it is always computed
                out of place here, so this costs only the check).
            adapter_names: adapters to merge (default: the active ones).
        Raises:
            ValueError: the merged weight is not finite (``safe_merge``), or ``lora_bias`` without a base bias.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A.keys():
                continue
            weight = base.dequantize(torch.float32)
            if self.merges_exactly(name):
                self._merge_into_offsets(name, weight, safe_merge)
                continue
            if name in self.lora_variant:
                merged = self.lora_variant[name].merge_safe(self, name, weight)
            else:
                merged = weight + self.get_delta_weight(name)
            if safe_merge and not bool(torch.isfinite(merged).all()):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            if self.lora_bias[name] and base.bias is None:
                raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
            if self.keep_unmerged:
                self._unmerged_state[name] = _quantized_state(base)
            err = requantize_(base, merged, delta=merged - weight, name=self._layer_name())
            self.merge_errors[name] = err
            logger.debug("%s: merged adapter %r, re-quantization error %s", self._layer_name(), name, err)
            if self.lora_bias[name]:
                base.bias.data += (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
            self.merged_adapters.append(name)

    def _merge_into_offsets(self, name: str, weight: Tensor, safe_merge: bool) -> None:
        """:meth:`merge` of a QA adapter into per-group float offsets: ``m[o, k] += ΔW[o, k·g_o]``."""
        base = self.get_base_layer()
        g_o = base.offset_group_size
        delta = self.get_delta_weight(name).to(weight.device)            # [out, in], constant per adapter group
        if safe_merge and not bool(torch.isfinite(delta).all()):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        if self.lora_bias[name] and base.bias is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        if self.keep_unmerged:  # add_to_offsets_ edits the packed bytes in place: keep copies
            self._unmerged_state[name] = {k: b.clone() for k, b in _quantized_state(base).items()}
        base.add_to_offsets_(delta[:, ::g_o], name=self._layer_name())  # [out, in / g_o]: one value per offset group
        err = RequantizationError.measure(base.dequantize(torch.float32), weight + delta, delta, into_offsets=True)
        self.merge_errors[name] = err
        logger.debug("%s: merged QA adapter %r into the offsets, error %s", self._layer_name(), name, err)
        if self.lora_bias[name]:
            base.bias.data += (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: restore the saved packed tensors (exact), or re-quantize ``W − ΔW`` (offsets:
        subtract the change again, exact up to fp16 rounding)."""
        if not self.merged:
            logger.warning("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A.keys():
                continue
            state = self._unmerged_state.pop(name, None)
            if state is not None:
                _restore_state(base, state)
                if name in self.lora_variant:
                    self._caches.pop(f"{name}-weight_norm", None)
            elif self.merges_exactly(name):
                base.add_to_offsets_(-self.get_delta_weight(name)[:, ::base.offset_group_size],
                                     name=self._layer_name())
            else:
                weight = base.dequantize(torch.float32)
                if name in self.lora_variant:
                    unmerged = self.lora_variant[name].unmerge(self, name, weight).float()
                else:
                    unmerged = weight - self.get_delta_weight(name)
                requantize_(base, unmerged, delta=unmerged - weight, name=self._layer_name())
            if self.lora_bias[name]:
                base.bias.data -= (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)

    def _layer_name(self) -> str:
        return self.kwargs.get("target_name") or type(self.get_base_layer()).__name__

    def __repr__(self) -> str:
        return "qtune.lora." + super().__repr__()


# --------------------------------------------------------------------------------------------------
# LoRA on quantized fused experts (peft ``target_parameters``)
# --------------------------------------------------------------------------------------------------
class QuantLoraExperts(ParamWrapper):
    """peft's ``ParamWrapper`` (LoRA on one 3-D expert parameter) for a weight of a qtune ``QuantExperts``.

    peft's own wrapper cannot take a quantized stack: it finds its targets with ``named_parameters()`` (a
    ``QuantExpertStack`` is a module of packed buffers) and adds the delta through ``torch.nn.utils.parametrize``
    to the whole dense ``[E, out, in]`` parameter on every forward, which is the dense copy the quantized
    experts exist to avoid. This subclass keeps everything peft saves and loads (``lora_A`` ``[E·r, in]``,
    ``lora_B`` ``[out, E·r]``, expert ``e``'s delta ``s · B[:, :, e] A[e]`` with ``A = lora_A.view(E, r, in)``,
    ``B = lora_B.view(out, r, E)``, the nesting of one wrapper per parameter in the order the float module
    registers them, hence the state-dict keys ``experts.base_layer.lora_A.weight`` / ``experts.lora_A.weight``),
    so the adapter it saves is the one plain peft builds on the float model with the same ``target_parameters``,
    and loads there. What changes is the forward: the outermost wrapper calls ``QuantExperts.forward`` with the
    low-rank factors of every wrapper in the chain, and each routed expert adds ``s·(x A_eᵀ) B_eᵀ`` for the tokens
    routed to it (the packed weights stay as they are; gradients reach A and B by autograd).

    Merging dequantizes one expert at a time, adds its delta and re-quantizes it in the stack's format (as
    :class:`QuantLoraLinear` does), recording the error in ``merge_errors``. As in peft: no dropout, DoRA,
    LoRA bias or fan_in_fan_out (peft's ``ParamWrapper`` refuses them, and the adapter must load there).
    """

    keep_unmerged: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, config: LoraConfig,
                 **kwargs: Any) -> None:
        for key in ("loaded_in_8bit", "loaded_in_4bit", "device_map", "target_name"):
            kwargs.pop(key, None)
        self.merge_errors: dict[str, RequantizationError] = {}
        self._unmerged_state: dict[str, dict[str, Tensor]] = {}
        super().__init__(base_layer, adapter_name, parameter_name=parameter_name, config=config, **kwargs)

    def get_param(self):
        """The targeted :class:`QuantExpertStack` (peft's wrapper returns an ``nn.Parameter``)."""
        return getattr(self.get_base_layer(), self.parameter_name)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # as ParamWrapper reads a 3-D parameter's shape [E, a, b] in the model's layout (update_layer swaps)
        stack = self.get_param()
        self.num_experts = stack.num_experts
        self._param_ndim = 3
        return stack.param_shape

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # the stack holds integer codes: move to its device, keep the adapter's float dtype (as for QuantLinear)
        device = next(iter(self.get_param().buffers())).device
        for layer_name in self.adapter_layer_names + self.other_param_names:
            layer = getattr(self, layer_name, None)
            if isinstance(layer, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in layer:
                if not any(p.device.type == "meta" for p in layer[adapter_name].parameters()):
                    layer[adapter_name] = layer[adapter_name].to(device)

    def factors(self, adapter: str) -> tuple[Tensor, Tensor, float]:
        """``(A [E, r, in], B [E, out, r], s)`` of ``adapter`` in a linear layer's orientation."""
        a = self.lora_A[adapter].weight
        b = self.lora_B[adapter].weight
        return (a.reshape(self.num_experts, -1, a.shape[-1]),
                b.reshape(b.shape[0], -1, self.num_experts).permute(2, 0, 1), float(self.scaling[adapter]))

    def expert_delta(self, adapter: str, e: int) -> Tensor:
        """Expert ``e``'s ``s · B_e A_e`` [out, in] in fp32."""
        a, b, s = self.factors(adapter)
        return (b[e].float() @ a[e].float()) * s

    def get_delta_weight(self, adapter_name, *args, **kwargs) -> Tensor:
        """All experts' deltas in the model's layout (``[E, out, in]``, transposed layouts ``[E, in, out]``),
        fp32: for export; the forward and the merge never build it."""
        stack = self.get_param()
        deltas = torch.stack([self.expert_delta(adapter_name, e) for e in range(self.num_experts)])
        return deltas.transpose(1, 2) if stack.transposed else deltas

    def chain(self) -> tuple[list["QuantLoraExperts"], nn.Module]:
        """The nested wrappers from this one inwards, and the ``QuantExperts`` at the bottom."""
        wrappers, module = [], self
        while isinstance(module, QuantLoraExperts):
            wrappers.append(module)
            module = module.base_layer
        return wrappers, module

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, **kwargs: Any) -> Tensor:
        self._check_forward_args(hidden_states, **kwargs)
        wrappers, experts = self.chain()
        lora: dict[str, list[tuple[Tensor, Tensor, float]]] = {}
        for w in wrappers:
            if w.disable_adapters:
                if w.merged:
                    w.unmerge()
                continue
            for adapter in w.active_adapters:
                if adapter in w.lora_A.keys() and adapter not in w.merged_adapters:
                    lora.setdefault(w.parameter_name, []).append(w.factors(adapter))
        return experts(hidden_states, top_k_index, top_k_weights, lora=lora)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the quantized stack, expert by expert: dequantize, add ``s·B_e A_e``,
        re-quantize (``merge_errors`` records the error over all experts)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        stack = self.get_param()
        name = self.kwargs.get("target_name") or f"experts.{self.parameter_name}"
        for adapter in adapter_names:
            if adapter not in self.lora_A.keys():
                continue
            if self.keep_unmerged:
                self._unmerged_state[adapter] = {n: b.clone() for n, b in stack.named_buffers(recurse=False)}
            sq_err = sq_w = sq_d = 0.0
            max_abs = 0.0
            for e in range(self.num_experts):
                w0 = stack.dequantize(e, torch.float32)
                d = self.expert_delta(adapter, e).to(w0.device)
                merged = w0 + d
                if safe_merge and not bool(torch.isfinite(merged).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken "
                                     f"({name}[{e}])")
                stack.quantize_expert_(e, merged, name=f"{name}[{e}]")
                err = stack.dequantize(e, torch.float32) - merged
                sq_err += float(err.pow(2).sum())
                sq_w += float(merged.pow(2).sum())
                sq_d += float(d.pow(2).sum())
                max_abs = max(max_abs, float(err.abs().max()))
            n = self.num_experts * stack.in_features * stack.out_features
            e_norm, d_norm = math.sqrt(sq_err), math.sqrt(sq_d)
            self.merge_errors[adapter] = RequantizationError(
                max_abs=max_abs, rms=e_norm / math.sqrt(max(n, 1)), rel_weight=e_norm / max(math.sqrt(sq_w), 1e-30),
                rel_delta=(e_norm / d_norm) if d_norm > 0 else (0.0 if e_norm == 0 else math.inf))
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: restore the saved stack (exact), or re-quantize ``W − ΔW`` per expert."""
        if not self.merged:
            logger.warning("Already unmerged. Nothing to do.")
            return
        stack = self.get_param()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A.keys():
                continue
            state = self._unmerged_state.pop(adapter, None)
            if state is not None:
                for n, b in state.items():
                    stack._buffers[n].copy_(b)
                continue
            for e in range(self.num_experts):
                w = stack.dequantize(e, torch.float32)
                stack.quantize_expert_(e, w - self.expert_delta(adapter, e).to(w.device))

    def __repr__(self) -> str:
        return "qtune." + super().__repr__()


def _expert_stacks(model: nn.Module) -> dict[str, nn.Module]:
    """``{unwrapped name "<experts>.<weight>": QuantExpertStack}`` of every quantized experts weight."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantExperts):
            clean = name.replace(".base_layer", "")
            for w in module.weight_names:
                out[f"{clean}.{w}"] = module._modules[w]
    return out


def _float_expert_params(model: nn.Module) -> list[str]:
    out = []
    for name, module in model.named_modules():
        if is_fused_experts(module):
            clean = name.replace(".base_layer", "")
            out += [f"{clean}.{w}" for w in ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")]
    return out


def _matches(key: str, target: str) -> bool:
    # peft's rule for target_parameters (BaseTuner._inject_parameters)
    return key == target or key.endswith("." + target)


def all_experts_names(model: nn.Module) -> list[str]:
    """The explicit ``target_parameters`` of every fused experts weight of ``model`` (quantized or float):
    what ``target_parameters=["all-experts"]`` expands to."""
    names = sorted(set(_expert_stacks(model)) | set(_float_expert_params(model)))
    return [n.removeprefix("base_model.model.") for n in names]


def _check_target_parameters(model: nn.Module, config: LoraConfig) -> None:
    """Expand ``["all-experts"]`` and refuse a target parameter that names nothing in ``model``."""
    tp = getattr(config, "target_parameters", None)
    if not tp:
        return
    if any(str(t).lower() == ALL_EXPERTS for t in tp):
        names = all_experts_names(model)
        if not names:
            raise ValueError("target_parameters=['all-experts']: the model has no fused experts module")
        config.target_parameters = sorted({*[t for t in tp if str(t).lower() != ALL_EXPERTS], *names})
        tp = config.target_parameters
    keys = set(_expert_stacks(model))
    for name, module in model.named_modules():
        clean = name.replace(".base_layer", "")
        keys.update(f"{clean}.{p}" if clean else p for p, _ in module.named_parameters(recurse=False))
        if hasattr(module, "parametrizations"):
            keys.update(f"{clean}.{p}" for p in module.parametrizations.keys())
    for t in tp:
        if not any(_matches(k, t) for k in keys):
            raise ValueError(f"target_parameters: {t!r} names no parameter of the model (expert weights are "
                             f"named like {next(iter(sorted(_expert_stacks(model))), 'model.layers.0.mlp.experts.down_proj')!r})")
    if _expert_stacks(model) and any(_matches(k, t) for k in _expert_stacks(model) for t in tp):
        if config.lora_dropout:
            raise ValueError(f"LoRA on experts (target_parameters) needs lora_dropout=0 (got {config.lora_dropout}): "
                             "peft's ParamWrapper, which loads the adapter on the float model, refuses dropout")


def _targets_quant_experts(model: nn.Module, config: PeftConfig) -> bool:
    tp = getattr(config, "target_parameters", None) or []
    return any(_matches(k, t) for k in _expert_stacks(model) for t in tp)


@contextlib.contextmanager
def _quiet_unmatched_parameters(model: nn.Module | None = None, config: PeftConfig | None = None):
    """While peft builds its layers for ``config``: qtune adds the layers of quantized expert weights itself right
    after (:func:`_inject_expert_lora`), so peft must not warn that ``target_parameters`` matched nothing, nor
    refuse a config that targets nothing else (``target_modules=[]``: peft's dummy target is used meanwhile)."""
    dummy = (config is not None and model is not None and not config.target_modules
             and _targets_quant_experts(model, config))
    saved = config.target_modules if dummy else None
    if dummy:
        config.target_modules = DUMMY_TARGET_MODULES
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"target_parameters=.* were set but no parameter was matched")
            yield
    finally:
        if dummy:
            config.target_modules = saved


def _inject_expert_lora(peft_model: PeftModel, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap every targeted ``QuantExperts`` weight in :class:`QuantLoraExperts` (nested in the float module's
    parameter order, as peft nests ``ParamWrapper``), or add ``adapter_name`` to the existing wrapper.

    Returns the targeted names.
    """
    tp = getattr(config, "target_parameters", None)
    if not tp:
        return []
    root = peft_model.base_model.model if isinstance(peft_model, PeftModel) else peft_model
    targeted = []
    experts_modules = [(n, m) for n, m in root.named_modules() if isinstance(m, QuantExperts)]
    for name, experts in experts_modules:
        clean = name.replace(".base_layer", "")
        outer_name = clean
        for wname in experts.weight_names:
            key = f"{clean}.{wname}"
            if not any(_matches(key, t) for t in tp):
                continue
            outer = root.get_submodule(outer_name)
            existing = outer
            while isinstance(existing, QuantLoraExperts) and existing.parameter_name != wname:
                existing = existing.base_layer
            # as peft's _create_and_replace: rank/alpha patterns match the key (here the parameter's name)
            r_key = get_pattern_key(config.rank_pattern.keys(), key)
            a_key = get_pattern_key(config.alpha_pattern.keys(), key)
            kwargs = dict(r=config.rank_pattern.get(r_key, config.r),
                          lora_alpha=config.alpha_pattern.get(a_key, config.lora_alpha))
            if isinstance(existing, QuantLoraExperts):
                existing.update_layer(adapter_name, config=config, **kwargs)
            else:
                new = QuantLoraExperts(outer, adapter_name, parameter_name=wname, config=config, target_name=key,
                                       **kwargs)
                new.kwargs["target_name"] = key
                if adapter_name not in peft_model.active_adapters:
                    new.requires_grad_(False)
                    new.set_adapter(peft_model.active_adapters, inference_mode=config.inference_mode)
                set_submodule(root, outer_name, new)
            targeted.append(key)
    return targeted


# --------------------------------------------------------------------------------------------------
# Configs, building and reloading
# --------------------------------------------------------------------------------------------------
def register_lora_config(config: PeftConfig) -> LoraConfig:
    """Map every ``QuantLinear`` to :class:`QuantLoraLinear` in ``config`` (in place) and return it.

    This is the only call to peft's experimental ``LoraConfig._register_custom_module``. The mapping is
    not saved with adapters, so it must be applied again to every config that builds or reloads LoRA
    layers on a qtune model (the helpers in this module do so).

    Raises:
        TypeError: ``config`` is not a ``LoraConfig`` (qtune's layers support LoRA and DoRA only).
        RuntimeError: the installed peft no longer offers the custom-module mapping.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"qtune supports LoRA/DoRA adapters (peft.LoraConfig) on quantized layers, got "
                        f"{type(config).__name__}")
    register = getattr(config, "_register_custom_module", None)
    if register is None:
        raise RuntimeError(f"peft {peft.__version__} has no LoraConfig._register_custom_module: qtune cannot attach "
                           "LoRA to its quantized layers with this version (qtune needs peft>=0.17, as pyproject.toml says)")
    register({QuantLinear: QuantLoraLinear})
    return config


def _head_modules(model: nn.Module, config: PeftConfig) -> set[int]:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    heads: set[int] = set()
    get_out = getattr(base, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads.add(id(out))
    elif str(getattr(config, "task_type", "")) in ("SEQ_CLS", "TaskType.SEQ_CLS"):
        for name in _SEQ_CLS_HEADS:
            if isinstance(getattr(base, name, None), nn.Module):
                heads.add(id(getattr(base, name)))
                break
    return heads


def all_linear_names(model: nn.Module, config: PeftConfig | None = None) -> list[str]:
    """Names of every ``QuantLinear``, ``nn.Linear`` and ``Conv1D`` LoRA should target for ``"all-linear"``.

    Like peft: the output head (``get_output_embeddings()``, or the classifier head of a SEQ_CLS model)
    is left out, and so are the modules inside existing adapter layers (their base layer is targeted).
    """
    heads = _head_modules(model, config) if config is not None else _head_modules(model, LoraConfig())
    names: list[str] = []
    inside_tuner: list[str] = []
    # names as peft matches them: relative to the base model (add_adapter passes the PeftModel)
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    for name, module in root.named_modules():
        if any(name.startswith(p + ".") for p in inside_tuner):
            continue
        if isinstance(module, BaseTunerLayer):
            inside_tuner.append(name)
            base = module.get_base_layer()
        else:
            base = module
        if id(module) in heads or id(base) in heads:
            continue
        if isinstance(base, (QuantLinear, nn.Linear)) or is_conv1d(base):
            names.append(name)
    return names


def prepare_lora_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """Make ``config`` ready for a qtune model, in place: expand ``"all-linear"`` and register the layers.

    peft would expand ``"all-linear"`` to ``nn.Linear``/``Conv1D`` only and miss every quantized layer.
    The expansion lists full module names, as peft's does. A quantization-aware config (``use_qalora``) is
    checked against the targeted layers (:func:`_check_quantization_aware`).
    """
    _expand_targets(model, config)
    if getattr(config, "use_qalora", False):
        _check_quantization_aware(model, config)
    return config


def _expand_targets(model: nn.Module, config: LoraConfig) -> None:
    register_lora_config(config)
    _check_target_parameters(model, config)
    tm = config.target_modules
    if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        names = all_linear_names(model, config)
        if not names:
            raise ValueError("target_modules='all-linear' matched no linear or quantized layer in the model")
        config.target_modules = set(names)


def _targeted_quant_layers(model: nn.Module, config: LoraConfig) -> list[tuple[str, QuantLinear]]:
    """``(name, layer)`` of every ``QuantLinear`` that ``config.target_modules`` selects (peft's own matching)."""
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    if not config.target_modules:
        return []
    out = []
    for name, module in root.named_modules():
        if isinstance(module, QuantLinear) and check_target_module_exists(config, name.replace(".base_layer", "")):
            out.append((name.replace(".base_layer", ""), module))
    return out


EXACT_MERGE_FORMATS = "GGUF Q4_1/Q5_1 or affine"


def _inexact_reason(layer: QuantLinear, group: int) -> str | None:
    """Why a QA-LoRA change pooled over ``group`` inputs cannot fold into ``layer``'s float offsets, or ``None``
    when it can (the layer has per-group float offsets, every ``g_o`` inputs, and ``g_o`` divides ``group``)."""
    g_o = layer.offset_group_size
    if g_o is None:
        return "has no per-group float offset"
    if group % g_o:
        return f"has float offsets per {g_o} inputs, which do not divide the QA-LoRA group of {group}"
    return None


def qalora_offset_error(name: str, layer: QuantLinear, group: int, where: str = "") -> str | None:
    """The one-line refusal of a quantization-aware adapter on ``layer`` (``None`` when it merges exactly).

    QA-LoRA only pays for its pooled (coarser) adapter when the change lands exactly in float offsets; on any
    other format its merge re-quantizes like a standard LoRA's, so qtune refuses it instead of training it."""
    why = _inexact_reason(layer, group)
    if why is None:
        return None
    return (f"{where}quantization-aware LoRA: layer {name} (format {layer.config.format}) {why}, so the adapter's "
            f"change cannot merge into it exactly; only {EXACT_MERGE_FORMATS} layers take it exactly: train a "
            "standard LoRA instead (quantization_aware false, no use_qalora) or leave this layer out of "
            "target_modules")


def _check_quantization_aware(model: nn.Module, config: LoraConfig, where: str = "") -> None:
    """Refuse a QA-LoRA config on ``model``: a group that does not divide a targeted layer's ``in_features``, or a
    targeted quantized layer that cannot take the adapter's change exactly at merge time (no per-group float
    offset, or offsets the group does not cover; :func:`qalora_offset_error`). ``where`` prefixes the messages
    (e.g. the adapter_config.json being loaded)."""
    g = config.qalora_group_size
    if not isinstance(g, int) or g <= 0:
        raise ValueError(f"{where}use_qalora: qalora_group_size must be a positive int, got {g!r}")
    layers = _targeted_quant_layers(model, config)
    for name, layer in layers:
        if layer.in_features % g:
            raise ValueError(f"{where}use_qalora: layer {name} has in_features={layer.in_features}, not a multiple "
                             f"of qalora_group_size={g}")
    for name, layer in layers:
        error = qalora_offset_error(name, layer, g, where)
        if error is not None:
            raise ValueError(error)


def quantization_aware_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """Make ``config`` a quantization-aware LoRA (QA-LoRA) config for ``model``, in place, and return it.

    Sets ``use_qalora=True`` and ``qalora_group_size`` to the quantization group of the targeted layers
    (:attr:`~qtune.nn.QuantLinear.quant_group_size`: the Q4_1/Q5_1 block, the affine group), so that the adapter's
    change is constant within each group; the layers must have per-group float offsets that group covers
    (:func:`qalora_offset_error`), else the config is refused. Layers with different groups get the least common
    multiple (constant within every layer's groups, so merges into float offsets stay exact; the adapter is
    pooled more coarsely on the layers with the finer groups). peft records both fields in adapter_config.json.

    Raises:
        ValueError: the adapter targets no quantized layer, a targeted layer has no group along ``in_features``
            (LLM.int8, per-row int8, GPTQ in classic act-order: a permuted ``g_idx``), the group does not divide
            a layer's ``in_features``, a targeted layer has no per-group float offset covered by the group (NF4,
            GPTQ, Q4_0, Q8_0, K-quants: :func:`qalora_offset_error`), or DoRA.
    """
    _expand_targets(model, config)
    if config.use_dora:
        raise ValueError("quantization-aware LoRA cannot be combined with DoRA (use_dora)")
    layers = _targeted_quant_layers(model, config)
    if not layers:
        raise ValueError("quantization-aware LoRA: the adapter targets no quantized layer (target_modules="
                         f"{sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules!r})")
    for name, layer in layers:
        if layer.quant_group_size is None:
            raise ValueError(f"quantization-aware LoRA: layer {name} ({layer.config.format}) has no quantization group "
                             "along in_features to pool over; use a group format (GGUF, affine, NF4, GPTQ/int8 with "
                             "group_size and g_idx = k // group_size) or leave this layer out of target_modules")
    sizes = sorted({layer.quant_group_size for _, layer in layers})
    config.use_qalora = True
    config.qalora_group_size = math.lcm(*sizes)
    if len(sizes) > 1:
        logger.info("quantization-aware LoRA: layers quantized in groups of %s; pooling over groups of %d (their lcm)",
                    sizes, config.qalora_group_size)
    _check_quantization_aware(model, config)
    return config


def get_peft_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default", *, loftq_weights: Any = None,
                   loftq_iters: int = 1, quantization_aware: bool = False, **kwargs: Any):
    """``peft.get_peft_model`` for a model with qtune layers (and any other model).

    Args:
        model: the (quantized) base model.
        config: a ``peft.LoraConfig``; r, lora_alpha, lora_dropout, use_rslora, use_dora,
            modules_to_save, bias/lora_bias, use_qalora/qalora_group_size and ``target_modules="all-linear"`` all
            apply to qtune layers.
        adapter_name: name of the adapter.
        loftq_weights: LoftQ initialisation (:func:`qtune.integrations.loftq.loftq_init_`) from these float weights
            (the float checkpoint folder the model was quantized from, ``{layer name: weight}`` or a callable):
            the quantized layers are re-quantized and the adapter set so that ``deq(Q) + s·BA ≈ W``.
        loftq_iters: LoftQ's alternating steps.
        quantization_aware: make it a QA-LoRA adapter pooled over the layers' quantization groups
            (:func:`quantization_aware_config`), which merges exactly into Q4_1/Q5_1/affine layers.
        kwargs: passed to ``peft.get_peft_model``.
    Returns:
        ``peft.PeftModel`` whose targeted ``QuantLinear`` layers are wrapped in :class:`QuantLoraLinear`.
    Raises:
        ValueError: ``init_lora_weights="loftq"`` (peft's LoftQ quantizes with bitsandbytes on CUDA and cannot
            re-quantize qtune layers: pass ``loftq_weights=`` instead).
    """
    if getattr(config, "init_lora_weights", True) == "loftq":
        raise ValueError("LoraConfig(init_lora_weights='loftq') is peft's bitsandbytes LoftQ; for qtune layers pass "
                         "qtune.get_peft_model(model, config, loftq_weights=<float checkpoint folder>, loftq_iters=T)")
    if loftq_weights is not None and (quantization_aware or getattr(config, "use_qalora", False)):
        raise ValueError("LoftQ initialisation and a quantization-aware (QA-LoRA) adapter cannot be combined: LoftQ's "
                         "SVD factors are not constant within the quantization groups")
    if quantization_aware:
        quantization_aware_config(model, config)
    else:
        prepare_lora_config(model, config)
    with _quiet_unmatched_parameters(model, config):
        peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    _inject_expert_lora(peft_model, config, adapter_name)
    if loftq_weights is not None:
        from .loftq import loftq_init_

        loftq_init_(peft_model, loftq_weights, iters=loftq_iters, adapter_name=adapter_name)
    return peft_model


def add_adapter(peft_model: PeftModel, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
    """``PeftModel.add_adapter`` with the qtune mapping registered on ``config``."""
    prepare_lora_config(peft_model, config)
    with _quiet_unmatched_parameters(peft_model, config):
        peft_model.add_adapter(adapter_name, config, **kwargs)
    _inject_expert_lora(peft_model, config, adapter_name)


def load_adapter(model: nn.Module, path: str, adapter_name: str = "default", *, is_trainable: bool = False,
                 **kwargs: Any) -> PeftModel:
    """Load a saved PEFT LoRA adapter onto a qtune base (``PeftModel.from_pretrained`` after registration).

    Args:
        model: the quantized base model, or a ``PeftModel`` to add ``adapter_name`` to.
        path: folder written by ``save_pretrained`` (adapter_config.json + adapter weights).
        adapter_name: name to load it under.
        is_trainable: load it for further training (otherwise frozen, inference mode).
        kwargs: passed to ``PeftModel.from_pretrained`` / ``PeftModel.load_adapter``.
    Returns:
        the ``PeftModel``.
    Raises:
        ValueError: the adapter names target parameters the model lacks, or it is quantization-aware
            (``use_qalora: true``) and a layer it targets cannot take its change exactly
            (:func:`_check_quantization_aware`); the message names adapter_config.json and the layer.
    """
    config = PeftConfig.from_pretrained(path)
    register_lora_config(config)
    config_file = Path(path) / "adapter_config.json"
    try:  # peft would only warn and load nothing for a target parameter the model does not have
        _check_target_parameters(model, config)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from None
    if getattr(config, "use_qalora", False):
        _check_quantization_aware(model, config, where=f"{config_file}: ")
    config.inference_mode = not is_trainable
    if isinstance(model, PeftModel):
        with _quiet_unmatched_parameters(model, config):
            model.add_adapter(adapter_name, config)
        _inject_expert_lora(model, config, adapter_name)
        model.load_adapter(path, adapter_name, is_trainable=is_trainable, **kwargs)
        return model
    if not _targets_quant_experts(model, config):
        return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                         config=config, **kwargs)
    # expert LoRA layers are qtune's: build the adapter's layers, add them, then load the weights into both
    with _quiet_unmatched_parameters(model, config):
        peft_model = PeftModel(model, config, adapter_name=adapter_name)
    _inject_expert_lora(peft_model, config, adapter_name)
    peft_model.load_adapter(path, adapter_name, is_trainable=is_trainable, **kwargs)
    return peft_model


# --------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MergeReport:
    """Re-quantization errors of a merge, per layer (name → :class:`RequantizationError`)."""

    layers: dict[str, RequantizationError] = dataclasses.field(default_factory=dict)

    @property
    def max_abs(self) -> float:
        return max((e.max_abs for e in self.layers.values()), default=0.0)

    @property
    def mean_rel_delta(self) -> float:
        vals = [e.rel_delta for e in self.layers.values() if math.isfinite(e.rel_delta)]
        return sum(vals) / len(vals) if vals else 0.0

    @property
    def clamped(self) -> int:
        return sum(e.clamped for e in self.layers.values())

    @property
    def exact(self) -> int:
        """Layers whose change went into the float offsets (quantization-aware adapters on Q4_1/Q5_1/affine)."""
        return sum(e.exact for e in self.layers.values())

    @property
    def mean_kept(self) -> float:
        """Mean share of the LoRA change the merged quantized weights kept (``nan`` without any change)."""
        vals = [e.kept for e in self.layers.values() if math.isfinite(e.kept)]
        return sum(vals) / len(vals) if vals else math.nan

    def summary(self) -> str:
        how = (f" ({self.exact} exactly into the float offsets, codes unchanged; {len(self.layers) - self.exact} "
               "re-quantized): merge error" if self.exact else ": re-quantization error")
        kept = "" if math.isnan(self.mean_kept) else f", ΔW kept {100 * self.mean_kept:.1f}% (mean over layers)"
        return (f"merged {len(self.layers)} quantized layers{how} max |Δ| {self.max_abs:.3g}, "
                f"mean ‖error‖/‖LoRA delta‖ {self.mean_rel_delta:.3f}{kept}"
                + (f", {self.clamped} weights clamped to the GPTQ grid" if self.clamped else ""))


def _quant_lora_layers(model: nn.Module) -> Iterable[tuple[str, QuantLoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, (QuantLoraLinear, QuantLoraExperts)):
            yield name, module


def merge_report(model: nn.Module, adapter_name: str | None = None) -> MergeReport:
    """Collect the re-quantization errors recorded by the last merge of each :class:`QuantLoraLinear`."""
    report = MergeReport()
    for name, layer in _quant_lora_layers(model):
        for adapter, err in layer.merge_errors.items():
            if adapter_name is None or adapter == adapter_name:
                report.layers[name if adapter_name else f"{name}[{adapter}]"] = err
    return report


def merge_and_unload(model: PeftModel, *, adapter_names: list[str] | None = None, safe_merge: bool = False,
                     progressbar: bool = False) -> tuple[nn.Module, MergeReport]:
    """Merge the adapters into the quantized base (re-quantizing it) and drop the LoRA layers.

    Unlike ``PeftModel.merge_and_unload`` this keeps no pre-merge copy of any layer and returns the
    re-quantization errors.

    Returns:
        ``(base model, MergeReport)``; the base keeps its ``QuantLinear`` layers, now holding ``W + ΔW``.
    """
    layers = list(_quant_lora_layers(model))
    for _, layer in layers:
        layer.keep_unmerged = False
    model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
    report = MergeReport({name: err for name, layer in layers for err in list(layer.merge_errors.values())[-1:]})
    logger.info("%s", report.summary())
    return model.unload(), report

