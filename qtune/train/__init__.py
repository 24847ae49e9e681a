"""Recipe-driven QLoRA training: recipe schema and validation, the task table (SFT, DPO, KTO, reward, GRPO,
RLOO, distillation), data, and the runner behind ``qtune train``."""
from .recipe import Recipe, RecipeError, load_recipe, validate
from .tasks import TASKS, Task

__all__ = ["Recipe", "RecipeError", "load_recipe", "validate", "run", "TASKS", "Task"]


def run(recipe: Recipe, **kwargs):
    """Train a validated recipe (see :func:`qtune.train.runner.run`)."""
    from .runner import run as _run
    return _run(recipe, **kwargs)
