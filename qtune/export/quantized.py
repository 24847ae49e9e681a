"""``--mode quantized``: merge (as ``--mode merged``, in fp32), then quantize the merged weights again.

Why not merge in the quantized domain (``W_q + ΔW`` re-rounded, as ``merge_and_unload`` on a quantized
base does)? Because the export can then pick the format and redo the work that makes it good:

* RTN formats (``nf4``, ``fp4``, ``int8``, ``llm_int8``, ``rtn``): each merged weight ``W'`` is quantized
  directly (new absmax/scales fitted to ``W'``).
* ``gptq``: sequential block-by-block GPTQ (:func:`qtune.calibration.gptq_quantize_model`) on the merged
  model with calibration text, so the rounding error of ``W'`` is compensated with the merged model's own
  activations. This is what lets a fine-tune of a GPTQ base ship as a GPTQ model, a merge other tools refuse.

The layers quantized are those that were quantized in the training base (same names), or, for a float
base, every linear layer except the output head and tied layers. With ``format`` equal to the base's
format and no options (``--format nf4``), the base's settings are kept (block size, double quant, GPTQ
bits/group size/act-order); ``nf4:double_quant=true`` or ``gptq:bits=4,group_size=64`` set them.

**Exact merge.** A quantization-aware adapter (QA-LoRA: ``ΔW`` constant within each quantization group) exported
to its base's own format, when that format has per-group float offsets (GGUF Q4_1/Q5_1, ``affine``), is not
re-quantized: ``ΔW`` goes into the offsets (:func:`merge_into_offsets`), codes and scales keep their bytes, and the
report shows ≈ 100% of the change kept (the offsets' fp16 rounding). This is the default when ``format`` is not given.

Reported (printed and in ``qtune_export.json``): per layer and in total ``‖Q(W') − W'‖/‖W'‖`` against the
merged full-precision weights, per layer also against the LoRA delta ``‖Q(W') − W'‖/‖ΔW‖`` and the share
of ``ΔW`` the quantized weight kept (a re-quantization that rounds ``W'`` back onto the base's grid keeps
≈ 0% while its weight error looks tiny: that case is flagged with a warning); logits of
the re-quantized model against the merged one on a probe sentence; and, with a held-out text, the
perplexity of the trained model, the merged fp32 model and the re-quantized one.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..formats import QuantConfig, get_format, parse_format_spec
from ..formats.base import dtype_name
from ..integrations.layouts import get_layout, layout_names, save_quantized
from ..nn import QuantExperts, QuantLinear, float_weight_of, is_fused_experts, layer_class_for, set_submodule
from ..atomic import atomic_output, check_free_space, check_output
from .merged import MergedLayer, _heldout, cast_float_params, merge_to_float, resolve_dtype, write_extras
from .report import ExportResult, LayerError, format_layer_table
from .source import ExportSource, load_source
from .verify import check_logits, compare_logits, logits, probe_ids, tolerance, verify_quantized

__all__ = ["export_quantized", "target_config", "requantize_model", "erased_warning", "exact_merge_layers",
           "merge_into_offsets"]


def target_config(spec: str | QuantConfig, base_plan: dict[str, QuantConfig], dtype: torch.dtype) -> QuantConfig:
    """The config to re-quantize into.

    Args:
        spec: a ``QuantConfig``, or ``"name[:key=value,...]"`` as for ``qtune quantize`` (``nf4``,
            ``nf4:double_quant=true``, ``gptq:bits=4,group_size=64``).
        base_plan: the training base's ``{layer: QuantConfig}``; a bare name equal to the base's (single)
            format keeps the base's settings.
        dtype: the compute dtype of the new layers.
    Raises:
        ValueError: unknown format or option.
    """
    if isinstance(spec, QuantConfig):
        return dataclasses.replace(spec, compute_dtype=spec.compute_dtype or dtype_name(dtype))
    try:
        qc = parse_format_spec(spec)
    except ValueError as e:
        raise ValueError(f"--format {spec!r}: {e}") from None
    compute = qc.compute_dtype or dtype_name(dtype)
    base_formats = {type(c) for c in base_plan.values()}
    if not qc.options and len(base_formats) == 1:
        base_cfg = next(iter(base_plan.values()))
        if type(base_cfg) is get_format(qc.format):
            return dataclasses.replace(base_cfg, compute_dtype=compute)
    return qc.config(compute)


def _error(name: str, layer: QuantLinear, w: torch.Tensor, merged: MergedLayer | None) -> LayerError:
    q = layer.dequantize(torch.float32)
    err = q - w
    e2 = float(err.pow(2).sum())
    w2 = float(w.pow(2).sum())
    rel_delta = kept = None
    delta = merged.delta(w) if merged is not None else None
    if delta is not None:
        d2 = float(delta.pow(2).sum())
        if d2 > 0:
            rel_delta = math.sqrt(e2 / d2)
            # Q(W') − W = ΔW + err: the share of ΔW along which the quantized weight still moved. Noise
            # uncorrelated with ΔW leaves ≈ 1; rounding back onto the base's own grid (err ≈ −ΔW) gives ≈ 0
            kept = 1.0 + float((err * delta).sum()) / d2
    return LayerError(name=name, format=layer.config.format, bits=layer.bits_per_parameter(),
                      rel_weight=math.sqrt(e2 / max(w2, 1e-30)), rel_delta=rel_delta, kept=kept, err_sq=e2, w_sq=w2)


def _experts_error(name: str, experts: QuantExperts, module: nn.Module) -> LayerError:
    """:func:`_error` over every expert weight (one expert dequantized at a time; no LoRA delta on experts)."""
    e2 = w2 = 0.0
    for wname in experts.weight_names:
        stack, w = experts._modules[wname], getattr(module, wname).detach()
        for e in range(stack.num_experts):
            we = (w[e].t() if stack.transposed else w[e]).float()
            e2 += float((stack.dequantize(e, torch.float32) - we).pow(2).sum())
            w2 += float(we.pow(2).sum())
    return LayerError(name=name, format=experts.quant_config.format, bits=experts.bits_per_parameter(),
                      rel_weight=math.sqrt(e2 / max(w2, 1e-30)), rel_delta=None, kept=None, err_sq=e2, w_sq=w2)


@torch.no_grad()
def requantize_model(model: nn.Module, plan: list[str], cfg: QuantConfig, *, calibration: torch.Tensor | None = None,
                     merged: dict[str, MergedLayer] | None = None, progress: bool = False) -> list[LayerError]:
    """Quantize the layers ``plan`` of a float model to ``cfg``, in place; return each layer's error.

    Args:
        model: a transformers model with fp32 ``nn.Linear``/``Conv1D`` layers (the merged model).
        plan: names of the layers to quantize.
        cfg: the target config.
        calibration: int64 ``[samples, seq_len]`` token ids; required when ``cfg.needs_calibration`` (GPTQ).
        merged: ``{layer: MergedLayer}`` from :func:`qtune.export.merge_to_float`, for the error against the
            LoRA delta (``rel_delta``, ``kept``).
    Raises:
        ValueError: a format that needs calibration (GPTQ) without it.
    """
    merged = merged or {}
    errors: list[LayerError] = []
    if cfg.needs_calibration:
        if calibration is None:
            raise ValueError(f"{cfg.format} re-quantization needs calibration data (--calibration)")
        from ..calibration import gptq_quantize_model

        # fused experts: GPTQ per expert on the tokens the router sends it (the float modules kept for the error)
        experts = {n: model.get_submodule(n) for n in plan if is_fused_experts(model.get_submodule(n))}
        weights = {n: float_weight_of(model.get_submodule(n), n)[0].float().clone() for n in plan if n not in experts}
        gptq_quantize_model(model, calibration, None, skip_modules=(), overrides={n: cfg for n in plan},
                            progress=progress)
        for n in plan:
            layer = model.get_submodule(n)
            if n in experts:
                if not isinstance(layer, QuantExperts):
                    raise ValueError(f"experts module {n}: GPTQ left it unquantized")
                errors.append(_experts_error(n, layer, experts.pop(n)))
                continue
            if not isinstance(layer, QuantLinear):
                raise ValueError(f"layer {n}: GPTQ left it unquantized (tied or kept in fp32 by the model)")
            errors.append(_error(n, layer, weights.pop(n), merged.get(n)))
        return errors
    for n in plan:
        module = model.get_submodule(n)
        if is_fused_experts(module):
            experts = QuantExperts.from_float(module, cfg, name=n)
            errors.append(_experts_error(n, experts, module))
            set_submodule(model, n, experts)
            continue
        w = float_weight_of(module, n)[0].float()
        layer = layer_class_for(cfg).from_float(module, cfg, name=n)
        errors.append(_error(n, layer, w, merged.get(n)))
        set_submodule(model, n, layer)
    return errors


def erased_warning(errors: list[LayerError], cfg: QuantConfig, threshold: float = 0.5) -> str | None:
    """A warning when re-quantization rounds the merged weights back onto the base's grid.

    Then ``Q(W') ≈ W``: the weight error relative to ``W'`` looks tiny, yet the fine-tune is gone. Measured
    per layer as the share of ``ΔW`` the quantized weight kept (:class:`LayerError` ``kept``); warns when the
    median is below ``threshold``.
    """
    kept = sorted(e.kept for e in errors if e.kept is not None and math.isfinite(e.kept))
    if not kept:
        return None
    median = kept[len(kept) // 2]
    if median >= threshold:
        return None
    return (f"qtune export: WARNING: the {cfg.format} re-quantization keeps only {100 * median:.0f}% of the LoRA "
            "change (median over layers): the merged weights were rounded back onto the base's grid, so most of "
            "what training changed is gone. Compare the held-out perplexities (--heldout); ship --mode merged or "
            "--mode adapter, or a finer format (int8), instead.")


def report_layer_errors(result, errors: list[LayerError], cfg: QuantConfig, log: Callable[[str], None]) -> None:
    """Put the per-layer errors into ``result`` (``layers``, ``total_rel_weight``), log their table, and log and
    record the warning when the re-quantization erased most of the LoRA change (:func:`erased_warning`)."""
    result.layers, result.total_rel_weight = errors, _total(errors)
    log(format_layer_table(errors, result.total_rel_weight))
    warning = erased_warning(errors, cfg)
    if warning:
        log(warning)
        result.warnings.append(warning)


def _total(errors: list[LayerError]) -> float:
    return math.sqrt(sum(e.err_sq for e in errors) / max(sum(e.w_sq for e in errors), 1e-30))


def _state_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def export_quantized(source: str | Path | ExportSource, out: str | Path, *, format: str | QuantConfig | None = None,
                     layout: str = "qtune", dtype: str | torch.dtype | None = "auto",
                     calibration: str | None = None, samples: int | None = None, seq_len: int | None = None,
                     seed: int = 0, overwrite: bool = False, verify: bool = True,
                     heldout: str | None = None, heldout_tokens: int | None = None, heldout_window: int | None = None,
                     push_to_hub: str | None = None, private: bool = False, token: str | None = None,
                     base: str | None = None, base_format: str | None = None, progress: bool = False,
                     log: Callable[[str], None] = print) -> ExportResult:
    """Merge the adapter in fp32, quantize the merged model again, and write it in ``layout``.

    Args:
        source: a run/adapter folder or an :class:`ExportSource` (consumed).
        out: the export folder (atomic; must not exist unless ``overwrite``).
        format: target format (see :func:`target_config`); ``None``: the adapted layers' own format when the adapter
            merges into it exactly (a quantization-aware adapter on Q4_1/Q5_1/affine, :func:`exact_merge_layers`; the
            base's other layers keep their formats), else nf4. A GGUF file is written by
            :func:`qtune.export.quantized_gguf.export_gguf` (``export(..., mode="quantized", format="gguf")``).
        layout: ``qtune`` (``quant_method: qtune``), ``bnb`` (transformers+bitsandbytes) or ``gptq`` (GPTQ v1).
        dtype: dtype of the float parameters and compute dtype of the quantized layers (``auto``: the base's).
        calibration: GPTQ calibration text (a source as in recipes: a file, ``qtune:austen/emma``...; default:
            the run recipe's).
        samples, seq_len, seed: calibration windows (default: the recipe's, else 128 × 512).
        verify: check the merged model against the trained model (dtype tolerance), and the reloaded folder (qtune's
            loader) against the in-memory re-quantized model.
        heldout, heldout_tokens, heldout_window: held-out text for perplexity/logits comparisons.
        push_to_hub, private, token: upload afterwards (:func:`qtune.export.hub.push_folder`).
        base, base_format: see :func:`qtune.export.load_source`.
        progress: tqdm bar over GPTQ blocks.
        log: output lines (the per-layer table included).
    Returns:
        :class:`ExportResult` with ``layers`` and ``total_rel_weight``.
    Raises:
        FileExistsError, FileNotFoundError, ValueError: bad output path, source, format/layout pair, missing
            calibration, verification failure. Nothing is left at ``out`` on any error.
    """
    from . import card, hub

    if isinstance(format, str) and format.strip().lower() == "gguf":
        raise ValueError("format 'gguf' is one GGUF file: qtune.export.export_gguf, or export(..., mode='quantized', "
                         "format='gguf')")
    start = time.perf_counter()
    out = check_output(out, overwrite=overwrite)
    if layout not in layout_names():
        raise ValueError(f"--layout {layout!r} is not one of {', '.join(layout_names())}")
    writer = get_layout(layout)
    if push_to_hub:
        hub.check_repo(push_to_hub, overwrite=overwrite, token=token)
    src = source if isinstance(source, ExportSource) else load_source(source, base=base, base_format=base_format)
    target = resolve_dtype(dtype, src)
    base_plan = {n.removesuffix(".base_layer"): m.config for n, m in src.model.get_base_model().named_modules()
                 if isinstance(m, QuantLinear)}
    if format is None:  # the adapted layers' own format when the adapter merges into it exactly (others stay)
        from ..integrations.peft import QuantLoraLinear

        adapted = {dataclasses.replace(m.get_base_layer().config, compute_dtype=None)
                   for m in src.model.modules() if isinstance(m, QuantLoraLinear)}
        only = next(iter(adapted)) if len(adapted) == 1 else None
        format = only if only is not None and exact_merge_layers(src.model, only) else "nf4"
    cfg = target_config(format, base_plan, target)
    cfg = writer.stored_config(cfg)  # the in-memory model must compute as the reloaded one will
    writer.check(cfg)
    windows = None
    if cfg.needs_calibration:
        windows = _calibration(src, calibration, samples, seq_len, seed)
    result = ExportResult(mode="quantized", out=out, dtype=dtype_name(target), format=cfg.format, layout=layout)

    model = src.model
    ids = probe_ids(src.tokenizer, model.get_base_model().config.vocab_size)
    trained_logits = logits(model, ids)
    held = _heldout(src, heldout, heldout_tokens, heldout_window)
    if held is not None:
        result.heldout["source"] = heldout
        result.heldout["trained"], _ = held.measure(model, log, "trained (quantized base + adapter)")

    # a quantization-aware adapter on Q4_1/Q5_1/affine exported to the base's own format: into the offsets, exactly
    exact = exact_merge_layers(model, cfg)
    merged_logits = held_merged = None
    if exact:
        merged, errors = merge_into_offsets(model, log)
        result.merged_layers = len(errors)
        cast_float_params(merged, target)
    else:
        merged, errors, merged_logits, held_merged = _merge_and_requantize(
            model, src, cfg, target, writer, windows, ids, trained_logits, held, result, verify, progress, log)
    report_layer_errors(result, errors, cfg, log)
    quant_logits = logits(merged, ids)
    if merged_logits is not None:
        result.probe["quantized vs merged fp32"] = compare_logits(quant_logits, merged_logits)
    result.probe["quantized vs trained"] = compare_logits(quant_logits, trained_logits)
    if held is not None:
        label = f"exactly merged {cfg.format}" if exact else f"re-quantized {cfg.format}"
        result.heldout["quantized"], held_q = held.measure(merged, log, label)
        if held_merged is not None:
            result.heldout["quantized vs merged fp32"] = compare_logits(held_q, held_merged)

    from ..integrations.transformers import mark_quantized

    mark_quantized(merged)
    with atomic_output(out, overwrite=overwrite) as tmp:
        check_free_space(tmp, _state_bytes(merged), what="the quantized checkpoint")
        save_quantized(merged, tmp, layout=layout, tokenizer=src.tokenizer, overwrite=True)
        if verify:
            result.verify = verify_quantized(tmp, quant_logits, ids, dtype=target, tol=tolerance(target),
                                             auto_class=src.auto_class)
        result.seconds = time.perf_counter() - start
        write_extras(tmp, card.quantized_card(src, result), result)
    if push_to_hub:
        result.hub_url = hub.push_after_export(out, push_to_hub, private=private, overwrite=overwrite, token=token,
                                               log=log)
    result.seconds = time.perf_counter() - start
    log(result.summary())
    return result


def _merge_and_requantize(model, src: ExportSource, cfg: QuantConfig, target: torch.dtype, writer, windows, ids,
                          trained_logits, held, result: ExportResult, verify: bool, progress: bool, log):
    """The general path: fold the adapter in fp32, then quantize the merged layers to ``cfg`` again.

    Returns ``(model, errors, merged fp32 probe logits, merged fp32 held-out logits or None)``."""
    merge_tol = tolerance(torch.float32, src.compute_dtype)  # before merging: it reads the trained model's layers
    merged, layers, plan = merge_to_float(model, dtype=torch.float32)
    result.merged_layers = len(layers)
    if not plan:
        from ..calibration import plan_layers

        plan = plan_layers(merged, cfg)
    names = list(plan)
    if not names:
        raise ValueError("no linear layer to quantize in the merged model")
    writer.check_experts([n for n in names if is_fused_experts(merged.get_submodule(n))])
    writer.check_plan(merged, {n: cfg for n in names})
    merged_logits = logits(merged, ids)
    result.probe["merged fp32 vs trained"] = compare_logits(merged_logits, trained_logits)
    if verify:
        check_logits(result.probe["merged fp32 vs trained"], merge_tol, "merged model vs the trained model")
    held_merged = None
    if held is not None:
        result.heldout["merged fp32"], held_merged = held.measure(merged, log, "merged fp32")
    log(f"qtune export: folded LoRA into {len(layers)} layers (fp32); quantizing {len(names)} layers to "
        f"{cfg.to_json()}" + (f" with GPTQ on {windows.shape[0]} × {windows.shape[1]} calibration tokens"
                              if windows is not None else ""))
    errors = requantize_model(merged, names, cfg, calibration=windows,
                              merged={l.name: l for l in layers}, progress=progress)
    cast_float_params(merged, target)
    return merged, errors, merged_logits, held_merged


def exact_merge_layers(peft_model, cfg: QuantConfig) -> list[str]:
    """The LoRA layers of ``peft_model`` when its whole adapter can be merged exactly into ``cfg``, else ``[]``.

    Exact: every quantized base layer with an adapter is in ``cfg`` (same format and settings) and takes every
    active adapter into its per-group float offsets (:meth:`qtune.integrations.peft.QuantLoraLinear.merges_exactly`:
    a quantization-aware adapter on Q4_1/Q5_1/affine), and no LoRA sits on quantized experts. Then the export keeps
    the base's codes and scales and moves the change into the offsets (:func:`merge_into_offsets`).
    """
    from peft.tuners.lora.layer import LoraLayer

    from ..integrations.peft import QuantLoraExperts, QuantLoraLinear

    adapters = list(peft_model.active_adapters)
    names = []
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, QuantLoraExperts):
            return []
        if isinstance(module, QuantLoraLinear):
            base = module.get_base_layer()
            if dataclasses.replace(base.config, compute_dtype=cfg.compute_dtype) != cfg:
                return []
            if not all(module.merges_exactly(a) for a in adapters if a in module.lora_A.keys()):
                return []
            names.append(name)
        elif isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), QuantLinear):
            return []
    return names


def merge_into_offsets(peft_model, log: Callable[[str], None] = print) -> tuple[nn.Module, list[LayerError]]:
    """Merge a quantization-aware adapter into the float offsets of its quantized base (same format, same codes).

    Returns:
        ``(model, errors)``: the base model with the changed offsets, and per layer the error against the exact
        ``W + ΔW`` (the offsets' fp16 rounding; ``kept`` ≈ 100%).
    """
    from ..integrations.peft import merge_and_unload

    merged, report = merge_and_unload(peft_model)
    log(f"qtune export: {report.summary()}")
    errors = []
    for name, err in report.layers.items():
        name = name.removeprefix("base_model.model.")  # the PeftModel's names, unloaded
        layer = merged.get_submodule(name)
        errors.append(LayerError(name=name, format=layer.config.format, bits=layer.bits_per_parameter(),
                                 rel_weight=err.rel_weight, rel_delta=err.rel_delta if math.isfinite(err.rel_delta) else None,
                                 kept=err.kept if math.isfinite(err.kept) else None, err_sq=err.err_sq, w_sq=err.w_sq))
    merged.requires_grad_(False)
    merged.eval()
    return merged, errors


def _calibration(src: ExportSource, calibration: str | None, samples: int | None, seq_len: int | None,
                 seed: int) -> torch.Tensor:
    """Calibration windows for GPTQ: ``--calibration``, else the run recipe's GPTQ calibration text."""
    from ..calibration import calibration_windows
    from ..sources import PREFIX, check_exists, normalize, read_text

    rc = src.recipe.quantization.get("calibration") or {}
    if src.tokenizer is None:
        raise ValueError("GPTQ calibration needs a tokenizer, and neither the adapter nor the base folder has one")
    samples = samples or rc.get("samples") or 128
    seq_len = seq_len or rc.get("seq_len") or 512
    if calibration is None:
        calibration = rc.get("source")
        if calibration is None:
            raise ValueError("--format gptq needs calibration text: --calibration PATH (a .txt/.jsonl file, "
                             "qtune:austen/emma, ...)")
    if calibration is rc.get("source") or normalize(calibration).startswith(PREFIX):
        texts: str | list[str] = [read_text(calibration)]  # the recipe's source syntax, read as training read it
    else:  # a file or dataset given for calibration: read as `qtune quantize --calibration` reads it (first
        texts = check_exists(calibration, "calibration file")  # string column if no `text`, capped in size)
    return calibration_windows(texts, src.tokenizer, samples=samples, seq_len=seq_len, seed=seed)
