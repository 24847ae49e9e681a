"""Quantize a model to NF4 while loading it, measure what that costs, save it and load it back.

    python examples/quantize_and_evaluate.py                      # bundled SmolLM2-135M, about a minute on 2 CPU cores
    python examples/quantize_and_evaluate.py --model path/to/model --tokens 4096 --out nf4-model

Steps: the float model in fp32 and the same model quantized to NF4 (with double quantization) through the
ordinary ``from_pretrained`` + ``quantization_config``; held-out perplexity of both on the first
``--tokens`` tokens of Jane Austen's *Persuasion* (bundled with qtune); bits per weight of the linear
layers and memory footprint; ``save_pretrained`` of the NF4 model and a reload with plain transformers,
which must give bit-identical logits.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qtune  # importing qtune registers QTuneConfig (quant_method "qtune") with transformers
from qtune.assets import austen_text
from qtune.assets import resolve_model
from qtune.evaluate import model_bits_per_param, tokenize_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a local model folder")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens of Persuasion to score")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window length")
    p.add_argument("--out", default=None, help="where to save the NF4 model (default: a temporary folder, removed "
                   "at the end)")
    return p.parse_args(argv)


def describe(name: str, model, ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Print perplexity, bits/param and footprint of ``model``; return its logits on the first window."""
    ppl = qtune.perplexity(model, ids, seq_len=seq_len)
    print(f"{name:>5}: perplexity {ppl.perplexity:8.3f} on {ppl.predicted:,} tokens "
          f"({ppl.tokens_per_s:,.0f} tokens/s), {model_bits_per_param(model):5.2f} bits/param in the linear layers, "
          f"footprint {model.get_memory_footprint() / 2**20:7.1f} MiB")
    with torch.no_grad():
        return model(input_ids=ids[:seq_len].reshape(1, -1)).logits


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenize_text(austen_text("persuasion"), tokenizer, tokens=args.tokens)

    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    describe("fp32", fp32, ids, args.seq_len)
    del fp32  # only one copy of the float weights in memory at a time

    # Every linear layer except the output head becomes a qtune Linear4bit: 4-bit NF4 codes in blocks of 64
    # with an absmax per block, the absmaxes themselves stored in 8 bits (double quantization).
    config = qtune.QTuneConfig("nf4", double_quant=True)
    nf4 = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32).eval()
    logits = describe("nf4", nf4, ids, args.seq_len)

    with contextlib.ExitStack() as stack:
        out = args.out or stack.enter_context(tempfile.TemporaryDirectory(prefix="qtune-nf4-"))
        nf4.save_pretrained(out)  # packed codes and absmaxes as safetensors, quantization_config in config.json
        tokenizer.save_pretrained(out)
        # No quantization_config here: the saved folder says it is a qtune NF4 model, and transformers finds
        # QTuneConfig because qtune is imported.
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            reloaded_logits = reloaded(input_ids=ids[:args.seq_len].reshape(1, -1)).logits
    same = torch.equal(logits, reloaded_logits)
    print(f"saved to {out}{'' if args.out else ' (temporary)'}; reloaded with AutoModelForCausalLM.from_pretrained: "
          f"identical logits: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
