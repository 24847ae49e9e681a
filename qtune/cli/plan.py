"""``qtune plan RECIPE.yaml [section.key=value ...]``: predicted peak training memory of a recipe.

Reads only the model's config (a local folder, or qtune's table of the shipped recipes' models), never its
weights. Prints the split into quantized weights, float weights, LoRA parameters, gradients, optimizer
state and activations (with and without gradient checkpointing), and whether 24/16/12 GB cards fit.
"""
from __future__ import annotations

import argparse

from . import one_line_errors


def add_parser(subparsers) -> None:
    p = one_line_errors(subparsers.add_parser(
        "plan", help="predict the peak training memory of a recipe (no weights loaded)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="section.key=value",
                   help="override recipe values, e.g. training.max_length=4096")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_main)


def _main(args) -> int:
    import json

    from ..plan import plan_recipe
    from ..train.recipe import load_recipe

    if "--json" in args.overrides:
        args.overrides.remove("--json")
        args.json = True
    plan = plan_recipe(load_recipe(args.recipe, args.overrides))
    print(json.dumps(plan.to_dict(), indent=2, default=str) if args.json else plan.report())
    return 0
