"""Training recipes: YAML data with sections ``model``, ``quantization``, ``lora``, ``dataset``,
``training`` and ``output``, a ``task`` (``sft`` by default; see :mod:`qtune.train.tasks`) and that
task's own section (``dpo:``, ``grpo:``, ...), validated before anything is loaded.

A recipe is plain data (torchtune's recipe/config split): this module reads it with the line of every
key, applies ``section.key=value`` overrides from the command line, fills defaults and checks every
key and value. A mistake raises :class:`RecipeError`, whose message names the file and line, the
bad key and its allowed values, e.g.::

    recipes/x.yaml:12: lora.bias: 'some' is not one of 'none', 'all', 'lora_only'

The ``training`` section holds keyword arguments of the task's trl config (``trl.SFTConfig`` for
``sft``, ``trl.DPOConfig`` for ``dpo``, ...; names, declared choices and simple types are checked here,
the rest when the config is built); the task's section holds that config's task-specific fields
(``dpo.beta``, ``grpo.num_generations``) and qtune's task keys (``grpo.reward``, ``distill.teacher``).
``output_dir`` and ``report_to`` come from the ``output`` section.

``model.dtype: auto`` and ``quantization.compute_dtype: auto`` are resolved when a run starts
(:meth:`Recipe.resolve_dtypes`, from the hardware the run uses: bf16 where it is native, else fp32).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..formats import CONFIGS, FP4Config, LLMInt8Config, NF4Config, get_format
from ..sources import PREFIX as ASSET_PREFIX  # noqa: F401  (bundled models and texts: qtune:<name>)
from .options import NONE, Opt
from .options import REQUIRED as _REQUIRED

SECTIONS = ("model", "quantization", "lora", "dataset", "training", "output")
TASK_KEY = "task"
DTYPES = ("float32", "bfloat16", "float16")
AUTO = "auto"
RECIPE_ONLY_FORMATS = ("pretrained", "none")  # no quantization while loading: already quantized, or float
# the formats transformers + bitsandbytes computes itself (quantization.backend: bitsandbytes)
BNB_BACKEND_CONFIGS = (NF4Config, FP4Config, LLMInt8Config)


def quant_formats() -> tuple[str, ...]:
    """What ``quantization.format`` accepts: every registered format (asked when a recipe is validated, so a
    format registered after import works too), then ``pretrained`` and ``none``."""
    return tuple(CONFIGS) + RECIPE_ONLY_FORMATS


class RecipeError(ValueError):
    """A recipe mistake, located: ``file:line: key: message``."""

    def __init__(self, message: str, *, key: str = "", where: str = "") -> None:
        self.key, self.where, self.reason = key, where, message
        text = message if not key else f"{key}: {message}"
        super().__init__(f"{where}: {text}" if where else text)


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v!r}"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v!r}"


def _probability(v: Any) -> str | None:
    return None if 0 <= v < 1 else f"must be in [0, 1), got {v!r}"


def _str_list(v: Any) -> str | None:
    if isinstance(v, list) and not all(isinstance(s, str) for s in v):
        return f"must be a list of strings, got {v!r}"
    return None


NUMBER = (int, float)

MODEL = {
    "path": Opt((str,), doc="local folder, a .gguf file (with quantization.format: pretrained), Hugging Face "
                            "Hub id, or qtune:smollm2-135m-instruct (bundled demo model)"),
    "tokenizer": Opt((str, NONE), None, doc="tokenizer folder/id (default: model.path)"),
    "dtype": Opt((str,), "bfloat16", (AUTO,) + DTYPES,
                 doc="dtype of the float parameters (embeddings, norms, head); auto: bf16 where the hardware has "
                     "native bf16, else fp32"),
    "attn_implementation": Opt((str, NONE), None, (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3")),
    "trust_remote_code": Opt((bool,), False),
    "revision": Opt((str, NONE), None),
    "adapter": Opt((str, NONE), None,
                   doc="start from a trained adapter (a qtune train run folder or a PEFT adapter folder), trainable; "
                       "its own LoRA settings apply"),
}

QUANTIZATION = {
    "format": Opt((str,), check=lambda v: None if v in quant_formats() else
                  f"{v!r} is not one of {_fmt_choices(quant_formats())}",
                  doc="qtune format to quantize the float checkpoint into while loading; 'pretrained': the "
                      "checkpoint is already quantized (qtune, bitsandbytes or GPTQ); 'none': no quantization"),
    "compute_dtype": Opt((str, NONE), None, (None, AUTO) + DTYPES),
    "skip_modules": Opt((list, NONE), None, check=_str_list, doc="name patterns kept in full precision"),
    "overrides": Opt((dict,), {}, doc="{name pattern: format name, {format: ..., fields}, or null}"),
    "calibration": Opt((dict, NONE), None, doc="gptq only: {source, samples, seq_len}"),
    "storage_dtype": Opt((str, NONE), None, (None,) + DTYPES,
                         doc="store the packed weights as frozen float parameters of this dtype (same bytes) so that "
                             "FSDP shards the quantized base too; use FSDP's parameter dtype (bitsandbytes' "
                             "bnb_4bit_quant_storage)"),
    "backend": Opt((str,), "qtune", ("qtune", "bitsandbytes"),
                   doc="bitsandbytes: load the same format with transformers+bitsandbytes and peft's own k-bit "
                       "preparation instead (nf4, fp4, llm_int8; for comparisons)"),
}

CALIBRATION = {
    "source": Opt((str,), doc="dataset source of the calibration text"),
    "samples": Opt((int,), 128, check=_positive),
    "seq_len": Opt((int,), 512, check=_positive),
}

LORA = {
    "r": Opt((int,), 16, check=_positive),
    "alpha": Opt(NUMBER, 32, check=_positive),
    "dropout": Opt(NUMBER, 0.05, check=_probability),
    "target_modules": Opt((str, list), "all-linear", check=_str_list),
    "use_rslora": Opt((bool,), False),
    "use_dora": Opt((bool,), False),
    "quantization_aware": Opt((bool,), False, doc="QA-LoRA (peft use_qalora): the adapter's input is pooled over "
                              "each quantization group of the base's layers, so its change merges exactly into "
                              "Q4_1/Q5_1 GGUF and affine layers (their float offsets); a targeted layer of any "
                              "other format is refused"),
    "experts": Opt((bool,), False, doc="LoRA on the fused MoE experts too (peft target_parameters, all expert "
                   "weights; needs dropout: 0)"),
    "bias": Opt((str,), "none", ("none", "all", "lora_only")),
    "init": Opt((str,), "default", ("default", "loftq"),
                doc="loftq: quantize the base and set the adapter together so that deq(Q) + s·BA ≈ W at step 0 "
                    "(LoftQ; needs a float model.path quantized while loading)"),
    "loftq_iters": Opt((int,), 1, check=_positive, doc="LoftQ's alternating quantize/SVD steps"),
    "modules_to_save": Opt((list, NONE), None, check=_str_list),
    "dtype": Opt((str,), "auto", ("auto",) + DTYPES,
                 doc="dtype of the trainable adapter weights; auto: what trl picks for a quantized base (bf16)"),
}

DATA_SOURCE = {
    "source": Opt((str,), doc="qtune:austen/<novel>, a local .txt/.json/.jsonl/.csv/.parquet file, or hf:<dataset id>"),
    "format": Opt((str,), "auto", ("auto", "text", "prompt_completion", "conversational")),
    "split": Opt((str,), "train"),
    "text_field": Opt((str,), "text"),
    "max_examples": Opt((int, NONE), None, check=lambda v: None if v is None else _positive(v)),
    "skip_examples": Opt((int,), 0, check=_non_negative),
    "chunk_chars": Opt((int,), 2000, check=_positive, doc="plain-text files: paragraphs joined up to this size"),
}

PERPLEXITY = {
    "source": Opt((str,), doc="held-out text (same source syntax as dataset.train.source)"),
    "max_tokens": Opt((int,), 4096, check=_positive),
    "window": Opt((int,), 512, check=_positive),
    "before": Opt((bool,), True, doc="also measure before training"),
}

DATASET = {
    "train": Opt((dict,), doc="training data"),
    "eval": Opt((dict, NONE), None, doc="evaluation data (eval loss)"),
    "perplexity": Opt((dict, NONE), None, doc="held-out perplexity before/after training"),
}

OUTPUT = {
    "dir": Opt((str,), doc="run folder: checkpoints, adapter, logs, loss curve, summary"),
    "overwrite": Opt((bool,), False, doc="allow a non-empty run folder without --resume"),
    "save_adapter": Opt((bool,), True),
    "merge": Opt((bool,), False, doc="also save the base with the adapter merged and re-quantized"),
    "plot": Opt((bool,), True),
    "report_to": Opt((str, list), "auto", check=_str_list, doc="auto: tensorboard when installed"),
}

SCHEMAS: dict[str, dict[str, Opt]] = {"model": MODEL, "quantization": QUANTIZATION, "lora": LORA,
                                      "dataset": DATASET, "output": OUTPUT}
SUBSCHEMAS: dict[tuple[str, str], dict[str, Opt]] = {
    ("dataset", "train"): DATA_SOURCE, ("dataset", "eval"): DATA_SOURCE, ("dataset", "perplexity"): PERPLEXITY,
    ("quantization", "calibration"): CALIBRATION,
}
# SFTConfig keys the recipe sets from elsewhere
TRAINING_RESERVED = {"output_dir": "output.dir", "report_to": "output.report_to"}


# ------------------------------------------------------------------------------------------------
# Reading YAML with line numbers
# ------------------------------------------------------------------------------------------------
def _load_with_lines(text: str, filename: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML; return the data and ``{key path: line}`` for every mapping key (1-based)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines: dict[tuple, int] = {}

        def walk(n: yaml.Node, path: tuple) -> None:
            if isinstance(n, yaml.MappingNode):
                seen = set()
                for key_node, value_node in n.value:
                    key = loader.construct_object(key_node, deep=True)
                    if key in seen:
                        raise RecipeError("duplicate key", key=".".join(map(str, path + (key,))),
                                          where=f"{filename}:{key_node.start_mark.line + 1}")
                    seen.add(key)
                    lines[path + (key,)] = key_node.start_mark.line + 1
                    walk(value_node, path + (key,))

        walk(node, ())
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark is not None else filename
        raise RecipeError(f"invalid YAML: {getattr(e, 'problem', None) or e}", where=where) from None
    finally:
        loader.dispose()
    return data, lines


# ------------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Recipe:
    """A validated recipe: every section with its defaults filled in.

    Attributes:
        model, quantization, lora, dataset, training, output: the sections (plain dicts).
        path: the YAML file (``None`` for a recipe built from a dict).
        overrides: the ``section.key=value`` strings applied on top of the file.
        task: the ``task:`` value (a key of :data:`qtune.train.tasks.TASKS`).
        task_options: the task's own section (``dpo:``, ``grpo:``, ...; empty for ``sft``).
    """

    model: dict[str, Any]
    quantization: dict[str, Any]
    lora: dict[str, Any]
    dataset: dict[str, Any]
    training: dict[str, Any]
    output: dict[str, Any]
    path: Path | None = None
    overrides: tuple[str, ...] = ()
    task: str = "sft"
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    origin: "_Ctx | None" = dataclasses.field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {TASK_KEY: self.task}
        out.update({s: getattr(self, s) for s in SECTIONS})
        if self.model.get("adapter") is not None:  # the adapter's own LoRA settings apply
            out["lora"] = {"dtype": self.lora["dtype"]}
        if self.task != "sft":
            out[self.task] = self.task_options
        return out

    def where(self, *path: str) -> str:
        """``file:line`` (or ``command line (...)``) of a key, for errors found after validation."""
        if self.origin is None:
            return str(self.path) if self.path else "<recipe>"
        return self.origin.where(tuple(path))

    def error(self, path: tuple[str, ...], message: str) -> "RecipeError":
        """A :class:`RecipeError` located at ``path`` (e.g. a dataset without the columns the task needs)."""
        return RecipeError(message, key=".".join(path), where=self.where(*path))

    def resolve_dtypes(self, device=None) -> list[str]:
        """Replace ``auto`` in ``model.dtype`` and ``quantization.compute_dtype`` by the dtype the hardware
        runs best (:func:`qtune.hardware.resolve_dtype`), in place.

        Returns:
            one line per resolved key, ``"model.dtype: auto -> float32 (reason)"``.
        """
        lines = []
        for section, key in (("model", "dtype"), ("quantization", "compute_dtype")):
            if getattr(self, section).get(key) != AUTO:
                continue
            from ..formats.base import dtype_name
            from ..hardware import resolve_dtype

            dtype, reason = resolve_dtype(AUTO, device)
            name = dtype_name(dtype) if dtype is not None else None
            getattr(self, section)[key] = name
            lines.append(f"{section}.{key}: auto -> {name}" + (f" ({reason})" if reason else ""))
        return lines

    def format_fields(self) -> dict[str, Any]:
        """The fields of the quantization format's config given in ``quantization`` (e.g. ``double_quant``)."""
        return {k: v for k, v in self.quantization.items() if k not in QUANTIZATION}

    @property
    def needs_calibration(self) -> bool:
        """Whether the base is quantized on calibration data here (``quantization.calibration``; GPTQ)."""
        fmt = self.quantization["format"]
        return fmt in CONFIGS and get_format(fmt).needs_calibration

    def quant_config(self):
        """The qtune ``QuantConfig`` of ``quantization`` (``None`` for ``pretrained``/``none``).

        Raises:
            ValueError: ``compute_dtype`` is still ``auto`` (call :meth:`resolve_dtypes` first).
        """
        q = self.quantization
        if q["format"] in ("pretrained", "none"):
            return None
        if q["compute_dtype"] == AUTO:
            raise ValueError("quantization.compute_dtype is 'auto': resolve it first (Recipe.resolve_dtypes)")
        from ..formats import config_from_dict
        return config_from_dict({"format": q["format"], "compute_dtype": q["compute_dtype"], **self.format_fields()})


class _Ctx:
    """Where each key came from, for error messages."""

    def __init__(self, filename: str, lines: dict[tuple, int], override_at: dict[tuple, str]) -> None:
        self.filename, self.lines, self.override_at = filename, lines, override_at

    def where(self, path: tuple) -> str:
        for i in range(len(path), 0, -1):
            p = path[:i]
            if p in self.override_at:
                return f"command line ({self.override_at[p]})"
            if p in self.lines:
                return f"{self.filename}:{self.lines[p]}"
        return self.filename

    def error(self, path: tuple, message: str) -> RecipeError:
        return RecipeError(message, key=".".join(map(str, path)), where=self.where(path))


def _fmt_choices(choices) -> str:
    return ", ".join("null" if c is None else repr(c) for c in choices)


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "integer", float: "number", bool: "true/false", str: "string", list: "list", dict: "mapping",
             NONE: "null"}
    if float in types:  # a float field takes integers too
        types = tuple(t for t in types if t is not int)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _check_value(ctx: _Ctx, path: tuple, opt: Opt, value: Any) -> Any:
    ok = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) for t in opt.types)
    if not ok:
        raise ctx.error(path, f"expected {_type_names(opt.types)}, got {value!r}")
    if opt.choices is not None and value not in opt.choices:
        raise ctx.error(path, f"{value!r} is not one of {_fmt_choices(opt.choices)}")
    if opt.check is not None and value is not None:
        msg = opt.check(value)
        if msg:
            raise ctx.error(path, msg)
    return value


def _unknown_key(ctx: _Ctx, path: tuple, allowed) -> RecipeError:
    allowed = sorted(map(str, allowed))
    close = difflib.get_close_matches(str(path[-1]), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    listing = ", ".join(allowed) if len(allowed) <= 30 else f"{len(allowed)} names, {', '.join(allowed[:12])}, ..."
    return ctx.error(path, f"unknown key{hint}; allowed: {listing}")


def _validate_mapping(ctx: _Ctx, path: tuple, schema: Mapping[str, Opt], data: Any,
                      extra: Mapping[str, Opt] | None = None) -> dict[str, Any]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ctx.error(path, f"expected a mapping of keys, got {data!r}")
    full = dict(schema, **(extra or {}))
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in full:
            raise _unknown_key(ctx, path + (key,), full)
        out[key] = _check_value(ctx, path + (key,), full[key], value)
        sub = SUBSCHEMAS.get(path + (key,))
        if sub is not None and value is not None:
            out[key] = _validate_mapping(ctx, path + (key,), sub, value)
    for key, opt in full.items():
        if key not in out:
            if opt.default is _REQUIRED:
                raise ctx.error(path + (key,), "is required" + (f" ({opt.doc})" if opt.doc else ""))
            out[key] = opt.default if not isinstance(opt.default, (dict, list)) else type(opt.default)(opt.default)
    return out


def _annotation_types(annotation: Any) -> tuple[type, ...] | None:
    """Simple Python types a dataclass field annotation accepts (``None``: too complex to check)."""
    simple = {"int": (int,), "float": NUMBER, "bool": (bool,), "str": (str,), "None": (NONE,), "NoneType": (NONE,)}
    if annotation in (int, float, bool, str):
        return simple[annotation.__name__]
    text = annotation if isinstance(annotation, str) else str(annotation)
    out: list[type] = []
    for part in text.replace("typing.", "").split("|"):
        part = part.strip().removeprefix("<class '").removesuffix("'>")
        if part in simple:
            out.extend(simple[part])
        elif part.startswith("dict"):
            out.append(dict)
        elif part.startswith("list"):
            out.append(list)
        else:
            return None
    return tuple(out) or None


def _validate_config_fields(ctx: _Ctx, section: str, data: Any, fields: dict[str, dataclasses.Field],
                            what: str, extra: Mapping[str, Opt] | None = None) -> dict[str, Any]:
    """Check keys against a trl config's dataclass fields (names, declared choices, simple types) and
    ``extra`` qtune keys (full :class:`Opt` checks and defaults)."""
    extra = extra or {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ctx.error((section,), f"expected a mapping of {what} arguments, got {data!r}")
    for key, value in data.items():
        path = (section, key)
        if key in TRAINING_RESERVED:
            raise ctx.error(path, f"set {TRAINING_RESERVED[key]} instead")
        if key in extra:
            continue
        if key not in fields:
            raise _unknown_key(ctx, path, [k for k in (*fields, *extra) if k not in TRAINING_RESERVED])
        f = fields[key]
        types = _annotation_types(f.type)
        if types is None and isinstance(value, bool) and isinstance(f.default, str):
            # e.g. save_strategy: no -- YAML 1.1 reads unquoted no/yes/off/on as booleans
            raise ctx.error(path, f"expected a string (default {f.default!r}), got {value!r}; YAML reads unquoted "
                            "no/yes/off/on as false/true: quote the value, e.g. 'no'")
        choices = f.metadata.get("choices")
        _check_value(ctx, path, Opt(types or (object,), choices=tuple(choices) if choices else None), value)
    out = dict(data)
    out.update(_validate_mapping(ctx, (section,), extra, {k: v for k, v in data.items() if k in extra}))
    return out


def _validate_training(ctx: _Ctx, data: Any, task) -> dict[str, Any]:
    return _validate_config_fields(ctx, "training", data, task.config_fields(), f"trl.{task.config}")


def _validate_task(ctx: _Ctx, data: dict, out: dict) -> tuple[str, dict[str, Any]]:
    """``(task name, its validated section)``; another task's section is an error."""
    from .tasks import TASK_NAMES, TASKS

    name = data.get(TASK_KEY, "sft")
    task = TASKS[name]
    for other in TASK_NAMES:
        if other != name and other in data:
            raise ctx.error((other,), f"this section is for task: {other}; the recipe's task is {name!r}"
                            + (f" (its section is {name}:)" if name != "sft" else ""))
    if name == "sft":
        return name, {}
    if data.get(name) is None and any(o.default is _REQUIRED for o in task.options.values()):
        missing = [k for k, o in task.options.items() if o.default is _REQUIRED]
        raise ctx.error((TASK_KEY,), f"task {name} needs a {name}: section with "
                        + ", ".join(f"{name}.{k} ({task.options[k].doc})" for k in missing))
    section = _validate_config_fields(ctx, name, data.get(name), task.specific_fields(),
                                      f"trl.{task.config} (task-specific)", task.options)
    both = [k for k in section if k in out["training"]]
    if both:
        raise ctx.error((name, both[0]), f"also set as training.{both[0]}; set it in one place")
    if task.head != "causal_lm":
        for path in (("dataset", "perplexity"), ("output", "merge")):
            if out[path[0]][path[1]]:
                raise ctx.error(path, f"task {name} trains a {task.head} model, which has no language-model "
                                "head to measure perplexity with or to merge into a causal LM")
    m = out["model"]
    if m["adapter"] is not None:
        if task.head != "causal_lm":
            raise ctx.error(("model", "adapter"), f"task {name} trains a new {task.head} head; it cannot start "
                            "from a causal-LM adapter")
        given = [k for k in (data.get("lora") or {}) if k != "dtype"]
        if given:
            raise ctx.error(("lora", given[0]), "model.adapter is set: the adapter's own LoRA settings apply "
                            "(only lora.dtype may be given)")
    return name, section


def _apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict[tuple, str]:
    at: dict[tuple, str] = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like section.key=value (e.g. training.max_steps=2)",
                              where="command line")
        key, _, raw = item.partition("=")
        path = tuple(p for p in key.strip().split(".") if p)
        if len(path) < 2:
            raise RecipeError(f"override {item!r} must name a section and a key (section.key=value)",
                              where="command line")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise RecipeError(f"cannot parse the value of {item!r}: {e}", where="command line") from None
        node = data
        for i, p in enumerate(path[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"{'.'.join(path[:i + 1])} is not a mapping; cannot set {key}",
                                  where=f"command line ({item})")
            node = child
        node[path[-1]] = value
        at[path] = item
    return at


def validate(data: Any, *, filename: str = "<recipe>", lines: dict[tuple, int] | None = None,
             overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Validate recipe data (a dict as read from YAML) and fill in defaults.

    Args:
        data: the parsed YAML.
        filename: used in error messages.
        lines: ``{key path: line}`` from the YAML reader.
        overrides: ``section.key=value`` strings applied first.
    Returns:
        :class:`Recipe`.
    Raises:
        RecipeError: the first problem found, with its location.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping with sections " + ", ".join(SECTIONS), where=filename)
    from .tasks import TASK_NAMES, TASKS

    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    ctx = _Ctx(filename, lines or {}, _apply_overrides(data, overrides))
    top = SECTIONS + (TASK_KEY,) + tuple(t for t in TASK_NAMES if t != "sft")
    for key in data:
        if key not in top:
            raise _unknown_key(ctx, (key,), top)
    task = TASKS[_check_value(ctx, (TASK_KEY,), Opt((str,), choices=TASK_NAMES), data.get(TASK_KEY, "sft"))]
    out: dict[str, Any] = {}
    for section in ("model", "lora", "dataset", "output"):
        if section not in data and any(o.default is _REQUIRED for o in SCHEMAS[section].values()):
            raise ctx.error((section,), "section is required")
        out[section] = _validate_mapping(ctx, (section,), SCHEMAS[section], data.get(section))
    if out["lora"]["quantization_aware"]:
        for key in ("use_dora", "experts"):
            if out["lora"][key]:
                raise ctx.error(("lora", key), "must be false with lora.quantization_aware: true (QA-LoRA pools the "
                                "input of linear layers; peft has no DoRA or expert variant of it)")
    if out["lora"]["experts"]:  # peft's ParamWrapper (which loads expert adapters) refuses these
        for key, bad in (("dropout", out["lora"]["dropout"]), ("use_dora", out["lora"]["use_dora"])):
            if bad:
                raise ctx.error(("lora", key), f"must be {0 if key == 'dropout' else 'false'} with lora.experts: true "
                                "(peft's target_parameters LoRA does not support it)")
    # quantization: the format decides which more keys are allowed (the format config's fields)
    q = data.get("quantization")
    if q is None:
        raise ctx.error(("quantization",), "section is required (format: " + ", ".join(quant_formats()) + ")")
    if not isinstance(q, dict):
        raise ctx.error(("quantization",), f"expected a mapping, got {q!r}")
    fmt = q.get("format")
    if fmt is None:
        raise ctx.error(("quantization", "format"), f"is required; one of {_fmt_choices(quant_formats())}")
    _check_value(ctx, ("quantization", "format"), QUANTIZATION["format"], fmt)
    extra: dict[str, Opt] = {}
    if fmt in CONFIGS:
        for f in dataclasses.fields(CONFIGS[fmt]):
            if f.name != "compute_dtype":
                extra[f.name] = Opt((object,), f.default)
    out["quantization"] = _validate_mapping(ctx, ("quantization",), QUANTIZATION, q, extra)
    if fmt in CONFIGS:
        from ..formats import config_from_dict
        qq = out["quantization"]
        try:
            config_from_dict({"format": fmt, "compute_dtype": None if qq["compute_dtype"] == AUTO else qq["compute_dtype"],
                              **{k: qq[k] for k in extra}})
        except (ValueError, TypeError) as e:
            bad = next((k for k in extra if k in str(e) and k in q), "format")
            raise ctx.error(("quantization", bad), str(e)) from None
    calibrated = fmt in CONFIGS and get_format(fmt).needs_calibration
    if out["quantization"]["backend"] == "bitsandbytes" and not (
            fmt in CONFIGS and issubclass(get_format(fmt), BNB_BACKEND_CONFIGS)):
        raise ctx.error(("quantization", "backend"), "bitsandbytes supports formats "
                        f"{', '.join(c.format for c in BNB_BACKEND_CONFIGS)}, not {fmt!r}")
    if calibrated and out["quantization"]["calibration"] is None:
        raise ctx.error(("quantization", "format"), f"{fmt} needs quantization.calibration "
                        "({source: ..., samples: 128, seq_len: 512}), or use format: pretrained with a GPTQ "
                        "checkpoint, or rtn (no calibration)")
    for pattern, value in out["quantization"]["overrides"].items():
        if value is not None:
            from ..formats import config_from_dict
            d = {"format": value} if isinstance(value, str) else value
            try:
                config_from_dict(dict(d))
            except (ValueError, TypeError) as e:
                raise ctx.error(("quantization", "overrides", pattern), str(e)) from None
    out["training"] = _validate_training(ctx, data.get("training"), task)
    name, section = _validate_task(ctx, data, out)
    if name == "reward" and (out["quantization"]["backend"] != "qtune" or fmt == "pretrained" or calibrated):
        raise ctx.error(("quantization", "format"), "task reward loads the base as a sequence classifier: "
                        "quantize a float checkpoint while loading (nf4, fp4, int8, ...; backend qtune) or 'none'")
    _validate_loftq(ctx, data, out, fmt, calibrated)
    _validate_quantization_aware(ctx, out, fmt)
    return Recipe(**out, overrides=tuple(overrides), task=name, task_options=section, origin=ctx)


def _validate_quantization_aware(ctx: "_Ctx", out: dict, fmt: str) -> None:
    """``lora.quantization_aware: true`` with a format qtune quantizes while loading: refuse it here when that format
    has no per-group float offset (its layers could only re-quantize the merged change). Bases whose layers are
    known only once loaded (``pretrained``, GGUF files, ``overrides``) are checked at setup, layer by layer
    (:func:`qtune.integrations.peft.quantization_aware_config`)."""
    q = out["quantization"]
    if (not out["lora"]["quantization_aware"] or fmt not in CONFIGS or q["backend"] != "qtune"
            or any(v is not None for v in q["overrides"].values())):
        return
    from ..formats import config_from_dict
    from ..nn import layer_class_for

    cfg = config_from_dict({"format": fmt, **{f.name: q[f.name] for f in dataclasses.fields(CONFIGS[fmt])
                                             if f.name != "compute_dtype" and f.name in q}})
    probe = layer_class_for(cfg)(4096, 1, False, cfg, device="meta")  # on meta: only its properties are read
    if probe.offset_group_size is None:
        raise ctx.error(("lora", "quantization_aware"), f"quantization.format {fmt} has no per-group float offset, "
                        "so a quantization-aware adapter cannot merge into it exactly; only GGUF Q4_1/Q5_1 or affine "
                        "layers take it exactly: set lora.quantization_aware: false (standard LoRA) or use one of "
                        "those formats")


def _validate_loftq(ctx: "_Ctx", data: dict, out: dict, fmt: str, calibrated: bool) -> None:
    """``lora.init: loftq`` re-quantizes the base from the float checkpoint: it needs one, quantized while loading
    by qtune with a format that needs no calibration, and plain LoRA (no DoRA, no expert adapters)."""
    lo = out["lora"]
    if lo["init"] != "loftq":
        # a resolved recipe (saved by a run) lists the default 1; any other value without loftq is a mistake
        if (data.get("lora") or {}).get("loftq_iters", 1) != 1:
            raise ctx.error(("lora", "loftq_iters"), "applies to lora.init: loftq only")
        return
    if out["quantization"]["backend"] != "qtune" or fmt not in CONFIGS or calibrated:
        raise ctx.error(("lora", "init"), f"loftq re-quantizes the base from its float weights: it needs a float "
                        f"model.path quantized while loading with a format that needs no calibration (nf4, affine, "
                        f"int8, rtn...; backend qtune), not quantization.format {fmt!r}"
                        + (" with backend bitsandbytes" if out["quantization"]["backend"] != "qtune" else ""))
    for key in ("use_dora", "experts", "quantization_aware"):
        if lo[key]:
            raise ctx.error(("lora", key), "must be false with lora.init: loftq (LoftQ initialises plain LoRA on "
                            "quantized linear layers)")


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read and validate a recipe YAML file (nothing is loaded but the YAML and the trl config schema).

    Raises:
        FileNotFoundError: no such file.
        RecipeError: invalid YAML, unknown key, bad value (the message names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    data, lines = _load_with_lines(path.read_text(encoding="utf-8"), str(path))
    recipe = validate(data, filename=str(path), lines=lines, overrides=overrides)
    recipe.path = path
    return recipe


def header_command(path: str | os.PathLike) -> str | None:
    """The command shown in a recipe's header comment (the first ``# ...qtune ...`` line), if any."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if not s.startswith("#"):
            break
        s = s.lstrip("#").strip()
        if "qtune" in s and (s.startswith("qtune ") or s.startswith("accelerate ") or s.startswith("python ")):
            return s
    return None
