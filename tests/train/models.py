"""Tiny models, tokenizer and quantization helpers shared by the training and peft tests."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import qtune
from qtune.formats.gptq import GPTQHessian
from qtune.nn import linear_modules

# the formats the acceptance list names; GPTQ with a Hessian from random inputs
FORMATS = {
    "nf4": qtune.NF4Config(blocksize=64),
    "fp4": qtune.FP4Config(blocksize=64),
    "int8": qtune.Int8Config(),
    "llm_int8": qtune.LLMInt8Config(),
    "gptq": qtune.GPTQConfig(bits=4, group_size=32),
}

CORPUS = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. Emma Woodhouse, handsome, clever, and rich, "
    "with a comfortable home and happy disposition, seemed to unite some of the best blessings of existence; and "
    "had lived nearly twenty-one years in the world with very little to distress or vex her. "
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained on :data:`CORPUS` (no download), with pad/eos and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 320):
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                          pad_token_id=0, eos_token_id=1, bos_token_id=1)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = 320) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size)).float()


def gptq_hessians(model: nn.Module, skip=("lm_head",), seed: int = 0) -> dict[str, dict]:
    """``layer_kwargs`` for ``quantize_model`` with a GPTQ config: a Hessian from random inputs per layer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in linear_modules(model):
        if any(name.endswith(s) for s in skip):
            continue
        k = module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
        h = GPTQHessian(k)
        h.add_batch(torch.randn(128, k, generator=g))
        out[name] = {"hessian": h}
    return out


def quantize(model: nn.Module, fmt: str) -> nn.Module:
    """Quantize every linear layer but ``lm_head`` to ``fmt`` (a key of :data:`FORMATS`), in place."""
    cfg = FORMATS[fmt]
    kwargs = gptq_hessians(model) if isinstance(cfg, qtune.GPTQConfig) else None
    qtune.quantize_model(model, cfg, layer_kwargs=kwargs)
    return model


def save_tiny_model_dir(path: Path, arch: str = "llama") -> Path:
    """A float tiny model + tokenizer saved as a Hugging Face folder (what a recipe's ``model.path`` names)."""
    tok = tiny_tokenizer()
    model = tiny_model(arch, vocab_size=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
