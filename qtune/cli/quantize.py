"""``qtune quantize MODEL --format F ... --out DIR``: quantize a Hugging Face model folder and save it.

Round-to-nearest formats (nf4, fp4, int8, llm_int8, rtn) are quantized while loading (peak memory ≈ the
quantized model + one tensor); ``gptq`` loads the float model and runs sequential block-by-block GPTQ on
calibration windows. The output is written to a temporary folder and renamed at the end: on any error
nothing appears at ``--out``.

Examples::

    qtune quantize smollm2 --format nf4 --double-quant --out smollm2-nf4
    qtune quantize MODEL --format gptq --bits 4 --group-size 128 --calibration emma.txt \\
        --samples 128 --seq-len 512 --out model-gptq --layout gptq

GPTQ's default ordering is act-order with static groups (``g_idx = k // group_size``, the kernels' no-gather
path); ``--no-static-groups`` gives classic act-order (permuted ``g_idx``), ``--no-act-order`` group-aware order,
``--no-act-order --no-act-group-aware`` the natural column order.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from .. import sources
from ..assets import resolve_model
from ..formats import CliOption, format_names, get_format, parse_format_spec
from ..integrations.layouts import get_layout, layout_names
from . import check_positive, model_dtype, one_line_errors


def build_config(args: argparse.Namespace):
    from ..integrations import QTuneConfig

    cls = get_format(args.format)
    # the flags the chosen format declares and the user gave; the others belong to other formats
    options = {o.field: getattr(args, o.field) for o in cls.cli_options if getattr(args, o.field, None) is not None}
    overrides = {}
    for item in args.override or ():
        pattern, eq, spec = item.partition("=")
        if not eq:
            raise ValueError(f"--override {item!r}: expected PATTERN=FORMAT_SPEC (or PATTERN=skip)")
        if spec.strip().lower() in ("skip", "none", "float"):
            overrides[pattern] = None
        else:
            parsed = parse_format_spec(spec)
            overrides[pattern] = {"format": parsed.format, **parsed.options, "compute_dtype": parsed.compute_dtype}
    return QTuneConfig(args.format, compute_dtype=args.compute_dtype, skip_modules=args.skip, overrides=overrides,
                       **options)


def planned_layers(path: Path, qconfig, trust_remote_code: bool = False):
    """``(skeleton, layer plan)``: the model of ``path`` on the meta device (no weights read) and the
    :class:`~qtune.nn.LayerPlan` of ``qconfig`` in it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return skeleton, qconfig.layer_plan(skeleton)


def _check_layer_plan(path: Path, qconfig, trust_remote_code: bool, layout) -> None:
    """The layer plan against the model's layer shapes, on a meta skeleton (no weights read): something to
    quantize, every layer's config storable in ``layout``, and the layout's own checks (whole GPTQ groups)."""
    skeleton, plan = planned_layers(path, qconfig, trust_remote_code)
    if not plan:
        raise ValueError(f"{path}: no linear layer left to quantize (check --skip/--override)")
    for cfg in dict.fromkeys(plan.values()):
        layout.check(cfg)
    layout.check_plan(skeleton, plan)


def run(args: argparse.Namespace) -> int:
    from ..integrations.layouts import load_model, save_quantized
    from ..nn import QuantLinear

    out = Path(args.out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not args.overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    calibrated = get_format(args.format).needs_calibration
    if calibrated:
        if not args.calibration:
            raise ValueError(f"--format {args.format} needs --calibration PATH_OR_DATASET")
        with warnings.catch_warnings():  # the old `austen:` spelling warns once, when the text is read
            warnings.simplefilter("ignore", FutureWarning)
            calibration = sources.check_exists(args.calibration, "calibration file")
    check_positive(args, "samples", "batch_size")
    check_positive(args, "seq_len", minimum=2)
    args.dtype = model_dtype(args.dtype)
    if calibrated and calibration.startswith(sources.PREFIX):
        try:
            sources.bundled_text(calibration)  # an unknown bundled text fails now, not after loading
        except ValueError as e:
            raise ValueError(f"--calibration {args.calibration}: {e}") from None
    layout = get_layout(args.layout)
    qconfig = build_config(args)
    layout.check(qconfig.default_config())
    path = resolve_model(args.model)
    _check_layer_plan(path, qconfig, args.trust_remote_code, layout)
    dtype = args.dtype
    start = time.perf_counter()
    tokenizer = _tokenizer(path, required=calibrated)
    if calibrated:
        from transformers import AutoModelForCausalLM

        from ..calibration import calibration_windows, gptq_quantize_model
        from ..integrations import mark_quantized

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=args.trust_remote_code,
                                                     use_safetensors=True)
        windows = calibration_windows(args.calibration, tokenizer, samples=args.samples, seq_len=args.seq_len,
                                      seed=args.seed)
        gptq_quantize_model(model, windows, qconfig.default_config(), skip_modules=qconfig.skip_modules,
                            overrides=qconfig.override_configs(), batch_size=args.batch_size,
                            device=args.device, progress=not args.no_progress)
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


def add_format_options(p: argparse.ArgumentParser) -> None:
    """One flag per format option the registered formats declare (``CliOption``), grouped by the formats
    that take it; each flag's ``dest`` is its config field and its default ``None`` (the config's default).

    Raises:
        ValueError: two formats declare the same flag differently.
    """
    flags: dict[str, tuple[CliOption, list[str]]] = {}
    for name in format_names():
        for opt in get_format(name).cli_options:
            seen = flags.setdefault(opt.cli_flag, (opt, []))
            if seen[0].field != opt.field or seen[0].type is not opt.type or seen[0].switch != opt.switch:
                raise ValueError(f"format {name!r} declares {opt.cli_flag} unlike format {seen[1][0]!r}")
            seen[1].append(name)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, (opt, names) in flags.items():
        title = "/".join(names)
        g = groups.get(title) or groups.setdefault(title, p.add_argument_group(title))
        if opt.type is bool:
            action = "store_true" if opt.switch else argparse.BooleanOptionalAction
            g.add_argument(flag, dest=opt.field, action=action, default=None, help=opt.help)
        else:
            g.add_argument(flag, dest=opt.field, type=opt.type, default=None, help=opt.help,
                           choices=opt.choices or None)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = one_line_errors(subparsers.add_parser(
        "quantize", help="quantize a model folder (RTN formats or GPTQ with calibration)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("model", help="model folder (config.json + safetensors), or 'smollm2'")
    p.add_argument("--format", required=True, choices=format_names())
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--layout", default="qtune", choices=layout_names(),
                   help="qtune: quant_method 'qtune'; bnb: transformers+bitsandbytes; gptq: GPTQ v1")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_format_options(p)
    calibrated = "/".join(n for n in format_names() if get_format(n).needs_calibration)
    g = p.add_argument_group(f"calibration ({calibrated})")
    g.add_argument("--calibration", help="calibration text: .txt/.json/.jsonl/.parquet file, qtune:austen/emma, or a "
                                         "dataset name (needs a network)")
    g.add_argument("--samples", type=int, default=128, help="calibration windows")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    g.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None,
                   help="where each block is calibrated, one block at a time (default: cuda when available, else cpu); "
                        "the model stays on the CPU")
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
