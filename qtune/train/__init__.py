"""Recipe-driven QLoRA training: recipe schema and validation, data, and the runner behind ``qtune train``."""
from .recipe import Recipe, RecipeError, load_recipe, validate

__all__ = ["Recipe", "RecipeError", "load_recipe", "validate", "run"]


def run(recipe: Recipe, **kwargs):
    """Train a validated recipe (see :func:`qtune.train.runner.run`)."""
    from .runner import run as _run
    return _run(recipe, **kwargs)
