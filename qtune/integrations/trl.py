"""trl integration: k-bit preparation of a qtune model, ``QTuneSFTTrainer`` and the same for every trl trainer.

:func:`prepare_model_for_kbit_training` does what peft's function of that name is for, without its
memory trap: peft casts every fp16/bf16 parameter that is not a bitsandbytes ``Params4bit`` to fp32,
which for a qtune model means the embeddings, the head and every norm (on an 8B model with a 128k
vocabulary, ~2 GB more). Here:

- every parameter is frozen (adapters are added afterwards);
- float parameters outside the quantized layers (norms, embeddings, head, unquantized layers) are cast
  to ``dtype`` only if one is given, never upcast behind the caller's back;
- packed tensors are buffers of the ``QuantLinear`` layers and are never touched;
- gradient checkpointing is enabled non-reentrant, with input gradients (so the checkpointed blocks,
  whose parameters are all frozen, still pass gradients to the adapters);
- the model is marked quantized (``is_quantized``, ``quantization_method="qtune"``,
  ``is_loaded_in_4bit``/``_8bit``, ``hf_quantizer``; see :func:`qtune.integrations.transformers.mark_quantized`)
  so the transformers Trainer, trl and peft treat it as a quantized base: the Trainer refuses to train it
  without adapters, never wraps it in ``DataParallel``, and trl keeps adapters in bf16 as for QLoRA.

:class:`QTuneSFTTrainer` is trl's ``SFTTrainer`` that runs the preparation and registers qtune's LoRA
layers on the ``peft_config`` (expanding ``"all-linear"`` to the quantized layers) before trl builds the
PEFT model. Datasets, packing, completion-only and assistant-only loss are trl's own.
:func:`qtune_trainer` does the same for any trl trainer (``DPOTrainer``, ``KTOTrainer``, ``RewardTrainer``,
``GRPOTrainer``, ``RLOOTrainer``, ``DistillationTrainer``): one mixin, :class:`QTuneTrainerMixin`, in front
of trl's class. trl's preference and RL trainers take their reference model from the policy itself when
the model is a ``PeftModel`` and ``ref_model`` is ``None`` (adapter disabled, or a frozen copy of a loaded
adapter), so the quantized base is held once.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn
from trl import SFTConfig, SFTTrainer

from ..formats.base import parse_dtype
from ..nn.base import QuantLinear, packed_storage_parameters
from .peft import _inject_expert_lora, _quiet_unmatched_parameters, prepare_lora_config

logger = logging.getLogger(__name__)

__all__ = ["prepare_model_for_kbit_training", "is_qtune_model", "QTuneTrainerMixin", "QTuneSFTTrainer",
           "qtune_trainer", "count_parameters"]


def is_qtune_model(model: nn.Module) -> bool:
    """Whether ``model`` holds at least one qtune ``QuantLinear``."""
    return any(isinstance(m, QuantLinear) for m in model.modules())


def _quant_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, QuantLinear) for p in m.parameters(recurse=False)}


def prepare_model_for_kbit_training(model: nn.Module, *, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                    dtype: torch.dtype | str | None = None, freeze: bool = True) -> nn.Module:
    """Prepare a model with qtune layers for adapter training (in place).

    Args:
        model: a transformers model whose linear layers are (partly) qtune ``QuantLinear``.
        use_gradient_checkpointing: enable activation checkpointing (non-reentrant by default).
        gradient_checkpointing_kwargs: passed to ``torch.utils.checkpoint`` (default ``{"use_reentrant": False}``).
        dtype: cast the float parameters outside the quantized layers to this dtype (default: leave them).
        freeze: freeze every parameter (False for a model that already carries adapters).
    Returns:
        ``model``.
    """
    dtype = parse_dtype(dtype, what="dtype")
    quant_params = _quant_param_ids(model)
    for p in model.parameters():
        if freeze:
            p.requires_grad_(False)
        if dtype is not None and p.is_floating_point() and id(p) not in quant_params and p.dtype != dtype:
            p.data = p.data.to(dtype)
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if getattr(getattr(model, "config", None), "use_cache", False):
            model.config.use_cache = False
    if is_qtune_model(model) and getattr(model, "hf_quantizer", None) is None:
        from .transformers import mark_quantized
        mark_quantized(model)
    model._qtune_kbit_prepared = True
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"trainable", "float", "quantized"}``: trainable parameters, all float parameters, and the weights
    held (packed) by ``QuantLinear`` layers (``in_features × out_features`` each)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    packed = {id(p) for p in packed_storage_parameters(model)}  # quantized bytes stored as float parameters
    floats = sum(p.numel() for p in model.parameters() if id(p) not in packed)
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return {"trainable": trainable, "float": floats, "quantized": quantized}


def _checkpointing(args) -> tuple[bool, dict | None]:
    """(enabled, kwargs) from training args; transformers 5 renamed gradient_* to activation_checkpointing*."""
    if args is None:
        return True, None
    on = getattr(args, "activation_checkpointing", None)
    if on is None:
        on = getattr(args, "gradient_checkpointing", False)
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs", None)
    return bool(on), kwargs


def _set_checkpointing_kwargs(args, kwargs: dict) -> None:
    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        if hasattr(args, name):
            setattr(args, name, kwargs)


def _restore_saved_module_dtypes(model: nn.Module) -> None:
    """Give trainable copies of whole modules (peft ``modules_to_save``, e.g. a reward model's ``score``
    head) back the dtype of the module they copy.

    trl casts every trainable parameter of a quantized model to bf16 (QLoRA's choice for LoRA A/B, whose
    inputs the LoRA layer casts); a copied ``nn.Linear`` does no such cast, so in bf16 it would meet fp32
    hidden states of an fp32 base and fail.
    """
    from peft.utils.other import ModulesToSaveWrapper

    for m in model.modules():
        if isinstance(m, ModulesToSaveWrapper):
            ref = next((p for p in m.original_module.parameters() if p.is_floating_point()), None)
            if ref is None:
                continue
            for p in m.modules_to_save.parameters():
                if p.is_floating_point() and p.dtype != ref.dtype:
                    p.data = p.data.to(ref.dtype)


class QTuneTrainerMixin:
    """In front of a trl trainer class: k-bit preparation and qtune LoRA layers, then trl as usual.

    Args:
        model: a transformers model with qtune layers (or any model; then this is the plain trl trainer),
            or a ``peft.PeftModel`` on one (an adapter to continue training; then no ``peft_config``).
        args: the trl trainer's config (``trl.SFTConfig``, ``trl.DPOConfig``, ...).
        peft_config: a ``peft.LoraConfig``; required for a quantized base (its weights cannot be trained).
            ``target_modules="all-linear"`` covers the quantized layers.
        adapter_dtype: dtype of the trainable LoRA parameters after trl set them up (``None``: trl's choice,
            bf16 for a quantized base as in QLoRA). Trainable copies of whole modules (``modules_to_save``,
            e.g. a reward model's ``score`` head) keep the dtype of the module they copy.
        kwargs: the trl trainer's other arguments (train_dataset, processing_class, callbacks, and per trainer
            ref_model, reward_funcs, teacher_model, ...).
    Raises:
        ValueError: a quantized base without adapters.
    """

    def __init__(self, model: nn.Module, args=None, *, peft_config=None,
                 adapter_dtype: torch.dtype | str | None = None, **kwargs: Any) -> None:
        from peft import PeftModel

        self.qtune_quantized = is_qtune_model(model)
        if self.qtune_quantized:
            if peft_config is None and not isinstance(model, PeftModel):
                raise ValueError("the model's qtune layers are quantized and frozen: pass a peft_config "
                                 "(e.g. peft.LoraConfig(target_modules='all-linear')) to train adapters on them")
            base = model.get_base_model() if isinstance(model, PeftModel) else model
            gc, gc_kwargs = _checkpointing(args)
            if not getattr(base, "_qtune_kbit_prepared", False):
                # the checkpointing options the Trainer itself understands are not torch.utils.checkpoint's
                ck = {k: v for k, v in (gc_kwargs or {}).items() if k not in ("every_n_layers", "offload")}
                prepare_model_for_kbit_training(base, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=ck,
                                                freeze=not isinstance(model, PeftModel))
            if gc and "use_reentrant" not in (gc_kwargs or {}):
                # the Trainer enables checkpointing again from args; keep it non-reentrant
                _set_checkpointing_kwargs(args, {**(gc_kwargs or {}), "use_reentrant": False})
            if peft_config is not None:
                prepare_lora_config(model, peft_config)
        with _quiet_unmatched_parameters(model if peft_config is not None else None, peft_config):
            super().__init__(model, args=args, peft_config=peft_config, **kwargs)
        if self.qtune_quantized and peft_config is not None:
            # trl built the PeftModel with peft's own get_peft_model: add qtune's LoRA on quantized experts
            # (target_parameters) in the dtype trl gave the other adapter weights
            dtypes = {p.dtype for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n}
            for name in _inject_expert_lora(self.model, peft_config, "default"):
                for p in self.model.get_submodule("base_model.model." + name.rpartition(".")[0]).parameters():
                    if p.requires_grad and len(dtypes) == 1:
                        p.data = p.data.to(next(iter(dtypes)))
        if adapter_dtype is not None:
            dtype = parse_dtype(adapter_dtype, what="adapter_dtype")
            for p in self.model.parameters():
                if p.requires_grad and p.dtype != dtype:
                    p.data = p.data.to(dtype)
        if self.qtune_quantized:
            _restore_saved_module_dtypes(self.model)
        self._flops_params: int | None = None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume: the Trainer reloads the adapter through peft's ``load_adapter``, which upcasts it to fp32;
        put every trainable parameter back in the dtype it trained in before the optimizer is built."""
        target = model if model is not None else self.model
        dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        for n, p in target.named_parameters():
            if n in dtypes and p.dtype != dtypes[n]:
                p.data = p.data.to(dtypes[n])

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """``6 · tokens · weights``, counting the packed weights of the quantized layers.

        transformers' default counts only parameters (the quantized weights are buffers here) and, for a
        model flagged ``is_loaded_in_4bit``, imports bitsandbytes to do so.
        """
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
        if ids is None:
            return 0
        if self._flops_params is None:
            c = count_parameters(self.model)
            embeddings = sum(m.weight.numel() for m in self.model.modules() if isinstance(m, nn.Embedding))
            self._flops_params = c["float"] + c["quantized"] - embeddings
        return 6 * ids.numel() * self._flops_params


class QTuneSFTTrainer(QTuneTrainerMixin, SFTTrainer):
    """trl ``SFTTrainer`` for qtune models (see :class:`QTuneTrainerMixin`); ``args`` is a ``trl.SFTConfig``."""

    def __init__(self, model: nn.Module, args: SFTConfig | None = None, **kwargs: Any) -> None:
        super().__init__(model, args, **kwargs)


@functools.cache
def qtune_trainer(trainer_class: type) -> type:
    """``trainer_class`` (a trl trainer) with :class:`QTuneTrainerMixin` in front, e.g.
    ``qtune_trainer(trl.DPOTrainer)(model, args, peft_config=..., train_dataset=..., processing_class=...)``."""
    if trainer_class is SFTTrainer:
        return QTuneSFTTrainer
    return type(f"QTune{trainer_class.__name__}", (QTuneTrainerMixin, trainer_class),
                {"__doc__": f"trl ``{trainer_class.__name__}`` for qtune models (see :class:`QTuneTrainerMixin`).",
                 "__module__": __name__})
