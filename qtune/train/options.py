"""The schema record of one recipe key (:class:`Opt`), shared by the recipe sections (:mod:`.recipe`) and
the task sections (:mod:`.tasks`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

REQUIRED = object()  # an Opt default: the key must be given
NONE = type(None)


@dataclasses.dataclass(frozen=True)
class Opt:
    """One recipe key: accepted types, default, allowed values and an optional extra check.

    ``check(value)`` returns an error message or ``None``.
    """

    types: tuple[type, ...]
    default: Any = REQUIRED
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


__all__ = ["Opt", "NONE", "REQUIRED"]
