"""qtune as a transformers quantization method: ``QTuneConfig`` and its ``HfQuantizer``.

After ``import qtune`` (or ``import qtune.integrations``)::

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=QTuneConfig(format="nf4", double_quant=True, compute_dtype="bfloat16"))
    model.save_pretrained(out)                     # qtune buffers + quantization_config {"quant_method": "qtune"}
    model = AutoModelForCausalLM.from_pretrained(out)   # restored without re-quantizing, identical logits

How loading works (transformers 5 ``core_model_loading``):

* **Quantize on load** (the checkpoint holds float weights). The skeleton is built on the meta device and
  left untouched; :meth:`QTuneHfQuantizer.param_needs_quantization` claims the ``<layer>.weight`` of every
  linear layer the plan quantizes, so transformers reads that one tensor (cast to ``dtype``, on its
  ``device_map`` device) and hands it to :class:`QTuneQuantize`, which quantizes it and swaps the
  float layer for the ``QuantLinear``. Loading is sequential in this mode, so peak memory is the
  quantized model plus one float tensor.
* **Pre-quantized** (``quantization_config.quant_method == "qtune"`` in ``config.json``). The plan's
  layers are replaced by meta ``QuantLinear`` modules whose buffers carry the checkpoint's names, shapes
  and dtypes, so the packed tensors load like any other tensor. Before anything is read the safetensors
  headers are checked against the plan (missing key, wrong shape or integer dtype: ``ValueError`` naming
  the file, key and layer).

Which layers are quantized (the *plan*): every ``nn.Linear``/``Conv1D`` except ``skip_modules`` (default
``["lm_head"]`` plus the model's output embeddings), modules whose weights are tied (they cannot be
packed) and ``_keep_in_fp32_modules``; ``overrides`` maps name patterns (see
:func:`qtune.nn.name_matches`) to another format or ``None`` (skip). A config with an explicit ``layers``
map (written by :func:`mark_quantized`, the calibration CLI and the bitsandbytes/GPTQ importers) uses
exactly that map instead.

Flags set on the loaded model (read by peft's ``prepare_model_for_kbit_training``, trl and the
transformers Trainer): ``is_quantized = True``, ``quantization_method = "qtune"``, ``hf_quantizer``
(trainable, serializable), ``is_loaded_in_4bit`` when any layer stores ≤ 4 bits per weight and
``is_loaded_in_8bit`` when any layer stores 8 bits. Packed tensors are buffers (never parameters), so
``num_parameters()`` counts only the float parameters, and peft's fp32 upcast never touches them.
``get_memory_footprint()`` is the byte count of every parameter and buffer, i.e. the packed bytes.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, Mapping

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..formats import FormatSpec, QuantConfig, config_from_dict, parse_format_spec
from ..formats.base import dtype_name
from ..hardware import auto_compute_dtype
from ..nn import LayerPlan, QuantLinear, is_conv1d, layer_class_for, plan_layers, set_submodule
from ..nn.experts import QuantExperts
from ..nn.replace import DEFAULT_SKIP, unquantizable_modules  # noqa: F401  (re-exported)
from .safetensors_header import SAFETENSORS_DTYPES, headers_by_key, read_safetensors_header  # noqa: F401  (re-exported)

QUANT_METHOD = "qtune"


def _format_dict(value: Any, what: str) -> dict[str, Any] | None:
    """Normalize a per-layer format spec (``QuantConfig``, ``"nf4"``, ``{"format": ...}`` or ``None``) to a dict."""
    if value is None:
        return None
    if isinstance(value, QuantConfig):
        return value.to_dict()
    if isinstance(value, str):
        value = {"format": value}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what}: expected a QuantConfig, a format name, a dict or None, got {type(value).__name__}")
    data = dict(value)
    config_from_dict(data)  # validates (ValueError names the bad format/field)
    return data


class QTuneConfig(QuantizationConfigMixin):
    """transformers quantization config for qtune (``quant_method: "qtune"``).

    Args:
        format: default format, one of ``qtune.CONFIGS`` (``nf4``, ``fp4``, ``int8``, ``llm_int8``, ``rtn``,
            ``gptq``). ``gptq`` needs calibration: quantize with ``qtune quantize``/
            :func:`qtune.calibration.gptq_quantize_model`; as a loading config it only reloads saved models.
        compute_dtype: dtype of the quantized matmuls (``"bfloat16"``...); ``"auto"`` (default): bf16 where
            the machine computes it natively, fp32 otherwise (:func:`qtune.hardware.auto_dtype`, decided when
            the layers are built, so a saved ``"auto"`` chooses again on the loading machine); ``None``: the
            model's dtype.
        skip_modules: name patterns kept in full precision. ``None`` means ``["lm_head"]`` plus the model's
            output embeddings. Tied modules and ``_keep_in_fp32_modules`` are always skipped.
        overrides: ``{pattern: format}`` per-module formats (a ``QuantConfig``, a format name, a dict
            ``{"format": ..., **fields}`` or ``None`` to skip); the last matching pattern wins.
        layers: explicit ``{module name: format dict}``; when given it replaces format/skip/overrides.
        **options: fields of the default format's config (``double_quant``, ``blocksize``, ``bits``,
            ``group_size``, ``sym``, ``desc_act``, ``threshold``, ``symmetric``...).

    Raises:
        ValueError/TypeError: unknown format or field, or a bad override (the message names it).
    """

    def __init__(self, format: str = "nf4", *, compute_dtype: str | torch.dtype | None = "auto",
                 skip_modules: list[str] | tuple[str, ...] | None = None,
                 overrides: Mapping[str, Any] | None = None,
                 layers: Mapping[str, Mapping[str, Any]] | None = None, **options: Any) -> None:
        options.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        if isinstance(compute_dtype, torch.dtype):
            compute_dtype = dtype_name(compute_dtype)
        self.format = format
        self.compute_dtype = compute_dtype
        self.options = dict(options)
        self.skip_modules = None if skip_modules is None else [str(s) for s in skip_modules]
        self.overrides = {str(p): _format_dict(v, f"QTuneConfig.overrides[{p!r}]") for p, v in (overrides or {}).items()}
        self.layers = None if layers is None else {str(n): _format_dict(v, f"QTuneConfig.layers[{n!r}]")
                                                    for n, v in layers.items()}
        self.default_config()  # validate now, not at load time

    # -- (de)serialization ------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: str | FormatSpec) -> "QTuneConfig":
        """A loading config from a format spec (``"nf4:double_quant=true"``, see
        :func:`qtune.formats.parse_format_spec`): that format for every layer, default skips.

        Raises:
            ValueError: unknown format or field, malformed option.
        """
        if not isinstance(spec, FormatSpec):
            spec = parse_format_spec(spec)
        return cls(spec.format, compute_dtype=spec.compute_dtype, **spec.options)

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        config = cls(**dict(config_dict))
        unused = {k: v for k, v in kwargs.items() if not hasattr(config, k)}
        for k, v in kwargs.items():
            if hasattr(config, k):
                setattr(config, k, v)
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": QUANT_METHOD, "format": self.format, **copy.deepcopy(self.options),
                               "compute_dtype": self.compute_dtype, "skip_modules": copy.deepcopy(self.skip_modules),
                               "overrides": copy.deepcopy(self.overrides)}
        if self.layers is not None:
            out["layers"] = copy.deepcopy(self.layers)
        return out

    def __iter__(self):
        yield from self.to_dict().items()

    # -- configs --------------------------------------------------------------------------------
    def _with_compute_dtype(self, data: dict[str, Any]) -> QuantConfig:
        data = dict(data)
        if data.get("compute_dtype") is None and self.compute_dtype is not None:
            data["compute_dtype"] = self.compute_dtype
        return config_from_dict(data)

    def default_config(self) -> QuantConfig:
        """The qtune config of the default format (with ``compute_dtype``)."""
        return self._with_compute_dtype({"format": self.format, **self.options})

    def override_configs(self) -> dict[str, QuantConfig | None]:
        return {p: None if d is None else self._with_compute_dtype(d) for p, d in self.overrides.items()}

    def layer_plan(self, model: nn.Module) -> LayerPlan:
        """The :class:`~qtune.nn.LayerPlan` of ``model`` (which may live on meta): the explicit ``layers`` map
        when there is one, else the default format minus ``skip_modules`` (``None``: ``lm_head`` and the
        output embeddings), tied and fp32-pinned modules, with ``overrides``.

        Raises:
            ValueError: an explicit ``layers`` entry names no linear layer of the model.
        """
        if self.layers is not None:
            return plan_layers(model, None, layers={n: None if d is None else self._with_compute_dtype(d)
                                                    for n, d in self.layers.items()})
        return plan_layers(model, self.default_config(), skip_modules=self.skip_modules,
                           overrides=self.override_configs())

    def plan(self, model: nn.Module, always_skip: tuple[str, ...] = ()) -> dict[str, QuantConfig]:
        """Deprecated: :meth:`layer_plan` (``always_skip`` is computed there). ``{module name: QuantConfig}``."""
        warnings.warn("QTuneConfig.plan(model, always_skip) is deprecated: use QTuneConfig.layer_plan(model)",
                      DeprecationWarning, stacklevel=2)
        if self.layers is not None:
            return dict(self.layer_plan(model))
        skip = tuple(self.skip_modules if self.skip_modules is not None else DEFAULT_SKIP) + tuple(always_skip)
        return dict(plan_layers(model, self.default_config(), skip_modules=skip, overrides=self.override_configs(),
                                model_skips=False))


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _resolve_auto(cfg: QuantConfig, float_dtype: torch.dtype, device: torch.device | str) -> QuantConfig:
    if isinstance(cfg.compute_dtype, str) and cfg.compute_dtype.strip().lower() == "auto":
        # "auto" next to a known model dtype: that dtype where this machine computes it natively, else fp32
        dev = None if torch.device(device).type == "meta" else device
        cfg = dataclasses.replace(cfg, compute_dtype=dtype_name(auto_compute_dtype(float_dtype, dev)[0]))
    return cfg


def meta_layer(old: nn.Module, cfg: QuantConfig, *, model_dtype: torch.dtype, device: torch.device | str = "meta") -> QuantLinear:
    """An empty ``QuantLinear`` replacing ``old`` (``nn.Linear``/``Conv1D``), buffers on ``device``."""
    conv1d = is_conv1d(old)
    if conv1d:
        in_features, out_features = old.weight.shape
    else:
        in_features, out_features = old.in_features, old.out_features
    w = getattr(old, "weight", None)
    float_dtype = w.dtype if w is not None and w.is_floating_point() else model_dtype
    cfg = _resolve_auto(cfg, float_dtype, device)
    compute = cfg.torch_compute_dtype or float_dtype
    # transformers builds the skeleton under a `torch.device("meta")` context; the format modules cache
    # their code tables on first use, which must not happen on meta (the buffers themselves get `device`)
    with torch.device("cpu"):
        layer = layer_class_for(cfg)(in_features, out_features, old.bias is not None, cfg, compute_dtype=compute,
                                     device=device)
    layer.from_conv1d = conv1d
    return layer


def meta_experts(old: nn.Module, cfg: QuantConfig, *, model_dtype: torch.dtype,
                 device: torch.device | str = "meta", name: str = "") -> QuantExperts:
    """An empty :class:`~qtune.nn.experts.QuantExperts` replacing the fused experts module ``old``, its stacked
    buffers on ``device`` (the float module's biases, activation and norm are kept as they are)."""
    w = old._parameters.get("down_proj")
    float_dtype = w.dtype if w is not None and w.is_floating_point() else model_dtype
    cfg = _resolve_auto(cfg, float_dtype, device)
    with torch.device("cpu"):  # see meta_layer
        return QuantExperts(old, cfg, device=device, name=name)


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module, QuantConfig]]:
    """``(name, module, qtune config)`` of every ``QuantLinear`` and ``QuantExperts`` of ``model``."""
    out = []
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out.append((n, m, m.config))
        elif isinstance(m, QuantExperts):
            out.append((n, m, m.quant_config))
    return out


def set_quantized_flags(model: nn.Module) -> None:
    """Set ``is_quantized``, ``quantization_method`` and ``is_loaded_in_4bit``/``_8bit`` from the layers."""
    bits = {int(c.bits) for _, _, c in quantized_modules(model)}
    if any(isinstance(m, QuantExperts) for m in model.modules()):
        # transformers' save_pretrained would map the fused expert tensors back to the checkpoint's original
        # per-expert names (its reverse weight conversion), which cannot split packed stacks: qtune saves the
        # model's own state-dict names, which transformers 5 loads as they are (the export's
        # strip_quantization gives the conversions back to a dequantized model)
        if "_qtune_weight_conversions" not in vars(model):
            model._qtune_weight_conversions = vars(model).get("_weight_conversions")
        model._weight_conversions = []
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.is_loaded_in_4bit = any(b <= 4 for b in bits)
    model.is_loaded_in_8bit = any(b > 4 for b in bits)


def finalize_layers(model: nn.Module) -> None:
    """Freeze quantized layers' biases in their compute dtype (and the biases of quantized experts, in their own)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m.bias is not None and m.bias.device.type != "meta":
                m.bias = nn.Parameter(m.bias.detach().to(m.compute_dtype), requires_grad=False)
        elif isinstance(m, QuantExperts):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


def check_layers_against_checkpoint(model: nn.Module, layer_names: list[str], headers: dict[str, tuple[str, dict]]) -> None:
    """Every buffer of the (meta) ``QuantLinear`` layers must be in the checkpoint with its shape and dtype.

    Raises:
        ValueError: naming the layer, key and file of the first disagreement.
    """
    if not headers:
        return
    prefix = getattr(model, "base_model_prefix", "")
    for name in layer_names:
        layer = model.get_submodule(name)
        experts = isinstance(layer, QuantExperts)
        qconfig = layer.quant_config if experts else layer.config
        for bname, buf in layer.named_buffers(recurse=experts):
            key = f"{name}.{bname}"
            candidates = [key]
            if prefix:
                candidates += [key.removeprefix(prefix + "."), f"{prefix}.{key}"]
            found = next((c for c in candidates if c in headers), None)
            if found is None:
                raise ValueError(f"layer {name} ({qconfig.format}): tensor {key!r} is missing from the checkpoint "
                                 "(quantization_config disagrees with the tensors)")
            file, entry = headers[found]
            shape = tuple(int(s) for s in entry["shape"])
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if shape != tuple(buf.shape):
                raise ValueError(f"{file}: key {found!r} has shape {list(shape)}, but layer {name} "
                                 f"({qconfig.to_json()}) expects {list(buf.shape)} "
                                 "(quantization_config disagrees with the tensors)")
            if dtype is None or (dtype != buf.dtype and not (dtype.is_floating_point and buf.dtype.is_floating_point)):
                raise ValueError(f"{file}: key {found!r} has dtype {entry['dtype']}, but layer {name} expects "
                                 f"{buf.dtype} (quantization_config disagrees with the tensors)")


# ------------------------------------------------------------------------------------------------
# The quantizer
# ------------------------------------------------------------------------------------------------
def _skip_parent_init(model: nn.Module, names) -> None:
    """Mark the parents of quantized layers as initialized when they own no tensors themselves.

    Some ``_init_weights`` reach into children (GPT-2 re-initializes ``attn.c_proj.weight`` from
    ``GPT2Attention``); a ``LinearGPTQ`` has no ``weight`` and a packed weight must never be re-drawn.
    """
    for name in names:
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else None
        if parent is not None and not any(True for _ in parent.parameters(recurse=False)) \
                and not any(True for _ in parent.buffers(recurse=False)):
            parent._is_hf_initialized = True


#: the reasons quantize-on-load failed during the current ``qtune.load_model`` (transformers copies the
#: quantization config and converts in loader threads, so the record is kept here; one load at a time per process)
CONVERSION_ERRORS: list[str] = []


class QTuneQuantize(ConversionOps):
    """Quantize-on-load op: one float ``<layer>.weight`` in, the layer swapped for its ``QuantLinear``."""

    def __init__(self, hf_quantizer: "QTuneHfQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None, full_layer_name: str | None = None,
                missing_keys: set[str] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        try:
            return self._convert(input_dict, model, missing_keys)
        except ValueError as e:
            # transformers turns this into a generic RuntimeError and logs the reason in its load report;
            # qtune.load_model raises the first reason itself, as one line
            CONVERSION_ERRORS.append(str(e))
            raise

    def _convert(self, input_dict: dict[str, Any], model: nn.Module | None,
                 missing_keys: set[str] | None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module_name, _, param = key.rpartition(".")
            if module_name in self.hf_quantizer.experts_configs:
                self._convert_experts(model, module_name, param, key, value, missing_keys)
                continue
            module_name = key.removesuffix(".weight")
            cfg = self.hf_quantizer.plan_configs.get(module_name)
            if cfg is None:  # not ours (should not happen): pass through
                out[key] = value
                continue
            old = model.get_submodule(module_name)
            layer = meta_layer(old, cfg, model_dtype=value.dtype, device=value.device)
            weight = value.t() if layer.from_conv1d else value
            layer.quantize_(weight, name=module_name)
            bias = old.bias
            if bias is not None and bias.device.type != "meta":  # the bias was read before the weight
                layer.bias = nn.Parameter(bias.detach().to(device=value.device, dtype=layer.compute_dtype),
                                          requires_grad=False)
            layer._is_hf_initialized = True
            for t in layer.buffers(recurse=False):
                t._is_hf_initialized = True
            set_submodule(model, module_name, layer)
            if missing_keys is not None:
                missing_keys.discard(key)
            del value, weight
        return out

    def _convert_experts(self, model: nn.Module, module_name: str, param: str, key: str, value: torch.Tensor,
                         missing_keys: set[str] | None) -> None:
        """Quantize one fused expert weight (``gate_up_proj``/``up_proj``/``down_proj`` [E, ...], already merged
        from per-expert checkpoint tensors by transformers' conversion) into its ``QuantExperts``."""
        module = model.get_submodule(module_name)
        if not isinstance(module, QuantExperts):
            cfg = self.hf_quantizer.experts_configs[module_name]
            module = meta_experts(module, cfg, model_dtype=value.dtype, device=value.device, name=module_name)
            module._is_hf_initialized = True
            set_submodule(model, module_name, module)
        stack = module._modules[param]
        stack.quantize_(value, name=key)
        for t in stack.buffers():
            t._is_hf_initialized = True
        self.hf_quantizer.experts_loaded.add(key)
        if missing_keys is not None:
            missing_keys.discard(key)


def _experts_weight(module: nn.Module, param: str) -> bool:
    from ..nn.experts import is_fused_experts
    return is_fused_experts(module) and param in ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")


class QTuneHfQuantizer(HfQuantizer):
    """transformers ``HfQuantizer`` for :class:`QTuneConfig` (see the module docstring)."""

    requires_calibration = False
    quantization_config: QTuneConfig

    def __init__(self, quantization_config: QTuneConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.plan_configs: dict[str, QuantConfig] = {}
        self.experts_configs: dict[str, QuantConfig] = {}  # fused experts modules (quantize-on-load and reload)
        self.experts_loaded: set[str] = set()  # "<experts>.<weight>" quantized on load

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("qtune: disk offload (device_map value 'disk') is not supported for quantized layers")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def _experts_config(self, model: nn.Module, param_name: str) -> QuantConfig | None:
        """The config of a fused expert weight ``<experts>.<gate_up_proj|up_proj|down_proj>`` of the plan."""
        module_name, _, param = param_name.rpartition(".")
        cfg = self.experts_configs.get(module_name)
        if cfg is None:
            return None
        module = model.get_submodule(module_name)
        if isinstance(module, QuantExperts):
            return cfg if param in module.weight_names else None
        return cfg if _experts_weight(module, param) else None

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        if self._experts_config(model, param_name) is not None:
            return True
        if not param_name.endswith(".weight"):
            return False
        return param_name.removesuffix(".weight") in self.plan_configs

    def param_element_size(self, model: nn.Module, param_name: str, param: torch.Tensor) -> float:
        cfg = self.plan_configs.get(param_name.removesuffix(".weight")) if param_name.endswith(".weight") else None
        cfg = cfg or self._experts_config(model, param_name)
        if cfg is not None:
            return cfg.bits / 8
        return param.element_size()

    def get_quantize_ops(self) -> QTuneQuantize:
        return QTuneQuantize(self)

    def _process_model_before_weight_loading(self, model: nn.Module, device_map: Any = None,
                                             checkpoint_files: list[str] | None = None, **kwargs: Any) -> None:
        cfg = self.quantization_config
        plan = cfg.layer_plan(model)
        headers = headers_by_key(checkpoint_files)  # also rejects corrupt/truncated files before loading
        _skip_parent_init(model, plan)
        self.experts_configs = dict(plan.experts)
        if not self.pre_quantized:
            needs_calibration = sorted([n for n, c in plan.items() if c.needs_calibration]
                                       + [n for n, c in plan.experts.items() if c.needs_calibration])
            if needs_calibration:
                fmt = {**plan.configs, **plan.experts}[needs_calibration[0]].format
                raise ValueError(f"format {fmt!r} needs calibration data (layer {needs_calibration[0]}): quantize with "
                                 f"`qtune quantize MODEL --format {fmt} --calibration FILE` or "
                                 "qtune.calibration.gptq_quantize_model(), or use format='rtn' for round-to-nearest")
            self.plan_configs = plan
            return
        dtype = _model_dtype(model)
        for name, c in plan.items():
            set_submodule(model, name, meta_layer(model.get_submodule(name), c, model_dtype=dtype))
        for name, c in plan.experts.items():
            set_submodule(model, name, meta_experts(model.get_submodule(name), c, model_dtype=dtype, name=name))
        self.plan_configs = plan
        check_layers_against_checkpoint(model, list(plan) + list(plan.experts), headers)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        not_done = [n for n in self.plan_configs if not isinstance(model.get_submodule(n), QuantLinear)]
        not_done += [n for n in self.experts_configs if not isinstance(model.get_submodule(n), QuantExperts)]
        if not_done:
            raise ValueError(f"qtune: layer {not_done[0]} was not quantized: its weight was not found in the checkpoint")
        if not self.pre_quantized:
            for name in self.experts_configs:
                missing = [f"{name}.{w}" for w in model.get_submodule(name).weight_names
                           if f"{name}.{w}" not in self.experts_loaded]
                if missing:
                    raise ValueError(f"qtune: experts tensor {missing[0]} was not found in the checkpoint")
        for name in [*self.plan_configs, *self.experts_configs]:
            layer = model.get_submodule(name)
            recurse = isinstance(layer, QuantExperts)
            meta = [b for b, t in layer.named_buffers(recurse=recurse) if t.device.type == "meta"]
            if meta:
                raise ValueError(f"qtune: layer {name}: tensor {name}.{meta[0]} was not loaded from the checkpoint")
        finalize_layers(model)
        set_quantized_flags(model)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        from ..nn import dequantize_model
        return dequantize_model(model, dtype=dtype)


def _register() -> None:
    # idempotent: a re-import (e.g. importlib.reload in tests) must not raise "already registered"
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not QTuneConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(QTuneConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not QTuneHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(QTuneHfQuantizer)


_register()


def layers_config(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: config dict}`` of the model's ``QuantLinear`` layers and ``QuantExperts`` modules (for an explicit
    ``QTuneConfig.layers``)."""
    return {n: c.to_dict() for n, _, c in quantized_modules(model)}


def mark_quantized(model: nn.Module, config: QTuneConfig | None = None) -> QTuneConfig:
    """Make a model quantized outside ``from_pretrained`` (``qtune.quantize_model``, calibration) look
    like a transformers-loaded qtune model, so ``save_pretrained`` writes a reloadable checkpoint.

    Sets ``config.quantization_config`` (with an explicit ``layers`` map), ``hf_quantizer`` and the flags.

    Returns:
        The ``QTuneConfig`` attached to the model.
    """
    layers = layers_config(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no qtune QuantLinear layers to mark as quantized")
    if config is None:
        first = next(iter(layers.values()))
        fields = {k: v for k, v in first.items() if k not in ("format", "compute_dtype")}
        config = QTuneConfig(first["format"], compute_dtype=first.get("compute_dtype"), layers=layers, **fields)
    else:
        config = copy.deepcopy(config)
        config.layers = layers
    finalize_layers(model)
    quantizer = QTuneHfQuantizer(config, pre_quantized=True)
    configs = {n: config_from_dict(d) for n, d in layers.items()}
    quantizer.plan_configs = {n: c for n, c in configs.items() if not isinstance(model.get_submodule(n), QuantExperts)}
    quantizer.experts_configs = {n: c for n, c in configs.items() if n not in quantizer.plan_configs}
    model.hf_quantizer = quantizer
    if hasattr(model, "config"):
        model.config.quantization_config = config
    set_quantized_flags(model)
    return config


__all__ = ["QTuneConfig", "QTuneHfQuantizer", "QTuneQuantize", "QUANT_METHOD", "mark_quantized", "layers_config",
           "read_safetensors_header", "headers_by_key", "unquantizable_modules", "set_quantized_flags", "meta_experts",
           "quantized_modules"]
