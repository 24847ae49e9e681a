"""Perplexity of GPTQ settings chosen on the command line, qtune's and GPTQModel's, calibrated on the same windows.

``python -m qtune.bench.gptq_study --row NAME=SPEC [--row NAME=SPEC ...] [--model smollm2] [--tokens 16384]
[--samples 32] [--out FILE]``

A study of one factor at a time (ordering, damping, calibration size) needs rows that
:mod:`qtune.bench.perplexity`'s fixed table does not list; this bench takes them as arguments and measures them
exactly as that table does (same settings, same calibration windows, same evaluation, same results schema, so
:mod:`qtune.bench.readme` can render either). ``SPEC`` is one of:

* ``qtune:<format spec>``: qtune's sequential GPTQ (:func:`qtune.calibration.gptq_quantize_model`) with the
  config of ``QTuneConfig.from_spec`` (e.g. ``qtune:gptq:bits=3,group_size=128,act_group_aware=false``);
* ``gptqmodel:<key>=<value>,...``: GPTQModel 7.7 (``.deps/gptqmodel``) in a child process, its ``QuantizeConfig``
  defaults plus these fields (``bits``, ``group_size``, ``sym``, ``desc_act``, ``act_group_aware``,
  ``static_groups``, ``damp_percent``...; values ``true``/``false``, integers or floats), read back by qtune
  (:func:`qtune.bench.gptq_speed.time_gptqmodel`).

The float model is always the first row. Every row records its spec; qtune rows the config it resolved to
(``config``), GPTQModel rows the ``QuantizeConfig`` fields GPTQModel reports having used (``quantize_config``). The results go to ``bench/results/gptq-study.json`` (``--out`` elsewhere),
rewritten after every row with ``"complete": false`` until the last one.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .perplexity import SETTINGS, _write, add_settings_args
from .results import bench_command, default_dir, load_average


def parse_row(arg: str) -> tuple[str, str, str]:
    """``NAME=KIND:SPEC`` → ``(name, kind, spec)`` with kind ``qtune`` or ``gptqmodel``."""
    name, sep, rest = arg.partition("=")
    kind, colon, spec = rest.partition(":")
    if not sep or not colon or not name.strip() or kind not in ("qtune", "gptqmodel"):
        raise SystemExit(f"--row {arg!r}: expected NAME=qtune:<format spec> or NAME=gptqmodel:key=value,...")
    return name.strip(), kind, spec


def parse_gptqmodel_spec(spec: str) -> dict[str, Any]:
    """``"bits=3,damp_percent=0.01,desc_act=true"`` → ``{"bits": 3, "damp_percent": 0.01, "desc_act": True}``."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"gptqmodel spec {spec!r}: {item!r} is not key=value")
        low = value.strip().lower()
        if low in ("true", "false"):
            out[key.strip()] = low == "true"
        else:
            try:
                out[key.strip()] = int(value)
            except ValueError:
                try:
                    out[key.strip()] = float(value)
                except ValueError:
                    raise SystemExit(f"gptqmodel spec {spec!r}: {key}={value!r} is not a bool or a number") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row", action="append", required=True, metavar="NAME=SPEC", help="a row (repeat)")
    add_settings_args(p)
    p.add_argument("--out", help="results file (default bench/results/gptq-study.json)")
    args = p.parse_args(argv)
    rows_spec = [parse_row(r) for r in args.row]
    names = [r[0] for r in rows_spec]
    if len(set(names)) != len(names) or "fp32" in names:
        raise SystemExit(f"--row: names must be unique and not 'fp32', got {names}")
    out = Path(args.out) if args.out else default_dir() / "gptq-study.json"
    settings = {k: getattr(args, k) for k in SETTINGS}

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..assets import resolve_model
    from ..calibration import calibration_windows, gptq_quantize_model
    from ..evaluate import model_bits_per_param, perplexity, tokenize_text
    from ..integrations import QTuneConfig
    from ..integrations.layouts import load_model
    from ..sources import read_text
    from .gptq_speed import default_gptqmodel_path, time_gptqmodel

    hf_logging.disable_progress_bar()
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenize_text(read_text(args.text), tokenizer, tokens=args.tokens)
    cal = calibration_windows([read_text(args.calibration)], tokenizer, samples=args.samples, seq_len=args.cal_seq_len)

    def float_model():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)

    def qtune_row(spec: str) -> Callable[[], tuple[Any, dict]]:
        qc = QTuneConfig.from_spec(spec)  # parse errors before any row runs

        def build():
            model = float_model()
            cpu = time.process_time()
            report = gptq_quantize_model(model, cal, qc.default_config(), skip_modules=qc.skip_modules,
                                         overrides=qc.override_configs(), progress=False)
            cfg = qc.default_config()
            return model, {"quantize_s": round(report.seconds, 2),
                           "quantize_cpu_s": round(time.process_time() - cpu, 2),
                           "config": {"format": cfg.format, **{k: v if v is None or isinstance(v, (bool, int, float, str))
                                                               else str(v) for k, v in dataclasses.asdict(cfg).items()}}}
        return build

    def gptqmodel_row(spec: str) -> Callable[[], tuple[Any, dict]]:
        fields = parse_gptqmodel_spec(spec)
        bits, group_size, sym = fields.pop("bits", 4), fields.pop("group_size", 128), fields.pop("sym", True)

        def build():
            with tempfile.TemporaryDirectory(prefix="qtune-gptq-study-") as tmp:
                t = time_gptqmodel(path, cal, 8, default_gptqmodel_path(), "float32", bits=bits, group_size=group_size,
                                   sym=sym, quantize_config=fields, out=Path(tmp) / "model")
                model = load_model(Path(tmp) / "model", dtype=torch.float32)
            return model, {"quantize_s": t["quantize_s"], "quantize_cpu_s": t["quantize_cpu_s"],
                           "gptqmodel": t["gptqmodel"], "quantize_config": t["quantize_config"]}
        return build

    rows: list[tuple[str, str, Callable[[], tuple[Any, dict]]]] = [("fp32", "float", lambda: (float_model(), {}))]
    for name, kind, spec in rows_spec:
        rows.append((name, f"{kind}:{spec}", qtune_row(spec) if kind == "qtune" else gptqmodel_row(spec)))

    print(f"{path.name}: perplexity on the first {ids.numel()} tokens of {args.text} ({args.seq_len}-token windows); "
          f"calibrated on {args.samples}x{args.cal_seq_len} tokens of {args.calibration}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    print(f"{'row':<40} {'quantize s':>10} {'perplexity':>11} {'vs fp32':>8}", flush=True)
    ref = None
    measured: list[dict[str, Any]] = []
    load_start = load_average()
    for i, (name, spec, build) in enumerate(rows):
        t0 = time.perf_counter()
        model, extra = build()
        prep = time.perf_counter() - t0
        bits = model_bits_per_param(model)
        res = perplexity(model, ids, seq_len=args.seq_len, batch_size=args.batch_size)
        ref = res.perplexity if ref is None else ref
        print(f"{name:<40} {extra.get('quantize_s', 0.0):>10.1f} {res.perplexity:>11.4f} "
              f"{100 * (res.perplexity / ref - 1):>+7.2f}%", flush=True)
        measured.append({"name": name, "spec": spec, "bits_per_param": bits, "load_quantize_s": round(prep, 2),
                         **extra, "perplexity": res.perplexity, "nll": res.nll, "predicted_tokens": res.predicted,
                         "eval_tokens_per_s": round(res.tokens_per_s, 1), "load_average_end": load_average()})
        del model
        gc.collect()
        _write(out, settings, measured, None, load_start, complete=i == len(rows) - 1, model_name=path.name,
               eval_tokens=ids.numel(), command=bench_command("qtune.bench.gptq_study", argv))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
