"""Perplexity table of every qtune format on a real model, next to transformers+bitsandbytes in the same run.

``python -m qtune.bench.perplexity [--model smollm2] [--tokens 16384] [--seq-len 512] [--samples 32] [--out FILE]``

Rows: the float model; qtune NF4, NF4+DQ, FP4, int8, LLM.int8, RTN-4 g128, GPTQ-2/3/4/8 g128 (rows
``qtune gptq-N g128``: the default, act-order with static groups; ``... group-aware``: group-aware order, the
default before; ``... act-order``: classic act-order, ``static_groups=false``, permuted ``g_idx``;
``... no-order``: the natural order; GPTQ-3 also with GPTQModel's damping 0.05; results files written before
the default changed name act-order with static groups ``... act-order static`` and mean group-aware order by
``qtune gptq-N g128``, or the natural order in files older than group-aware order), affine-4 g64/g128,
affine-3 and affine-2 g64 (and affine-4 without its fit, and with the scale refitted too); bitsandbytes NF4,
NF4+DQ, FP4, LLM.int8 loaded by transformers from the same float checkpoint; and GPTQModel 7.7 GPTQ-2/3/4/8 g128
(its default ``act_group_aware`` order and ``desc_act``), quantized on the same windows in a child process
(:func:`qtune.bench.gptq_speed.time_gptqmodel`, GPTQModel from ``.deps/gptqmodel``) and read back by qtune.
Each row has bits/parameter (linear layers, lm_head excluded), the time to load and quantize (for GPTQ:
calibration included; GPTQ rows also ``quantize_s`` and ``quantize_cpu_s``, the quantization alone, wall and CPU)
and perplexity on the first ``--tokens``
tokens of the held-out text in disjoint ``--seq-len`` windows. GPTQ calibrates on ``--samples`` random
``--cal-seq-len`` windows of the calibration text (default: Emma, the demo's training novel; the
evaluation text defaults to Persuasion, held out).

bitsandbytes' 4-bit layers run in train mode here: on CPU its eval mode repacks the weights for a fused
kernel with different rounding (SmolLM2 has no dropout, so both modes compute the same function). Its
LLM.int8 runs in eval mode (the int8 matmul path, as in inference).

The table goes to ``bench/results/perplexity.json`` (``--out`` elsewhere), rewritten after every row with
``"complete": false`` until the last one, so a long run that is stopped keeps what it measured. With
``--only ROW ... --merge`` the rows measured replace those of the same name in the existing file, whose
settings must match, and the recorded command becomes ``<old command> && <this command>``: running it
reproduces the file.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .. import sources
from .formats import quiet_bitsandbytes
from .results import bench_command, default_dir, load_average, read_results, write_results

# the settings that make two runs' rows comparable (a merge refuses a file with other values)
SETTINGS = ("model", "text", "calibration", "tokens", "seq_len", "samples", "cal_seq_len", "batch_size")
# GPTQ orderings other than the default (act-order with static groups), spelled out so a row keeps its meaning
CLASSIC = "desc_act=true,static_groups=false"
GROUP_AWARE = "desc_act=false,act_group_aware=true"
NATURAL = "desc_act=false,act_group_aware=false"


def _bnb_config(spec: str):
    """transformers' ``BitsAndBytesConfig`` for a format spec bitsandbytes computes (``nf4-dq``, ``llm_int8``...)."""
    from transformers import BitsAndBytesConfig

    from ..formats import LLMInt8Config, parse_format_spec

    cfg = parse_format_spec(spec).config()
    if isinstance(cfg, LLMInt8Config):
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=torch.float32)


def _bnb_bits_per_param(model) -> float:
    """Bits per weight of bitsandbytes' linear layers (packed weight, absmax/nested stats or SCB), lm_head excluded."""
    import bitsandbytes as bnb

    out_emb = model.get_output_embeddings()
    bits, params = 0.0, 0
    for m in model.modules():
        if m is out_emb:
            continue
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            nbytes = m.weight.numel() * m.weight.element_size() + qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                nbytes += qs.state2.absmax.numel() * 4 + 4
            bits += 8 * nbytes
            params += m.in_features * m.out_features
        elif isinstance(m, bnb.nn.Linear8bitLt):
            bits += 8 * (m.weight.numel() + m.weight.SCB.numel() * 4)
            params += m.weight.numel()
        elif isinstance(m, torch.nn.Linear):
            bits += 8 * m.weight.numel() * m.weight.element_size()
            params += m.weight.numel()
    return bits / params


def add_settings_args(p: argparse.ArgumentParser) -> None:
    """The options that make :data:`SETTINGS` (model, texts, token counts, calibration windows, batch size), shared
    with :mod:`.gptq_study`."""
    p.add_argument("--model", default="smollm2", help="float model folder, or 'smollm2' (the bundled SmolLM2-135M)")
    p.add_argument("--text", default="qtune:austen/persuasion", help="evaluation text (file, or qtune:austen/NAME)")
    p.add_argument("--calibration", default="qtune:austen/emma", help="GPTQ calibration text (file, or qtune:austen/NAME)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows")
    p.add_argument("--cal-seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_settings_args(p)
    p.add_argument("--only", nargs="*", metavar="ROW", help="run only these rows (names as printed)")
    p.add_argument("--skip-bnb", action="store_true")
    p.add_argument("--skip-gptq", action="store_true", help="leave out the GPTQ rows (minutes of calibration each)")
    p.add_argument("--skip-gptqmodel", action="store_true",
                   help="leave out the GPTQModel rows (GPTQModel 7.7 in .deps/gptqmodel, as .ci/run installs it)")
    p.add_argument("--out", help="results file (default bench/results/perplexity.json)")
    p.add_argument("--merge", action="store_true",
                   help="replace the rows measured in the existing --out file instead of rewriting it")
    args = p.parse_args(argv)
    quiet_bitsandbytes()
    out = Path(args.out) if args.out else default_dir() / "perplexity.json"
    settings = {k: getattr(args, k) for k in SETTINGS}
    previous = _previous_run(out, settings) if args.merge else None

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from ..calibration import calibration_windows, gptq_quantize_model
    from ..assets import resolve_model
    from ..evaluate import model_bits_per_param, perplexity, tokenize_text
    from ..sources import read_text
    from ..integrations import QTuneConfig
    from ..integrations.layouts import load_model

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenize_text(read_text(args.text), tokenizer, tokens=args.tokens)
    cal = None
    # a GPTQ row's build leaves its quantization's wall and CPU seconds here (calibration, Hessians, solve,
    # packing; not the load): the CPU time (all threads of the process) is the fairer measure on a shared machine
    quantize_s: dict[str, tuple[float, float]] = {}

    def calibration():
        nonlocal cal
        if cal is None:
            cal = calibration_windows([read_text(args.calibration)], tokenizer, samples=args.samples,
                                      seq_len=args.cal_seq_len)
        return cal

    def float_model():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)

    def rtn(spec: str) -> Callable:
        return lambda: load_model(path, QTuneConfig.from_spec(spec), dtype=torch.float32)

    def gptq(spec: str) -> Callable:
        def build():
            model = float_model()
            qc = QTuneConfig.from_spec(spec)
            cpu = time.process_time()
            report = gptq_quantize_model(model, calibration(), qc.default_config(), skip_modules=qc.skip_modules,
                                         overrides=qc.override_configs(), progress=False)
            quantize_s["last"] = (report.seconds, time.process_time() - cpu)
            return model
        return build

    def gptqmodel(bits: int, **quantize_config: Any) -> Callable:
        """GPTQModel quantizes the float checkpoint on the same windows (its defaults plus ``quantize_config``)
        in a child process and saves it; qtune reads that checkpoint (bit-identical, see the interop tests)."""
        def build():
            import tempfile

            from .gptq_speed import default_gptqmodel_path, time_gptqmodel
            with tempfile.TemporaryDirectory(prefix="qtune-ppl-gptqmodel-") as tmp:
                timing = time_gptqmodel(path, calibration(), 8, default_gptqmodel_path(), "float32", bits=bits,
                                        quantize_config=quantize_config, out=Path(tmp) / "model")
                quantize_s["last"] = (timing["quantize_s"], timing["quantize_cpu_s"])
                return load_model(Path(tmp) / "model", dtype=torch.float32)
        return build

    rows: list[tuple[str, Callable, Callable, bool]] = [
        ("fp32", float_model, model_bits_per_param, True),
        ("qtune nf4", rtn("nf4"), model_bits_per_param, True),
        ("qtune nf4+dq", rtn("nf4-dq"), model_bits_per_param, True),
        ("qtune fp4", rtn("fp4"), model_bits_per_param, True),
        ("qtune int8", rtn("int8"), model_bits_per_param, True),
        ("qtune llm_int8", rtn("llm_int8"), model_bits_per_param, True),
        ("qtune rtn-4 g128", rtn("rtn:bits=4,group_size=128"), model_bits_per_param, True),
        # the default: act-order with static groups (g_idx = k // group_size, kernels need no gather)
        ("qtune gptq-4 g128", gptq("gptq:bits=4,group_size=128"), model_bits_per_param, True),
        # asymmetric grids (a zero point per group), the kind SmolLM2's own Q4_1 weights come from
        ("qtune rtn-4 g128 asym", rtn("rtn:bits=4,group_size=128,sym=false"), model_bits_per_param, True),
        ("qtune gptq-4 g128 asym", gptq("gptq:bits=4,group_size=128,sym=false"), model_bits_per_param, True),
        ("qtune gptq-4 g128 asym act-order", gptq(f"gptq:bits=4,group_size=128,sym=false,{CLASSIC}"),
         model_bits_per_param, True),
        ("qtune gptq-4 g128 asym group-aware", gptq(f"gptq:bits=4,group_size=128,sym=false,{GROUP_AWARE}"),
         model_bits_per_param, True),
        ("qtune gptq-4 g128 act-order", gptq(f"gptq:bits=4,group_size=128,{CLASSIC}"), model_bits_per_param, True),
        # the other orderings that keep g_idx = k // group_size
        ("qtune gptq-4 g128 group-aware", gptq(f"gptq:bits=4,group_size=128,{GROUP_AWARE}"),
         model_bits_per_param, True),
        ("qtune gptq-4 g128 no-order", gptq(f"gptq:bits=4,group_size=128,{NATURAL}"), model_bits_per_param, True),
        # float scale and offset per group, fitted to the weights without calibration (qtune.formats.affine);
        # "min-max" is the same storage with the fit switched off (iters=0)
        ("qtune affine-4 g64", rtn("affine:bits=4,group_size=64"), model_bits_per_param, True),
        ("qtune affine-4 g64 min-max", rtn("affine:bits=4,group_size=64,iters=0"), model_bits_per_param, True),
        ("qtune affine-4 g128", rtn("affine:bits=4,group_size=128"), model_bits_per_param, True),
        ("qtune affine-4 g128 min-max", rtn("affine:bits=4,group_size=128,iters=0"), model_bits_per_param, True),
        ("qtune affine-4 g64 scale+offset", rtn("affine:bits=4,group_size=64,fit=scale_offset"),
         model_bits_per_param, True),
        ("qtune affine-3 g64", rtn("affine:bits=3,group_size=64"), model_bits_per_param, True),
        ("qtune affine-3 g64 min-max", rtn("affine:bits=3,group_size=64,iters=0"), model_bits_per_param, True),
        ("qtune affine-2 g64", rtn("affine:bits=2,group_size=64"), model_bits_per_param, True),
        ("qtune gptq-3 g128", gptq("gptq:bits=3,group_size=128"), model_bits_per_param, True),
        ("qtune gptq-3 g128 act-order", gptq(f"gptq:bits=3,group_size=128,{CLASSIC}"), model_bits_per_param, True),
        ("qtune gptq-3 g128 no-order", gptq(f"gptq:bits=3,group_size=128,{NATURAL}"), model_bits_per_param, True),
        ("qtune gptq-3 g128 group-aware", gptq(f"gptq:bits=3,group_size=128,{GROUP_AWARE}"),
         model_bits_per_param, True),
        ("qtune gptq-8 g128", gptq("gptq:bits=8,group_size=128"), model_bits_per_param, True),
        ("qtune gptq-8 g128 group-aware", gptq(f"gptq:bits=8,group_size=128,{GROUP_AWARE}"),
         model_bits_per_param, True),
        ("qtune gptq-3 g128 damp 0.05", gptq("gptq:bits=3,group_size=128,damp_percent=0.05"), model_bits_per_param,
         True),
        ("qtune gptq-2 g128", gptq("gptq:bits=2,group_size=128"), model_bits_per_param, True),
        ("qtune gptq-2 g128 act-order", gptq(f"gptq:bits=2,group_size=128,{CLASSIC}"), model_bits_per_param, True),
        ("qtune gptq-2 g128 group-aware", gptq(f"gptq:bits=2,group_size=128,{GROUP_AWARE}"),
         model_bits_per_param, True),
    ]
    if not args.skip_gptq and not args.skip_gptqmodel:
        from .gptq_speed import default_gptqmodel_path
        if not (default_gptqmodel_path() / "gptqmodel").is_dir():
            print(f"(GPTQModel not installed in {default_gptqmodel_path()}: no GPTQModel rows)", file=sys.stderr)
        else:  # GPTQModel 7.7's default ordering is act_group_aware; desc_act is its act-order
            for bits in (2, 3, 4, 8):
                rows.append((f"gptqmodel gptq-{bits} g128", gptqmodel(bits), model_bits_per_param, True))
                rows.append((f"gptqmodel gptq-{bits} g128 desc_act",
                             gptqmodel(bits, desc_act=True, act_group_aware=False), model_bits_per_param, True))
    if args.skip_gptq:
        rows = [r for r in rows if " gptq-" not in r[0]]
    if not args.skip_bnb:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:
            print(f"(bitsandbytes unavailable: {e})", file=sys.stderr)
        else:
            for name in ("nf4", "nf4-dq", "fp4", "llm_int8"):
                build = (lambda name=name: AutoModelForCausalLM.from_pretrained(
                    path, dtype=torch.float32, use_safetensors=True, quantization_config=_bnb_config(name)))
                rows.append((f"bnb {name.replace('-dq', '+dq')}", build, _bnb_bits_per_param, name == "llm_int8"))

            def on_bnb_bytes(name: str) -> Callable:
                # qtune reading the checkpoint bitsandbytes wrote: the very same bytes. bitsandbytes quantizes
                # 8-bit from the fp16-cast weight, and its native CPU double quantization breaks ties in the
                # nested absmax codes differently from its reference kernel (which qtune's quantizer equals)
                def build():
                    import tempfile
                    with tempfile.TemporaryDirectory() as tmp:
                        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                             quantization_config=_bnb_config(name)).save_pretrained(tmp)
                        return load_model(tmp, dtype=torch.float32)
                return build
            rows.append(("qtune llm_int8 on bnb bytes", on_bnb_bytes("llm_int8"), model_bits_per_param, True))
            rows.append(("qtune nf4+dq on bnb bytes", on_bnb_bytes("nf4-dq"), model_bits_per_param, True))
    if args.only:
        unknown = set(args.only) - {r[0] for r in rows}
        if unknown:
            raise SystemExit(f"--only: unknown rows {sorted(unknown)}; choose from {[r[0] for r in rows]}")
        rows = [r for r in rows if r[0] in args.only or r[0] == "fp32"]

    print(f"{path.name}: perplexity on the first {ids.numel()} tokens of {args.text} ({args.seq_len}-token windows); "
          f"GPTQ calibrated on {args.samples}x{args.cal_seq_len} tokens of {args.calibration}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    print(f"{'model':<30} {'bits/param':>10} {'load+quant s':>12} {'perplexity':>11} {'vs fp32':>8} {'tokens/s':>9}", flush=True)
    ref = None
    measured: list[dict[str, Any]] = []
    load_start = load_average()
    for i, (label, build, bpp, eval_mode) in enumerate(rows):
        t0 = time.perf_counter()
        model = build()
        prep = time.perf_counter() - t0
        bits = bpp(model)  # before the forward: bitsandbytes moves SCB off the weight in its first int8 forward
        res = perplexity(model, ids, seq_len=args.seq_len, batch_size=args.batch_size, eval_mode=eval_mode)
        ref = res.perplexity if ref is None else ref
        print(f"{label:<30} {bits:>10.3f} {prep:>12.1f} {res.perplexity:>11.4f} "
              f"{100 * (res.perplexity / ref - 1):>+7.2f}% {res.tokens_per_s:>9.0f}", flush=True)
        measured.append({"name": label, "bits_per_param": bits, "load_quantize_s": round(prep, 2),
                         **({k: round(v, 2) for k, v in zip(("quantize_s", "quantize_cpu_s"), quantize_s.pop("last"))}
                            if "last" in quantize_s else {}),
                         "perplexity": res.perplexity, "nll": res.nll, "predicted_tokens": res.predicted,
                         "eval_tokens_per_s": round(res.tokens_per_s, 1)})
        del model
        gc.collect()
        _write(out, settings, measured, previous, load_start, complete=i == len(rows) - 1, model_name=path.name,
               eval_tokens=ids.numel(), command=bench_command("qtune.bench.perplexity", argv))
    print(f"wrote {out}")
    return 0


def _previous_run(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The results file a ``--merge`` run updates; its settings must equal this run's."""
    if not out.exists():
        raise SystemExit(f"--merge: {out} does not exist (run the full table first)")
    prev = read_results(out, benchmark="perplexity")
    def same(k: str, a: Any, b: Any) -> bool:  # text sources compare in the one syntax (austen:x == qtune:austen/x)
        if k in ("text", "calibration") and isinstance(a, str) and isinstance(b, str):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return sources.normalize(a) == sources.normalize(b)
        return a == b

    differ = {k: (prev["results"]["settings"].get(k), v) for k, v in settings.items()
              if not same(k, prev["results"]["settings"].get(k), v)}
    if differ:
        raise SystemExit(f"--merge: {out} was measured with other settings (file, now): {differ}")
    if not prev["results"].get("complete"):
        raise SystemExit(f"--merge: {out} is incomplete (its run was stopped); rerun the full table")
    return prev


def _write(out: Path, settings: dict[str, Any], measured: list[dict[str, Any]], previous: dict[str, Any] | None,
           load_start: list[float] | None, *, complete: bool, model_name: str, eval_tokens: int,
           command: str) -> None:
    """Write (or, with ``previous``, update) the results file; ``vs_fp32`` against the fp32 row of the file."""
    rows = list(measured)
    if previous is not None:
        new = {r["name"]: r for r in measured}
        # keep the old fp32 reference (identical maths) so the other rows' ratios keep their base
        new.pop("fp32", None)
        rows = [new.pop(r["name"], r) for r in previous["results"]["rows"]] + list(new.values())
        command = f"{previous['command']} && {command}"
    ref = next((r["perplexity"] for r in rows if r["name"] == "fp32"), None)
    for r in rows:
        r["vs_fp32"] = None if ref is None else r["perplexity"] / ref - 1
    results = {"settings": settings, "model_name": model_name, "eval_tokens": eval_tokens,
               "threads": torch.get_num_threads(), "load_average_start": load_start,
               "complete": complete, "rows": rows}
    write_results("perplexity", results, out, command=command)


if __name__ == "__main__":
    raise SystemExit(main())
