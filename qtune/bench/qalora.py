"""Quantization-aware LoRA on SmolLM2's own Q4_1 GGUF against a standard LoRA: held-out perplexity of the base, the
trained models, the QA adapter merged exactly into the Q4_1 offsets and the standard adapter re-quantized to Q4_1.

``python -m qtune.bench.qalora [--steps N] [--workdir DIR] [--out FILE]``

Both runs take the demo recipe (``recipes/smollm2-135m/qlora-nf4.yaml``: Emma, r=16, lr 1e-3, 4×256 tokens per
step, held-out Persuasion 2,048 tokens in 512-token windows) with the base replaced by the model's own GGUF file
(``quantization.format: pretrained``: its Q4_1 blocks kept as they are) and ``lora.quantization_aware`` true or
false; ``--steps`` overrides ``training.max_steps`` (the demo's 40 by default). Each trained adapter is then
exported with ``qtune export --mode quantized --format gguf_q4_1`` (in this process, no verification reload):
the QA adapter takes the exact path (its change added to each block's fp16 offset, codes unchanged), the standard
one is merged in fp32 and re-quantized. Perplexities come from the runs' summaries (base, trained) and from the
exports (trained: adapter on the GGUF base; quantized: the merged Q4_1 model in memory; same tokens). The base's
perplexity is measured once, before the QA run trains. The share of each adapter's change that the
Q4_1 weights kept is the exporter's per-layer ``kept`` (mean over layers).

Results: ``bench/results/qalora.json`` (``--out`` elsewhere). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path
from typing import Any

from .results import load_average, write_and_report

DEMO_RECIPE = "recipes/smollm2-135m/qlora-nf4.yaml"


def recipe_data(base: dict[str, Any], gguf: Path, out: Path, *, quantization_aware: bool, steps: int) -> dict[str, Any]:
    """The demo recipe on the GGUF file, QA-LoRA or standard LoRA, ``steps`` steps, into ``out``."""
    data = copy.deepcopy(base)
    data["model"]["path"] = str(gguf)
    data["quantization"] = {"format": "pretrained", "compute_dtype": base["quantization"].get("compute_dtype", "auto")}
    data["lora"]["quantization_aware"] = quantization_aware
    data["training"]["max_steps"] = steps
    data["training"]["save_steps"] = max(steps, 1)  # one checkpoint at the end (what the exporter reads: adapter/)
    data["output"] = {"dir": str(out), "overwrite": True, "plot": False, "report_to": "none"}
    if not quantization_aware:  # the base's perplexity once (the QA run's "before"); the export measures the rest
        data["dataset"]["perplexity"] = None
    return data


def _mean_kept(layers) -> float | None:
    vals = [l.kept for l in layers if l.kept is not None and math.isfinite(l.kept)]
    return sum(vals) / len(vals) if vals else None


def run_variant(name: str, data: dict[str, Any], workdir: Path, heldout: dict[str, Any]) -> dict[str, Any]:
    """Train one recipe and export it to Q4_1; its perplexities and the share of the change kept."""
    import yaml

    from ..export import export_quantized
    from ..train import load_recipe
    from ..train.runner import run

    recipe_file = workdir / f"{name}.yaml"
    recipe_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    t0 = time.perf_counter()
    summary = run(load_recipe(recipe_file))
    train_s = time.perf_counter() - t0
    ppl = heldout
    lines: list[str] = []

    def log(line: str) -> None:  # printed as it comes (a long run's numbers must not be lost to a later error)
        lines.append(line)
        print(line, flush=True)

    t0 = time.perf_counter()
    result = export_quantized(data["output"]["dir"], workdir / f"{name}-q4_1", format="gguf_q4_1", overwrite=True,
                              verify=False, heldout=ppl["source"], heldout_tokens=ppl["max_tokens"],
                              heldout_window=ppl["window"], log=log)
    export_s = time.perf_counter() - t0
    exact = any("exactly into the float offsets" in line for line in lines)
    row = {
        "quantization_aware": data["lora"]["quantization_aware"],
        "steps": summary["global_step"],
        "train_s": train_s,
        "step_s": summary.get("step_s"),
        "perplexity_base": (summary.get("perplexity_before") or {}).get("perplexity"),
        "perplexity_trained": result.heldout["trained"]["perplexity"],
        "perplexity_quantized": result.heldout["quantized"]["perplexity"],
        "merge": "exact (offsets)" if exact else "re-quantized",
        "kept_mean": _mean_kept(result.layers),
        "rel_delta_mean": (sum(l.rel_delta for l in result.layers if l.rel_delta is not None)
                           / max(sum(l.rel_delta is not None for l in result.layers), 1)),
        "export_s": export_s,
    }
    row["quantized_over_trained"] = row["perplexity_quantized"] / row["perplexity_trained"]
    print(f"{name}: {row['steps']} steps; held-out perplexity trained "
          f"{row['perplexity_trained']:.2f}, Q4_1 after merge ({row['merge']}) {row['perplexity_quantized']:.2f} "
          f"(x{row['quantized_over_trained']:.4f} of trained); change kept {100 * (row['kept_mean'] or 0):.1f}%")
    return row


def main(argv: list[str] | None = None) -> int:
    import yaml

    from ..assets import smollm2_gguf

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=DEMO_RECIPE, help=f"base recipe (default: the demo, {DEMO_RECIPE})")
    p.add_argument("--steps", type=int, default=None, help="training steps of each run (default: the recipe's)")
    p.add_argument("--workdir", default="runs/bench-qalora", help="the runs' and exports' folders")
    p.add_argument("--out", help="results file (default bench/results/qalora.json)")
    args = p.parse_args(argv)
    if not Path(args.recipe).is_file():
        raise SystemExit(f"recipe {args.recipe} does not exist (run from the repository root)")
    base = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8"))
    steps = args.steps or base["training"]["max_steps"]
    gguf = smollm2_gguf()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    load_start = load_average()
    runs = {}
    for name, qa in (("qalora", True), ("lora", False)):
        runs[name] = run_variant(name, recipe_data(base, gguf, workdir / name, quantization_aware=qa, steps=steps),
                                 workdir, base["dataset"]["perplexity"])
    results: dict[str, Any] = {
        "model": gguf.name, "recipe": args.recipe, "steps": steps, "recipe_steps": base["training"]["max_steps"],
        "heldout": base["dataset"]["perplexity"], "load_average_start": load_start,
        "perplexity_base": runs["qalora"]["perplexity_base"], "runs": runs,
        # what pooling the adapter's input costs in trained perplexity, same steps (> 1: QA-LoRA is worse)
        "qalora_over_lora_trained": runs["qalora"]["perplexity_trained"] / runs["lora"]["perplexity_trained"],
    }
    return write_and_report("qalora", results, args.out, argv)


if __name__ == "__main__":
    raise SystemExit(main())
