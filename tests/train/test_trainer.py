"""QTuneSFTTrainer and k-bit preparation on tiny random models (CPU)."""
from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig

from qtune.integrations.peft import QuantLoraLinear
from qtune.integrations.trl import QTuneSFTTrainer, count_parameters, prepare_model_for_kbit_training
from qtune.nn import QuantLinear
from tests.train.models import CORPUS, FORMATS, quantize, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _args(tmp_path, **kw) -> SFTConfig:
    base = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
                logging_steps=1, report_to="none", max_length=64, save_strategy="no", disable_tqdm=True,
                seed=0, data_seed=0, bf16=False)
    base.update(kw)
    return SFTConfig(**base)


def _text_ds():
    return Dataset.from_dict({"text": [CORPUS[i:i + 200] for i in range(0, len(CORPUS) - 200, 40)]})


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_sft_steps_lower_loss(fmt, tok, tmp_path):
    model = quantize(tiny_model(vocab_size=len(tok)), fmt)
    # every buffer by name (layers may share a code table until mark_quantized gives each its own)
    packed = {n: b.clone() for n, b in model.named_buffers(remove_duplicate=False)}
    trainer = QTuneSFTTrainer(model, _args(tmp_path), train_dataset=_text_ds(), processing_class=tok,
                              peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert sum(isinstance(m, QuantLoraLinear) for m in trainer.model.modules()) == 14
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < losses[0] - 0.02, losses
    # the quantized weights did not move
    for n, b in trainer.model.get_base_model().named_buffers():
        key = n.replace(".base_layer", "")
        if key in packed:
            assert torch.equal(b, packed[key]), n


def test_model_recognized_as_quantized(tok, tmp_path):
    model = quantize(tiny_model(vocab_size=len(tok)), "nf4")
    trainer = QTuneSFTTrainer(model, _args(tmp_path, max_steps=1), train_dataset=_text_ds(), processing_class=tok,
                              peft_config=LoraConfig(r=4, target_modules="all-linear"))
    base = trainer.model.get_base_model()
    assert base.is_quantized and base.is_loaded_in_4bit and base.quantization_method == "qtune"
    assert base.hf_quantizer is not None and base.hf_quantizer.is_trainable
    # trl treats it as a QLoRA base: adapters in bf16
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert trainer.floating_point_ops({"input_ids": torch.zeros(2, 8, dtype=torch.long)}) > 0
    # a quantized base without adapters is refused
    with pytest.raises(ValueError, match="peft_config"):
        QTuneSFTTrainer(quantize(tiny_model(vocab_size=len(tok)), "int8"), _args(tmp_path), train_dataset=_text_ds(),
                        processing_class=tok)
    # the adapter dtype can be chosen
    trainer = QTuneSFTTrainer(quantize(tiny_model(vocab_size=len(tok)), "int8"), _args(tmp_path),
                              train_dataset=_text_ds(), processing_class=tok, adapter_dtype="float32",
                              peft_config=LoraConfig(r=4, target_modules="all-linear"))
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    assert trainer.model.get_base_model().is_loaded_in_8bit


def test_kbit_preparation_keeps_dtypes_and_packed_weights(tok):
    model = tiny_model(vocab_size=len(tok)).to(torch.bfloat16)
    quantize(model, "nf4")
    # every buffer by name (layers may share a code table until mark_quantized gives each its own)
    packed = {n: b.clone() for n, b in model.named_buffers(remove_duplicate=False)}
    assert any(b.dtype == torch.uint8 for b in packed.values())

    def assert_packed_untouched():
        now = dict(model.named_buffers(remove_duplicate=False))
        assert now.keys() == packed.keys()
        for n, b in now.items():  # same dtype and bit-identical values
            assert b.dtype == packed[n].dtype and torch.equal(b, packed[n]), n

    prepare_model_for_kbit_training(model)
    # no fp32 upcast of norms/embeddings/head, nothing trainable yet
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    assert_packed_untouched()
    assert model.is_gradient_checkpointing
    assert model.config.use_cache is False
    emb = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert emb.requires_grad  # input gradients on, so frozen checkpointed blocks pass gradients through
    # an explicit dtype casts the float parameters outside the quantized layers only
    prepare_model_for_kbit_training(model, dtype="float32")
    qbias = [p for m in model.modules() if isinstance(m, QuantLinear) for p in m.parameters(recurse=False)]
    assert model.model.norm.weight.dtype == torch.float32 and all(p.dtype == torch.bfloat16 for p in qbias)
    assert_packed_untouched()


def test_prompt_completion_loss_on_completion_only(tok, tmp_path):
    ds = Dataset.from_dict({"prompt": ["Emma Woodhouse, handsome,"] * 8, "completion": [" clever, and rich."] * 8})
    model = quantize(tiny_model(vocab_size=len(tok)), "fp4")
    trainer = QTuneSFTTrainer(model, _args(tmp_path, max_steps=2), train_dataset=ds, processing_class=tok,
                              peft_config=LoraConfig(r=4, target_modules="all-linear"))
    batch = next(iter(trainer.get_train_dataloader()))
    n_prompt = len(tok("Emma Woodhouse, handsome,").input_ids)
    labels = batch["labels"][0]
    assert (labels[:n_prompt] == -100).all() and (labels[n_prompt:] != -100).any()
    trainer.train()


def test_conversational_assistant_only_loss(tok, tmp_path):
    msgs = [[{"role": "user", "content": "Who is handsome?"}, {"role": "assistant", "content": "Emma Woodhouse."}]] * 8
    model = quantize(tiny_model(vocab_size=len(tok)), "gptq")
    trainer = QTuneSFTTrainer(model, _args(tmp_path, max_steps=2, assistant_only_loss=True),
                              train_dataset=Dataset.from_dict({"messages": msgs}), processing_class=tok,
                              peft_config=LoraConfig(r=4, target_modules="all-linear"))
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    kept = tok.decode(ids[labels != -100])
    assert "Emma Woodhouse." in kept and "handsome" not in kept
    trainer.train()


def test_packing(tok, tmp_path):
    model = quantize(tiny_model(vocab_size=len(tok)), "llm_int8")
    trainer = QTuneSFTTrainer(model, _args(tmp_path, max_steps=2, packing=True, packing_strategy="wrapped"),
                              train_dataset=_text_ds(), processing_class=tok,
                              peft_config=LoraConfig(r=4, target_modules="all-linear"))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] == 64 and (batch["labels"] != -100).float().mean() > 0.9
    trainer.train()
    c = count_parameters(trainer.model)
    assert c["quantized"] > 0 and 0 < c["trainable"] < c["float"]
