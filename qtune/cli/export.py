"""``qtune export RUN_OR_ADAPTER_DIR --mode adapter|merged|quantized --out DIR``: ship a trained adapter.

* ``adapter``: the PEFT folder (adapter_config.json + adapter_model.safetensors), a model card and
  qtune_base.json (the recipe of the base it was trained on).
* ``merged``: the LoRA folded into the dequantized base in fp32 and saved in ``--dtype`` as a plain
  transformers checkpoint (sharded safetensors, config, generation config, tokenizer); no qtune needed.
* ``quantized``: merged, then quantized again into ``--format`` (RTN formats directly; ``gptq`` with
  ``--calibration`` text, on the merged weights) and saved in ``--layout``; prints the per-layer and total
  error against the merged full-precision model, and with ``--heldout`` the perplexity of each model.
  ``--format gguf`` writes one GGUF file instead (``--out/model.gguf``): a GGUF base's own tensor types,
  metadata and tokenizer; ``--gguf-type`` for a Hugging Face base.

The export is written next to ``--out`` and renamed at the end, reloads itself and checks its logits
(``--no-verify`` skips it); an existing ``--out`` is never touched without ``--overwrite``.

Examples::

    qtune export runs/smollm2-135m-qlora-nf4 --mode adapter --out smollm2-emma-lora
    qtune export runs/smollm2-135m-qlora-nf4 --mode merged --dtype bf16 --out smollm2-emma \\
        --push-to-hub me/smollm2-emma --private
    qtune export runs/my-run-on-a-gguf-base --mode quantized --format gguf --out my-model-gguf
    qtune export runs/smollm2-135m-qlora-nf4 --mode quantized --format gguf --gguf-type q8_0 --out smollm2-emma-q8
    qtune export runs/smollm2-135m-qlora-nf4 --mode quantized --format gptq --layout gptq \\
        --calibration qtune:austen/emma --samples 64 --heldout qtune:austen/persuasion --out smollm2-emma-gptq
"""
from __future__ import annotations

import argparse
import sys

from ..formats import format_names
from ..integrations.layouts import layout_names
from . import one_line_errors

_QUANTIZED_ONLY = ("format", "layout", "calibration", "samples", "seq_len", "gguf_type")
_FLOAT_MODES_ONLY = ("dtype", "heldout", "heldout_tokens", "heldout_window")


def run(args: argparse.Namespace) -> int:
    from ..export import export

    mode = args.mode
    for key in _QUANTIZED_ONLY:
        if mode != "quantized" and getattr(args, key) is not None:
            raise ValueError(f"--{key.replace('_', '-')} applies to --mode quantized only")
    for key in _FLOAT_MODES_ONLY:
        if mode == "adapter" and getattr(args, key) is not None:
            raise ValueError(f"--{key.replace('_', '-')} applies to --mode merged/quantized only")
    if args.private and not args.push_to_hub:
        raise ValueError("--private applies with --push-to-hub only")
    kwargs = dict(overwrite=args.overwrite, verify=not args.no_verify, push_to_hub=args.push_to_hub,
                  private=args.private, base=args.base, base_format=args.base_format)
    if mode != "adapter":
        kwargs.update(dtype=args.dtype or "auto", heldout=args.heldout, heldout_tokens=args.heldout_tokens,
                      heldout_window=args.heldout_window)
    if mode == "merged":
        kwargs["max_shard_size"] = args.max_shard_size
    if mode == "quantized":
        kwargs.update(format=args.format, layout=args.layout or "qtune", calibration=args.calibration,
                      samples=args.samples, seq_len=args.seq_len, progress=not args.no_progress,
                      gguf_type=args.gguf_type)
    try:
        export(args.source, args.out, mode=mode, **kwargs)
    except OSError as e:
        if isinstance(e, (FileNotFoundError, FileExistsError)):
            raise
        # a full disk or an I/O error while writing: the temporary folder is gone, --out untouched
        print(f"qtune export: error: {e}; nothing was written to {args.out}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"qtune export: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = one_line_errors(subparsers.add_parser(
        "export", help="export a trained adapter: adapter / merged / re-quantized, Hub upload",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("source", metavar="RUN_OR_ADAPTER_DIR",
                   help="a `qtune train` run folder, a checkpoint-N folder, or a PEFT adapter folder")
    p.add_argument("--mode", required=True, choices=("adapter", "merged", "quantized"))
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--dtype", default=None, choices=("auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"),
                   help="merged/quantized: dtype of the float tensors (default auto: the base's float dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and a non-empty Hub repo)")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the export and checking its logits")
    g = p.add_argument_group("quantized")
    g.add_argument("--format", default=None, metavar="FORMAT[:OPTS]",
                   help=f"one of {', '.join(format_names())} (default: the base's own format when a quantization-aware "
                        "adapter merges into it exactly, else nf4), with options as for `qtune quantize`, e.g. "
                        "nf4:double_quant=true or gptq:bits=4,group_size=64; a bare name equal to the base's format "
                        "keeps the base's settings. `gguf`: one GGUF file (--out/model.gguf, for llama.cpp/Ollama): a "
                        "GGUF base keeps its metadata, tokenizer and tensor types (unchanged layers byte for byte), "
                        "a Hugging Face base (llama/mistral/qwen2) needs --gguf-type")
    g.add_argument("--gguf-type", default=None, choices=("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"),
                   help="--format gguf on a Hugging Face base: type of the decoder's linear weights (q4_1/q5_1 carry a "
                        "float offset per 32 weights; q8_0 is near-lossless); embeddings F16, norms F32")
    g.add_argument("--layout", default=None, choices=layout_names(),
                   help="qtune (default), bnb (transformers+bitsandbytes) or gptq (GPTQ v1)")
    g.add_argument("--calibration", default=None,
                   help="gptq: calibration text (.txt/.json/.jsonl/.parquet, qtune:austen/emma; default: the run's)")
    g.add_argument("--samples", type=int, default=None, help="gptq: calibration windows (default 128)")
    g.add_argument("--seq-len", type=int, default=None, help="gptq: tokens per window (default 512)")
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("merged/quantized")
    g.add_argument("--heldout", default=None, help="held-out text (qtune:austen/persuasion, a .txt file...): perplexity "
                                                   "of the trained, merged and re-quantized models")
    g.add_argument("--heldout-tokens", type=int, default=None, help="tokens of it (default: the recipe's, else 2048)")
    g.add_argument("--heldout-window", type=int, default=None, help="window length (default: the recipe's, else 512)")
    g.add_argument("--max-shard-size", default="5GB", help="merged: safetensors shard size (default 5GB)")
    g = p.add_argument_group("base (when the source does not record it)")
    g.add_argument("--base", default=None, help="base model folder the adapter was trained on")
    g.add_argument("--base-format", default=None,
                   help="how --base was quantized for training: pretrained (a quantized folder), none, or a format "
                        "spec (nf4, nf4:double_quant=true, int8...)")
    g = p.add_argument_group("Hugging Face Hub")
    g.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="upload the export (token: HF_TOKEN or `hf auth login`); refuses a non-empty repo "
                        "without --overwrite")
    g.add_argument("--private", action="store_true", help="create the repo private")
    p.set_defaults(func=run)
    return p


if __name__ == "__main__":  # pragma: no cover
    from .main import main

    sys.exit(main(["export", *sys.argv[1:]]))
