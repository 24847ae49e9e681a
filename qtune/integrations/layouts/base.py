"""The layout record, its registry, and what the bitsandbytes/GPTQ translations share.

A *layout* is how a folder stores quantized layers: qtune's own (``quant_method: "qtune"``), transformers+
bitsandbytes, GPTQ v1. Each lives in one module of this package with its reader, writer and
``can_store(config)``, and registers a :class:`Layout` record; loading, saving, ``qtune quantize`` and
``qtune export`` ask the registry, never a layout's name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ...formats import QuantConfig
from ...formats.base import dtype_name, parse_dtype
from ...nn import QuantLinear
from ..safetensors_header import Headers, TensorReader


@dataclasses.dataclass(frozen=True)
class Layout:
    """One checkpoint layout.

    Attributes:
        name: the ``layout=`` / ``--layout`` value (``qtune``, ``bnb``, ``gptq``).
        quant_method: what ``config.json``'s ``quantization_config.quant_method`` says for this layout (``""``
            for a layout of files that are not Hugging Face folders, such as GGUF).
        holds: what the layout can hold, for messages (``"gptq/rtn layers"``).
        can_store: ``config -> bool``: can a layer with this config be written in this layout?
        detects: ``quantization_config dict -> bool``: is a folder with this config in this layout?
        read: ``(path, quantization_config, headers, dtype, kwargs, auto_class) -> model`` (``from_pretrained``
            kwargs; ``auto_class``: the transformers auto class to build, e.g. ``AutoModelForCausalLM``).
        write: ``(model, folder) -> None``: write the model's weights and ``config.json`` into ``folder``.
        refusal: ``config -> str | None``: why a config cannot be stored, beyond :attr:`holds` (optional).
        stored_config: ``config -> config``: the config a layer written with ``config`` reads back as (optional;
            e.g. bitsandbytes stores symmetric per-row int8 as LLM.int8).
        check_plan: ``(model, {layer: config}) -> None``: refuse, before any work, a plan the writer would
            refuse at the end (optional; e.g. GPTQ's whole groups). Raises ``ValueError`` naming the layer.
        describe: ``quantization_config dict -> str``: its settings in a few words, for model cards (optional).
        declares: ``quantization_config dict -> dict | None``: the qtune format a folder in this layout holds, as
            ``{"format": name, **fields}`` (or ``{"qtune": quantization_config}`` for qtune's own layout, whose
            config may differ per layer), read from ``config.json`` alone, without the weights; for the memory
            plan (optional: ``None`` when the layout cannot tell without reading the tensors).
        note: what loads a folder in this layout, for model cards (optional).
        claims_path: ``path -> bool``: a path in this layout that is not a Hugging Face folder (a GGUF file),
            read with ``read(path, {}, {}, ...)`` (optional).
        tokenizer: ``(path, **from_pretrained kwargs) -> tokenizer`` for the paths it claims (optional).
        stores_experts: the writer stores quantized fused experts (:class:`qtune.nn.QuantExperts`); a layout
            without it refuses a model or plan that has them, naming the module.
        float_offsets: the layout can carry a float offset per group (``W = s·q + m``, formats whose config says
            ``float_offset``, e.g. ``affine``). Layouts whose readers know only integer zero points (GPTQ's
            ``qzeros``, bitsandbytes' absmax) cannot, and refuse such formats saying so.
    """

    name: str
    quant_method: str
    holds: str
    can_store: Callable[[QuantConfig], bool]
    detects: Callable[[dict[str, Any]], bool]
    read: Callable[..., nn.Module]
    write: Callable[[nn.Module, Path], None]
    refusal: Callable[[QuantConfig], str | None] = lambda cfg: None
    stored_config: Callable[[QuantConfig], QuantConfig] = lambda cfg: cfg
    check_plan: Callable[[nn.Module, Mapping[str, QuantConfig]], None] = lambda model, plan: None
    describe: Callable[[dict[str, Any]], str] = lambda qc: ""
    declares: Callable[[dict[str, Any]], dict[str, Any] | None] = lambda qc: None
    note: str = ""
    claims_path: Callable[[Path], bool] = lambda path: False
    tokenizer: Callable[..., Any] | None = None
    stores_experts: bool = False
    float_offsets: bool = False

    def check_experts(self, names: list[str]) -> None:
        """Refuse quantized fused experts modules (``names``) when this layout cannot store them.

        Raises:
            ValueError: naming the first module.
        """
        if names and not self.stores_experts:
            raise ValueError(f"{names[0]}: the {self.name} layout cannot store quantized fused experts "
                             f"({len(names)} module(s)); use the qtune layout, or skip the experts")

    def check(self, cfg: QuantConfig) -> None:
        """Refuse a config this layout cannot store, before any work is done.

        Raises:
            ValueError: ``--layout <name> holds <what>, not <format>`` (or the layout's own reason).
        """
        if not self.can_store(cfg):
            if getattr(cfg, "float_offset", False) and not self.float_offsets:
                layouts = ", ".join(n for n, l in _LAYOUTS.items() if l.float_offsets and l.can_store(cfg))
                raise ValueError(f"--layout {self.name} cannot carry the float per-group offsets of {cfg.format} (its "
                                 f"readers know integer zero points only); use --layout {layouts or 'qtune'}")
            raise ValueError(self.refusal(cfg) or f"--layout {self.name} holds {self.holds}, not {cfg.format}")


_LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    """Add (or replace) a layout in the registry; returns it."""
    _LAYOUTS[layout.name] = layout
    return layout


def layout_names() -> tuple[str, ...]:
    """The registered layouts' names, in registration order."""
    return tuple(_LAYOUTS)


def get_layout(name: str) -> Layout:
    """The layout called ``name``.

    Raises:
        ValueError: no such layout (the message lists the registered ones).
    """
    if name not in _LAYOUTS:
        raise ValueError(f"layout={name!r} is not one of {', '.join(repr(n) for n in _LAYOUTS)}")
    return _LAYOUTS[name]


def detect_layout(qc: dict[str, Any], where: str = "config.json") -> Layout:
    """The layout of a folder whose ``config.json`` has ``quantization_config`` ``qc``.

    Raises:
        ValueError: no registered layout reads it (the message names the ``quant_method`` and the layouts).
    """
    for layout in _LAYOUTS.values():
        if layout.detects(qc):
            return layout
    methods = ", ".join(dict.fromkeys(l.quant_method for l in _LAYOUTS.values() if l.quant_method))
    raise ValueError(f"{where}: quant_method {str(qc.get('quant_method', ''))!r} is not supported ({methods})")


def layout_claiming(path: str | Path) -> Layout | None:
    """The layout that reads ``path`` as a file of its own (e.g. a ``.gguf`` file), or None."""
    return next((l for l in _LAYOUTS.values() if l.claims_path(Path(path))), None)


def storing_layouts(cfg: QuantConfig) -> tuple[str, ...]:
    """Names of the layouts that can store ``cfg``."""
    return tuple(n for n, l in _LAYOUTS.items() if l.can_store(cfg))


# ------------------------------------------------------------------------------------------------
# Reading folders
# ------------------------------------------------------------------------------------------------
def read_config_json(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict (``ValueError`` naming the file when absent or invalid)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{file}: not found ({path} is not a Hugging Face model folder)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data


def dims(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an ``nn.Linear``/``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    k, n = module.weight.shape  # Conv1D: [in, out]
    return int(n), int(k)


def _resolve_dtype(dtype: Any, config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return parse_dtype(cfg_dtype) if cfg_dtype is not None else torch.float32
    return parse_dtype(dtype)


# (headers, meta skeleton, qc) -> (qtune state dict of the quantized layers, {layer: format dict}, checkpoint keys used)
Translate = Callable[[Headers, nn.Module, dict[str, Any]], tuple[dict[str, Any], dict[str, dict], set[str]]]


def translated_reader(translate: Translate) -> Callable[..., nn.Module]:
    """The ``read`` of a foreign layout: :func:`read_translated` with the layout's ``translate``."""
    return functools.partial(read_translated, translate=translate)


def read_translated(path: Path, qc: dict[str, Any], headers: Headers, *, translate: Translate, dtype: Any,
                    kwargs: dict[str, Any], auto_class: Any) -> nn.Module:
    """Load a foreign layout through ``from_pretrained`` with a translated, lazily read state dict (the
    checkpoint's other tensors are passed through under their own names).

    Args:
        translate: see :data:`Translate`.
        kwargs: ``from_pretrained`` arguments (``trust_remote_code`` included).
        auto_class: the transformers auto class whose model the folder holds (``AutoModelForCausalLM``...).
    """
    from transformers import AutoConfig, GenerationConfig

    from ..transformers import QTuneConfig

    trust_remote_code = kwargs.get("trust_remote_code", False)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    del hf_config.quantization_config
    torch_dtype = _resolve_dtype(dtype, hf_config)
    with torch.device("meta"):
        skeleton = auto_class.from_config(hf_config, trust_remote_code=trust_remote_code)
    state, layers, consumed = translate(headers, skeleton, qc)
    reader = TensorReader(headers)
    for key in headers:
        if key not in consumed:
            state[key] = reader.lazy(key)
    for d in layers.values():
        if d.get("compute_dtype") is None:
            d["compute_dtype"] = dtype_name(torch_dtype)
    first = next(iter(layers.values()))
    qconfig = QTuneConfig(first["format"], compute_dtype=first["compute_dtype"], layers=layers,
                          **{k: v for k, v in first.items() if k not in ("format", "compute_dtype")})
    hf_config.quantization_config = qconfig.to_dict()
    model_class = type(skeleton)
    del skeleton
    kwargs = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}
    model = model_class.from_pretrained(None, config=hf_config, state_dict=state, dtype=torch_dtype, **kwargs)
    model.name_or_path = str(path)
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """``{name: layer}`` of the model's ``QuantLinear`` layers."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of everything except the quantized layers, without tied duplicates."""
    quant = set(quantized_layers(model))
    tied = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    out = {}
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in quant or key in tied:
            continue
        out[key] = t.detach().contiguous()
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_translated(model: nn.Module, folder: Path, tensors: dict[str, torch.Tensor],
                     quantization_config: dict[str, Any]) -> None:
    """Write a foreign layout: ``model.safetensors``, ``config.json`` with ``quantization_config``, and the
    generation config."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    cfg["quantization_config"] = quantization_config
    write_json(folder / "config.json", cfg)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        with contextlib.suppress(Exception):
            gen.save_pretrained(folder)


def unique(values: set, what: str) -> Any:
    """The one value all layers share for a layout-wide setting.

    Raises:
        ValueError: the layers disagree.
    """
    if len(values) != 1:
        raise ValueError(f"{what}: the layers disagree ({sorted(map(str, values))}); this layout needs one setting")
    return next(iter(values))


__all__ = ["Layout", "register_layout", "get_layout", "layout_names", "detect_layout", "layout_claiming", "storing_layouts",
           "read_config_json", "dims", "read_translated", "translated_reader", "quantized_layers", "float_state_dict",
           "write_json", "write_translated", "unique"]
