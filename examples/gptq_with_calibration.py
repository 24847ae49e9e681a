"""GPTQ 4-bit on calibration text, against round-to-nearest at the same bits and group size; saved in GPTQ layout.

    python examples/gptq_with_calibration.py                      # bundled SmolLM2-135M, ~5 min on 2 idle CPU cores
    python examples/gptq_with_calibration.py --model path/to/model --group-size 128 --samples 128 --out gptq-model

GPTQ quantizes each linear layer column by column and spreads the rounding error of each column over the
columns not yet quantized, weighted by the Hessian ``H = Σ x xᵀ`` of the layer's inputs on calibration text
(here random windows of Jane Austen's *Emma*, bundled with qtune). Round-to-nearest (RTN) stores the same
tensors (``qweight``/``qzeros``/``scales``/``g_idx``) but rounds every weight independently, so the
perplexity gap on held-out text (*Persuasion*) is what the calibration buys.

The default group size is 64, not the usual 128: SmolLM2's hidden size is 576 = 4.5 × 128, and the GPTQ
checkpoint layout (what AutoGPTQ/GPTQModel/transformers load) needs whole groups. qtune's own layout would
accept a partial last group; ``--group-size`` must divide every layer's input size here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qtune
from qtune.assets import austen_text
from qtune.calibration import check_group_sizes, plan_layers
from qtune.assets import resolve_model
from qtune.evaluate import model_bits_per_param, tokenize_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a local model folder")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, default=64, help="input columns per scale/zero (-1: one per row)")
    p.add_argument("--samples", type=int, default=8, help="calibration windows from Emma")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens of Persuasion to score")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window length")
    p.add_argument("--out", default=None, help="where to save the GPTQ model (default: a temporary folder, "
                   "removed at the end)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    heldout = tokenize_text(austen_text("persuasion"), tokenizer, tokens=args.tokens)

    def ppl(model) -> float:
        return qtune.perplexity(model, heldout, seq_len=args.seq_len).perplexity

    # GPTQ needs the float model and calibration inputs: load in fp32, quantize in place further down.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = qtune.GPTQConfig(bits=args.bits, group_size=args.group_size)
    # fail now, not after calibrating, if the GPTQ layout cannot hold these groups
    check_group_sizes(model, plan_layers(model, config))
    float_ppl = ppl(model)

    # RTN needs no data: it quantizes while loading, like NF4.
    rtn_config = qtune.QTuneConfig("rtn", bits=args.bits, group_size=args.group_size)
    rtn = AutoModelForCausalLM.from_pretrained(path, quantization_config=rtn_config, dtype=torch.float32)
    rtn_ppl, rtn_bits = ppl(rtn), model_bits_per_param(rtn)
    del rtn

    windows = qtune.calibration_windows("qtune:austen/emma", tokenizer, samples=args.samples, seq_len=args.calib_seq_len)
    # block by block: each block's layers are calibrated on the outputs of the already-quantized blocks before it
    report = qtune.gptq_quantize_model(model, windows, config, progress=False)
    print(f"GPTQ: {report.summary()} in {report.seconds:.1f} s on {windows.numel():,} calibration tokens")
    gptq_ppl = ppl(model)

    print(f"held-out perplexity on {heldout.numel():,} tokens of Persuasion:")
    print(f"  fp32                          {float_ppl:8.3f}")
    print(f"  RTN  {args.bits}-bit g{args.group_size:<4} ({rtn_bits:.2f} b/p)  {rtn_ppl:8.3f}")
    print(f"  GPTQ {args.bits}-bit g{args.group_size:<4} ({model_bits_per_param(model):.2f} b/p)  {gptq_ppl:8.3f}")

    probe = heldout[:args.seq_len].reshape(1, -1)
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    with contextlib.ExitStack() as stack:
        out = Path(args.out or stack.enter_context(tempfile.TemporaryDirectory(prefix="qtune-gptq-")))
        # GPTQ v1 tensors + quantize_config.json: loadable by GPTQ libraries, and by qtune.load_model
        qtune.save_quantized(model, out, layout="gptq", tokenizer=tokenizer, overwrite=True)
        saved = json.loads((out / "quantize_config.json").read_text())
        reloaded = qtune.load_model(out)
        with torch.no_grad():
            diff = (reloaded(input_ids=probe).logits - logits).abs().max().item()
    # qtune keeps GPTQ scales in fp16, as the layout stores them; only float biases are rounded to fp16 on
    # saving, so a model without biases (Llama, SmolLM2) reloads exactly
    print(f"saved to {out}{'' if args.out else ' (temporary)'} in GPTQ layout (bits={saved['bits']}, "
          f"group_size={saved['group_size']}); reloaded: max |Δlogits| {diff:.2e}")
    return 0 if diff < 1e-2 * logits.abs().max().item() else 1


if __name__ == "__main__":
    raise SystemExit(main())
