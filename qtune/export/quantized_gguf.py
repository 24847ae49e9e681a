"""``--mode quantized --format gguf``: merge the adapter, quantize into GGUF block types, write one GGUF file.

* **GGUF base** (the run trained on ``model.path: file.gguf``): every linear layer goes back into its source
  type. A layer the merge left unchanged (no adapter, or ``W'`` equal to the dequantized blocks) keeps the
  source's blocks byte for byte; a changed one is quantized again into its type (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 with
  the gguf package's rounding; a changed K-quant layer is refused, naming it). Metadata, tokenizer and every
  other tensor come from the source file (:func:`qtune.export.gguf.write_gguf`).
* **Hugging Face base**: the merged linear layers (those quantized in the base, else every decoder linear
  layer) are quantized into ``gguf_type`` (``q4_0``/``q4_1``/``q5_0``/``q5_1``/``q8_0``); embeddings and an
  untied head are written F16 (and rounded to fp16 in the in-memory model, so the checks compare what is
  written), norms F32; config and tokenizer metadata from the run.

The merge is :func:`qtune.export.merge_to_float` (the same as every other mode); the per-layer report gives
the share of the LoRA change each re-quantized layer kept (``kept``), as for the other quantized exports.

``out`` is a folder (written atomically) holding ``model.gguf``, ``README.md`` and ``qtune_export.json``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..atomic import atomic_output, check_free_space, check_output
from ..formats.base import dtype_name
from ..nn import LinearGGUF, QuantLinear, set_submodule
from .gguf import GGUFWritten, gguf_source_of, hf_architecture, parse_gguf_type, write_gguf
from .merged import MergedLayer, _heldout, cast_float_params, merge_to_float, resolve_dtype
from .report import ExportResult, LayerError, format_layer_table
from .source import ExportSource, load_source
from .verify import check_logits, compare_logits, logits, probe_ids, tolerance

__all__ = ["export_gguf", "GGUF_FILE"]

GGUF_FILE = "model.gguf"


@torch.no_grad()
def _back_to_source_types(merged: nn.Module, originals: dict[str, LinearGGUF],
                          layers: dict[str, MergedLayer]) -> tuple[list[LayerError], int]:
    """Put every GGUF layer of the base back into ``merged`` in its own type; return the errors of the
    re-quantized ones and how many kept their source blocks."""
    from .quantized import _error

    errors: list[LayerError] = []
    unchanged = 0
    for name, original in originals.items():
        dense = merged.get_submodule(name)
        w = dense.weight.detach().float()
        bias = None if dense.bias is None else dense.bias.detach()
        same_bias = (bias is None) == (original.bias is None) and (
            bias is None or torch.equal(bias.to(original.bias.dtype), original.bias))
        if same_bias and torch.equal(w, original.dequantize(torch.float32).to(w.device)):
            set_submodule(merged, name, original)  # the source's blocks, untouched
            unchanged += 1
            continue
        if not original.config.can_quantize:
            raise ValueError(f"layer {name}: the adapter changed it, and its source type {original.config.type_name} "
                             "has no quantizer (qtune's and the gguf package's quantize the 32-weight types only); "
                             "export --mode merged, or train on a Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 file")
        layer = LinearGGUF.from_float(dense, original.config, name=name)
        errors.append(_error(name, layer, w, layers.get(name)))
        set_submodule(merged, name, layer)
    return errors, unchanged


@torch.no_grad()
def _round_written_floats(model: nn.Module) -> None:
    """Round 2-D float parameters (embeddings, an untied head) to fp16 in place: the file stores them F16."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dim() >= 2:
                p.data = p.data.to(torch.float16).to(p.dtype)


def _card(src: ExportSource, result: ExportResult, written: GGUFWritten, source_file: Path | None) -> str:
    from collections import Counter

    from .card import _export_numbers, _metrics_table

    types = Counter(written.tensors.values())
    origin = (f"written back into the tensor types of `{source_file.name}` (metadata and tokenizer kept; "
              f"{len(written.kept)} of {len(written.tensors)} tensors byte-identical to it)"
              if source_file else "quantized from the merged Hugging Face model")
    table = format_layer_table(result.layers, result.total_rel_weight or 0.0) if result.layers else "(no layer changed)"
    return (f"---\nlibrary_name: gguf\ntags: [qtune, lora, merged, gguf]\n---\n\n"
            f"# {src.base_model} + LoRA, merged, GGUF\n\n"
            f"`{GGUF_FILE}` ({written.architecture}): the LoRA adapter folded into the base in fp32, {origin}. "
            "Runs in llama.cpp, Ollama and LM Studio; `AutoModelForCausalLM.from_pretrained(folder, "
            f"gguf_file=\"{GGUF_FILE}\")` reads it too.\n\n"
            f"- **Tensor types:** {', '.join(f'{n} × {t}' for t, n in sorted(types.items()))}\n\n"
            "## Export checks\n\n" + _export_numbers(result) + "\n"
            "## Re-quantized layers\n\n```\n" + table + "\n```\n\n"
            "## Training metrics\n\n" + _metrics_table(src.metrics()) + "\n")


def export_gguf(source: str | Path | ExportSource, out: str | Path, *, gguf_type: str | None = None,
                dtype: str | torch.dtype | None = "auto", overwrite: bool = False, verify: bool = True,
                heldout: str | None = None, heldout_tokens: int | None = None, heldout_window: int | None = None,
                base: str | None = None, base_format: str | None = None, push_to_hub: str | None = None,
                private: bool = False, token: str | None = None, log: Callable[[str], None] = print) -> ExportResult:
    """Merge the adapter and write the model as ``out/model.gguf`` (see the module docstring).

    Args:
        source: a run/adapter folder or an :class:`ExportSource` (consumed).
        out: the export folder (atomic; must not exist unless ``overwrite``).
        gguf_type: Hugging Face bases: ``q4_0``/``q4_1``/``q5_0``/``q5_1``/``q8_0`` (required); GGUF bases keep
            their own types (giving one is an error).
        dtype: dtype of the float tensors of the in-memory model (``auto``: the base's); a GGUF base's float
            tensors are written in their source types.
        verify: check the merged model against the trained one, and the file reloaded by qtune against the
            in-memory quantized model.
        heldout, heldout_tokens, heldout_window: held-out perplexity of the trained, merged and GGUF models.
        base, base_format: see :func:`qtune.export.load_source`.
        push_to_hub, private, token: upload the folder afterwards (:func:`qtune.export.hub.push_folder`).
    Returns:
        :class:`ExportResult` (``layers``: the re-quantized layers, with the share of the LoRA change kept).
    Raises:
        FileExistsError, ValueError: bad output path, an architecture or tensor GGUF cannot carry, a changed
            K-quant layer, verification failure. Nothing is left at ``out`` on any error.
    """
    from . import hub

    start = time.perf_counter()
    out = check_output(out, overwrite=overwrite)
    if push_to_hub:
        hub.check_repo(push_to_hub, overwrite=overwrite, token=token)
    src = source if isinstance(source, ExportSource) else load_source(source, base=base, base_format=base_format)
    base_model = src.model.get_base_model()
    source_file = gguf_source_of(base_model)
    target = resolve_dtype(dtype, src)
    if source_file is not None:
        if gguf_type is not None:
            raise ValueError(f"--gguf-type applies to Hugging Face bases; the base {source_file.name} is written back "
                             "in its own tensor types")
        fmt = "gguf"
    else:
        if gguf_type is None:
            raise ValueError("--format gguf on a Hugging Face base needs --gguf-type (q4_0, q4_1, q5_0, q5_1, q8_0)")
        hf_architecture(base_model.config)  # refuse before any work
        cfg = parse_gguf_type(gguf_type)(compute_dtype=dtype_name(target))
        fmt = cfg.format
    originals = {n.removesuffix(".base_layer"): m for n, m in base_model.named_modules() if isinstance(m, LinearGGUF)}
    result = ExportResult(mode="quantized", out=out, dtype=dtype_name(target), format=fmt, layout="gguf")

    model = src.model
    ids = probe_ids(src.tokenizer, base_model.config.vocab_size)
    trained_logits = logits(model, ids)
    held = _heldout(src, heldout, heldout_tokens, heldout_window)
    if held is not None:
        result.heldout["source"] = heldout
        result.heldout["trained"], _ = held.measure(model, log, "trained (quantized base + adapter)")
    held_merged = merged_logits = None
    exact = source_file is not None and _merges_exactly(model)
    if exact:  # a quantization-aware adapter on Q4_1/Q5_1 layers: into the blocks' offsets, same codes and scales
        from .quantized import merge_into_offsets

        merged, errors = merge_into_offsets(model, log)
        result.merged_layers = len(errors)
        log(f"qtune export: merged the quantization-aware adapter exactly into the offsets of {len(errors)} GGUF "
            f"layers (codes and scales unchanged); every other tensor keeps its source bytes")
    else:
        merged, errors, merged_logits, held_merged = _merge_to_source_or_type(
            model, src, source_file, originals, cfg if source_file is None else None, ids, trained_logits, held,
            result, verify, log)
    cast_float_params(merged, target)
    if source_file is None:
        _round_written_floats(merged)
    result.layers = errors
    if errors:
        from .quantized import report_layer_errors

        report_layer_errors(result, errors, cfg if source_file is None else originals[errors[0].name].config, log)
    quant_logits = logits(merged, ids)
    if merged_logits is not None:
        result.probe["quantized vs merged fp32"] = compare_logits(quant_logits, merged_logits)
    result.probe["quantized vs trained"] = compare_logits(quant_logits, trained_logits)
    if held is not None:
        result.heldout["quantized"], held_q = held.measure(merged, log, "GGUF, exactly merged" if exact else "GGUF")
        if held_merged is not None:
            result.heldout["quantized vs merged fp32"] = compare_logits(held_q, held_merged)

    with atomic_output(out, overwrite=overwrite) as tmp:
        file = tmp / GGUF_FILE
        check_free_space(tmp, _bytes(merged), what="the GGUF file")
        written = write_gguf(merged, file, source=source_file, tokenizer=src.tokenizer, log=log)
        if verify:
            from ..integrations.layouts import load_model

            again = load_model(file, dtype=target)
            result.verify = check_logits(compare_logits(logits(again, ids), quant_logits), tolerance(target),
                                         f"{out / GGUF_FILE} (reloaded)")
        result.seconds = time.perf_counter() - start
        from .merged import write_extras

        write_extras(tmp, _card(src, result, written, source_file), result)
    if push_to_hub:
        result.hub_url = hub.push_after_export(out, push_to_hub, private=private, overwrite=overwrite, token=token,
                                               log=log)
    result.seconds = time.perf_counter() - start
    log(result.summary())
    return result


def _merges_exactly(peft_model) -> bool:
    """Every LoRA layer of ``peft_model`` is a quantization-aware adapter that folds into its GGUF layer's offsets
    (:meth:`qtune.integrations.peft.QuantLoraLinear.merges_exactly`), and there is at least one."""
    from peft.tuners.lora.layer import LoraLayer

    from ..integrations.peft import QuantLoraLinear

    adapters = list(peft_model.active_adapters)
    lora = [m for m in peft_model.get_base_model().modules() if isinstance(m, LoraLayer)]
    return bool(lora) and all(
        isinstance(m, QuantLoraLinear) and isinstance(m.get_base_layer(), LinearGGUF)
        and all(m.merges_exactly(a) for a in adapters if a in m.lora_A.keys()) for m in lora)


def _merge_to_source_or_type(model, src, source_file, originals, cfg, ids, trained_logits, held, result, verify, log):
    """Fold the adapter in fp32 (:func:`merge_to_float`) and quantize the changed layers back into their source
    types (GGUF base) or into ``cfg`` (Hugging Face base). Returns ``(model, errors, merged logits, held-out
    merged logits)``."""
    merge_tol = tolerance(torch.float32, src.compute_dtype)
    merged, layers, plan = merge_to_float(model, dtype=torch.float32)
    result.merged_layers = len(layers)
    merged_logits = logits(merged, ids)
    result.probe["merged fp32 vs trained"] = compare_logits(merged_logits, trained_logits)
    if verify:
        check_logits(result.probe["merged fp32 vs trained"], merge_tol, "merged model vs the trained model")
    held_merged = None
    if held is not None:
        result.heldout["merged fp32"], held_merged = held.measure(merged, log, "merged fp32")
    by_name = {l.name: l for l in layers}
    if source_file is not None:
        errors, unchanged = _back_to_source_types(merged, originals, by_name)
        log(f"qtune export: folded LoRA into {len(layers)} layers (fp32); {unchanged} GGUF layers keep their "
            f"source blocks, {len(errors)} re-quantized into their source types")
    else:
        from ..calibration import plan_layers
        from .quantized import requantize_model

        names = list(plan) or [n for n in plan_layers(merged, cfg) if ".layers." in n]
        log(f"qtune export: folded LoRA into {len(layers)} layers (fp32); quantizing {len(names)} layers to "
            f"{cfg.type_name}")
        errors = requantize_model(merged, names, cfg, merged=by_name)
    return merged, errors, merged_logits, held_merged


def _bytes(model: nn.Module) -> int:
    from .quantized import _state_bytes

    return _state_bytes(model)
