"""Run a training recipe: load (and quantize) the model, train LoRA adapters with trl, report.

``run(recipe)`` is what ``qtune train RECIPE.yaml`` calls, also under ``accelerate launch -m qtune
train`` (one process per device; trl/accelerate handle DDP or FSDP from the accelerate config). Every
task (``task: sft``, ``dpo``, ``kto``, ``reward``, ``grpo``, ``rloo``, ``distill``; see
:mod:`qtune.train.tasks`) takes the same named steps:

1. :func:`start_run`: resolve ``auto`` dtypes, check the run folder, the trl config of the task, write
   the resolved recipe;
2. :func:`load_data`: datasets (``dataset.train``/``eval``) with the columns the task needs (a missing
   column is a recipe error naming the ``source`` line), before any weights are loaded;
3. :func:`load_base`: tokenizer and base model (:mod:`qtune.train.base_model`, which ``qtune export``
   uses too): a float checkpoint quantized while loading (``quantization.format``), an already quantized
   checkpoint (``pretrained``), or calibrated here (``gptq``); a causal LM, or a one-output sequence
   classifier for ``reward``;
4. :func:`attach_adapter`: a new LoRA config from ``lora``, or the trained adapter of ``model.adapter``
   (trainable);
5. held-out perplexity before training (``dataset.perplexity``);
6. :func:`build_trainer`: the task's trl trainer behind :class:`~qtune.integrations.trl.QTuneTrainerMixin`
   (reference = the same quantized base; reward functions; teacher);
7. :func:`train`: resuming from the last checkpoint with ``resume=True``;
8. :func:`finish`: the adapter (PEFT format), final eval loss and perplexity, a loss-curve PNG and
   ``summary.json``.

The first SIGINT (Ctrl-C) lets the running optimizer step finish, saves a checkpoint, and stops;
``--resume`` continues from it with the same step count. A second SIGINT aborts at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
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
from .base_model import SCORE_HEADS, Base, device_map, has_score_head, resolve_model_path
from .base_model import load_base as _load_base
from .recipe import Recipe
from .tasks import TASKS, Task, task_config_kwargs

logger = logging.getLogger(__name__)



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
# Configs
# ------------------------------------------------------------------------------------------------
def lora_config(recipe: Recipe):
    """The ``peft.LoraConfig`` of ``lora``; for ``task: reward`` a ``SEQ_CLS`` config whose ``score`` head
    trains beside the adapter (``modules_to_save``)."""
    from peft import LoraConfig

    lo = recipe.lora
    seq_cls = has_score_head(recipe)
    save = list(lo["modules_to_save"] or [])
    if seq_cls:
        save += [h for h in SCORE_HEADS if h not in save]
    return LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=float(lo["dropout"]),
                      target_modules=lo["target_modules"], use_rslora=lo["use_rslora"], use_dora=lo["use_dora"],
                      target_parameters=["all-experts"] if lo.get("experts") else None,
                      bias=lo["bias"], modules_to_save=save or None, task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM")


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


def task_config(recipe: Recipe):
    """The trl config of the recipe's task (``trl.SFTConfig``, ``trl.DPOConfig``, ...): qtune's defaults,
    then ``training``, then the task section's trl fields."""
    task = TASKS[recipe.task]
    fields = task.config_fields()
    kwargs = {k: v for k, v in TRAINING_DEFAULTS.items() if k in fields}
    training = dict(recipe.training)
    training.update(task_config_kwargs(task, recipe.task_options))
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
    return task.config_class()(output_dir=recipe.output["dir"], report_to=report_to(recipe), **kwargs)


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
    first, last = s.get("metrics_first") or {}, s.get("metrics_last") or {}
    if last:
        lines.append(f"  {s.get('task', 'sft')} metrics (first -> last logged): "
                     + ", ".join(f"{k} {first[k]:.4g} -> {v:.4g}" for k, v in last.items()))
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


@dataclasses.dataclass
class Run:
    """What the steps of :func:`run` hand on to each other."""

    recipe: Recipe
    task: Task
    out: Path
    args: Any  # the task's trl config
    state: Any  # accelerate.PartialState
    resume: bool
    summary: dict[str, Any]
    t_start: float

    def say(self, *a, **k) -> None:
        if self.state.is_main_process:
            print(*a, **k)


def start_run(recipe: Recipe, *, resume: bool = False) -> Run:
    """Step 1: ``auto`` dtypes resolved (printed once), the run folder checked, the task's trl config built
    (this sets up the distributed state), the seed set, the resolved recipe written to ``recipe.yaml``."""
    from accelerate import PartialState
    from transformers import set_seed

    t_start = time.perf_counter()
    resolved = recipe.resolve_dtypes()
    out = Path(recipe.output["dir"])
    _check_output_dir(out, resume, recipe.output["overwrite"])
    args = task_config(recipe)  # sets up the (distributed) state first
    state = PartialState()
    set_seed(args.seed)
    r = Run(recipe, TASKS[recipe.task], out, args, state, resume,
            {"recipe": str(recipe.path) if recipe.path else None, "overrides": list(recipe.overrides),
             "task": recipe.task}, t_start)
    for line in resolved:
        r.say(f"qtune train: {line}")
    if state.is_main_process:
        write_resolved_recipe(recipe, out / "recipe.yaml")
    return r


def load_data(recipe: Recipe, state=None):
    """Step 2: ``(train, eval or None)`` datasets with the columns the task needs.

    Raises:
        RecipeError: a dataset lacks a column the task needs (names the ``source`` line of the recipe).
    """
    from . import data

    required = TASKS[recipe.task].columns or None
    ctx = state.main_process_first() if state is not None else contextlib.nullcontext()
    out = []
    with ctx:
        for split in ("train", "eval"):
            spec = recipe.dataset[split]
            if spec is None:
                out.append(None)
                continue
            try:
                out.append(data.load_dataset(spec, required=required))
            except data.MissingColumns as e:
                raise recipe.error(("dataset", split, "source"), f"task {recipe.task} {e}") from None
    return out[0], out[1]


def load_base(recipe: Recipe) -> Base:
    """Step 3: the base as the recipe describes it (:func:`qtune.train.base_model.load_base`, which
    ``qtune export`` uses to rebuild a run's base)."""
    return _load_base(recipe)


def find_adapter_dir(recipe: Recipe) -> Path:
    """The adapter folder ``model.adapter`` names: itself, or ``adapter/`` of a run folder.

    Raises:
        RecipeError: no adapter there (names the recipe line).
    """
    p = Path(recipe.model["adapter"]).expanduser()
    for cand in (p, p / "adapter"):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise recipe.error(("model", "adapter"), f"{p}: neither a PEFT adapter folder (adapter_config.json) nor a "
                       "qtune train run folder with adapter/ (did that run finish?)")


def attach_adapter(recipe: Recipe, model, float_path: Path | None = None, say=None):
    """Step 4: ``(model, peft_config)``: the base and a new ``LoraConfig`` (trl wraps it), or the trained
    adapter of ``model.adapter`` loaded trainable (a ``PeftModel``; ``peft_config`` ``None``), or with
    ``lora.init: loftq`` the new adapter already attached and LoftQ-initialised from the float checkpoint
    ``float_path`` (a ``PeftModel``; ``peft_config`` ``None``). LoftQ is deterministic, so a resumed run gets the
    same quantized base back before the checkpoint's adapter weights are loaded over it."""
    if recipe.model["adapter"] is None and recipe.lora.get("init", "default") == "loftq":
        from ..integrations.loftq import loftq_init_
        from ..integrations.peft import get_peft_model

        if float_path is None:
            raise ValueError("lora.init: loftq needs the float checkpoint folder (float_path)")
        peft_model = get_peft_model(model, lora_config(recipe))
        loftq_init_(peft_model, float_path, iters=recipe.lora["loftq_iters"], log=say)
        return peft_model, None
    if recipe.model["adapter"] is None:
        config = lora_config(recipe)
        if recipe.lora["quantization_aware"]:  # the pooling group comes from the loaded base's layers
            from ..integrations.peft import quantization_aware_config

            try:
                quantization_aware_config(model, config)
            except ValueError as e:
                raise recipe.error(("lora", "quantization_aware"), str(e)) from None
        return model, config
    from ..integrations.peft import load_adapter

    folder = find_adapter_dir(recipe)
    return load_adapter(model, str(folder), is_trainable=True), None


def _reward_inputs(run: Run, base: Base) -> dict[str, Any]:
    from .rewards import resolve_reward

    names = run.recipe.task_options["reward"]
    names = [names] if isinstance(names, str) else list(names)
    try:
        return {"reward_funcs": [resolve_reward(n) for n in names]}
    except ValueError as e:
        raise run.recipe.error((run.task.name, "reward"), str(e)) from None


def _teacher_inputs(run: Run, base: Base) -> dict[str, Any]:
    """The teacher: ``distill.teacher`` or the base checkpoint unquantized, frozen, in ``model.dtype``."""
    from transformers import AutoModelForCausalLM

    m = run.recipe.model
    path = resolve_model_path(run.recipe.task_options["teacher"] or m["path"], m["revision"])
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(m["dtype"]), device_map=device_map(),
                                                   trust_remote_code=m["trust_remote_code"])
    teacher.requires_grad_(False)
    return {"teacher_model": teacher.eval()}


# what a task's trainer takes beyond model, args, data and tokenizer (dpo/kto: ref_model=None, i.e. the base)
TASK_INPUTS = {"grpo": _reward_inputs, "rloo": _reward_inputs, "distill": _teacher_inputs}


def build_trainer(run: Run, base: Base, model, peft_config, train_ds, eval_ds, callbacks: list):
    """Step 6: the task's trl trainer for the qtune model (:func:`qtune.integrations.trl.qtune_trainer`)."""
    from ..integrations.trl import qtune_trainer

    recipe = run.recipe
    extra = TASK_INPUTS[run.task.name](run, base) if run.task.name in TASK_INPUTS else {}
    cls = qtune_trainer(run.task.trainer_class())
    trainer = cls(model, run.args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=base.tokenizer,
                  peft_config=peft_config, adapter_dtype=adapter_dtype(recipe), callbacks=callbacks, **extra)
    if recipe.quantization["storage_dtype"]:
        # before accelerate wraps the model (in train()): FSDP then shards the packed weights as well
        from ..nn import set_storage_dtype
        n = set_storage_dtype(trainer.model, recipe.quantization["storage_dtype"])
        run.say(f"qtune train: packed weights of {n} layers stored as {recipe.quantization['storage_dtype']} "
                "parameters")
    return trainer


def train(run: Run, trainer, interrupt) -> None:
    """Step 7: ``trainer.train()`` (resumed with ``run.resume``), SIGINT-aware; fills the run summary."""
    from ..integrations.trl import count_parameters

    summary = run.summary
    counts = count_parameters(trainer.model)
    summary["parameters"] = {"trainable": counts["trainable"], "quantized": counts["quantized"],
                             "total": counts["float"] + counts["quantized"]}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with _sigint_requests(interrupt):
        result = trainer.train(resume_from_checkpoint=True if run.resume else None)
    train_s = time.perf_counter() - t0
    st = trainer.state
    summary.update(status="interrupted" if interrupt.stopped_at is not None else "finished",
                   global_step=st.global_step, max_steps=st.max_steps, start_step=interrupt.start_step,
                   train_s=train_s, train_loss=result.training_loss)
    summary.update(task_metrics(st.log_history))
    if run.state.num_processes > 1:
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


# metrics trl logs per task that a summary repeats (first and last logged value)
TASK_METRICS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "reward", "kl",
                "accuracy", "margin")


def task_metrics(log_history: list[dict]) -> dict[str, Any]:
    """``{"metrics_first": {...}, "metrics_last": {...}}`` of :data:`TASK_METRICS` in the training log."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for h in log_history:
        for k in TASK_METRICS:
            if k in h and "eval_" + k not in h:
                first.setdefault(k, h[k])
                last[k] = h[k]
    return {"metrics_first": first, "metrics_last": last} if first else {}


def finish(run: Run, trainer, base: Base, interrupt, eval_ds, ppl: tuple | None) -> dict[str, Any]:
    """Step 8: save the adapter (or say where the checkpoint is), final eval and perplexity, merged model,
    loss plot and ``summary.json``."""
    from . import data

    recipe, out, state, summary = run.recipe, run.out, run.state, run.summary
    st = trainer.state
    if interrupt.stopped_at is not None:
        summary["checkpoint"] = str(out / f"checkpoint-{st.global_step}")
        run.say(f"qtune train: stopped at step {st.global_step}; checkpoint saved in {summary['checkpoint']}. "
                f"Continue with: qtune train {recipe.path or 'RECIPE.yaml'} --resume")
    else:
        if recipe.output["save_adapter"]:
            adapter_dir = out / "adapter"
            trainer.save_model(str(adapter_dir))
            if state.is_main_process:
                base.tokenizer.save_pretrained(adapter_dir)
            summary["adapter_dir"] = str(adapter_dir)
        if eval_ds is not None:
            metrics = trainer.evaluate()
            if "eval_loss" in metrics:
                summary["eval_loss"] = float(metrics["eval_loss"])
            summary["eval_metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if ppl is not None and state.is_main_process:
            spec, text = ppl
            summary["perplexity_after"] = data.perplexity(trainer.model, base.tokenizer, text,
                                                          max_tokens=spec["max_tokens"], window=spec["window"])
        if recipe.output["merge"]:
            summary["merge"] = _save_merged(trainer.model, base.tokenizer, out / "merged", state)
    summary["memory"] = peak_memory()
    summary["wall_s"] = time.perf_counter() - run.t_start
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if recipe.output["plot"]:
            png = plot_loss(st.log_history, out / "loss.png",
                            title=f"{base.path.name} {recipe.quantization['format']} {recipe.task}")
            summary["loss_plot"] = str(png) if png else None
        summary["summary_file"] = str(out / "summary.json")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        run.say(format_summary(summary))
    state.wait_for_everyone()
    return summary


def _pair_margin(run: Run, model, base: Base, eval_ds, when: str) -> None:
    """DPO: the chosen − rejected log-prob margin on the held-out pairs (``dataset.eval``), before and after
    training (:func:`qtune.train.data.preference_margin`; before training: the adapter is the identity)."""
    from . import data

    if run.task.name != "dpo" or eval_ds is None or (when == "before" and run.resume) or not run.state.is_main_process:
        return
    m = data.preference_margin(model, base.tokenizer, eval_ds)
    run.summary[f"pair_margin_{when}"] = m
    run.say(f"qtune train: held-out chosen-rejected log-prob margin {when} training: {m['margin']:+.3f} nats "
            f"(chosen preferred in {100 * m['accuracy']:.0f}% of {m['pairs']} pairs)")


def _perplexity_before(run: Run, base: Base) -> tuple | None:
    """Step 5: held-out perplexity before training; returns ``(spec, text)`` for the one after."""
    from . import data

    spec = run.recipe.dataset["perplexity"]
    if not spec:
        return None
    text = data.read_text(spec["source"])
    bnb_cpu = run.recipe.quantization["backend"] == "bitsandbytes" and not torch.cuda.is_available()
    if bnb_cpu and spec["before"]:
        # bitsandbytes 0.50 on CPU repacks 4-bit weights for its fused kernel in eval mode, after which
        # backward yields no input gradient: never evaluate such a model before training
        run.say("qtune train: bitsandbytes on CPU: skipping the perplexity before training (eval mode would "
                "repack its CPU weights and break training)")
    elif spec["before"] and not run.resume and run.state.is_main_process:
        t0 = time.perf_counter()
        before = data.perplexity(base.model, base.tokenizer, text, max_tokens=spec["max_tokens"],
                                 window=spec["window"])
        run.summary["perplexity_before"] = before
        run.say(f"qtune train: held-out perplexity before training: {before['perplexity']:.2f} "
                f"({before['predicted']:,} tokens, {time.perf_counter() - t0:.0f} s)")
    run.state.wait_for_everyone()
    return spec, text


def run(recipe: Recipe, *, resume: bool = False, callbacks: list | None = None) -> dict[str, Any]:
    """Train the recipe; return the summary (also written to ``<output.dir>/summary.json``).

    Args:
        recipe: a validated :class:`~qtune.train.recipe.Recipe`.
        resume: continue from the last ``checkpoint-*`` in ``output.dir``.
        callbacks: extra ``transformers.TrainerCallback`` objects.
    Raises:
        RecipeError: a dataset without the columns the task needs, an adapter folder that is not one.
    """
    r = start_run(recipe, resume=resume)
    train_ds, eval_ds = load_data(recipe, r.state)
    if recipe.model["adapter"] is not None:
        find_adapter_dir(recipe)  # before the weights are loaded
    base = load_base(recipe)
    r.summary.update(model=str(base.path), format=recipe.quantization["format"], load_s=base.load_s)
    r.say(f"qtune train: loaded {base.path} ({recipe.quantization['format']}, task {recipe.task}) in "
          f"{base.load_s:.1f} s")
    model, peft_config = attach_adapter(recipe, base.model, base.path, say=r.say)
    if peft_config is None and recipe.model["adapter"] is not None:
        r.summary["start_adapter"] = str(find_adapter_dir(recipe))
    ppl = _perplexity_before(r, base)
    _pair_margin(r, model, base, eval_ds, "before")
    interrupt = _interrupt_callback_class()()
    trainer = build_trainer(r, base, model, peft_config, train_ds, eval_ds, [interrupt, *(callbacks or [])])
    train(r, trainer, interrupt)
    if interrupt.stopped_at is None:
        _pair_margin(r, trainer.model, base, eval_ds, "after")
    return finish(r, trainer, base, interrupt, eval_ds, ppl)


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
    from ..integrations.layouts import save_quantized
    from ..integrations.peft import merge_and_unload
    from ..integrations.transformers import mark_quantized

    merged, report = merge_and_unload(peft_model)
    if state.is_main_process:
        mark_quantized(merged)
        save_quantized(merged, folder, tokenizer=tokenizer, overwrite=True)
    return f"{report.summary()} -> {folder}"
