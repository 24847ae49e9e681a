"""Tiny training runs to export, built without training: a run folder as ``qtune train`` writes it
(``summary.json`` naming the recipe, ``adapter/`` with the PEFT adapter and tokenizer), whose adapter
holds random (non-zero) LoRA weights on the base the recipe builds."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from tests.train.models import CORPUS, save_tiny_model_dir

QUANT = {
    "nf4": {"format": "nf4", "blocksize": 64},
    "nf4-dq": {"format": "nf4", "blocksize": 64, "double_quant": True},
    "fp4": {"format": "fp4", "blocksize": 64},
    "int8": {"format": "int8"},
    "none": {"format": "none"},
}


def gptq_quant(text_file: Path) -> dict:
    return {"format": "gptq", "bits": 4, "group_size": 32,
            "calibration": {"source": str(text_file), "samples": 8, "seq_len": 32}}


def make_base(root: Path, arch: str = "llama") -> Path:
    """A float tiny model + tokenizer folder and a text file (``root/text.txt``)."""
    model = root / f"model-{arch}"
    if not (model / "config.json").is_file():
        save_tiny_model_dir(model, arch)
    text = root / "text.txt"
    if not text.is_file():
        paras = [CORPUS[i:i + 300] for i in range(0, len(CORPUS) - 300, 37)]
        text.write_text("\n\n".join(paras * 4))
    return model


def recipe_data(model: Path, quant: dict, out: Path, text: Path) -> dict:
    return {
        "model": {"path": str(model), "dtype": "float32"},
        "quantization": quant,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "dataset": {"train": {"source": str(text), "chunk_chars": 300},
                    "perplexity": {"source": str(text), "max_tokens": 256, "window": 64}},
        "training": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64},
        "output": {"dir": str(out), "report_to": "none"},
    }


def randomize_lora(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            noise = torch.randn(p.shape, generator=g).to(p.dtype) * scale
            p.data = p.data * (1 + noise) if "magnitude" in name else noise


def make_run(root: Path, name: str, quant: dict, *, arch: str = "llama", use_dora: bool = False,
             seed: int = 0, model: Path | None = None, lora_scale: float = 0.05,
             quantization_aware: bool = False) -> Path:
    """A run folder as ``qtune train`` leaves it, with a random adapter on the recipe's base (a QA-LoRA adapter
    pooled over the layers' quantization groups with ``quantization_aware``)."""
    from peft import LoraConfig

    from qtune.integrations.peft import get_peft_model
    from qtune.train import load_recipe
    from qtune.train.base_model import load_base_model, load_tokenizer

    model = model or make_base(root, arch)
    run = root / name
    recipe_file = root / f"{name}.yaml"
    recipe_file.write_text("# qtune train\n" + yaml.safe_dump(recipe_data(model, quant, run, root / "text.txt"),
                                                                sort_keys=False))
    recipe = load_recipe(recipe_file)
    tok = load_tokenizer(recipe, model)
    base, _ = load_base_model(recipe, model, tok)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                 use_dora=use_dora, task_type="CAUSAL_LM"),
                                quantization_aware=quantization_aware)
    randomize_lora(peft_model, seed, lora_scale)
    peft_model.save_pretrained(run / "adapter")
    tok.save_pretrained(run / "adapter")
    summary = {"recipe": str(recipe_file), "overrides": [], "model": str(model), "format": quant["format"],
               "status": "finished", "global_step": 2, "max_steps": 2, "train_loss": 4.25, "eval_loss": 4.0,
               "perplexity_before": {"perplexity": 300.0, "predicted": 200},
               "perplexity_after": {"perplexity": 250.0, "predicted": 200},
               "parameters": {"trainable": 1000, "quantized": 100, "total": 2000}}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return run


def make_gptq_base(root: Path, model: Path, text: Path, layout: str = "gptq") -> Path:
    """A GPTQ-quantized (4-bit, group 32, calibrated) copy of ``model``, saved in ``layout``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qtune
    from qtune.calibration import calibration_windows, gptq_quantize_model
    from qtune.integrations.layouts import save_quantized
    from qtune.integrations.transformers import mark_quantized

    out = root / f"base-gptq-{layout}"
    if (out / "config.json").is_file():
        return out
    float_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model)
    windows = calibration_windows([text.read_text()], tok, samples=8, seq_len=32)
    gptq_quantize_model(float_model, windows, qtune.GPTQConfig(bits=4, group_size=32), progress=False)
    mark_quantized(float_model)
    save_quantized(float_model, out, layout=layout, tokenizer=tok)
    return out


def make_adapter_dir(root: Path, name: str, base: Path, *, seed: int = 1, target_modules="all-linear") -> Path:
    """A bare PEFT adapter folder (no run around it) trained on the already quantized folder ``base``."""
    from peft import LoraConfig

    from qtune.integrations.layouts import load_model
    from qtune.integrations.peft import get_peft_model

    model = load_model(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules,
                                                  task_type="CAUSAL_LM"))
    randomize_lora(peft_model, seed)
    out = root / name
    peft_model.save_pretrained(out)
    return out
