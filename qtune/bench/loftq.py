"""LoftQ against LoRA's default initialisation on the demo recipe: step-0 loss and held-out perplexity.

``python -m qtune.bench.loftq [--recipe FILE] [--format SPEC ...] [--steps N] [--loftq-iters T] [--out FILE]
[-- section.key=value ...]``

For each format (default: ``nf4``, ``affine:bits=3,group_size=64``, ``affine:bits=2,group_size=64``) the recipe
(default: the demo, ``recipes/smollm2-135m/qlora-nf4.yaml``) is trained twice in this process through
:func:`qtune.train.runner.run`, with ``lora.init: default`` and with ``lora.init: loftq`` (``lora.loftq_iters:
T``), the quantization section replaced by the format (its ``compute_dtype`` kept), ``--steps`` steps and a loss
logged at every step. Each row records the first logged training loss (the loss of the first batch at
initialisation: the step-0 loss), the last one, the held-out perplexity before training (of the initialised
model: for LoftQ the re-quantized base with its adapter) and after, and the run's wall time. Both
initialisations of a format see the same batches (same seed).

``--steps 0`` trains nothing: each row is the initialised model (base quantized, adapter attached, LoftQ applied
or not), its mean token loss on the first ``--train-tokens`` tokens of the training text in ``training.max_length``
windows (the step-0 loss) and its held-out perplexity; no trainer is built.

Results: ``bench/results/loftq.json`` (``--out`` elsewhere).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .results import load_average, write_and_report

DEMO_RECIPE = "recipes/smollm2-135m/qlora-nf4.yaml"
FORMATS = ("nf4", "affine:bits=3,group_size=64", "affine:bits=2,group_size=64")


def _recipe(path: str, spec: str, init: str, iters: int, steps: int, out_dir: Path, overrides: list[str]):
    """The recipe at ``path`` with the format, initialisation and steps of one row (validated)."""
    import yaml

    from ..formats import parse_format_spec
    from ..train.recipe import validate

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    fs = parse_format_spec(spec)
    compute = (data.get("quantization") or {}).get("compute_dtype")
    data["quantization"] = {"format": fs.format, **fs.options, **({"compute_dtype": compute} if compute else {})}
    lora = dict(data.get("lora") or {})
    lora["init"] = init
    if init == "loftq":
        lora["loftq_iters"] = iters
    data["lora"] = lora
    data["training"] = {**(data.get("training") or {}), "max_steps": steps, "logging_steps": 1,
                        "save_steps": 10**6}
    data["output"] = {**(data.get("output") or {}), "dir": str(out_dir), "overwrite": True, "plot": False,
                      "report_to": "none"}
    return validate(data, filename=str(path), overrides=overrides)


def run_row(recipe_path: str, spec: str, init: str, iters: int, steps: int, workdir: Path,
            overrides: list[str]) -> dict[str, Any]:
    """Train one (format, initialisation) and return its row."""
    from transformers import TrainerCallback

    from ..train.runner import run

    losses: list[tuple[int, float]] = []

    class _Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append((state.global_step, float(logs["loss"])))

    tag = f"{spec.replace(':', '-').replace(',', '-').replace('=', '')}-{init}"
    recipe = _recipe(recipe_path, spec, init, iters, steps, workdir / tag, overrides)
    t0 = time.perf_counter()
    summary = run(recipe, callbacks=[_Losses()])
    wall = time.perf_counter() - t0
    before, after = summary.get("perplexity_before"), summary.get("perplexity_after")
    row = {"format": spec, "init": init, "loftq_iters": iters if init == "loftq" else None,
           "steps": summary["global_step"], "step0_loss": losses[0][1] if losses else None,
           "final_loss": losses[-1][1] if losses else None, "losses": [round(v, 4) for _, v in losses],
           "perplexity_before": before["perplexity"] if before else None,
           "perplexity_after": after["perplexity"] if after else None, "wall_s": round(wall, 1)}
    print(f"{spec:<32} {init:<8} step-0 loss {row['step0_loss']:.4f}  final {row['final_loss']:.4f}  "
          f"perplexity {row['perplexity_before']:.2f} -> {row['perplexity_after']:.2f}  ({wall:.0f} s)", flush=True)
    return row


def init_row(recipe_path: str, spec: str, init: str, iters: int, workdir: Path, overrides: list[str],
             train_tokens: int) -> dict[str, Any]:
    """``--steps 0``: the initialised model only, no training: the mean token loss on the first ``train_tokens``
    tokens of the training text (in ``training.max_length`` windows: the step-0 loss without the trainer's
    batching) and the held-out perplexity of the recipe's ``dataset.perplexity``."""
    from ..evaluate import perplexity, tokenize_text
    from ..train import data
    from ..train.base_model import load_base
    from ..train.runner import attach_adapter

    tag = f"{spec.replace(':', '-').replace(',', '-').replace('=', '')}-{init}"
    recipe = _recipe(recipe_path, spec, init, iters, 1, workdir / tag, overrides)
    t0 = time.perf_counter()
    base = load_base(recipe)
    model, peft_config = attach_adapter(recipe, base.model, base.path)
    if peft_config is not None:  # the default init: the adapter as trl would attach it (B = 0)
        from ..integrations.peft import get_peft_model
        model = get_peft_model(model, peft_config)
    train_text = data.read_text(recipe.dataset["train"]["source"])
    ids = tokenize_text(train_text, base.tokenizer, tokens=train_tokens)
    window = int(recipe.training.get("max_length", 256))
    res = perplexity(model, ids, seq_len=window, batch_size=4)
    loss = res.nll / res.predicted  # mean token loss (the NLL is summed)
    spec_ppl = recipe.dataset["perplexity"]
    held = data.perplexity(model, base.tokenizer, data.read_text(spec_ppl["source"]),
                           max_tokens=spec_ppl["max_tokens"], window=spec_ppl["window"])
    wall = time.perf_counter() - t0
    row = {"format": spec, "init": init, "loftq_iters": iters if init == "loftq" else None, "steps": 0,
           "step0_loss": loss, "train_tokens": ids.numel(), "perplexity_before": held["perplexity"],
           "perplexity_after": None, "wall_s": round(wall, 1)}
    print(f"{spec:<32} {init:<8} step-0 loss {loss:.4f}  held-out perplexity {held['perplexity']:.2f}  ({wall:.0f} s)",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=DEMO_RECIPE, help=f"recipe YAML (default: the demo, {DEMO_RECIPE})")
    p.add_argument("--format", action="append", dest="formats", metavar="SPEC",
                   help=f"format spec to compare on (repeatable; default {', '.join(FORMATS)})")
    p.add_argument("--steps", type=int, default=20,
                   help="training steps; 0: no training, the initialised models only (step-0 loss on the first "
                        "--train-tokens tokens of the training text, held-out perplexity)")
    p.add_argument("--train-tokens", type=int, default=2048, help="with --steps 0: tokens of the step-0 loss")
    p.add_argument("--loftq-iters", type=int, default=1, help="LoftQ's alternating steps T")
    p.add_argument("--workdir", default="runs/bench-loftq", help="the runs' output folders")
    p.add_argument("--out", help="results file (default bench/results/loftq.json)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="more recipe overrides (after --)")
    args = p.parse_args(argv)
    if args.steps < 0 or args.loftq_iters < 1:
        raise SystemExit("--steps must be >= 0 and --loftq-iters >= 1")
    formats = args.formats or list(FORMATS)
    workdir = Path(args.workdir)
    load_start = load_average()
    rows = []
    for spec in formats:
        for init in ("default", "loftq"):
            if args.steps == 0:
                rows.append(init_row(args.recipe, spec, init, args.loftq_iters, workdir, args.overrides,
                                     args.train_tokens))
            else:
                rows.append(run_row(args.recipe, spec, init, args.loftq_iters, args.steps, workdir, args.overrides))
    by = {(r["format"], r["init"]): r for r in rows}
    ratios = {spec: {"step0_loss": by[(spec, "loftq")]["step0_loss"] / by[(spec, "default")]["step0_loss"],
                     "perplexity_before": by[(spec, "loftq")]["perplexity_before"]
                     / by[(spec, "default")]["perplexity_before"],
                     "perplexity_after": (by[(spec, "loftq")]["perplexity_after"]
                                          / by[(spec, "default")]["perplexity_after"]) if args.steps else None}
              for spec in formats if by[(spec, "loftq")]["perplexity_before"] is not None}
    for spec, r in ratios.items():
        after = f", after {r['perplexity_after']:.3f}" if r["perplexity_after"] is not None else ""
        print(f"{spec}: loftq/default step-0 loss {r['step0_loss']:.3f}, perplexity before "
              f"{r['perplexity_before']:.3f}{after}")
    results = {"recipe": args.recipe, "steps": args.steps, "loftq_iters": args.loftq_iters, "overrides": args.overrides,
               "rows": rows, "loftq_over_default": ratios, "load_average_start": load_start,
               "load_average_end": load_average()}
    return write_and_report("loftq", results, args.out, argv)


if __name__ == "__main__":
    raise SystemExit(main())
