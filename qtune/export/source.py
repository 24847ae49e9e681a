"""What an export starts from: a training run folder or a PEFT adapter folder, and the base it was trained on.

``RUN_OR_ADAPTER_DIR`` is one of

* a run folder written by ``qtune train`` (``summary.json`` + ``adapter/``): the base is rebuilt from the
  run's recipe exactly as training built it (same model, format, settings, GPTQ calibration);
* an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``):

  - inside a run (a ``checkpoint-N`` folder, or ``adapter/`` itself): the run's recipe, as above;
  - exported by ``qtune export --mode adapter``: its ``qtune_base.json`` records the recipe;
  - otherwise ``adapter_config.json``'s ``base_model_name_or_path``, which must then be an already
    quantized folder (qtune, bitsandbytes or GPTQ layout), or be described with ``base_format``.

The adapter is checked against the base before peft touches it: every LoRA matrix must name a layer of
the base with the same input/output sizes (an adapter trained on another base fails with one line
naming the layer and both shapes).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FILE = "qtune_base.json"
SUMMARY = "summary.json"
# fields of a run's summary.json worth repeating in a model card
METRIC_KEYS = ("status", "global_step", "max_steps", "train_loss", "eval_loss", "train_tokens", "tokens_per_s",
               "train_s", "perplexity_before", "perplexity_after", "parameters")

__all__ = ["ExportSource", "load_source", "find_adapter", "check_adapter_fits"]


@dataclasses.dataclass
class ExportSource:
    """A trained adapter on its (quantized) base, ready to export.

    Attributes:
        model: ``peft.PeftModel``: the base with qtune ``QuantLinear`` layers (or float) and the adapter,
            in eval mode. Merging exporters consume it (the LoRA layers are folded in place).
        tokenizer: the run's tokenizer, or ``None`` when neither the adapter nor the base folder has one.
        adapter_dir: the folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        recipe: the validated recipe the base was built from (``qtune.train.Recipe``).
        base_path: the local base model folder.
        run_dir: the training run folder, if any.
        summary: the run's ``summary.json`` (training metrics), if any.
    """

    model: Any
    tokenizer: Any
    adapter_dir: Path
    recipe: Any
    base_path: Path
    run_dir: Path | None = None
    summary: dict[str, Any] | None = None

    @property
    def base_model(self) -> str:
        """The base model as the recipe names it (a folder, a Hub id or ``qtune:smollm2-135m-instruct``)."""
        return str(self.recipe.model["path"])

    @property
    def base_quantization(self) -> dict[str, Any]:
        """The recipe's ``quantization`` section (``format`` ``pretrained`` adds the checkpoint's own method)."""
        q = {k: v for k, v in self.recipe.quantization.items() if v not in (None, {}, [])}
        if q.get("format") == "pretrained" and _is_gguf_file(self.base_path):
            q["checkpoint"] = {"quant_method": "gguf", "file": self.base_path.name}
        elif q.get("format") == "pretrained":
            # the checkpoint's own quantization_config (bitsandbytes/GPTQ/qtune), without the per-layer map
            qc = _read_json(self.base_path / "config.json").get("quantization_config")
            if isinstance(qc, dict):
                q["checkpoint"] = {k: v for k, v in qc.items() if k != "layers"}
        return q

    @property
    def auto_class(self):
        """The transformers auto class of the trained model: ``AutoModelForSequenceClassification`` for a task
        with a score head (``reward``), else ``AutoModelForCausalLM``; exports reload with it."""
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from ..train.base_model import has_score_head

        return AutoModelForSequenceClassification if has_score_head(self.recipe) else AutoModelForCausalLM

    @property
    def float_dtype(self) -> torch.dtype:
        """dtype of the base's float parameters (embeddings, norms)."""
        for p in self.model.get_base_model().parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def compute_dtype(self) -> torch.dtype:
        """The coarsest dtype the trained model computes in (a quantized layer's compute dtype, else the float
        parameters' dtype); bounds how exactly an export can reproduce its logits."""
        from ..nn import QuantLinear

        dtypes = {m.compute_dtype for m in self.model.modules() if isinstance(m, QuantLinear)} | {self.float_dtype}
        return max(dtypes, key=lambda d: torch.finfo(d).eps)

    def metrics(self) -> dict[str, Any]:
        """Training metrics of the run (empty without a ``summary.json``)."""
        s = self.summary or {}
        return {k: s[k] for k in METRIC_KEYS if s.get(k) is not None}

    def base_record(self) -> dict[str, Any]:
        """What ``qtune_base.json`` stores: enough to rebuild this base (the full recipe)."""
        from .. import __version__

        return {"qtune_version": __version__, "base_model": self.base_model,
                "quantization": self.base_quantization, "recipe": _plain(self.recipe.to_dict()),
                "recipe_file": str(self.recipe.path) if self.recipe.path else None,
                "metrics": _plain(self.metrics())}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ------------------------------------------------------------------------------------------------
# Finding the adapter and the recipe
# ------------------------------------------------------------------------------------------------
def find_adapter(path: str | Path) -> tuple[Path, Path | None]:
    """``(adapter folder, run folder or None)`` for a run or adapter folder.

    Raises:
        FileNotFoundError: no such folder, no adapter in it, or adapter files missing (names the file).
        ValueError: only pickled adapter weights (``adapter_model.bin``).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: does not exist")
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: not a folder (expected a training run folder or a PEFT adapter folder)")
    if (p / ADAPTER_CONFIG).is_file():
        adapter, run = p, (p.parent if (p.parent / SUMMARY).is_file() else None)
    elif (p / SUMMARY).is_file():
        adapter, run = p / "adapter", p
        if not (adapter / ADAPTER_CONFIG).is_file():
            checkpoints = sorted((c for c in p.glob("checkpoint-*") if (c / ADAPTER_CONFIG).is_file()),
                                 key=lambda c: int(c.name.split("-")[-1]) if c.name.split("-")[-1].isdigit() else -1)
            hint = (f"; export a checkpoint instead: qtune export {checkpoints[-1]} ..." if checkpoints
                    else "; it holds no checkpoint either")
            raise FileNotFoundError(f"{p}: the run has no final adapter ({adapter / ADAPTER_CONFIG} is missing: "
                                    f"was it interrupted?){hint}")
    else:
        raise FileNotFoundError(f"{p}: neither a training run folder ({SUMMARY} + adapter/) nor a PEFT adapter "
                                f"folder ({ADAPTER_CONFIG} is missing)")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        if (adapter / "adapter_model.bin").is_file():
            raise ValueError(f"{adapter}: holds only adapter_model.bin (a pickle); qtune reads safetensors only "
                             "(re-save the adapter with safe_serialization=True)")
        raise FileNotFoundError(f"{adapter / ADAPTER_WEIGHTS}: missing (the adapter folder is incomplete)")
    return adapter, run


def _is_gguf_file(path: str | Path) -> bool:
    """A GGUF file as the base (``model.path: file.gguf``): it holds config and tokenizer itself."""
    from ..integrations.layouts.gguf import is_gguf_path

    return is_gguf_path(path) and Path(path).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _minimal_recipe(model: str, quantization: dict[str, Any], dtype: str | None = None,
                    tokenizer: str | None = None):
    """A recipe holding only the base (the model and quantization sections) for bases named outside a run."""
    from ..train.recipe import validate

    m: dict[str, Any] = {"path": model}
    if dtype:
        m["dtype"] = dtype
    if tokenizer:
        m["tokenizer"] = tokenizer
    data = {"model": m, "quantization": quantization, "lora": {},
            "dataset": {"train": {"source": "(not used by export)"}}, "output": {"dir": "(not used by export)"}}
    return validate(data, filename="<export base>")


def _quantization_from_spec(spec: str) -> dict[str, Any]:
    """``--base-format`` (``none``, ``pretrained``, or a ``qtune quantize`` format spec) as a recipe section."""
    low = spec.strip().lower()
    if low in ("none", "float", "pretrained"):
        return {"format": "none" if low != "pretrained" else "pretrained"}
    from ..formats import parse_format_spec

    qc = parse_format_spec(spec)
    if qc.needs_calibration:
        raise ValueError(f"--base-format {qc.format}: a {qc.format.upper()} base depends on its calibration data; "
                         f"pass the quantized {qc.format.upper()} folder as --base (with --base-format pretrained), or "
                         "export from the training run folder")
    out = {"format": qc.format, **qc.options}
    if qc.compute_dtype:
        out["compute_dtype"] = qc.compute_dtype
    return out


def _is_quantized_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    return isinstance(_read_json(cfg).get("quantization_config"), dict)


def _config_dtype(path: Path) -> str | None:
    """The float dtype a model folder's config.json declares (``dtype``/``torch_dtype``), if one qtune loads."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    data = _read_json(cfg)
    value = data.get("dtype") or data.get("torch_dtype")
    try:
        return (_dtype_name(value) if isinstance(value, str) else None) or "float32"
    except (TypeError, ValueError):
        return "float32"  # what from_pretrained would load


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None or dtype == "auto":
        return None
    from ..formats.base import dtype_name, parse_dtype

    return dtype_name(parse_dtype(dtype))


def resolve_recipe(adapter: Path, run: Path | None, *, base: str | None = None, base_format: str | None = None,
                   dtype: str | None = None):
    """The recipe describing the base of ``adapter`` (see the module docstring for the order of lookup).

    Raises:
        FileNotFoundError: the run's recipe file is gone, or the base folder does not exist.
        ValueError: the base cannot be determined, or how it was quantized is unknown.
    """
    from ..train.recipe import load_recipe, validate

    if base is not None:
        path = Path(base).expanduser()
        if not base.startswith("qtune:") and not path.is_dir():
            raise FileNotFoundError(f"--base {base}: no such folder")
        if base_format is None:
            if base.startswith("qtune:") or not _is_quantized_folder(path):
                raise ValueError(f"--base {base} is a float model: say how it was quantized for training with "
                                 "--base-format (e.g. nf4, nf4:double_quant=true, int8, none)")
            base_format = "pretrained"
        return _minimal_recipe(base, _quantization_from_spec(base_format), dtype or _config_dtype(path))
    if base_format is not None and ((adapter / BASE_FILE).is_file() or run is not None):
        raise ValueError(f"{adapter}: its base is recorded ({BASE_FILE if run is None else 'the run recipe'}); "
                         "--base-format applies with --base, or to a bare adapter folder")
    if (adapter / BASE_FILE).is_file():
        record = _read_json(adapter / BASE_FILE)
        if not isinstance(record.get("recipe"), dict):
            raise ValueError(f"{adapter / BASE_FILE}: no 'recipe' object")
        recipe = validate(record["recipe"], filename=str(adapter / BASE_FILE))
        if dtype:
            recipe.model["dtype"] = dtype
        return recipe
    if run is not None:
        local = run / "recipe.yaml"
        summary = _read_json(run / SUMMARY)
        if local.is_file():
            recipe = load_recipe(local)
        else:
            file = summary.get("recipe")
            if not file:
                raise ValueError(f"{run / SUMMARY}: names no recipe file; pass --base and --base-format")
            if not Path(file).is_file():
                raise FileNotFoundError(f"{run / SUMMARY}: the run's recipe {file} no longer exists; restore it, or "
                                        "pass --base and --base-format")
            recipe = load_recipe(file, summary.get("overrides") or ())
        if dtype:
            recipe.model["dtype"] = dtype
        return recipe
    config = _read_json(adapter / ADAPTER_CONFIG)
    name = config.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{adapter / ADAPTER_CONFIG}: no base_model_name_or_path; pass --base")
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(f"{adapter}: its base {name!r} is not a local folder (the Hub is not read here); pass --base "
                         "with the base folder")
    if base_format is None:
        if not _is_quantized_folder(path):
            raise ValueError(f"{adapter}: its base {name} is a float model, and nothing records how it was quantized "
                             "for training; pass --base-format (e.g. nf4, int8, none)")
        base_format = "pretrained"
    return _minimal_recipe(str(path), _quantization_from_spec(base_format), dtype or _config_dtype(path))


# ------------------------------------------------------------------------------------------------
# Checking the adapter against the base
# ------------------------------------------------------------------------------------------------
def _dims(module: nn.Module) -> tuple[int, int] | None:
    """(out_features, in_features) of a linear-like module, else None."""
    from ..nn import QuantLinear, is_conv1d

    if isinstance(module, (QuantLinear, nn.Linear)):
        return module.out_features, module.in_features
    if is_conv1d(module):
        k, n = module.weight.shape
        return int(n), int(k)
    return None


def check_adapter_fits(model: nn.Module, adapter: Path, base_name: str = "the base") -> None:
    """Every LoRA A/B matrix of ``adapter`` must name a layer of ``model`` with matching sizes.

    Raises:
        ValueError: a layer is missing from the base, or its shape differs (the message names both).
    """
    from ..integrations.safetensors_header import read_safetensors_header

    from ..nn import QuantLinear

    header = read_safetensors_header(adapter / ADAPTER_WEIGHTS)
    # a quantization-aware adapter (peft's use_qalora) pools the input of qtune layers over groups: A is [r, in / g]
    config_file = adapter / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    qa_group = int(adapter_config.get("qalora_group_size") or 1) if adapter_config.get("use_qalora") else 1
    if not header:
        raise ValueError(f"{adapter / ADAPTER_WEIGHTS}: holds no tensors")
    for key, entry in sorted(header.items()):
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                break
        else:
            continue
        name = key.split(part)[0].removeprefix("base_model.model.")
        while name.endswith(".base_layer"):  # nested peft ParamWrappers (LoRA on expert parameters)
            name = name.removesuffix(".base_layer")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{adapter}: was trained on another base: its layer {name} does not exist in "
                             f"{base_name}") from None
        dims = _dims(module)
        if dims is None:
            continue  # LoRA on embeddings etc.: peft checks those when loading
        shape = [int(s) for s in entry["shape"]]
        if len(shape) != 2:
            continue
        out_f, in_f = dims
        if isinstance(module, QuantLinear) and qa_group > 1:
            in_f //= qa_group
        if part == ".lora_A." and shape[1] != in_f:
            raise ValueError(f"{adapter}: was trained on another base: layer {name} has in_features {shape[1]} in "
                             f"the adapter ({key} {shape}) but {in_f} in {base_name}")
        if part == ".lora_B." and shape[0] != out_f:
            raise ValueError(f"{adapter}: was trained on another base: layer {name} has out_features {shape[0]} in "
                             f"the adapter ({key} {shape}) but {out_f} in {base_name}")


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def _tokenizer(adapter: Path, recipe, base_path: Path):
    from transformers import AutoTokenizer

    if any((adapter / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(adapter, trust_remote_code=recipe.model["trust_remote_code"])
    else:
        from ..train.base_model import load_tokenizer

        try:
            return load_tokenizer(recipe, base_path)
        except (OSError, ValueError, TypeError):
            return None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_source(path: str | Path, *, base: str | None = None, base_format: str | None = None,
                dtype: str | torch.dtype | None = None) -> ExportSource:
    """Load a trained adapter and rebuild its base, as training had it.

    Args:
        path: a ``qtune train`` run folder, a checkpoint folder in it, or a PEFT adapter folder.
        base: the base model folder (default: from the run's recipe, ``qtune_base.json`` or the adapter config).
        base_format: how ``base`` was quantized for training: ``pretrained`` (it is a quantized folder),
            ``none``, or a format spec as for ``qtune quantize`` (``nf4``, ``nf4:double_quant=true``, ``int8``).
        dtype: dtype of the base's float parameters (default: the recipe's ``model.dtype``).
    Returns:
        :class:`ExportSource`.
    Raises:
        FileNotFoundError / ValueError: see :func:`find_adapter`, :func:`resolve_recipe`,
            :func:`check_adapter_fits`.
    """
    from ..integrations.peft import load_adapter
    from ..train.base_model import load_base, resolve_model_path

    adapter, run = find_adapter(path)
    recipe = resolve_recipe(adapter, run, base=base, base_format=base_format, dtype=_dtype_name(dtype))
    base_path = resolve_model_path(recipe.model["path"], recipe.model["revision"])
    if not (Path(base_path) / "config.json").is_file() and not _is_gguf_file(base_path):
        raise FileNotFoundError(f"base model {base_path}: config.json is missing (not a model folder)")
    tokenizer = _tokenizer(adapter, recipe, Path(base_path))
    if recipe.needs_calibration and tokenizer is None:
        raise ValueError(f"base {base_path}: {recipe.quantization['format'].upper()} calibration needs a tokenizer, "
                         "and none was found")
    model = load_base(recipe, path=Path(base_path), tokenizer=tokenizer).model
    check_adapter_fits(model, adapter, f"the base {recipe.model['path']}")
    try:
        model = load_adapter(model, str(adapter))
    except RuntimeError as e:  # e.g. size mismatch of modules_to_save
        first = str(e).strip().splitlines()
        raise ValueError(f"{adapter}: does not fit the base {recipe.model['path']}: "
                         f"{' '.join(s.strip() for s in first[:3])}") from None
    model.eval()
    summary = None
    if run is not None:
        summary = _read_json(run / SUMMARY)
    elif (adapter / BASE_FILE).is_file():  # an exported adapter carries its run's metrics
        summary = _read_json(adapter / BASE_FILE).get("metrics") or None
    return ExportSource(model=model, tokenizer=tokenizer, adapter_dir=adapter, recipe=recipe,
                        base_path=Path(base_path), run_dir=run, summary=summary)
