"""Render the README's benchmark tables from the results files, so every number there has a file and a command.

``python -m qtune.bench.readme [--readme README.md] [--results bench/results] [--check]``

The README marks each generated part with a pair of HTML comments (invisible once rendered)::

    <!-- bench:formats -->            a block: the table of bench/results/formats.json,
    ...                               then the command that wrote it and the file
    <!-- /bench:formats -->

    (<!-- bench:demo:summary -->48.8 → 38.9 in 3 min 28 s<!-- /bench:demo:summary -->)   an inline fragment

``NAME`` is the results file's stem (``bench/results/NAME.json``); the renderer is chosen by the file's
``benchmark`` key (``formats-avx2.json`` is rendered as a ``formats`` file) and the optional ``:PART``.
Everything between the markers is replaced; everything outside them is left as it is. A file listed in
:data:`OPTIONAL` (the GPU bench, which needs a GPU to write it) renders as nothing while it is absent; any
other missing file is an error. ``--check`` writes nothing and exits 1 when the README differs from what the
files give (a test runs it on the committed README and files).
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from .results import read_results

OPTIONAL = frozenset({"gpu"})

MARKER = re.compile(r"<!-- bench:(?P<key>[\w.-]+(?::\w+)?) -->(?P<body>.*?)<!-- /bench:(?P=key) -->", re.S)
OPENER = re.compile(r"<!-- /?bench:(?P<key>[^ ]*) -->")

FORMAT_METRICS = ("quantize", "dequantize", "forward", "fwd+bwd")
# the perplexity table pairs each qtune row with bitsandbytes' row of the same format, measured in the same run
PPL_PAIRS = {"qtune nf4": "bnb nf4", "qtune nf4+dq": "bnb nf4+dq", "qtune fp4": "bnb fp4",
             "qtune llm_int8": "bnb llm_int8"}


def _num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _machine(payload: dict[str, Any]) -> str:
    """``2 cores AMD EPYC (torch CPU capability AVX512), load average 1.9 at the start and 4.0 at the end``
    (+ the variables that change kernels or threads, when set)."""
    m = payload["machine"]
    text = f"{m.get('cores')} cores {m.get('cpu') or 'CPU'} (torch CPU capability {m.get('cpu_capability')})"
    start, end = payload["results"].get("load_average_start"), m.get("load_average")
    if start and end:
        text += f", load average {start[0]:.1f} at the start and {end[0]:.1f} at the end"
    elif end:
        text += f", load average {end[0]:.1f} at the end"
    env = m.get("env") or {}
    if env:
        text += ", run with " + " ".join(f"`{k}={v}`" for k, v in env.items())
    if m.get("cuda"):
        text += ", " + ", ".join(d["name"] for d in m["cuda"]["devices"])
    return text


def _source(payload: dict[str, Any], path: Path) -> str:
    """The line under every table: the command and the file the numbers come from (``path`` as the README links it)."""
    return (f"Command: `{payload['command']}` → [`{path.as_posix()}`]({path.as_posix()}) "
            f"({payload['created'][:10]}; {_machine(payload)}).")


def render_formats(payload: dict[str, Any], path: Path) -> str:
    r = payload["results"]
    st = r["settings"]
    bnb = payload["machine"]["versions"].get("bitsandbytes")
    threads = f"{r['threads']} thread" + ("s" if r["threads"] != 1 else "")
    intro = (f"{st['dtype']}, {st['out_features']}×{st['in_features']} weight, {st['tokens']:,} tokens, median of "
             f"{st['repeat']}, {threads}; ratio qtune/bitsandbytes {bnb} timed alternately in the same run (< 1: "
             f"qtune is faster); dense {st['dtype']} layer: forward {r['dense_ms']['forward']:.1f} ms, fwd+bwd "
             f"{r['dense_ms']['fwd+bwd']:.1f} ms.")
    choices = payload["machine"].get("qtune")
    if choices:  # files written before machine_info recorded it lack it
        intro += f" qtune's int8 matmul here: {choices['int8_matmul']} ({choices['int8_matmul_reason']})."
    rows = []
    for row in r["rows"]:
        ratio = row["ratio"] or {}
        bnb_ms = row["bnb_ms"] or {}
        rows.append([row["format"], *(_num(ratio.get(c)) for c in FORMAT_METRICS),
                     f"{row['qtune_ms']['forward']:.1f} / {row['qtune_ms']['fwd+bwd']:.1f}",
                     f"{bnb_ms['forward']:.1f} / {bnb_ms['fwd+bwd']:.1f}" if bnb_ms else "–"])
    table = _table(["format", "quantize", "dequantize", "forward", "fwd+bwd", "qtune fwd / fwd+bwd ms",
                    "bnb fwd / fwd+bwd ms"], rows)
    return f"{intro}\n\n{table}\n\n{_source(payload, path)}"


def render_perplexity(payload: dict[str, Any], path: Path) -> str:
    r = payload["results"]
    st = r["settings"]
    by_name = {row["name"]: row for row in r["rows"]}
    # a bitsandbytes row goes beside its qtune row when the file has both, else on its own line
    paired = {theirs for ours, theirs in PPL_PAIRS.items() if ours in by_name and theirs in by_name}
    intro = (f"Perplexity of {r['model_name']} on the first {r['eval_tokens']:,} tokens of `{st['text']}` "
             f"({st['seq_len']}-token windows, fp32 compute); bits/param over the linear layers without lm_head.")
    specs = any("spec" in row for row in r["rows"])  # qtune.bench.gptq_study: rows given as specs
    if specs or any(" gptq-" in name for name in by_name):
        intro += f" GPTQ calibrated on {st['samples']}×{st['cal_seq_len']} tokens of `{st['calibration']}`."
    if any(name.startswith("bnb ") or "on bnb bytes" in name for name in by_name):
        intro += (f" bitsandbytes {payload['machine']['versions'].get('bitsandbytes')} (rows `bnb ...`) loaded by "
                  "transformers from the same float checkpoint; rows `... on bnb bytes`: qtune reading the "
                  "checkpoint such a bitsandbytes model wrote.")
    if not r.get("complete"):
        intro += (f" The run was stopped after its first {len(r['rows'])} rows (`complete: false` in the file); "
                  "the rows after those were not measured.")
    timed = any("quantize_s" in row for row in r["rows"])  # GPTQ rows: the quantization alone, wall and CPU
    if timed:
        intro += (" GPTQ rows: the quantization alone (calibration forwards, Hessians, solve, packing), wall and CPU "
                  "seconds (CPU: every thread of the process; the fairer measure on a shared machine); rows "
                  "`gptqmodel ...`: GPTQModel quantized the same windows in a child process and qtune read its "
                  "checkpoint.")
    rows = []
    for row in r["rows"]:
        if row["name"] in paired:
            continue
        cells = [row["name"], f"{row['bits_per_param']:.2f}", f"{row['perplexity']:.3f}", f"{100 * row['vs_fp32']:+.2f}%",
                 f"{row['load_quantize_s']:.0f}"]
        if timed:
            cells.append(f"{row['quantize_s']:.0f} / {row['quantize_cpu_s']:.0f}" if "quantize_s" in row else "")
        if paired:
            theirs = by_name.get(PPL_PAIRS.get(row["name"], ""))
            cells.append(f"{theirs['perplexity']:.3f} ({theirs['bits_per_param']:.2f} bits)" if theirs else "")
        if specs:
            cells.append(f"`{row['spec']}`" if "spec" in row else "")
        rows.append(cells)
    header = ["model", "bits/param", "perplexity", "vs fp32", "load+quantize s"] + (["GPTQ wall / CPU s"] if timed else [])
    table = _table(header + (["bitsandbytes, same format"] if paired else []) + (["spec"] if specs else []), rows)
    return f"{intro}\n\n{table}\n\n{_source(payload, path)}"


def _demo_runs(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {run["backend"]: run for run in payload["results"]["runs"]}


def render_demo(payload: dict[str, Any], path: Path) -> str:
    r = payload["results"]
    rows = []
    for run in r["runs"]:
        before = _num(run["perplexity_before"]) if run["perplexity_before"] is not None else "(not run)"
        rows.append([run["backend"] if run["backend"] == "qtune" else "transformers+bitsandbytes+peft",
                     f"`{run['command']}`", str(run["steps"]), _duration(run["wall_s"]), f"{run['step_s']:.2f}",
                     f"{run['peak_rss_gib']:.2f}", f"{before} → {_num(run['perplexity_after'])}",
                     f"{run['model_dtype']} / {run['compute_dtype']}"])
    table = _table(["", "run", "steps", "wall time", "s/step", "peak RSS GiB", "held-out perplexity",
                    "model / compute dtype"], rows)
    text = table
    ratio = r.get("ratios_qtune_over_bitsandbytes")
    if ratio:
        text += (f"\n\nqtune / bitsandbytes: s/step {ratio['step_s']:.2f}, wall time {ratio['wall_s']:.2f}, "
                 f"peak RSS {ratio['peak_rss_gib']:.2f} (< 1: qtune is faster or smaller). On CPU the "
                 "bitsandbytes run skips the perplexity before training (its eval mode repacks the 4-bit weights "
                 "and breaks training).")
    return f"{text}\n\n{_source(payload, path)}"


def render_demo_summary(payload: dict[str, Any], path: Path) -> str:
    """Inline: ``48.81 → 38.92 after 40 steps in 3 min 28 s on 2 cores (AVX512)``."""
    run = _demo_runs(payload).get("qtune")
    if run is None:
        raise ValueError(f"{path}: no qtune run to summarize")
    return (f"{_num(run['perplexity_before'])} → {_num(run['perplexity_after'])} after {run['steps']} steps in "
            f"{_duration(run['wall_s'])} on {payload['machine']['cores']} cores "
            f"({payload['machine']['cpu_capability']}), {run['step_s']:.2f} s/step")


def render_gpu(payload: dict[str, Any], path: Path) -> str:
    """The GPU bench (:mod:`qtune.bench.gpu`): checks passed, kernel times on the first weight shape at the
    smallest and largest M, the fused/dequantize crossovers, and the training step against bitsandbytes."""
    r = payload["results"]
    verdict = "all checks passed" if r.get("ok") else f"{len(r.get('failures', []))} check(s) FAILED"
    parts = [f"GPU: {r.get('device')}; stages {', '.join(r.get('stages', []))}; {verdict}."]
    correct = r.get("correct")
    if correct:
        parts.append(f"Correctness: {correct['passed']} of {correct['checked']} kernel checks within bounds "
                     "(dequantize bit-identical; products within twice cuBLAS's own error).")
    bench = r.get("bench")
    if bench and bench.get("rows"):
        rows = bench["rows"]
        n, k = rows[0]["n"], rows[0]["k"]
        ms_ = sorted({x["m"] for x in rows})
        sel = [x for x in rows if (x["n"], x["k"]) == (n, k) and x["m"] in (ms_[0], ms_[-1])]
        table = _table(["format", "direction", "dtype", "M", "ms", "GB/s", "TFLOP/s", "vs dequantize+matmul",
                        "vs dense matmul"],
                       [[x["format"], x["direction"], x["dtype"], str(x["m"]), f"{x['ms']:.3f}", f"{x['gbps']:.0f}",
                         f"{x['tflops']:.1f}", f"{x['vs_dequant_matmul']:.2f}", f"{x['vs_dense']:.2f}"] for x in sel])
        parts.append(f"Kernels on the {n}×{k} weight (ratios = baseline ms / qtune ms, > 1: qtune is faster):\n\n{table}")
        cross = bench.get("crossover_by_dtype")
        if cross:
            lines = [[fam, d, dt, str(m)] for fam, dirs in cross["thresholds"].items() for d, by in dirs.items()
                     for dt, m in by.items()]
            parts.append(f"Fused kernel up to M (dequantize + cuBLAS above) on {cross['arch']}:\n\n"
                         + _table(["family", "direction", "dtype", "fused for M ≤"], lines))
    step = r.get("step")
    if step:
        if "skipped" in step:
            parts.append(f"Training step: skipped ({step['skipped']}).")
        elif "qtune" in step and "bitsandbytes" in step:
            parts.append(f"One QLoRA training step of a Llama-8B-shaped stack: qtune {step['qtune']['ms']:.1f} ms, "
                         f"transformers+bitsandbytes+peft {step['bitsandbytes']['ms']:.1f} ms.")
    parts.append(_source(payload, path))
    return "\n\n".join(parts)


def render_generic(payload: dict[str, Any], path: Path) -> str:
    """Any other bench (e.g. the GPU one): ``results["rows"]`` (a list of flat objects) as a table."""
    rows = payload["results"].get("rows") if isinstance(payload["results"], dict) else None
    if not isinstance(rows, list) or not all(isinstance(x, dict) for x in rows):
        raise ValueError(f"{path}: bench {payload['benchmark']!r} has no renderer and its results have no "
                         "'rows' list of objects to tabulate")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v).replace("|", "\\|")

    table = _table(columns, [[cell(row.get(c)) for c in columns] for row in rows])
    return f"{table}\n\n{_source(payload, path)}"


def render_qalora(payload: dict[str, Any], path: Path) -> str:
    """The QA-LoRA demo (:mod:`qtune.bench.qalora`): base, trained and exported-file perplexities of the
    quantization-aware and the standard adapter, and what the pooling costs."""
    r = payload["results"]
    runs = r["runs"]
    intro = (f"Held-out perplexity ({r['heldout_tokens']:,} tokens of `{r['heldout']['source']}`, "
             f"{r['eval_dtype']} evaluation) of `{r['recipe']}` on `{r['model']}`, {r['steps']} steps "
             f"(the recipe has {r['recipe_steps']}), trained in {r['train_dtype']}, and of the GGUF files "
             "`qtune export --mode quantized --format gguf` wrote, read back by qtune and by transformers. The "
             "standard-LoRA row is the same recipe with `lora.quantization_aware: false`.")
    rows = [[row["row"], f"{row['perplexity']:.3f}",
             "" if row["over_trained"] is None else f"{row['over_trained']:.5f}"] for row in r["table"]]
    table = _table(["model", "perplexity", "/ trained"], rows)
    qa, lora = runs["qalora"], runs["lora"]
    outro = (f"Change kept by the export: QA-LoRA {100 * qa['kept_mean']:.1f}% (exact merge into the offsets), "
             f"standard LoRA {100 * lora['kept_mean']:.1f}% (re-quantized). The pooled adapter costs "
             f"{100 * (r['qalora_over_lora_trained'] - 1):+.1f}% in trained perplexity against the standard one "
             "at the same steps.")
    return f"{intro}\n\n{table}\n\n{outro}\n\n{_source(payload, path)}"


def render_loftq(payload: dict[str, Any], path: Path) -> str:
    """LoftQ against the default LoRA initialisation (:mod:`qtune.bench.loftq`): per format and initialisation,
    the step-0 and last training losses and the held-out perplexity before and after training."""
    r = payload["results"]
    steps = r["steps"]
    intro = (f"`{r['recipe']}` with its quantization replaced by each format, {steps} steps"
             + (f" (overrides: {', '.join(f'`{o}`' for o in r['overrides'])})" if r.get("overrides") else "")
             + "; both initialisations see the same batches. Step-0 loss: the first batch's loss at initialisation; "
             "perplexity: held-out, before (the initialised model) and after training.")
    rows = [[row["format"], row["init"] + (f" (T={row['loftq_iters']})" if row.get("loftq_iters") else ""),
             _num(row.get("step0_loss"), 3), _num(row.get("final_loss"), 3),
             f"{_num(row.get('perplexity_before'))} → {_num(row.get('perplexity_after'))}"] for row in r["rows"]]
    table = _table(["format", "init", "step-0 loss", f"loss at step {steps}", "perplexity before → after"], rows)
    return f"{intro}\n\n{table}\n\n{_source(payload, path)}"


def render_gptq_speed(payload: dict[str, Any], path: Path) -> str:
    """GPTQ calibration time (:mod:`qtune.bench.gptq_speed`): qtune against GPTQModel in one run, wall and CPU
    seconds, their ratios, and qtune's time per part."""
    r = payload["results"]
    st, ours = r["settings"], r["qtune"]
    intro = (f"Time to GPTQ-quantize `{st['model']}` ({len(ours['block_s'])} blocks) on {st['samples']}×{st['seq_len']} "
             f"tokens of `{st['calibration']}`, batches of {st['batch_size']} windows, on the CPU ({r['cores']} cores, "
             f"{r['cpu']}, torch CPU capability {r['cpu_capability']}): the quantization alone, not loading or saving. "
             "CPU seconds count every thread of the process.")
    rows = [[f"qtune (`{st['spec']}`)", f"{ours['quantize_s']:.0f}", f"{ours['quantize_cpu_s']:.0f}"]]
    theirs = r.get("gptqmodel")
    if theirs:
        cfg = theirs.get("quantize_config", {})
        rows.append([f"GPTQModel {theirs.get('gptqmodel', '')} (its defaults: "
                     + ", ".join(f"{k}={v}" for k, v in cfg.items() if k in ("desc_act", "act_group_aware",
                                                                               "damp_percent")) + ")",
                     f"{theirs['quantize_s']:.0f}", f"{theirs['quantize_cpu_s']:.0f}"])
    table = _table(["library", "wall s", "CPU s"], rows)
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in ours["parts_s"].items())
    outro = f"qtune's wall time by part, summed over the blocks: {parts}."
    if theirs:
        outro += (f" qtune / GPTQModel: **{r['ratio_qtune_over_gptqmodel']:.2f}×** wall time, "
                  f"{r['cpu_ratio_qtune_over_gptqmodel']:.2f}× CPU time.")
    return f"{intro}\n\n{table}\n\n{outro}\n\n{_source(payload, path)}"


RENDERERS: dict[tuple[str, str | None], Callable[[dict[str, Any], Path], str]] = {
    ("formats", None): render_formats,
    ("perplexity", None): render_perplexity,
    ("demo", None): render_demo,
    ("demo", "summary"): render_demo_summary,
    ("gpu", None): render_gpu,
    ("qalora", None): render_qalora,
    ("loftq", None): render_loftq,
    ("gptq-speed", None): render_gptq_speed,
}


def render_section(key: str, results_dir: Path, readme_dir: Path) -> str:
    """The text between the markers ``<!-- bench:KEY -->`` and ``<!-- /bench:KEY -->``.

    Links to the results file are relative to ``readme_dir`` (the README's folder), so the text does not depend
    on where the command runs from.

    Raises:
        FileNotFoundError: the results file is missing and not in :data:`OPTIONAL`.
        ValueError: no renderer for the file's bench and part, or the file is invalid.
    """
    name, _, part = key.partition(":")
    path = results_dir / f"{name}.json"
    if not path.exists():
        if name in OPTIONAL:
            return "" if part else "\n"
        raise FileNotFoundError(f"README marker bench:{key}: results file {path} does not exist")
    payload = read_results(path)
    link = Path(os.path.relpath(path, readme_dir))
    renderer = RENDERERS.get((payload["benchmark"], part or None))
    if renderer is None and not part:
        renderer = render_generic
    if renderer is None:
        raise ValueError(f"README marker bench:{key}: no renderer for part {part!r} of bench {payload['benchmark']!r}")
    text = renderer(payload, link)
    return text if part else f"\n{text}\n"


def render(readme: str, results_dir: Path, readme_dir: Path) -> str:
    """``readme`` (the text of a README in ``readme_dir``) with every marked section re-rendered from ``results_dir``.

    Raises:
        ValueError: a marker without its partner (or nested, or misspelt), which would leave a section stale.
    """
    paired = 2 * len(MARKER.findall(readme))
    found = OPENER.findall(readme)
    if len(found) != paired:
        raise ValueError(f"README: {len(found)} bench markers but {paired} in matched pairs; every "
                         "<!-- bench:NAME --> needs its own <!-- /bench:NAME --> after it (markers seen: "
                         f"{', '.join(found)})")
    return MARKER.sub(lambda m: f"<!-- bench:{m['key']} -->{render_section(m['key'], results_dir, readme_dir)}"
                                f"<!-- /bench:{m['key']} -->", readme)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--readme", default="README.md")
    p.add_argument("--results", default="bench/results", help="folder of the results files")
    p.add_argument("--check", action="store_true", help="exit 1 (and show the diff) if the README is out of date")
    args = p.parse_args(argv)
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    keys = [m["key"] for m in MARKER.finditer(text)]
    if not keys:
        raise SystemExit(f"{readme}: no <!-- bench:NAME --> ... <!-- /bench:NAME --> sections")
    new = render(text, Path(args.results), readme.parent)
    if args.check:
        if new != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                       f"{readme} (committed)", f"{readme} (from {args.results})"))
            print(f"{readme} is out of date with {args.results}: run python -m qtune.bench.readme", file=sys.stderr)
            return 1
        print(f"{readme}: {len(keys)} sections up to date ({', '.join(keys)})")
        return 0
    if new != text:
        readme.write_text(new, encoding="utf-8")
    print(f"{readme}: rendered {len(keys)} sections ({', '.join(keys)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
