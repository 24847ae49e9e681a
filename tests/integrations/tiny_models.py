"""Tiny random causal LMs of every architecture qtune supports (hidden 64, 2 layers, vocab 128)."""
from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2", "gemma", "opt", "gpt2", "gpt_neox")


def tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=128, num_hidden_layers=2, max_position_embeddings=64)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                              **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                sliding_window=None, **common)
    if arch == "qwen2":  # q/k/v have biases
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                              **common)
    if arch == "gemma":
        return tf.GemmaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                              head_dim=16, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
                            vocab_size=128, num_hidden_layers=2, max_position_embeddings=64, dropout=0.0,
                            attention_dropout=0.0, activation_dropout=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if arch == "gpt2":  # Conv1D layers
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128, resid_pdrop=0.0,
                              embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if arch == "gpt_neox":  # untied embed_out
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, rotary_pct=0.5,
                                **common)
    # more decoder families (tests/integrations/test_architectures.py); not in ARCHS to keep the other
    # parametrized tests as they are
    if arch == "qwen3":  # q/k norms
        return tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, **common)
    if arch == "gemma2":  # soft-capping, sandwich norms, tied embeddings
        return tf.Gemma2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, sliding_window=32, **common)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, sliding_window=32, **common)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             pad_token_id=0, bos_token_id=0, eos_token_id=1, **common)
    if arch == "falcon":  # fused query_key_value, parallel attention
        return tf.FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
                               new_decoder_architecture=False, multi_query=True, bos_token_id=0, eos_token_id=1)
    if arch == "cohere":  # logit scale, tied embeddings, layer norm without bias
        return tf.CohereConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                               pad_token_id=0, bos_token_id=0, eos_token_id=1, **common)
    raise ValueError(arch)


def make_tiny(arch: str, folder: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a randomly initialized tiny model of ``arch`` to ``folder`` (safetensors) and return the path."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype).eval()
    with torch.no_grad():  # larger-than-init weights and biases so quantization errors are visible
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder


def tokens(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, length), generator=g)


def make_tokenizer(folder: str | Path, text: str) -> Path:
    """Save a 128-token BPE tokenizer trained on ``text`` (lower-cased) to ``folder``; ids fit the tiny vocab."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<eos>"], limit_alphabet=90)
    tok.train_from_iterator([text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    folder = Path(folder)
    fast.save_pretrained(folder)
    return folder
