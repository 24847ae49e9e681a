"""``qtune eval MODEL_OR_DIR --text FILE [--quant SPEC ...]``: perplexity (and tokens/s) side by side.

A float model is evaluated as is and once per ``--quant`` spec (quantized while loading; ``gptq`` specs
are calibrated with ``--calibration``). A quantized folder (qtune, bitsandbytes or GPTQ) is evaluated as
it is. Format specs: ``nf4``, ``nf4-dq`` (or ``nf4:double_quant=true``), ``fp4``, ``int8``, ``llm_int8``,
``rtn:bits=4,group_size=128``, ``gptq:bits=4,group_size=128,desc_act=true``.

Example::

    qtune eval smollm2 --text qtune:austen/persuasion --tokens 16384 --seq-len 512 --quant nf4 llm_int8 rtn:group_size=128
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

from . import check_positive, model_dtype, one_line_errors


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evaluate import model_bits_per_param, perplexity, tokenize_text
    from ..integrations.layouts import load_model, read_config_json
    from ..integrations import QTuneConfig
    from ..sources import read_text
    from ..assets import resolve_model

    check_positive(args, "tokens", "seq_len", minimum=2)
    check_positive(args, "stride", "batch_size", "samples")
    check_positive(args, "cal_seq_len", minimum=2)
    args.dtype = model_dtype(args.dtype)
    text = read_text(args.text)
    specs = [QTuneConfig.from_spec(s) for s in args.quant or ()]
    calibrated = [s.format for s in specs if s.default_config().needs_calibration]
    if calibrated and not args.calibration:
        raise ValueError(f"a {calibrated[0]} --quant spec needs --calibration PATH")
    path = resolve_model(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or path)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{args.tokenizer or path}: no tokenizer ({type(e).__name__}); pass --tokenizer DIR") from None
    ids = tokenize_text(text, tokenizer, tokens=args.tokens)
    if ids.numel() < 2:
        raise ValueError(f"--text {args.text}: {ids.numel()} tokens, at least 2 are needed for a perplexity")
    quantized = read_config_json(path).get("quantization_config") is not None
    if quantized and specs:
        raise ValueError(f"{path} is already quantized; --quant applies to float models only")

    rows = []

    def evaluate(label: str, build) -> None:
        start = time.perf_counter()
        model = build()
        prep = time.perf_counter() - start
        res = perplexity(model, ids, seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size)
        rows.append((label, model_bits_per_param(model), res, prep))
        print(f"  {label}: perplexity {res.perplexity:.4f} ({res.tokens_per_s:.0f} tokens/s)", file=sys.stderr)

    if quantized:
        evaluate(_label(read_config_json(path)["quantization_config"]), lambda: load_model(path, dtype=args.dtype))
    else:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, use_safetensors=True,
                                                    trust_remote_code=args.trust_remote_code)
        evaluate(str(base.dtype).removeprefix("torch."), lambda: base)
        for spec, raw in zip(specs, args.quant or ()):
            if spec.default_config().needs_calibration:
                evaluate(raw, lambda spec=spec: _gptq(base, tokenizer, spec, args))
            else:
                evaluate(raw, lambda spec=spec: load_model(path, spec, dtype=args.dtype))
    ref = rows[0][2].perplexity
    print(f"perplexity on {ids.numel()} tokens of {args.text} ({args.seq_len}-token windows"
          f"{'' if args.stride is None else f', stride {args.stride}'})")
    print(f"{'model':<34} {'bits/param':>10} {'perplexity':>11} {'vs first':>9} {'tokens/s':>9} {'prep s':>7}")
    for label, bpp, res, prep in rows:
        print(f"{label:<34} {bpp:>10.3f} {res.perplexity:>11.4f} {100 * (res.perplexity / ref - 1):>+8.2f}% "
              f"{res.tokens_per_s:>9.0f} {prep:>7.1f}")
    return 0


def _label(qc: dict) -> str:
    method = qc.get("quant_method")
    if method == "qtune":
        return f"qtune {qc.get('format')}"
    if qc.get("load_in_4bit"):
        return f"bnb {qc.get('bnb_4bit_quant_type')}" + ("+dq" if qc.get("bnb_4bit_use_double_quant") else "")
    if qc.get("load_in_8bit"):
        return "bnb int8"
    return f"{method} {qc.get('bits', '')}-bit g{qc.get('group_size', '')}"


def _gptq(base, tokenizer, spec, args):
    from ..calibration import calibration_windows, gptq_quantize_model

    model = copy.deepcopy(base)
    windows = calibration_windows(args.calibration, tokenizer, samples=args.samples, seq_len=args.cal_seq_len)
    gptq_quantize_model(model, windows, spec.default_config(), skip_modules=spec.skip_modules,
                        overrides=spec.override_configs(), progress=not args.no_progress)
    return model


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = one_line_errors(subparsers.add_parser(
        "eval", help="perplexity and tokens/s of a model and its quantized variants",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("model", help="model folder (float or quantized), or 'smollm2'")
    p.add_argument("--text", required=True,
                   help="UTF-8 text file (.txt or .gz), or qtune:austen/emma / qtune:austen/persuasion")
    p.add_argument("--quant", nargs="*", metavar="SPEC", help="formats to compare (float models only)")
    p.add_argument("--tokens", type=int, default=None, help="evaluate the first N tokens (default: all)")
    p.add_argument("--seq-len", type=int, default=512, help="window length")
    p.add_argument("--stride", type=int, default=None, help="window step (default: --seq-len, disjoint windows)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--trust-remote-code", action="store_true")
    g = p.add_argument_group("gptq specs")
    g.add_argument("--calibration", default=None)
    g.add_argument("--samples", type=int, default=128)
    g.add_argument("--cal-seq-len", type=int, default=512)
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p
