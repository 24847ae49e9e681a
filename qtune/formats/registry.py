"""The format registry: format name → config class, and format specs (``"nf4:double_quant=true"``).

Every question about a format (its bits, whether it needs calibration, its op family, its CLI options) is
answered by its config class (see :class:`qtune.formats.base.QuantConfig`); this module finds the class
from a name. A new format registers its config here (``register_format``), its op family with
:func:`qtune.ops.register_op_family` and its layer with :func:`qtune.nn.register_layer`, and nothing else
in qtune changes (``docs/adding-a-format.md``).
"""
from __future__ import annotations

import dataclasses
import json
import types
from typing import Any, Mapping

from .base import CliOption, QuantConfig

_FORMATS: dict[str, type[QuantConfig]] = {}

#: read-only view of the registry, ``{name: config class}`` in registration order
CONFIGS: Mapping[str, type[QuantConfig]] = types.MappingProxyType(_FORMATS)


def _declared(cls: type, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(cls)} or getattr(cls, name, None) is not None


def register_format(config_cls: type[QuantConfig]) -> type[QuantConfig]:
    """Register a format's config class under its ``format`` name (usable as a class decorator).

    Raises:
        TypeError: not a ``QuantConfig`` dataclass (those are frozen: configs are hashable), or
            ``needs_calibration`` is not a bool.
        ValueError: the class declares no ``format`` name, no ``bits`` or no ``op_family``, or the name is
            taken by another class.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, QuantConfig)
            and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"register_format: expected a QuantConfig dataclass, got {config_cls!r}")
    name = config_cls.__dict__.get("format", "")
    if not isinstance(name, str) or not name or name != name.lower() or "-" in name or ":" in name:
        raise ValueError(f"register_format: {config_cls.__name__}.format={name!r} must be a lower-case name "
                         "without '-' or ':', declared on the class itself")
    if not _declared(config_cls, "bits"):
        raise ValueError(f"register_format: {config_cls.__name__} declares no `bits` (a class attribute or a field)")
    if not _declared(config_cls, "op_family") or config_cls.op_family == "":
        raise ValueError(f"register_format: {config_cls.__name__} declares no `op_family` (see qtune.ops.register_op_family)")
    if not isinstance(config_cls.needs_calibration, bool):
        raise TypeError(f"register_format: {config_cls.__name__}.needs_calibration must be a bool")
    for opt in config_cls.cli_options:
        if not isinstance(opt, CliOption) or opt.field not in {f.name for f in dataclasses.fields(config_cls)}:
            raise ValueError(f"register_format: {config_cls.__name__}.cli_options: {opt!r} does not name a field")
    old = _FORMATS.get(name)
    # the same class again (e.g. its module reloaded) replaces itself; any other class may not take the name
    if old is not None and old is not config_cls and (old.__module__, old.__qualname__) != (
            config_cls.__module__, config_cls.__qualname__):
        raise ValueError(f"register_format: format {name!r} is already registered by "
                         f"{old.__module__}.{old.__qualname__}")
    _FORMATS[name] = config_cls
    return config_cls


def get_format(name: str) -> type[QuantConfig]:
    """The config class registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"quantization format {name!r} is not one of {sorted(_FORMATS)}") from None


def format_names() -> tuple[str, ...]:
    """Registered format names, in registration order."""
    return tuple(_FORMATS)


def config_from_dict(data: Mapping[str, Any]) -> QuantConfig:
    """Build a config from ``{"format": name, **fields}`` (the inverse of ``QuantConfig.to_dict``).

    Raises:
        ValueError: unknown format or field (the message lists the allowed ones).
    """
    data = dict(data)
    fmt = data.pop("format", None)
    cls = get_format(fmt)
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for format {fmt!r}; allowed: {sorted(allowed)}")
    return cls(**data)


# --------------------------------------------------------------------------------------------------
# Format specs
# --------------------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A spec option's value: ``true``/``false``/``none``, then JSON (numbers, lists), else the text itself."""
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """A parsed format spec: the format name and the options the spec wrote out (defaults not filled in).

    Attributes:
        format: the registered format name.
        options: the config fields the spec sets, ``compute_dtype`` excluded.
        compute_dtype: the spec's ``compute_dtype`` (``None``: not given).
    """

    format: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    compute_dtype: str | None = None

    def config(self, compute_dtype: str | None = None) -> QuantConfig:
        """The config (``compute_dtype``: used when the spec gives none)."""
        return config_from_dict({"format": self.format, **self.options,
                                 "compute_dtype": self.compute_dtype or compute_dtype})

    @property
    def needs_calibration(self) -> bool:
        return get_format(self.format).needs_calibration


def _alias(name: str) -> tuple[str, dict[str, Any]] | None:
    for fmt, cls in _FORMATS.items():
        if name in cls.spec_aliases:
            return fmt, dict(cls.spec_aliases[name])
    return None


def parse_format_spec(spec: str) -> FormatSpec:
    """``"name[:key=value,...]"`` → :class:`FormatSpec`, e.g. ``"nf4:double_quant=true"``,
    ``"rtn:bits=4,group_size=128"``, ``"gptq:bits=3,desc_act=true"``. Names are case-insensitive and
    ``-``/``_`` are the same; a format's ``spec_aliases`` add short names (``nf4-dq``).

    Raises:
        ValueError: unknown format or field, malformed option, invalid value (the config's own check).
    """
    name, _, rest = str(spec).partition(":")
    name = name.strip().lower().replace("-", "_")
    options: dict[str, Any] = {}
    alias = _alias(name)
    if alias is not None:
        name, options = alias
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"format spec {spec!r}: option {item!r} is not key=value")
        options[key.strip().replace("-", "_")] = parse_value(value.strip())
    options.pop("quant_method", None)
    compute = options.pop("compute_dtype", None)
    parsed = FormatSpec(name, options, compute)
    parsed.config()  # validate now (ValueError names the bad format, field or value)
    return parsed
