"""``qtune train RECIPE.yaml [section.key=value ...] [--resume]``: run a training recipe.

The recipe's ``task:`` picks the trl trainer: ``sft`` (default), ``dpo``, ``kto``, ``reward``, ``grpo``, ``rloo``
or ``distill`` (see recipes/smollm2-135m/*-nf4.yaml); ``model.adapter: RUN_DIR`` continues from a run's adapter.

Also runs under accelerate, one process per device: ``accelerate launch [--config_file
recipes/accelerate/multi_gpu_ddp.yaml] -m qtune train RECIPE.yaml``. The recipe is validated before
anything is loaded; a mistake prints ``file:line: key: problem (allowed values)`` and exits with 1.
"""
from __future__ import annotations

import argparse

from . import one_line_errors


def add_parser(subparsers) -> None:
    p = one_line_errors(subparsers.add_parser(
        "train", help="fine-tune LoRA adapters on a quantized base from a recipe YAML (SFT, DPO, KTO, reward, GRPO, RLOO, "
                              "distillation)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    # REMAINDER so that flags may also follow the overrides (argparse stops matching positionals at a flag)
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="section.key=value",
                   help="override recipe values, e.g. training.max_steps=2 output.dir=/tmp/run")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output.dir")
    p.add_argument("--check", action="store_true", help="only validate the recipe and print it")
    p.set_defaults(func=_main)


FLAGS = ("--resume", "--check")


def _main(args) -> int:
    from ..train.recipe import load_recipe

    for flag in FLAGS:
        while flag in args.overrides:
            args.overrides.remove(flag)
            setattr(args, flag[2:], True)

    recipe = load_recipe(args.recipe, args.overrides)
    if args.check:
        import yaml
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    from ..train.runner import run

    summary = run(recipe, resume=args.resume)
    return 0 if summary.get("status") in ("finished", "interrupted") else 1
