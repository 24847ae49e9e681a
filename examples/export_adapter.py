"""Export a trained LoRA adapter: merged into a bf16 model, and merged then re-quantized to NF4.

    python examples/export_adapter.py --source runs/smollm2-135m-qlora-nf4 --out exports   # a `qtune train` run
    python examples/export_adapter.py --source /tmp/qtune-qlora-XXXX/adapter \\
        --base-format nf4:double_quant=true,compute_dtype=bfloat16 --base-dtype bfloat16  # from qlora_python_api.py

``--source`` is a ``qtune train`` run folder (its recipe says how the base was built) or a PEFT adapter
folder. A bare adapter only names its float base (``base_model_name_or_path``), so say how that base was
quantized for training with ``--base-format`` (and ``--base-dtype``): the adapter must be merged into the
same quantized weights it was trained on.

Writes OUT/merged-bf16 (a plain transformers checkpoint, no qtune needed to load it) and OUT/quantized-nf4
(a qtune NF4 checkpoint). Each export is written atomically, reloads itself and checks its logits against
the model it came from before reporting (``VerificationError`` otherwise), and reports the held-out
perplexity of *Persuasion* for the trained and the exported model. About 1.5 min for SmolLM2 on 2 CPU cores.

Expect the NF4 export of an adapter trained on an NF4 base to lose most of what training gained: the merged
weights differ from the base by less than half an NF4 step almost everywhere, so they round back onto the
base's codes (the export warns, and the perplexities show it). The merged export keeps it all.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import qtune
from qtune.export import load_source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="a `qtune train` run folder or a PEFT adapter folder")
    p.add_argument("--out", default=None, help="folder for the exports (default: a new temporary folder, kept)")
    p.add_argument("--base", default=None, help="base model folder (default: from the run or adapter_config.json)")
    p.add_argument("--base-format", default=None,
                   help="how the base was quantized for training, e.g. nf4:double_quant=true,compute_dtype=bfloat16 "
                        "(needed for a bare adapter on a float base)")
    p.add_argument("--base-dtype", default=None, help="dtype of the base's float parameters during training")
    p.add_argument("--merged-dtype", default="bf16", help="dtype of the merged export (bf16, fp16, fp32)")
    p.add_argument("--format", default="nf4", help="format of the quantized export, e.g. nf4, int8, "
                   "rtn:bits=4,group_size=64")
    p.add_argument("--heldout", default="qtune:austen/persuasion", help="held-out text for perplexity ('none': skip)")
    p.add_argument("--heldout-tokens", type=int, default=2048)
    p.add_argument("--heldout-window", type=int, default=512)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="qtune-export-"))
    name = args.format.split(":")[0]

    def source():
        # The base rebuilt as training had it, with the adapter loaded (a peft.PeftModel). Merging exports
        # fold the adapter into it in place, so each export gets its own.
        return load_source(args.source, base=args.base, base_format=args.base_format, dtype=args.base_dtype)

    heldout = None if args.heldout == "none" else args.heldout
    common = dict(heldout=heldout, heldout_tokens=args.heldout_tokens, heldout_window=args.heldout_window,
                  overwrite=True)

    # Both exporters print their progress and their report (log=print); the returned ExportResult holds the
    # same numbers (also written to qtune_export.json in the export folder).
    # LoRA folded into the dequantized base in fp32, then cast to --merged-dtype.
    merged = qtune.export_merged(source(), out / f"merged-{args.merged_dtype}", dtype=args.merged_dtype,
                                 log=print, **common)
    # The same merge, quantized again, with the per-layer error against the merged fp32 weights. Re-quantizing
    # into the base's own format can round a small LoRA change back onto the base's grid: the export warns
    # when it keeps little of it (then ship the merged model or the adapter, or use a finer format: int8).
    quantized = qtune.export_quantized(source(), out / f"quantized-{name}", format=args.format, log=print, **common)

    print("\nexports:")
    for result in (merged, quantized):
        ppl = {k: v["perplexity"] for k, v in result.heldout.items() if isinstance(v, dict) and "perplexity" in v}
        print(f"  {result.out} ({result.mode}, {result.format or result.dtype}): {len(result.files)} files, "
              f"reload verified: {result.verify is not None}"
              + "".join(f"; perplexity {k} {v:.3f}" for k, v in ppl.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
