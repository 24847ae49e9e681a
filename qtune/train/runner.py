"""Run a training recipe: load (and quantize) the model, train LoRA adapters with trl, report.

``run(recipe)`` is what ``qtune train RECIPE.yaml`` calls, also under ``accelerate launch -m qtune
train`` (one process per device; trl/accelerate handle DDP or FSDP from the accelerate config). Steps:

1. tokenizer and datasets (``dataset.train``/``eval``);
2. the model: a float checkpoint quantized while loading (``quantization.format``), an already
   quantized checkpoint (``pretrained``), or GPTQ calibrated here (``gptq``);
3. held-out perplexity before training (``dataset.perplexity``);
4. :class:`~qtune.integrations.trl.QTuneSFTTrainer` with the recipe's LoRA config and ``training``
   section (``trl.SFTConfig``), resuming from the last checkpoint with ``resume=True``;
5. the adapter (PEFT format), final eval loss and perplexity, a loss-curve PNG and ``summary.json``.

The first SIGINT (Ctrl-C) lets the running optimizer step finish, saves a checkpoint, and stops;
``--resume`` continues from it with the same step count. A second SIGINT aborts at once.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..formats.base import parse_dtype
from .recipe import ASSET_PREFIX, Recipe

logger = logging.getLogger(__name__)

BUILTIN_MODELS = {"smollm2-135m-instruct": "smollm2_path"}


# ------------------------------------------------------------------------------------------------
# Interrupts
# ------------------------------------------------------------------------------------------------
def _interrupt_callback_class():
    from transformers import TrainerCallback

    class InterruptCallback(TrainerCallback):
        """Stop after the current optimizer step and save a checkpoint once an interrupt was requested.

        Every rank must stop at the same step, so under DDP the flag is max-reduced at each step end.
        """

        def __init__(self) -> None:
            self.requested = False
            self.stopped_at: int | None = None
            self.start_step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step = state.global_step  # > 0 when resumed from a checkpoint

        def on_step_end(self, args, state, control, **kwargs):
            flag = self.requested
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                t = torch.tensor([int(flag)], device=args.device if args.device.type != "cpu" else "cpu")
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
                flag = bool(t.item())
            if flag:
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            return control

    return InterruptCallback


@contextlib.contextmanager
def _sigint_requests(callback):
    """While active, the first SIGINT sets ``callback.requested``; a second one raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if callback.requested:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        callback.requested = True
        print("\nqtune train: interrupt received: finishing this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
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


def _device_map():
    from accelerate import PartialState

    state = PartialState()
    if state.device.type in ("cuda", "xpu", "mps"):
        return {"": state.device}
    return None


def load_model(recipe: Recipe, path: Path, tokenizer=None):
    """The model of ``recipe`` with its quantization applied (``QuantLinear`` layers).

    Returns:
        ``(model, seconds)``.
    """
    from transformers import AutoModelForCausalLM

    from ..integrations import checkpoints
    from ..integrations.transformers import QTuneConfig

    m, q = recipe.model, recipe.quantization
    dtype = parse_dtype(m["dtype"])
    common: dict[str, Any] = {"device_map": _device_map(), "trust_remote_code": m["trust_remote_code"]}
    if m["attn_implementation"]:
        common["attn_implementation"] = m["attn_implementation"]
    t0 = time.perf_counter()
    fmt = q["format"]
    if q["backend"] == "bitsandbytes":
        model = _load_bitsandbytes(recipe, path, dtype, common)
    elif fmt == "none":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **common)
    elif fmt == "pretrained":
        model = checkpoints.load_model(path, None, dtype=dtype, **common)
    elif fmt == "gptq":
        model = _calibrate_gptq(recipe, path, dtype, common, tokenizer)
    else:
        fields = recipe.format_fields()
        qc = QTuneConfig(fmt, compute_dtype=q["compute_dtype"], skip_modules=q["skip_modules"],
                         overrides=q["overrides"], **fields)
        model = checkpoints.load_model(path, qc, dtype=dtype, **common)
    return model, time.perf_counter() - t0


def _load_bitsandbytes(recipe: Recipe, path: Path, dtype, common: dict):
    """The same format through transformers + bitsandbytes, prepared the way peft documents it
    (``peft.prepare_model_for_kbit_training``). Used to compare qtune against the usual QLoRA stack."""
    from peft import prepare_model_for_kbit_training as peft_prepare
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = recipe.quantization
    compute = parse_dtype(q["compute_dtype"]) or dtype
    if q["format"] == "llm_int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(q.get("threshold", 6.0)),
                                 llm_int8_skip_modules=q["skip_modules"])
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q["format"],
                                 bnb_4bit_use_double_quant=bool(q.get("double_quant", False)),
                                 bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=q["skip_modules"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=bnb, **common)
    gc = recipe.training.get("activation_checkpointing", recipe.training.get("gradient_checkpointing", True))
    return peft_prepare(model, use_gradient_checkpointing=bool(gc),
                        gradient_checkpointing_kwargs={"use_reentrant": False})


def _calibrate_gptq(recipe: Recipe, path: Path, dtype, common: dict, tokenizer):
    """Load the float model and quantize it with GPTQ on the recipe's calibration text."""
    from transformers import AutoModelForCausalLM

    from ..calibration import quantize_with_calibration
    from .data import read_text

    cal, q = recipe.quantization["calibration"], recipe.quantization
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **common)
    overrides = {p: (None if v is None else recipe_format(v, q["compute_dtype"])) for p, v in q["overrides"].items()}
    report = quantize_with_calibration(model, tokenizer, [read_text(cal["source"])], recipe.quant_config(),
                                       samples=cal["samples"], seq_len=cal["seq_len"],
                                       skip_modules=q["skip_modules"], overrides=overrides)
    logger.info("GPTQ calibration: %s in %.0f s", report.summary(), report.seconds)
    return model


def recipe_format(value, compute_dtype):
    """A ``quantization.overrides`` value (format name or dict) as a qtune config."""
    from ..formats import config_from_dict

    d = {"format": value} if isinstance(value, str) else dict(value)
    d.setdefault("compute_dtype", compute_dtype)
    return config_from_dict(d)


def load_tokenizer(recipe: Recipe, model_path: Path):
    from transformers import AutoTokenizer

    tok_path = recipe.model["tokenizer"] or model_path
    tok = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=recipe.model["trust_remote_code"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
def lora_config(recipe: Recipe):
    from peft import LoraConfig

    lo = recipe.lora
    return LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=float(lo["dropout"]),
                      target_modules=lo["target_modules"], use_rslora=lo["use_rslora"], use_dora=lo["use_dora"],
                      bias=lo["bias"], modules_to_save=lo["modules_to_save"], task_type="CAUSAL_LM")


def report_to(recipe: Recipe) -> list[str]:
    value = recipe.output["report_to"]
    if value == "auto":
        import importlib.util
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else ["none"]
    return [value] if isinstance(value, str) else list(value)


# qtune's defaults for trl.SFTConfig (the recipe's training section wins)
TRAINING_DEFAULTS: dict[str, Any] = {
    "activation_checkpointing": True,
    "activation_checkpointing_kwargs": {"use_reentrant": False},
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 100,
    "ddp_find_unused_parameters": False,
    # the quantized weights are buffers; DDP would re-broadcast them from rank 0 at every forward
    "ddp_broadcast_buffers": False,
    "include_num_input_tokens_seen": "all",
}


def sft_config(recipe: Recipe):
    from trl import SFTConfig

    kwargs = dict(TRAINING_DEFAULTS)
    training = dict(recipe.training)
    # transformers 5 renamed gradient_checkpointing* to activation_checkpointing*; recipes may use either
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in training and new not in training:
            training[new] = training.pop(old)
    kwargs.update(training)
    if not torch.cuda.is_available():
        # CPU: use_cpu also makes several processes (torchrun / accelerate launch --multi_gpu) use gloo DDP;
        # bf16/fp16 mixed precision needs an accelerator, so CPU runs compute in model.dtype instead
        if kwargs.get("bf16") or kwargs.get("fp16"):
            logger.warning("no GPU: ignoring training.bf16/fp16 (mixed precision); compute runs in model.dtype")
        kwargs.update(use_cpu=True, bf16=False, fp16=False)
    return SFTConfig(output_dir=recipe.output["dir"], report_to=report_to(recipe), **kwargs)


def adapter_dtype(recipe: Recipe):
    d = recipe.lora["dtype"]
    return None if d == "auto" else parse_dtype(d)


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------
def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (GiB) and, with CUDA, peak allocated device memory."""
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["peak_cuda_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_cuda_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def plot_loss(log_history: list[dict], path: Path, title: str = "") -> Path | None:
    """Training (and eval) loss against step, as a PNG."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"qtune train: {s['status']} at step {s['global_step']}/{s['max_steps']} in {s['wall_s']:.0f} s"]
    p = s.get("parameters", {})
    if p:
        lines.append(f"  trainable parameters: {p['trainable']:,} ({100 * p['trainable'] / max(p['total'], 1):.2f}% "
                     f"of {p['total']:,}; {p['quantized']:,} quantized)")
    m = s.get("memory", {})
    if m:
        lines.append("  peak memory: " + ", ".join(f"{k.removeprefix('peak_').removesuffix('_gib')} {v:.2f} GiB"
                                                   for k, v in m.items()))
    if s.get("tokens_per_s"):
        lines.append(f"  throughput: {s['tokens_per_s']:.0f} tokens/s ({s.get('train_tokens', 0):,} tokens, "
                     f"{s.get('step_s', 0):.2f} s/step)")
    if s.get("eval_loss") is not None:
        lines.append(f"  final eval loss: {s['eval_loss']:.4f} (perplexity {math.exp(s['eval_loss']):.2f})")
    pb, pa = s.get("perplexity_before"), s.get("perplexity_after")
    if pb or pa:
        txt = "  held-out perplexity:"
        if pb:
            txt += f" before {pb['perplexity']:.2f}"
        if pa:
            txt += f" after {pa['perplexity']:.2f}"
        if pb and pa:
            txt += f" ({100 * (pa['perplexity'] / pb['perplexity'] - 1):+.1f}%)"
        lines.append(txt + f" on {(pa or pb)['predicted']:,} tokens")
    if s.get("merge"):
        lines.append(f"  merged: {s['merge']}")
    for k in ("adapter_dir", "loss_plot", "summary_file"):
        if s.get(k):
            lines.append(f"  {k.replace('_', ' ')}: {s[k]}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def write_resolved_recipe(recipe: Recipe, path: Path) -> None:
    """Write the recipe as this run uses it (file + overrides + defaults) as YAML, atomically.

    ``qtune export`` rebuilds the run's base from it, so a run folder stays self-describing even when
    the original recipe file is edited or gone.
    """
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# the resolved recipe of this run: {recipe.path or '(built in Python)'}"
              + (f" with {' '.join(recipe.overrides)}" if recipe.overrides else "") + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump(json.loads(json.dumps(recipe.to_dict(), default=str)), sort_keys=False),
                   encoding="utf-8")
    tmp.replace(path)


def _check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    has_checkpoints = out.is_dir() and any(p.name.startswith("checkpoint-") for p in out.iterdir())
    if resume and not has_checkpoints:
        raise FileNotFoundError(f"--resume: no checkpoint-* folder in {out} to resume from")
    if not resume and has_checkpoints and not overwrite:
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume to continue that run, or set "
                              "output.overwrite=true (or another output.dir) to start over")


def run(recipe: Recipe, *, resume: bool = False, callbacks: list | None = None) -> dict[str, Any]:
    """Train the recipe; return the summary (also written to ``<output.dir>/summary.json``).

    Args:
        recipe: a validated :class:`~qtune.train.recipe.Recipe`.
        resume: continue from the last ``checkpoint-*`` in ``output.dir``.
        callbacks: extra ``transformers.TrainerCallback`` objects.
    """
    from accelerate import PartialState
    from transformers import set_seed

    from ..integrations.trl import QTuneSFTTrainer, count_parameters
    from . import data

    t_start = time.perf_counter()
    out = Path(recipe.output["dir"])
    _check_output_dir(out, resume, recipe.output["overwrite"])
    args = sft_config(recipe)  # sets up the (distributed) state first
    state = PartialState()
    set_seed(args.seed)

    if state.is_main_process:
        write_resolved_recipe(recipe, out / "recipe.yaml")
    model_path = resolve_model_path(recipe.model["path"], recipe.model["revision"])
    tokenizer = load_tokenizer(recipe, model_path)
    with state.main_process_first():
        train_ds = data.load_dataset(recipe.dataset["train"])
        eval_ds = data.load_dataset(recipe.dataset["eval"]) if recipe.dataset["eval"] else None
    model, load_s = load_model(recipe, model_path, tokenizer)
    say = print if state.is_main_process else (lambda *a, **k: None)
    say(f"qtune train: loaded {model_path} ({recipe.quantization['format']}) in {load_s:.1f} s")

    summary: dict[str, Any] = {"recipe": str(recipe.path) if recipe.path else None, "overrides": list(recipe.overrides),
                               "model": str(model_path), "format": recipe.quantization["format"],
                               "load_s": load_s}
    ppl_spec = recipe.dataset["perplexity"]
    ppl_text = data.read_text(ppl_spec["source"]) if ppl_spec else None
    bnb_cpu = recipe.quantization["backend"] == "bitsandbytes" and not torch.cuda.is_available()
    if bnb_cpu and ppl_spec and ppl_spec["before"]:
        # bitsandbytes 0.50 on CPU repacks 4-bit weights for its fused kernel in eval mode, after which
        # backward yields no input gradient: never evaluate such a model before training
        say("qtune train: bitsandbytes on CPU: skipping the perplexity before training (eval mode would "
            "repack its CPU weights and break training)")
    elif ppl_spec and ppl_spec["before"] and not resume and state.is_main_process:
        t0 = time.perf_counter()
        summary["perplexity_before"] = data.perplexity(model, tokenizer, ppl_text, max_tokens=ppl_spec["max_tokens"],
                                                       window=ppl_spec["window"])
        say(f"qtune train: held-out perplexity before training: {summary['perplexity_before']['perplexity']:.2f} "
            f"({summary['perplexity_before']['predicted']:,} tokens, {time.perf_counter() - t0:.0f} s)")
    state.wait_for_everyone()

    interrupt = _interrupt_callback_class()()
    trainer = QTuneSFTTrainer(model, args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                              peft_config=lora_config(recipe), adapter_dtype=adapter_dtype(recipe),
                              callbacks=[interrupt, *(callbacks or [])])
    if recipe.quantization["storage_dtype"]:
        # before accelerate wraps the model (in train()): FSDP then shards the packed weights as well
        from ..nn import set_storage_dtype
        n = set_storage_dtype(trainer.model, recipe.quantization["storage_dtype"])
        say(f"qtune train: packed weights of {n} layers stored as {recipe.quantization['storage_dtype']} parameters")
    counts = count_parameters(trainer.model)
    summary["parameters"] = {"trainable": counts["trainable"], "quantized": counts["quantized"],
                             "total": counts["float"] + counts["quantized"]}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with _sigint_requests(interrupt):
        result = trainer.train(resume_from_checkpoint=True if resume else None)
    train_s = time.perf_counter() - t0
    st = trainer.state
    summary.update(status="interrupted" if interrupt.stopped_at is not None else "finished",
                   global_step=st.global_step, max_steps=st.max_steps, start_step=interrupt.start_step,
                   train_s=train_s, train_loss=result.training_loss)
    if state.num_processes > 1:
        summary["adapter_checksums"] = _gather_checksums(trainer.model)
        if len(set(summary["adapter_checksums"])) != 1:
            logger.warning("the ranks hold different adapter weights: %s", summary["adapter_checksums"])
    runtime = result.metrics.get("train_runtime", train_s)
    steps_run = max(st.global_step - interrupt.start_step, 1)
    tokens = int(st.num_input_tokens_seen or 0)  # since step 0; scaled to the steps of this run
    if tokens:
        summary["train_tokens"] = tokens
        summary["tokens_per_s"] = tokens * steps_run / max(st.global_step, 1) / max(runtime, 1e-9)
    summary["step_s"] = runtime / steps_run
    if interrupt.stopped_at is not None:
        summary["checkpoint"] = str(out / f"checkpoint-{st.global_step}")
        say(f"qtune train: stopped at step {st.global_step}; checkpoint saved in {summary['checkpoint']}. "
            f"Continue with: qtune train {recipe.path or 'RECIPE.yaml'} --resume")
    else:
        if recipe.output["save_adapter"]:
            adapter_dir = out / "adapter"
            trainer.save_model(str(adapter_dir))
            if state.is_main_process:
                tokenizer.save_pretrained(adapter_dir)
            summary["adapter_dir"] = str(adapter_dir)
        if eval_ds is not None:
            summary["eval_loss"] = float(trainer.evaluate()["eval_loss"])
        if ppl_spec and state.is_main_process:
            summary["perplexity_after"] = data.perplexity(trainer.model, tokenizer, ppl_text,
                                                          max_tokens=ppl_spec["max_tokens"], window=ppl_spec["window"])
        if recipe.output["merge"]:
            summary["merge"] = _save_merged(trainer.model, tokenizer, out / "merged", state)
    summary["memory"] = peak_memory()
    summary["wall_s"] = time.perf_counter() - t_start
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if recipe.output["plot"]:
            png = plot_loss(st.log_history, out / "loss.png", title=f"{model_path.name} {recipe.quantization['format']}")
            summary["loss_plot"] = str(png) if png else None
        summary["summary_file"] = str(out / "summary.json")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        say(format_summary(summary))
    state.wait_for_everyone()
    return summary


def _gather_checksums(model) -> list[str]:
    """A SHA-256 of this rank's trainable weights, gathered from every rank (DDP keeps them identical)."""
    import hashlib

    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            t = p.detach()
            if isinstance(t, DTensor):  # FSDP2 shards: every rank gathers the full tensor (same order on all)
                t = t.full_tensor()
            h.update(name.encode())
            h.update(t.float().cpu().numpy().tobytes())
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, h.hexdigest())
    return gathered


def _save_merged(peft_model, tokenizer, folder: Path, state) -> str:
    from ..integrations.checkpoints import save_quantized
    from ..integrations.peft import merge_and_unload
    from ..integrations.transformers import mark_quantized

    merged, report = merge_and_unload(peft_model)
    if state.is_main_process:
        mark_quantized(merged)
        save_quantized(merged, folder, tokenizer=tokenizer, overwrite=True)
    return f"{report.summary()} -> {folder}"
