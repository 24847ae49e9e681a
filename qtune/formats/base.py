"""Shared pieces of every quantization format: the config base class and input validation.

A format module (``nf4.py``, ``int8.py``, ``gptq.py``...) holds a frozen config dataclass and the
pure-PyTorch reference ``quantize``/``dequantize`` functions. The reference is the specification:
Triton kernels and any faster path must reproduce it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Mapping

import torch

from ..dtypes import FLOAT_DTYPES, dtype_name, parse_dtype  # noqa: F401  (re-exported)

def _is_auto(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


@dataclasses.dataclass(frozen=True)
class CliOption:
    """One config field offered as a ``qtune quantize`` flag (recipes and format specs use the field name).

    Attributes:
        field: the config field the flag sets.
        help: the flag's help text.
        flag: the flag (default ``--`` + the field with dashes).
        type: ``int``, ``float``, ``str`` or ``bool``.
        switch: for ``bool``: ``True`` gives a plain ``--flag`` (sets ``True``), ``False`` gives ``--flag``/``--no-flag``.
        choices: allowed values (argparse rejects others).
    Several formats may declare the same flag (``--bits``); their declarations must agree.
    """

    field: str
    help: str
    flag: str = ""
    type: type = int
    switch: bool = True
    choices: tuple = ()

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Base of every format config: static, hashable, JSON-serializable metadata.

    A format declares, once, on its config class (checked by :func:`qtune.formats.register_format`):

    - ``format``: the name used in recipes, format specs, ``--format`` and ``quantization_config``;
    - ``bits``: bits per stored weight code (a class attribute or a dataclass field);
    - ``needs_calibration``: quantizing needs calibration activations (GPTQ), so load-time quantization refuses it;
    - ``float_offset``: each group's offset is a stored float (``W = s·q + m``), not an integer zero point: layouts
      whose readers know only integer zeros (GPTQ, bitsandbytes) refuse it, and a group-constant update can be
      folded into the offsets exactly;
    - ``op_family``: the ``qtune::linear_<op_family>`` op family its layer computes with (a property where it
      depends on a field);
    - ``cli_options``: the fields offered as ``qtune quantize`` flags;
    - ``spec_aliases``: short spec names, e.g. ``{"nf4_dq": {"double_quant": True}}``.

    Everything else (the CLI, recipes, loaders, writers) asks the config or the registry.
    ``compute_dtype`` is the dtype the layer computes in (``None``: the dtype of the float weight;
    ``"auto"``: bf16 where the machine computes it natively, fp32 otherwise, decided when the layer is
    built, see :func:`qtune.hardware.auto_dtype`; the config keeps ``"auto"``, so a saved checkpoint
    chooses again on the machine that loads it).
    """

    format: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    float_offset: ClassVar[bool] = False
    op_family: ClassVar[str] = ""
    cli_options: ClassVar[tuple[CliOption, ...]] = ()
    spec_aliases: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        if not _is_auto(self.compute_dtype):
            parse_dtype(self.compute_dtype, what=f"{type(self).__name__}.compute_dtype")

    @property
    def torch_compute_dtype(self) -> torch.dtype | None:
        """``compute_dtype`` as a ``torch.dtype`` (``"auto"`` resolved for the default device)."""
        return self.resolve_compute_dtype()

    def resolve_compute_dtype(self, device: torch.device | str | None = None) -> torch.dtype | None:
        """``compute_dtype`` as a ``torch.dtype``, ``"auto"`` resolved for ``device`` (default: CUDA if
        available, else CPU)."""
        if _is_auto(self.compute_dtype):
            from ..hardware import auto_dtype
            return auto_dtype(device)[0]
        return parse_dtype(self.compute_dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def check_weight(weight: torch.Tensor, *, name: str = "weight") -> None:
    """Validate a float weight before quantization.

    Raises:
        TypeError: ``weight`` is not a floating-point tensor.
        ValueError: ``weight`` is not 2-D, is empty, or holds NaN/Inf (the message names ``name``).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point weight, got dtype {weight.dtype}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    # min and max propagate NaN and are ±Inf iff an element is: one fused pass, ~40x cheaper than
    # isfinite().all() on bf16 (which materializes a bool tensor)
    lo, hi = torch.aminmax(weight.detach())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        bad = (~torch.isfinite(weight)).nonzero()[0].tolist()
        raise ValueError(f"{name}: weight holds NaN/Inf (first at index {bad}, value {weight[bad[0], bad[1]].item()}); cannot quantize")
