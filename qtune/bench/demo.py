"""The README's demo (``qtune train recipes/smollm2-135m/qlora-nf4.yaml``) timed end to end, with its peak memory.

``python -m qtune.bench.demo [--recipe FILE] [--backend bitsandbytes] [--out FILE] [-- section.key=value ...]``

Each backend runs the recipe as the user would, in a child process (``python -m qtune train RECIPE
output.dir=<workdir>/<backend> output.overwrite=true [quantization.backend=bitsandbytes] OVERRIDES``), so
that the child's own peak resident memory (``ru_maxrss`` from ``os.wait4``, the whole process: Python,
libraries, model, optimizer, activations) is measured and nothing of this process is counted. From the
run's ``summary.json`` it records the steps, s/step (the trainer's runtime over the steps), perplexity of the
held-out text before and after; from the run's resolved ``recipe.yaml`` the model and compute dtypes the
run used, and from its log the reason printed for each ``auto`` dtype it resolved. ``qtune`` always runs; ``--backend bitsandbytes`` adds the same recipe through
transformers+bitsandbytes+peft and the ratios qtune/bitsandbytes (< 1: qtune is faster or smaller).

On CPU, bitsandbytes' run has no perplexity before training (its eval mode repacks the 4-bit weights and
breaks training; see :mod:`qtune.train.runner`).

Results: ``bench/results/demo.json`` (``--out`` elsewhere). Wall time includes start-up (imports, loading and
quantizing the model, both perplexity passes, saving the adapter).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .results import load_average, write_and_report

DEMO_RECIPE = "recipes/smollm2-135m/qlora-nf4.yaml"
BACKENDS = ("qtune", "bitsandbytes")


def run_child(argv: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float, float]:
    """Run ``argv`` with stdout+stderr to ``log``; return (exit code, wall seconds, peak RSS in GiB).

    ``os.wait4`` gives the resource usage of this one child (``RUSAGE_CHILDREN`` would report the largest of
    all children waited for so far, mixing the backends). Linux reports ``ru_maxrss`` in KiB.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss / 2**20


def _resolved_dtypes(run_dir: Path) -> dict[str, Any]:
    """``model.dtype`` and ``quantization.compute_dtype`` as the run resolved them (its ``recipe.yaml``)."""
    import yaml

    path = run_dir / "recipe.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the run wrote no resolved recipe")
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {"model_dtype": recipe["model"]["dtype"], "compute_dtype": recipe["quantization"]["compute_dtype"]}


def _auto_dtype_lines(log: Path) -> list[str]:
    """The run's own account of each ``auto`` dtype it resolved (``model.dtype: auto -> float32 (reason)``)."""
    prefix = "qtune train: "
    return [line[len(prefix):].strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
            if line.startswith(prefix) and ": auto -> " in line]


def run_backend(backend: str, recipe: str, workdir: Path, overrides: list[str]) -> dict[str, Any]:
    """Train ``recipe`` with ``backend`` in a child process; the numbers of that run.

    Raises:
        RuntimeError: the child failed (names the backend, exit code and log file, with the log's tail).
    """
    import json

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    run_dir = workdir / backend
    args = [f"output.dir={run_dir}", "output.overwrite=true"]
    if backend == "bitsandbytes":
        args.append("quantization.backend=bitsandbytes")
    argv = [sys.executable, "-m", "qtune", "train", recipe, *args, *overrides]
    log = workdir / f"{backend}.log"
    print(f"{backend}: {' '.join(argv[1:])} (log: {log})", flush=True)
    code, wall, rss = run_child(argv, log)
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:])
        raise RuntimeError(f"qtune train with backend {backend} exited with {code} (log {log}):\n{tail}")
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        raise FileNotFoundError(f"{summary_file}: the {backend} run finished without a summary")
    s = json.loads(summary_file.read_text(encoding="utf-8"))
    before, after = s.get("perplexity_before"), s.get("perplexity_after")
    row = {
        "backend": backend,
        "command": " ".join(["qtune", "train", recipe, *args[2:], *overrides]),
        "status": s["status"],
        "steps": s["global_step"],
        "wall_s": round(wall, 2),
        "train_s": round(s["train_s"], 2),
        "step_s": round(s["step_s"], 3),
        "tokens_per_s": round(s["tokens_per_s"], 1) if "tokens_per_s" in s else None,
        "peak_rss_gib": round(rss, 3),
        "perplexity_before": before["perplexity"] if before else None,
        "perplexity_after": after["perplexity"] if after else None,
        "train_loss": s.get("train_loss"),
        **_resolved_dtypes(run_dir),
        "dtype_choice": _auto_dtype_lines(log),
    }
    print(f"{backend}: {row['steps']} steps in {wall:.0f} s, {row['step_s']:.2f} s/step, peak RSS "
          f"{rss:.2f} GiB, perplexity {row['perplexity_before']} -> {row['perplexity_after']} "
          f"({row['model_dtype']}/{row['compute_dtype']})", flush=True)
    return row


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    """qtune / bitsandbytes for s/step, wall time and peak RSS (< 1: qtune is faster or smaller)."""
    return {k: ours[k] / theirs[k] for k in ("step_s", "wall_s", "peak_rss_gib")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=DEMO_RECIPE, help=f"recipe YAML (default: the demo, {DEMO_RECIPE})")
    p.add_argument("--backend", action="append", choices=["bitsandbytes"], default=[],
                   help="also run the recipe through transformers+bitsandbytes+peft, for the ratio")
    p.add_argument("--workdir", default="runs/bench-demo", help="the runs' output folders and logs")
    p.add_argument("--out", help="results file (default bench/results/demo.json)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="recipe overrides for every backend (after --, e.g. -- training.max_steps=2)")
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise SystemExit(f"overrides must be section.key=value, got {bad}")
    if not Path(args.recipe).is_file():
        raise SystemExit(f"recipe {args.recipe} does not exist (run from the repository root)")

    workdir = Path(args.workdir)
    load_start = load_average()
    runs = [run_backend(b, args.recipe, workdir, args.overrides) for b in ("qtune", *args.backend)]
    results: dict[str, Any] = {"recipe": args.recipe, "overrides": args.overrides, "load_average_start": load_start,
                               "runs": runs}
    if len(runs) == 2:
        results["ratios_qtune_over_bitsandbytes"] = ratios(runs[0], runs[1])
        print("qtune / bitsandbytes: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                   results["ratios_qtune_over_bitsandbytes"].items()))
    return write_and_report("demo", results, args.out, argv)


if __name__ == "__main__":
    raise SystemExit(main())
