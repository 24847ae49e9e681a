"""All-or-nothing output folders: moved to :mod:`qtune.atomic` (below the layouts that write checkpoints
too); these names stay importable from here."""
from ..atomic import atomic_output, check_free_space, check_output  # noqa: F401

__all__ = ["check_output", "atomic_output", "check_free_space"]
