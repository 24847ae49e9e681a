"""QLoRA from Python, without a recipe: LoRA adapters trained on a frozen NF4 base with trl.

    python examples/qlora_python_api.py                   # bundled SmolLM2-135M: 20 steps, ~3 min on 2 idle CPU cores
    python examples/qlora_python_api.py --model path/to/model --max-steps 200 --out runs/my-qlora

What ``qtune train recipes/smollm2-135m/qlora-nf4.yaml`` does, spelled out: load the base quantized to NF4
(double quantization, as in the QLoRA paper), prepare it for k-bit training, train rank-8 LoRA adapters
on every linear layer with ``qtune.QTuneSFTTrainer`` (trl's ``SFTTrainer`` plus qtune's LoRA layer) on
chunks of Jane Austen's *Emma*, and print the held-out perplexity of *Persuasion* before and after.
The adapter is then saved in the ordinary PEFT format and loaded back with ``qtune.load_adapter`` on a
freshly quantized base, which must give bit-identical logits.

Export the adapter afterwards (merged bf16 model, re-quantized NF4 model) with examples/export_adapter.py;
the command is printed at the end.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import SFTConfig

import qtune
from qtune.assets import austen_text
from qtune.assets import resolve_model
from qtune.evaluate import tokenize_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a local model folder")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="float parameters and NF4 compute dtype (bf16 matmuls are ~3x faster on AVX512-BF16 CPUs)")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--chunk-chars", type=int, default=1000, help="characters of Emma per training example")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens of Persuasion to score")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder; the adapter goes to OUT/adapter (default: a new "
                   "temporary folder, kept)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = resolve_model(args.model)
    dtype = getattr(torch, args.dtype)
    out = Path(args.out or tempfile.mkdtemp(prefix="qtune-qlora-"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    heldout = tokenize_text(austen_text("persuasion"), tokenizer, tokens=args.tokens)

    def load_base():
        # Quantizes the float checkpoint while loading; the same config rebuilds the same base bit for bit.
        config = qtune.QTuneConfig("nf4", double_quant=True, compute_dtype=dtype)
        return qtune.load_model(path, config, dtype=dtype)

    model = load_base()
    before = qtune.perplexity(model, heldout, seq_len=args.seq_len).perplexity
    print(f"held-out perplexity before training: {before:.3f}")

    # Freezes everything (the packed NF4 weights are buffers anyway) and marks the model as quantized for the
    # transformers Trainer. Unlike peft's function of that name it does not upcast the embeddings and norms to
    # fp32. Activation checkpointing is off: on a model this small recomputing activations costs more than
    # the memory it saves.
    model = qtune.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    # "all-linear" is expanded by qtune to every quantized layer (peft alone would find no nn.Linear to wrap).
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    emma = austen_text("emma")
    chunks = [emma[i:i + args.chunk_chars] for i in range(0, len(emma), args.chunk_chars)]
    train = Dataset.from_dict({"text": chunks[:args.max_steps * args.batch_size]})  # one pass, no repeats

    training = SFTConfig(
        output_dir=str(out / "trainer"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=2,
        logging_steps=max(1, args.max_steps // 4), save_strategy="no", report_to="none", seed=args.seed,
        disable_tqdm=True,
        activation_checkpointing=False,  # as prepared above (trl's default would turn it on)
        # the base already computes in --dtype; mixed-precision autocast would need an accelerator
        bf16=False, use_cpu=not torch.cuda.is_available())
    # adapter_dtype float32: trl would keep adapters in bf16 for a quantized base; fp32 adapters are tiny and
    # train more stably with a bf16 base.
    trainer = qtune.QTuneSFTTrainer(model, training, train_dataset=train, processing_class=tokenizer,
                                    peft_config=lora, adapter_dtype=torch.float32)
    trainer.model.print_trainable_parameters()
    trainer.train()
    losses = [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h]
    print(f"training loss every {training.logging_steps} steps: {losses}")

    peft_model = trainer.model.eval()
    after = qtune.perplexity(peft_model, heldout, seq_len=args.seq_len).perplexity
    print(f"held-out perplexity on {heldout.numel():,} tokens: before {before:.3f}, after {after:.3f} "
          f"({100 * (after / before - 1):+.1f}%)")

    adapter_dir = out / "adapter"
    peft_model.save_pretrained(adapter_dir)  # adapter_config.json + adapter_model.safetensors (LoRA only)
    tokenizer.save_pretrained(adapter_dir)

    # load_adapter registers qtune's LoRA layer with peft before PeftModel reads the folder.
    reloaded = qtune.load_adapter(load_base(), str(adapter_dir)).eval()
    probe = heldout[:args.seq_len].reshape(1, -1)
    with torch.no_grad():
        same = torch.equal(peft_model(input_ids=probe).logits, reloaded(input_ids=probe).logits)
    print(f"adapter saved to {adapter_dir}; reloaded on a fresh NF4 base: identical logits: {same}")
    print(f"export it: python examples/export_adapter.py --source {adapter_dir} "
          f"--base-format nf4:double_quant=true,compute_dtype={args.dtype} --base-dtype {args.dtype}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
