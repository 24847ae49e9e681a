"""``--mode merged``: fold the LoRA adapter into the dequantized base and write a plain transformers checkpoint.

For every LoRA layer ``W' = dequantize(Q) + s·B A`` (DoRA: ``m/‖W + s·BA‖ · (W + s·BA)``), computed in
fp32 and cast once to the requested dtype. ``Q`` is the quantized weight the adapter was trained against,
so the result reproduces the fine-tuned model (not "original float weights + adapter", whose delta was
learned to correct a different, quantized weight). Quantized layers without an adapter are dequantized;
``modules_to_save`` copies replace their originals. The checkpoint is sharded safetensors with a config
without ``quantization_config``, the generation config and the tokenizer: plain ``transformers`` loads it,
no qtune needed.

Memory: the merged model in fp32 (4 bytes per parameter) while merging, then cast in place.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..formats.base import dtype_name, parse_dtype
from ..nn import QuantExperts, QuantLinear, is_conv1d, set_submodule
from ..atomic import atomic_output, check_free_space, check_output
from .report import ExportResult, Heldout
from .source import ExportSource, load_source
from .verify import RELOAD_TOLERANCE, check_logits, compare_logits, logits, probe_ids, tolerance, verify_merged

__all__ = ["export_merged", "merge_to_float", "MergedLayer", "strip_quantization", "cast_float_params", "resolve_dtype"]


@dataclasses.dataclass(frozen=True)
class MergedLayer:
    """One layer after folding: the quantization it came from and the size of the LoRA change."""

    name: str
    config: Any            # the base layer's QuantConfig, or None for a float base layer
    weight_norm: float     # ‖W'‖_F of the merged weight
    delta_norm: float      # ‖W' − W‖_F: what the adapter changed
    # how to recompute W' − W later without keeping a dense copy of W: the packed base layer (quantized
    # bases), or the LoRA factors (A, B, s) of a float base layer (None: DoRA on a float base)
    base: Any = dataclasses.field(default=None, repr=False, compare=False)
    factors: tuple | None = dataclasses.field(default=None, repr=False, compare=False)

    @torch.no_grad()
    def delta(self, merged_weight: torch.Tensor) -> torch.Tensor | None:
        """``ΔW = W' − W`` [out, in] fp32 (``None`` when it cannot be recomputed)."""
        if self.base is not None:
            return merged_weight.float() - self.base.dequantize(torch.float32).to(merged_weight.device)
        if self.factors is None:
            return None
        out = torch.zeros_like(merged_weight, dtype=torch.float32)
        for a, b, s in self.factors:
            out += (b @ a) * s
        return out


def resolve_dtype(dtype: str | torch.dtype | None, source: ExportSource) -> torch.dtype:
    """``auto``/``None``: the base's float dtype; else ``bf16``/``fp16``/``fp32`` (any qtune dtype name)."""
    if dtype is None or dtype == "auto":
        return source.float_dtype
    return parse_dtype(dtype, what="dtype")


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """[out, in] fp32 weight of a QuantLinear / Linear / Conv1D."""
    if isinstance(module, QuantLinear):
        return module.dequantize(torch.float32)
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    if is_conv1d(module):
        return module.weight.detach().float().t()
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def _dense_module(weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool) -> nn.Module:
    """A new ``nn.Linear`` (or ``Conv1D``, weight stored [in, out]) holding ``weight`` [out, in] in fp32."""
    out_f, in_f = weight.shape
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        new = Conv1D(out_f, in_f)
        new.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        new.bias = nn.Parameter(bias.float() if bias is not None else torch.zeros(out_f, device=weight.device),
                                requires_grad=False)
        return new
    new = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=torch.float32)
    new.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.float(), requires_grad=False)
    return new


@torch.no_grad()
def _fold(layer, adapters: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, tuple | None]:
    """Merged fp32 weight [out, in], bias, the base weight, and the LoRA factors ``(A, B, s)`` (``None`` with
    DoRA), for a peft LoRA ``Linear``-like layer."""
    base = layer.get_base_layer()
    weight = _dense_weight(base)
    merged = weight.clone()
    bias = None if base.bias is None else base.bias.detach().float().clone()
    factors: list | None = []
    for name in adapters:
        if name not in layer.lora_A.keys():
            continue
        a, b = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
        qa = getattr(layer, "is_quantization_aware", None)
        if qa is not None and qa(name):  # QA-LoRA (qtune's layer): ΔW constant per group, see qalora_delta
            merged = merged + layer.get_delta_weight(name).to(merged.device)
            factors = None  # a quantized base: ΔW is recomputed from the packed base (MergedLayer.base)
        elif name in getattr(layer, "lora_variant", {}):
            if not getattr(layer, "use_dora", {}).get(name, False):
                raise ValueError(f"adapter {name!r}: LoRA variant {type(layer.lora_variant[name]).__name__} cannot be "
                                 "folded by qtune export (LoRA, DoRA and qtune's quantization-aware LoRA only)")
            delta = (b @ a) * layer.scaling[name]
            magnitude = layer.lora_magnitude_vector[name]
            # DoRA (Liu et al. 2024): W' = m / ‖W + ΔW‖ · (W + ΔW), the norm over each output row of [out, in];
            # peft's magnitude layer transposes fan_in_fan_out (Conv1D) weights itself
            t = getattr(magnitude, "fan_in_fan_out", False)
            norm = magnitude.get_weight_norm(merged.t() if t else merged, delta.t() if t else delta,
                                             scaling=1).detach().float()
            merged = (magnitude.weight.float() / norm).view(-1, 1) * (merged + delta)
            factors = None
        else:
            merged = merged + (b @ a) * layer.scaling[name]
            if factors is not None:
                factors.append((a, b, float(layer.scaling[name])))
        if layer.lora_bias.get(name, False):
            if bias is None:
                raise ValueError(f"adapter {name!r} trains a LoRA bias, but the base layer has no bias")
            bias = bias + layer.lora_B[name].bias.float() * layer.scaling[name]
    return merged, bias, weight, (tuple(factors) if factors is not None else None)


@torch.no_grad()
def _fold_experts(wrapper, adapters: list[str], name: str) -> tuple[nn.Module, list[MergedLayer]]:
    """The float experts module (the model's own class, fp32) with the LoRA deltas of a chain of nested
    ``ParamWrapper``s (qtune's ``QuantLoraExperts`` on quantized experts, or peft's on float ones) folded in."""
    from peft.tuners.lora.layer import LoraLayer

    chain = []
    module = wrapper
    while isinstance(module, LoraLayer):
        chain.append(module)
        module = module.base_layer
    if isinstance(module, QuantExperts):
        experts, config = module.to_float(torch.float32), module.quant_config
    else:
        experts, config = module, None
        for p in experts.parameters(recurse=False):
            p.data = p.data.float()
    layers = []
    for w in chain:
        param = getattr(experts, w.parameter_name)
        w0 = param.detach().float()
        new = w0.clone()
        for adapter in adapters:
            if adapter in w.lora_A.keys():
                new += w.get_delta_weight(adapter).float().to(new.device)
        if not bool(torch.isfinite(new).all()):
            raise ValueError(f"layer {name}.{w.parameter_name}: the merged weight holds NaN/Inf (the adapter is broken)")
        setattr(experts, w.parameter_name, nn.Parameter(new, requires_grad=False))
        layers.append(MergedLayer(f"{name}.{w.parameter_name}", config, float(new.norm()), float((new - w0).norm())))
    return experts, layers


@torch.no_grad()
def merge_to_float(peft_model, *, dtype: torch.dtype = torch.float32
                   ) -> tuple[nn.Module, list[MergedLayer], dict[str, Any]]:
    """Fold the active LoRA adapters into dense weights and drop every qtune layer (in place).

    Args:
        peft_model: a ``peft.PeftModel`` (LoRA/DoRA) on a qtune-quantized or float base. It is consumed.
        dtype: dtype of the returned model's floating parameters.
    Returns:
        ``(model, merged layers, base plan)``: the transformers model with only ``nn.Linear``/``Conv1D`` layers,
        the folded layers, and ``{layer name: QuantConfig}`` of every layer that was quantized in the base
        (what ``--mode quantized`` quantizes again).
    Raises:
        ValueError: an adapter type qtune cannot fold (not LoRA), or a LoRA bias without a base bias.
    """
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    base = peft_model.get_base_model()
    adapters = list(peft_model.active_adapters)
    merged: list[MergedLayer] = []
    plan: dict[str, Any] = {}
    done: list[str] = []
    for name, module in list(base.named_modules()):
        if not isinstance(module, LoraLayer) or any(name.startswith(d + ".") for d in done):
            continue
        if isinstance(module, ParamWrapper):  # LoRA on fused experts (target_parameters), nested per weight
            clean = name.replace(".modules_to_save.default", "").replace(".original_module", "")
            experts, layers = _fold_experts(module, adapters, clean)
            merged += layers
            if isinstance(module.get_base_layer(), QuantExperts):
                plan[clean] = module.get_base_layer().quant_config
            set_submodule(base, name, experts)
            done.append(name)
            continue
        inner = module.get_base_layer()
        if not (isinstance(inner, (QuantLinear, nn.Linear)) or is_conv1d(inner)):
            raise ValueError(f"layer {name}: LoRA on {type(inner).__name__} cannot be folded by qtune export "
                             "(linear layers only)")
        w, bias, w0, factors = _fold(module, adapters)
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer {name}: the merged weight holds NaN/Inf (the adapter is broken)")
        conv1d = inner.from_conv1d if isinstance(inner, QuantLinear) else is_conv1d(inner)
        # inside a modules_to_save copy the names carry peft's wrapper parts; report the plain name
        clean = name.replace(".modules_to_save.default", "").replace(".original_module", "")
        if isinstance(inner, QuantLinear):
            plan[clean] = inner.config
        quantized = isinstance(inner, QuantLinear)
        merged.append(MergedLayer(clean, getattr(inner, "config", None), float(w.norm()), float((w - w0).norm()),
                                  base=inner if quantized else None, factors=None if quantized else factors))
        set_submodule(base, name, _dense_module(w, bias, conv1d))
        del w0
    model = peft_model.unload()  # drops the (now empty) peft wrappers; modules_to_save copies replace originals
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            plan.setdefault(name, module.config)
            set_submodule(model, name, _dense_module(module.dequantize(torch.float32),
                                            None if module.bias is None else module.bias.detach(), module.from_conv1d))
        elif isinstance(module, QuantExperts):  # the model's own float experts module, dequantized
            plan.setdefault(name, module.quant_config)
            set_submodule(model, name, module.to_float(torch.float32))
    strip_quantization(model)
    cast_float_params(model, dtype)
    if hasattr(model, "config"):
        model.config.dtype = dtype
    model.requires_grad_(False)
    model.eval()
    return model, merged, plan


def cast_float_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating parameters outside qtune layers to ``dtype``, in place (ties stay tied).

    Buffers keep their dtype: rotary ``inv_freq`` stays fp32 as transformers builds it, and the packed
    tensors and scales of ``QuantLinear`` layers keep the dtypes their layouts require.
    """
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def strip_quantization(model: nn.Module) -> None:
    """Remove every trace of quantization from a model (config, quantizer, flags), so it saves as a plain one."""
    model.hf_quantizer = None
    if "_qtune_weight_conversions" in vars(model):  # set_quantized_flags turned them off for quantized experts
        model._weight_conversions = model._qtune_weight_conversions
        if model._weight_conversions is None:
            del model._weight_conversions
        del model._qtune_weight_conversions
    for attr in ("quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if attr in vars(model):
            delattr(model, attr)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False


def float_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the model's state dict if every floating tensor were ``dtype`` (ties counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * (torch.finfo(dtype).bits // 8 if t.is_floating_point() else t.element_size())
    return total


def write_extras(folder: Path, card: str, result: ExportResult) -> None:
    """README.md and qtune_export.json (what the export measured)."""
    (folder / "README.md").write_text(card, encoding="utf-8")
    result.files = sorted({p.name for p in folder.iterdir()} | {"qtune_export.json"})
    (folder / "qtune_export.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")


def export_merged(source: str | Path | ExportSource, out: str | Path, *, dtype: str | torch.dtype | None = "auto",
                  overwrite: bool = False, verify: bool = True, max_shard_size: str | int = "5GB",
                  heldout: str | None = None, heldout_tokens: int | None = None, heldout_window: int | None = None,
                  push_to_hub: str | None = None, private: bool = False, token: str | None = None,
                  base: str | None = None, base_format: str | None = None,
                  log: Callable[[str], None] = print) -> ExportResult:
    """Write the adapter merged into its dequantized base as a plain transformers checkpoint.

    Args:
        source: a run/adapter folder (see :func:`qtune.export.load_source`) or an :class:`ExportSource`
            (its model is consumed).
        out: the export folder (written atomically; must not exist unless ``overwrite``).
        dtype: ``bf16``/``fp16``/``fp32``, or ``auto`` (the base's float dtype).
        verify: check the merged model's logits against the trained model (dtype tolerance), then reload the folder
            with plain transformers and check it reproduces the merged model.
        max_shard_size: safetensors shard size (``save_pretrained``).
        heldout: held-out text (``qtune:austen/persuasion``, a .txt file...) to report perplexity before/after merging.
        heldout_tokens, heldout_window: tokens of it and window length (default: the recipe's, else 2048/512).
        push_to_hub: upload the folder to this Hub repo id afterwards (``private``, ``token``; see
            :func:`qtune.export.hub.push_folder`).
        base, base_format: see :func:`qtune.export.load_source`.
        log: progress/report lines.
    Returns:
        :class:`ExportResult`.
    Raises:
        FileExistsError: ``out`` exists (without ``overwrite``), or a non-empty Hub repo (without ``overwrite``).
        FileNotFoundError / ValueError: bad source (see :func:`load_source`); verification failure
            (:class:`qtune.export.verify.VerificationError`). Nothing is left at ``out`` on any error.
    """
    from . import card, hub

    start = time.perf_counter()
    out = check_output(out, overwrite=overwrite)
    if push_to_hub:
        hub.check_repo(push_to_hub, overwrite=overwrite, token=token)
    src = source if isinstance(source, ExportSource) else load_source(source, base=base, base_format=base_format)
    target = resolve_dtype(dtype, src)
    result = ExportResult(mode="merged", out=out, dtype=dtype_name(target))
    model = src.model
    ids = probe_ids(src.tokenizer, model.get_base_model().config.vocab_size)
    trained_logits = logits(model, ids)
    held = _heldout(src, heldout, heldout_tokens, heldout_window)
    held_ref = None
    if held is not None:
        result.heldout["source"] = heldout
        result.heldout["trained"], held_ref = held.measure(model, log, "trained (quantized base + adapter)")

    tol = tolerance(target, src.compute_dtype)  # before merging: it reads the trained model's layers
    merged, layers, _ = merge_to_float(model, dtype=target)
    result.merged_layers = len(layers)
    merged_logits = logits(merged, ids)
    result.probe["merged vs trained"] = compare_logits(merged_logits, trained_logits)
    if verify:  # the merge itself: the merged model must compute what the trained one did, up to dtype rounding
        check_logits(result.probe["merged vs trained"], tol, "merged model vs the trained model")
    log(f"qtune export: folded LoRA into {len(layers)} layers (fp32), model in {dtype_name(target)}; logits vs the "
        f"trained model: {result.probe['merged vs trained']}")
    if held is not None:
        result.heldout["merged"], held_logits = held.measure(merged, log, f"merged {dtype_name(target)}")
        result.heldout["merged vs trained"] = compare_logits(held_logits, held_ref)

    with atomic_output(out, overwrite=overwrite) as tmp:
        check_free_space(tmp, float_bytes(merged, target), what="the merged checkpoint")
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        if src.tokenizer is not None:
            src.tokenizer.save_pretrained(tmp)
        if verify:
            # the files: a reload must reproduce the in-memory merged model (same weights, same dtype)
            result.verify = verify_merged(tmp, merged_logits, ids, dtype=target, tol=RELOAD_TOLERANCE,
                                          auto_class=src.auto_class)
        result.seconds = time.perf_counter() - start
        write_extras(tmp, card.merged_card(src, result), result)
    if push_to_hub:
        result.hub_url = hub.push_after_export(out, push_to_hub, private=private, overwrite=overwrite, token=token,
                                               log=log)
    result.seconds = time.perf_counter() - start
    log(result.summary())
    return result


def _heldout(src: ExportSource, source: str | None, tokens: int | None, window: int | None) -> Heldout | None:
    if not source:
        return None
    if src.tokenizer is None:
        raise ValueError("--heldout needs a tokenizer, and neither the adapter nor the base folder has one")
    from .report import read_heldout

    spec = (src.recipe.dataset or {}).get("perplexity") or {}
    return Heldout(read_heldout(source), src.tokenizer, max_tokens=tokens or spec.get("max_tokens") or 2048,
                   window=window or spec.get("window") or 512)
