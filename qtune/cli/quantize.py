"""``qtune quantize MODEL --format F ... --out DIR``: quantize a Hugging Face model folder and save it.

Round-to-nearest formats (nf4, fp4, int8, llm_int8, rtn) are quantized while loading (peak memory ≈ the
quantized model + one tensor); ``gptq`` loads the float model and runs sequential block-by-block GPTQ on
calibration windows. The output is written to a temporary folder and renamed at the end: on any error
nothing appears at ``--out``.

Examples::

    qtune quantize smollm2 --format nf4 --double-quant --out smollm2-nf4
    qtune quantize MODEL --format gptq --bits 4 --group-size 128 --act-order --calibration emma.txt \\
        --samples 128 --seq-len 512 --out model-gptq --layout gptq
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import check_positive, model_dtype, one_line_errors

FORMATS = ("nf4", "fp4", "int8", "llm_int8", "rtn", "gptq")


def parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_format_spec(spec: str):
    """``"name[:key=value,...]"`` → ``QTuneConfig``, e.g. ``"nf4:double_quant=true"``, ``"rtn:bits=4,group_size=128"``,
    ``"gptq:bits=3,desc_act=true"``. ``nf4-dq``/``fp4-dq`` are short for double quantization.

    Raises:
        ValueError: unknown format or field, malformed option.
    """
    from ..integrations import QTuneConfig

    name, _, rest = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    options: dict[str, Any] = {}
    if name in ("nf4_dq", "fp4_dq"):
        name, options["double_quant"] = name[:3], True
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"format spec {spec!r}: option {item!r} is not key=value")
        options[key.strip().replace("-", "_")] = parse_value(value.strip())
    compute = options.pop("compute_dtype", None)
    return QTuneConfig(name, compute_dtype=compute, **options)


def resolve_model(model: str) -> Path:
    """A model folder; ``smollm2`` names the bundled SmolLM2-135M-Instruct (converted once, cached)."""
    if model.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        from ..assets import smollm2_path

        return smollm2_path()
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {model} does not exist (only local folders are read)")
    return path


def build_config(args: argparse.Namespace):
    from ..integrations import QTuneConfig

    fmt = args.format
    options: dict[str, Any] = {}
    if fmt in ("nf4", "fp4"):
        options["double_quant"] = bool(args.double_quant)
        if args.blocksize is not None:
            options["blocksize"] = args.blocksize
    elif fmt in ("rtn", "gptq"):
        options.update(bits=args.bits, group_size=args.group_size, sym=args.sym)
        if fmt == "gptq":
            options.update(desc_act=bool(args.act_order), damp_percent=args.damp_percent,
                           true_sequential=bool(args.true_sequential), static_groups=bool(args.static_groups))
    elif fmt == "llm_int8" and args.threshold is not None:
        options["threshold"] = args.threshold
    overrides = {}
    for item in args.override or ():
        pattern, eq, spec = item.partition("=")
        if not eq:
            raise ValueError(f"--override {item!r}: expected PATTERN=FORMAT_SPEC (or PATTERN=skip)")
        overrides[pattern] = None if spec.strip().lower() in ("skip", "none", "float") else parse_format_spec(spec).to_dict()
    for d in overrides.values():
        if d is not None:
            d.pop("quant_method", None)
            for k in ("skip_modules", "overrides", "layers"):
                d.pop(k, None)
    return QTuneConfig(fmt, compute_dtype=args.compute_dtype, skip_modules=args.skip, overrides=overrides, **options)


def planned_layers(path: Path, qconfig, trust_remote_code: bool = False):
    """``(skeleton, plan)``: the model of ``path`` on the meta device (no weights read) and the layers
    ``qconfig`` quantizes in it (``{name: QuantConfig}``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..integrations.transformers import unquantizable_modules

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    always_skip = unquantizable_modules(skeleton, output_embeddings=qconfig.skip_modules is None)
    return skeleton, qconfig.plan(skeleton, always_skip=always_skip)


def _check_plan(path: Path, qconfig, trust_remote_code: bool, layout: str) -> None:
    """The plan against the model's layer shapes, on a meta skeleton (no weights read): something to quantize,
    and whole groups for the GPTQ layout."""
    from ..calibration import check_group_sizes

    skeleton, plan = planned_layers(path, qconfig, trust_remote_code)
    if not plan:
        raise ValueError(f"{path}: no linear layer left to quantize (check --skip/--override)")
    if layout == "gptq":
        check_group_sizes(skeleton, plan)


def run(args: argparse.Namespace) -> int:
    from ..integrations.checkpoints import load_model, save_quantized
    from ..nn import QuantLinear

    out = Path(args.out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not args.overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    if args.format == "gptq":
        if not args.calibration:
            raise ValueError("--format gptq needs --calibration PATH_OR_DATASET")
        cal = Path(args.calibration)
        if not args.calibration.startswith("austen:") and (cal.suffix or "/" in args.calibration) and not cal.exists():
            raise FileNotFoundError(f"calibration file {args.calibration} does not exist")
    check_positive(args, "samples", "batch_size")
    check_positive(args, "seq_len", minimum=2)
    args.dtype = model_dtype(args.dtype)
    if args.format == "gptq" and args.calibration.startswith("austen:"):
        from ..assets import AUSTEN_TEXTS

        if args.calibration.split(":", 1)[1] not in AUSTEN_TEXTS:
            raise ValueError(f"--calibration {args.calibration}: the bundled texts are "
                             f"{', '.join('austen:' + n for n in AUSTEN_TEXTS)}")
    if args.layout == "gptq" and args.format not in ("gptq", "rtn"):
        raise ValueError(f"--layout gptq holds gptq/rtn layers, not {args.format}")
    if args.layout == "bnb" and args.format in ("gptq", "rtn"):
        raise ValueError(f"--layout bnb holds nf4/fp4/int8/llm_int8 layers, not {args.format}")
    path = resolve_model(args.model)
    qconfig = build_config(args)
    _check_plan(path, qconfig, args.trust_remote_code, args.layout)
    dtype = args.dtype
    start = time.perf_counter()
    tokenizer = _tokenizer(path, required=args.format == "gptq")
    if args.format == "gptq":
        from transformers import AutoModelForCausalLM

        from ..calibration import calibration_windows, gptq_quantize_model
        from ..integrations import mark_quantized

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=args.trust_remote_code,
                                                     use_safetensors=True)
        windows = calibration_windows(args.calibration, tokenizer, samples=args.samples, seq_len=args.seq_len,
                                      seed=args.seed)
        gptq_quantize_model(model, windows, qconfig.default_config(), skip_modules=qconfig.skip_modules,
                            overrides=qconfig.override_configs(), batch_size=args.batch_size,
                            progress=not args.no_progress)
        mark_quantized(model)
    else:
        model = load_model(path, qconfig, dtype=dtype, trust_remote_code=args.trust_remote_code)
    seconds = time.perf_counter() - start
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    qbytes = sum(m.quantized_bytes() for m in layers)
    params = sum(m.in_features * m.out_features for m in layers)
    save_quantized(model, out, layout=args.layout, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"{len(layers)} layers quantized to {args.format} ({8 * qbytes / max(params, 1):.3f} bits/param, "
          f"{qbytes / 2**20:.1f} MiB) in {seconds:.1f} s; model footprint {model.get_memory_footprint() / 2**20:.1f} MiB; "
          f"wrote {out} ({args.layout} layout)")
    return 0


def _tokenizer(path: Path, *, required: bool):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        if required:
            raise ValueError(f"{path}: no tokenizer to tokenize the calibration text ({type(e).__name__})") from None
        return None


def add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", help="dtype of the float parameters (auto, float32, bfloat16, float16)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the folder (off by default)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = one_line_errors(subparsers.add_parser(
        "quantize", help="quantize a model folder (RTN formats or GPTQ with calibration)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("model", help="model folder (config.json + safetensors), or 'smollm2'")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--layout", default="qtune", choices=("qtune", "bnb", "gptq"),
                   help="qtune: quant_method 'qtune'; bnb: transformers+bitsandbytes; gptq: GPTQ v1")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g = p.add_argument_group("nf4/fp4/llm_int8")
    g.add_argument("--double-quant", action="store_true", help="NF4/FP4: 8-bit absmax (QLoRA double quantization)")
    g.add_argument("--blocksize", type=int, default=None, help="NF4/FP4 block size (default 64)")
    g.add_argument("--threshold", type=float, default=None, help="LLM.int8 outlier threshold (default 6.0)")
    g = p.add_argument_group("gptq/rtn")
    g.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    g.add_argument("--group-size", type=int, default=128, help="-1: one group per row")
    g.add_argument("--act-order", action="store_true", help="GPTQ desc_act: columns by descending Hessian diagonal")
    g.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True, help="symmetric grid (default)")
    g.add_argument("--static-groups", action="store_true", help="with --act-order, keep g_idx = k // group_size")
    g.add_argument("--damp-percent", type=float, default=0.01)
    g.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="calibrate each block's layers group by group (default)")
    g.add_argument("--calibration", help="calibration text: .txt/.json/.jsonl/.parquet file, austen:emma, or a "
                                         "dataset name (needs a network)")
    g.add_argument("--samples", type=int, default=128, help="calibration windows")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    g.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("layers")
    g.add_argument("--skip", nargs="*", default=None, metavar="PATTERN",
                   help="modules kept in full precision (default: lm_head and the output embeddings)")
    g.add_argument("--override", action="append", metavar="PATTERN=SPEC",
                   help="per-module format, e.g. down_proj=int8 or 'mlp.*=rtn:bits=8' or lm_head=skip")
    g.add_argument("--compute-dtype", default=None, help="dtype of the quantized matmuls (default: the model's)")
    g.add_argument("--no-progress", action="store_true")
    add_common_model_args(p)
    p.set_defaults(func=run)
    return p


if __name__ == "__main__":  # pragma: no cover
    from .main import main

    sys.exit(main(["quantize", *sys.argv[1:]]))
