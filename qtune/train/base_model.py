"""Recipe → base model: what ``qtune train`` trains on and what ``qtune export`` rebuilds from a run.

:func:`load_base` is the one path from a recipe's ``model`` and ``quantization`` sections to a loaded base:
the local folder (:func:`resolve_model_path`: a folder, a bundled model, or a Hub snapshot), the tokenizer,
and the model (:func:`load_base_model`):

* ``format: none``: the float model;
* ``format: pretrained``: an already quantized folder, in any registered checkpoint layout, or a GGUF file
  (:func:`qtune.integrations.layouts.load_model`; the tokenizer then comes from the file too);
* a format that needs calibration (GPTQ): the float model quantized here on ``quantization.calibration``;
* any other format: quantized while loading (:func:`qtune_config`, the recipe's one ``QTuneConfig``);
* ``backend: bitsandbytes``: the same format through transformers + bitsandbytes (for comparisons);
* tasks with a sequence-classification head (``reward``): ``AutoModelForSequenceClassification`` with one
  output, its ``score`` head left in float (it trains beside the adapter).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from ..formats.base import parse_dtype
from .recipe import ASSET_PREFIX, Recipe
from .tasks import TASKS

logger = logging.getLogger(__name__)

BUILTIN_MODELS = {"smollm2-135m-instruct": "smollm2_path",
                  "smollm2-135m-instruct-gguf": "smollm2_gguf"}  # the package's own Q4_1 GGUF file, read as it is
# the classification heads transformers puts on decoder models (kept float and trainable)
SCORE_HEADS = ("score",)


def resolve_model_path(path: str, revision: str | None = None) -> Path:
    """A local folder for ``model.path``: itself, a bundled model, or a Hub snapshot (downloaded)."""
    if path.startswith(ASSET_PREFIX):
        name = path[len(ASSET_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown bundled model {path!r}; available: "
                             + ", ".join(ASSET_PREFIX + n for n in BUILTIN_MODELS))
        from .. import assets
        return Path(getattr(assets, BUILTIN_MODELS[name])())
    local = Path(path).expanduser()
    if local.exists():
        return local
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(path, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]))


def device_map():
    """``{"": device}`` of this process's accelerator (accelerate's state), ``None`` on CPU."""
    from accelerate import PartialState

    state = PartialState()
    if state.device.type in ("cuda", "xpu", "mps"):
        return {"": state.device}
    return None


def has_score_head(recipe: Recipe) -> bool:
    """Whether the recipe's task trains a sequence-classification head (``reward``) instead of the LM head."""
    return TASKS[recipe.task].head == "sequence_classification"


def recipe_format(value, compute_dtype):
    """A ``quantization.overrides`` value (format name or dict) as a qtune config."""
    from ..formats import config_from_dict

    d = {"format": value} if isinstance(value, str) else dict(value)
    d.setdefault("compute_dtype", compute_dtype)
    return config_from_dict(d)


def qtune_config(recipe: Recipe, *, compute_dtype: str | None = None, extra_skip: tuple[str, ...] = ()):
    """The recipe's ``quantization`` section as the ``QTuneConfig`` that quantizes the base while it loads.

    Args:
        compute_dtype: instead of ``quantization.compute_dtype`` (e.g. a planning dtype for ``auto``).
        extra_skip: module names kept float beyond ``quantization.skip_modules`` (a classifier's head).
    Returns:
        ``QTuneConfig``, or ``None`` for ``format: none``/``pretrained``.
    """
    from ..integrations.transformers import QTuneConfig

    q = recipe.quantization
    if q["format"] in ("none", "pretrained"):
        return None
    skip = q["skip_modules"]
    if extra_skip:
        skip = list(skip or []) + [n for n in extra_skip if n not in (skip or [])]
    return QTuneConfig(q["format"], compute_dtype=compute_dtype or q["compute_dtype"], skip_modules=skip,
                       overrides=q["overrides"], **recipe.format_fields())


def load_base_model(recipe: Recipe, path: Path, tokenizer=None):
    """The model of ``recipe`` with its quantization applied (``QuantLinear`` layers): a causal LM, or
    for a task with a sequence-classification head a classifier with one output (its ``score`` head left
    in float).

    ``auto`` dtypes still in the recipe are resolved first (:meth:`Recipe.resolve_dtypes`).

    Returns:
        ``(model, seconds)``.
    """
    from transformers import AutoModelForCausalLM

    from ..integrations.layouts import load_model

    for line in recipe.resolve_dtypes():
        logger.info("%s", line)
    m, q = recipe.model, recipe.quantization
    dtype = parse_dtype(m["dtype"])
    if has_score_head(recipe):
        return _load_classifier(recipe, path, dtype)
    common: dict[str, Any] = {"device_map": device_map(), "trust_remote_code": m["trust_remote_code"]}
    if m["attn_implementation"]:
        common["attn_implementation"] = m["attn_implementation"]
    t0 = time.perf_counter()
    fmt = q["format"]
    if q["backend"] == "bitsandbytes":
        model = _load_bitsandbytes(recipe, path, dtype, common)
    elif fmt == "none":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **common)
    elif fmt == "pretrained":
        model = load_model(path, None, dtype=dtype, **common)
    elif recipe.needs_calibration:
        model = _calibrate(recipe, path, dtype, common, tokenizer)
    else:
        model = load_model(path, qtune_config(recipe), dtype=dtype, **common)
    return model, time.perf_counter() - t0


def _load_classifier(recipe: Recipe, path: Path, dtype):
    """``AutoModelForSequenceClassification`` (one output: a reward) on the quantized base; ``score`` stays float
    so that it can train beside the adapter (``modules_to_save``)."""
    from transformers import AutoModelForSequenceClassification

    m = recipe.model
    common: dict[str, Any] = {"device_map": device_map(), "trust_remote_code": m["trust_remote_code"], "num_labels": 1}
    if m["attn_implementation"]:
        common["attn_implementation"] = m["attn_implementation"]
    t0 = time.perf_counter()
    qc = qtune_config(recipe, extra_skip=SCORE_HEADS)
    if qc is not None:
        common["quantization_config"] = qc
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, **common)
    return model, time.perf_counter() - t0


def _load_bitsandbytes(recipe: Recipe, path: Path, dtype, common: dict):
    """The same format through transformers + bitsandbytes, prepared the way peft documents it
    (``peft.prepare_model_for_kbit_training``). Used to compare qtune against the usual QLoRA stack."""
    from peft import prepare_model_for_kbit_training as peft_prepare
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ..formats import LLMInt8Config

    q = recipe.quantization
    cfg = recipe.quant_config()
    compute = parse_dtype(q["compute_dtype"]) or dtype
    if isinstance(cfg, LLMInt8Config):
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(cfg.threshold),
                                 llm_int8_skip_modules=q["skip_modules"])
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                                 bnb_4bit_use_double_quant=bool(cfg.double_quant),
                                 bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=q["skip_modules"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=bnb, **common)
    gc = recipe.training.get("activation_checkpointing", recipe.training.get("gradient_checkpointing", True))
    return peft_prepare(model, use_gradient_checkpointing=bool(gc),
                        gradient_checkpointing_kwargs={"use_reentrant": False})


def _calibrate(recipe: Recipe, path: Path, dtype, common: dict, tokenizer):
    """Load the float model and quantize it (GPTQ) on the recipe's calibration text."""
    from transformers import AutoModelForCausalLM

    from ..calibration import quantize_with_calibration
    from ..sources import read_text

    cal, q = recipe.quantization["calibration"], recipe.quantization
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **common)
    overrides = {p: (None if v is None else recipe_format(v, q["compute_dtype"])) for p, v in q["overrides"].items()}
    report = quantize_with_calibration(model, tokenizer, [read_text(cal["source"])], recipe.quant_config(),
                                       samples=cal["samples"], seq_len=cal["seq_len"],
                                       skip_modules=q["skip_modules"], overrides=overrides)
    logger.info("calibrated quantization: %s in %.0f s", report.summary(), report.seconds)
    return model


def load_tokenizer(recipe: Recipe, model_path: Path):
    """``model.tokenizer`` (or the model folder's tokenizer), with ``pad_token`` set to ``eos`` when absent."""
    from transformers import AutoTokenizer

    from ..integrations.layouts import layout_claiming

    tok_path = recipe.model["tokenizer"] or model_path
    own = layout_claiming(tok_path)  # a file that holds its tokenizer (GGUF)
    load = own.tokenizer if own is not None and own.tokenizer is not None else AutoTokenizer.from_pretrained
    tok = load(tok_path, trust_remote_code=recipe.model["trust_remote_code"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclasses.dataclass
class Base:
    """A recipe's base model: the local folder, its tokenizer and the (quantized) model."""

    path: Path
    tokenizer: Any
    model: Any
    load_s: float


_RECIPE_TOKENIZER = object()  # load_base's default: the recipe's tokenizer


def load_base(recipe: Recipe, *, path: Path | None = None, tokenizer: Any = _RECIPE_TOKENIZER) -> Base:
    """The base as the recipe describes it (what ``qtune train`` trains and ``qtune export`` rebuilds).

    Args:
        path: the local model folder (default: :func:`resolve_model_path` of ``model.path``).
        tokenizer: a tokenizer to use (``None``: none is available); by default the recipe's is loaded.
    Returns:
        :class:`Base`.
    """
    path = path if path is not None else resolve_model_path(recipe.model["path"], recipe.model["revision"])
    if tokenizer is _RECIPE_TOKENIZER:
        tokenizer = load_tokenizer(recipe, path)
    model, load_s = load_base_model(recipe, path, tokenizer)
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers find the last token by it
    return Base(path, tokenizer, model, load_s)


__all__ = ["Base", "load_base", "load_base_model", "load_tokenizer", "resolve_model_path", "qtune_config",
           "recipe_format", "device_map", "has_score_head", "SCORE_HEADS", "BUILTIN_MODELS"]
