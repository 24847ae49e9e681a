"""``qtune inspect PATH [--plot out.png]``: per-layer format, bits, bytes and bits/parameter.

PATH is a quantized folder (qtune, bitsandbytes or GPTQ) or a float one; a float model is quantized in
memory with ``--format SPEC`` (default nf4) so the table and the plot show before/after. ``--reference
FLOAT_DIR`` gives the float weights of a quantized folder, for the relative error column and the
"before" histogram.
"""
from __future__ import annotations

import argparse

from . import model_dtype, one_line_errors


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from ..inspection import float_tensors, float_weights, format_table, layer_table, parameter_counts, plot, quantized_copy
    from ..integrations.layouts import load_model, read_config_json
    from ..integrations import QTuneConfig
    from ..assets import resolve_model

    path = resolve_model(args.path)
    args.dtype = model_dtype(args.dtype)
    reference = None
    if args.reference:
        reference_path = resolve_model(args.reference)
    if read_config_json(path).get("quantization_config") is None:
        spec = QTuneConfig.from_spec(args.format)
        if spec.default_config().needs_calibration:
            raise ValueError(f"inspect quantizes float models with round-to-nearest formats; for {spec.format}, "
                             f"inspect the output of `qtune quantize --format {spec.format}` with --reference")
        if args.layer is not None:
            _check_layer(path, spec, args.layer)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, use_safetensors=True)
        model = quantized_copy(base, spec)
        reference = float_weights(base)
        print(f"{path}: float model, quantized in memory as {args.format}")
    else:
        model = load_model(path, dtype=args.dtype)
        if args.reference:
            ref = AutoModelForCausalLM.from_pretrained(reference_path, dtype="float32",
                                                       use_safetensors=True)
            reference = float_weights(ref)
    print(format_table(layer_table(model, reference)))
    left = float_tensors(model, args.float_above)
    print(f"floating-point tensors above {args.float_above:,} elements: {len(left)}")
    for name, shape, dtype in left:
        print(f"  {name} {list(shape)} {str(dtype).removeprefix('torch.')}")
    total, active = parameter_counts(model)
    if active != total:
        print(f"parameters: {total:,} total, " + (f"{active:,} active per token (routed experts)" if active is not None
                                                   else "active per token unknown (no num_experts_per_tok)"))
    print(f"model memory footprint: {model.get_memory_footprint():,} bytes")
    if args.plot:
        out = plot(model, args.plot, reference=reference, layer=args.layer)
        print(f"wrote {out}")
    return 0


def _check_layer(path, spec, layer: str) -> None:
    """``--layer`` names a layer that ``spec`` quantizes in the float model at ``path`` (checked before loading)."""
    from .quantize import planned_layers

    _, plan = planned_layers(path, spec)
    if layer not in plan:
        example = next(iter(plan), None)
        raise ValueError(f"--layer {layer!r} is not a layer {spec.format} quantizes in {path}"
                         + (f" (e.g. {example})" if example else ""))


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = one_line_errors(subparsers.add_parser(
        "inspect", help="per-layer format, bits, bytes, bits/param (and plots)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("path", help="model folder (quantized or float), or 'smollm2'")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="weight histogram before/after of one layer + per-layer relative error")
    p.add_argument("--layer", default=None, help="layer for the histogram (default: the one with the largest error)")
    p.add_argument("--format", default="nf4", help="format spec for a float PATH (default nf4)")
    p.add_argument("--reference", default=None, help="float model folder for errors of a quantized PATH")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--float-above", type=int, default=4096, metavar="N",
                   help="list every floating-point tensor with more than N elements (default 4096)")
    p.set_defaults(func=run)
    return p
