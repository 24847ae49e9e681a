"""Model cards (``README.md``) for the exported folders: base model, its quantization, recipe, metrics.

The YAML front matter follows the Hub's model-card metadata (``base_model``, ``library_name``, ``tags``);
``base_model`` is only written when it is a Hub id (a local path would be rejected by the Hub).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from .report import ExportResult, format_layer_table

# bundled models (qtune.train.base_model.BUILTIN_MODELS) and the Hub repositories they come from
HUB_IDS = {"qtune:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

__all__ = ["hub_base_model", "adapter_card", "merged_card", "quantized_card"]


def hub_base_model(name: str) -> str | None:
    """The Hub id of a base model name, or ``None`` for a local folder."""
    if name in HUB_IDS:
        return HUB_IDS[name]
    if _HUB_ID.match(name) and not Path(name).expanduser().exists():
        return name
    return None


def _front_matter(base: str, library: str, tags: list[str], pipeline: bool = True) -> str:
    meta: dict[str, Any] = {}
    hub = hub_base_model(base)
    if hub:
        meta["base_model"] = hub
    meta["library_name"] = library
    if pipeline:
        meta["pipeline_tag"] = "text-generation"
    meta["tags"] = tags
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _quant_text(q: dict[str, Any]) -> str:
    fmt = q.get("format")
    if fmt == "none":
        return "none (full-precision base)"
    if fmt == "pretrained":
        from ..integrations.layouts import detect_layout

        ck = q.get("checkpoint") or {}
        method = ck.get("quant_method", "?")
        try:
            detail = detect_layout(ck).describe(ck)
        except ValueError:  # a layout qtune does not know: say what the checkpoint says
            detail = ck.get("format") or ""
        return f"pre-quantized checkpoint ({method}{', ' + str(detail) if detail else ''})"
    fields = ", ".join(f"{k}={v}" for k, v in q.items() if k not in ("format", "calibration", "checkpoint"))
    cal = q.get("calibration")
    text = f"qtune {fmt}" + (f" ({fields})" if fields else "")
    if cal:
        text += f", calibrated on {cal.get('source')} ({cal.get('samples')} × {cal.get('seq_len')} tokens)"
    return text


def _metrics_table(metrics: dict[str, Any]) -> str:
    if not metrics:
        return "_No training metrics were recorded (the adapter was not exported from a `qtune train` run)._\n"
    rows = []
    for key in ("status", "global_step", "max_steps", "train_loss", "eval_loss", "train_tokens", "tokens_per_s"):
        if key in metrics:
            v = metrics[key]
            rows.append((key.replace("_", " "), f"{v:.4g}" if isinstance(v, float) else str(v)))
    if "eval_loss" in metrics and isinstance(metrics["eval_loss"], (int, float)):
        rows.append(("eval perplexity", f"{math.exp(metrics['eval_loss']):.3f}"))
    for key in ("perplexity_before", "perplexity_after"):
        p = metrics.get(key)
        if isinstance(p, dict) and "perplexity" in p:
            rows.append((f"held-out perplexity {key.split('_')[1]} training",
                         f"{p['perplexity']:.3f} ({p.get('predicted', '?')} tokens)"))
    params = metrics.get("parameters")
    if isinstance(params, dict) and "trainable" in params:
        rows.append(("trainable parameters", f"{params['trainable']:,}"))
    return "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _recipe_block(recipe: dict[str, Any] | None) -> str:
    if not recipe:
        return ""
    shown = {k: recipe[k] for k in ("model", "quantization", "lora", "dataset", "training") if k in recipe}
    return "## Recipe\n\n```yaml\n" + yaml.safe_dump(shown, sort_keys=False) + "```\n\n"


def adapter_card(source, result: ExportResult) -> str:
    """README.md of an adapter export."""
    q = source.base_quantization
    fmt = q.get("format", "none")
    tags = ["qtune", "peft", "lora"] + ([str(fmt)] if fmt not in ("none", "pretrained") else [])
    cfg = json.loads((source.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    lora = f"r={cfg.get('r')}, alpha={cfg.get('lora_alpha')}" + (", DoRA" if cfg.get("use_dora") else "")
    return (
        _front_matter(source.base_model, "peft", tags)
        + f"\n# LoRA adapter for {hub_base_model(source.base_model) or source.base_model}\n\n"
        f"A PEFT LoRA adapter ({lora}) trained with qtune on a quantized, frozen base.\n\n"
        f"- **Base model:** `{source.base_model}`\n"
        f"- **Base quantization during training:** {_quant_text(q)}\n"
        f"- **Files:** `adapter_config.json`, `adapter_model.safetensors`; `qtune_base.json` records the full "
        f"recipe, so `qtune export` can rebuild the exact base from this folder.\n\n"
        "## Training metrics\n\n" + _metrics_table(source.metrics()) + "\n"
        + _recipe_block(source.recipe.to_dict()) +
        "## Use\n\n"
        "On the same quantized base (the adapter was trained against its rounding):\n\n"
        "```python\nfrom qtune.export import load_source\nsource = load_source(\"path/to/this/folder\")  "
        "# rebuilds the base, loads the adapter\nmodel = source.model\n```\n\n"
        "or, on a base you loaded yourself with qtune:\n\n"
        "```python\nfrom qtune.integrations.peft import load_adapter\nmodel = load_adapter(base, "
        "\"path/to/this/folder\")\n```\n\n"
        "On a qtune base, use `qtune.integrations.peft.load_adapter` (it registers qtune's LoRA layer with peft "
        "before `PeftModel.from_pretrained` reads the folder). An adapter trained on a qtune NF4 base (bitsandbytes' "
        "block size 64) also loads with plain `PeftModel.from_pretrained` on the same model loaded by "
        "transformers+bitsandbytes (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\")`): the "
        "quantized bytes and the layer names are the same.\n\n"
        "Other exports: `qtune export FOLDER --mode merged` (full-precision checkpoint, no qtune needed) or "
        "`--mode quantized`.\n")


def _export_numbers(result: ExportResult) -> str:
    lines = []
    for k, v in result.probe.items():
        lines.append(f"- logits, {k} (probe sentence): {v}")
    for k, v in result.heldout.items():
        if isinstance(v, dict) and "perplexity" in v:
            lines.append(f"- held-out perplexity, {k}: {v['perplexity']:.3f} ({v['predicted']:,} tokens)")
        elif not isinstance(v, (dict, str)):
            lines.append(f"- logits, {k} (held-out window): {v}")
    if result.heldout.get("source"):
        lines.append(f"- held-out text: {result.heldout['source']}")
    return "\n".join(lines) + ("\n" if lines else "")


def merged_card(source, result: ExportResult) -> str:
    """README.md of a merged (full-precision) export."""
    q = source.base_quantization
    return (
        _front_matter(source.base_model, "transformers", ["qtune", "lora", "merged"])
        + f"\n# {hub_base_model(source.base_model) or source.base_model} + LoRA, merged ({result.dtype})\n\n"
        "An ordinary transformers checkpoint: the LoRA adapter trained with qtune was folded into the "
        "dequantized base weights in fp32 and saved in "
        f"{result.dtype}. It loads with `AutoModelForCausalLM.from_pretrained` and needs no qtune.\n\n"
        f"- **Base model:** `{source.base_model}`\n"
        f"- **Base quantization during training:** {_quant_text(q)} — the merged weights are "
        "`dequantize(Q(W)) + s·BA`, i.e. the weights the adapter was trained against, so the merged model "
        "reproduces the fine-tuned model rather than the original float base plus the adapter.\n"
        f"- **Layers with LoRA folded in:** {result.merged_layers}\n\n"
        "## Export checks\n\n" + _export_numbers(result) + "\n"
        "## Training metrics\n\n" + _metrics_table(source.metrics()) + "\n"
        + _recipe_block(source.recipe.to_dict()))


def quantized_card(source, result: ExportResult) -> str:
    """README.md of a re-quantized export, with the error table."""
    from ..formats import get_format
    from ..integrations.layouts import get_layout, layout_names

    q = source.base_quantization
    layout_note = get_layout(result.layout).note if result.layout in layout_names() else result.layout
    table = format_layer_table(result.layers, result.total_rel_weight or 0.0) if result.layers else ""
    return (
        _front_matter(source.base_model, "transformers", ["qtune", "lora", "merged", str(result.format)])
        + f"\n# {hub_base_model(source.base_model) or source.base_model} + LoRA, merged and re-quantized "
        f"({result.format})\n\n"
        "The LoRA adapter was folded into the dequantized base in fp32, then the merged weights were quantized "
        f"again to {result.format}"
        + (" with GPTQ on calibration data (error compensation on the merged weights)"
           if get_format(result.format).needs_calibration else " (round to nearest)")
        + f". Stored in the {layout_note}.\n\n"
        f"- **Base model:** `{source.base_model}`\n"
        f"- **Base quantization during training:** {_quant_text(q)}\n"
        f"- **Re-quantization error vs the merged full-precision model:** ‖Q(W)−W‖/‖W‖ = "
        f"{(result.total_rel_weight or 0.0):.4e} over {len(result.layers)} layers\n\n"
        + "".join(f"> **Warning:** {w.removeprefix('qtune export: WARNING: ')}\n\n" for w in result.warnings)
        + "## Export checks\n\n" + _export_numbers(result) + "\n"
        "## Per-layer error\n\n```\n" + table + "\n```\n\n"
        "## Training metrics\n\n" + _metrics_table(source.metrics()) + "\n"
        + _recipe_block(source.recipe.to_dict()))
