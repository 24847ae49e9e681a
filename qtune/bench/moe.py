"""Mixture-of-experts QLoRA: model memory and training-step time of qtune NF4 (experts quantized) against
transformers + bitsandbytes 4-bit (its ``Linear4bit`` replaces ``nn.Linear`` only, so the fused experts stay in
16 bits) and against the unquantized model, all measured in one run.

``python -m qtune.bench.moe [--experts 16] [--hidden 1024] [--intermediate 1024] [--layers 2] [--top-k 2]
[--batch 4] [--seq 256] [--steps 5] [--dtype auto] [--threads N] [--out FILE]``

The model is a Qwen3-MoE built from its config with random weights (no Hub): every layer a sparse MoE block of
``--experts`` experts, hidden ``--hidden``, a small vocabulary so that the experts dominate, as in real MoE
models. It is saved once to a temporary folder and loaded three times:

* ``float``: ``from_pretrained(dtype=compute dtype)``, the baseline of the step time;
* ``bnb``: ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit, nf4, compute dtype))``;
* ``qtune``: ``qtune.load_model(QTuneConfig("nf4", compute_dtype=...))``, experts quantized while loading.

Model memory is the bytes of the model's parameters and buffers (shared tensors once), compared with the same
model in bf16 (``params × 2``). A step is forward + backward + AdamW on LoRA adapters (r=8 on every attention
projection, ``target_modules="all-linear"``; the experts frozen in all three, so each one back-propagates
through its experts to the input) on one fixed batch of ``--batch × --seq`` tokens; the median over ``--steps``
steps after one warm-up, the three models stepped in turn within each repetition (same load for all).

``--dtype auto`` is qtune's policy (:func:`qtune.hardware.auto_dtype`: bf16 on CPUs with native bf16, else
fp32). Targets (issue 14): qtune's memory ≤ 0.35 × bf16, its step ≤ 1.3 × the unquantized model's.
Results: ``bench/results/moe.json`` (``--out`` elsewhere).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..formats import parse_dtype
from .results import load_average, write_and_report

MEMORY_TARGET = 0.35  # qtune model bytes / bf16 model bytes
STEP_TARGET = 1.3  # qtune step / unquantized step


def moe_config(*, experts: int, hidden: int, intermediate: int, layers: int, top_k: int, vocab: int):
    """A Qwen3-MoE config: every layer sparse, ``head_dim`` 128 (``hidden // 128`` query heads, 2 KV heads)."""
    from transformers import Qwen3MoeConfig

    heads = max(1, hidden // 128)
    return Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=min(2, heads), head_dim=128, moe_intermediate_size=intermediate,
                          intermediate_size=intermediate, num_experts=experts, num_experts_per_tok=top_k,
                          decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
                          tie_word_embeddings=False)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model`` (a tensor shared by two names counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def float_parameters(config) -> int:
    """Parameters of the float model of ``config`` (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def experts_implementation(model: nn.Module) -> str | None:
    """What computes the experts: transformers' ``config._experts_implementation``, or qtune's own loop over the
    routed experts (``QuantExperts`` does not dispatch on it)."""
    from ..nn.experts import QuantExperts

    if any(isinstance(m, QuantExperts) for m in model.modules()):
        return "qtune QuantExperts (routed experts, one dequantized at a time)"
    return getattr(model.config, "_experts_implementation", None)


def load_models(folder: Path, dtype: torch.dtype, which: list[str]) -> dict[str, nn.Module]:
    """The models to compare, loaded from ``folder`` (see the module docstring), in training mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ..integrations import QTuneConfig
    from ..integrations.layouts import load_model

    name = str(dtype).removeprefix("torch.")
    models: dict[str, nn.Module] = {}
    if "float" in which:
        models["float"] = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if "bnb" in which:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                 bnb_4bit_quant_storage=torch.uint8)
        models["bnb"] = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=bnb)
    if "qtune" in which:
        models["qtune"] = load_model(folder, QTuneConfig("nf4", compute_dtype=name), dtype=dtype)
    return models


def with_lora(name: str, model: nn.Module, r: int = 8) -> nn.Module:
    """LoRA r on every attention projection (``all-linear``: the routers and fused experts are not linear
    layers), the rest frozen; qtune's model through ``qtune.get_peft_model``, the others through peft."""
    from peft import LoraConfig, get_peft_model

    import qtune

    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")
    peft_model = (qtune.get_peft_model if name == "qtune" else get_peft_model)(model, config)
    peft_model.train()
    return peft_model


def step_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    """One QLoRA step on ``ids``: forward (causal-LM loss), backward, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def time_steps(steps: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    """Median seconds per step of each function, called in turn within each repetition, after one warm-up."""
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeat):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    from ..hardware import auto_dtype

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=1024, help="each expert's intermediate size")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model (median), after one warm-up")
    p.add_argument("--dtype", default="auto", help="compute and model dtype: auto (qtune's policy), bf16, fp32")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 gives steadier ratios on a "
                   "machine shared with other jobs, where every parallel op waits for descheduled threads")
    p.add_argument("--skip-bnb", action="store_true")
    p.add_argument("--out", help="results file (default bench/results/moe.json)")
    args = p.parse_args(argv)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = load_average()
    if args.dtype == "auto":
        dtype, reason = auto_dtype("cpu")
    else:
        dtype, reason = parse_dtype(args.dtype), "--dtype"
    dname = str(dtype).removeprefix("torch.")
    which = ["float", "qtune"] + ([] if args.skip_bnb else ["bnb"])
    config = moe_config(experts=args.experts, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                        top_k=args.top_k, vocab=args.vocab)
    n_params = float_parameters(config)
    print(f"Qwen3-MoE: {args.layers} layers, {args.experts} experts (top-{args.top_k}), hidden {args.hidden}, expert "
          f"intermediate {args.intermediate}, vocab {args.vocab}: {n_params / 1e6:.1f} M parameters; batch "
          f"{args.batch}x{args.seq} tokens; dtype {dname} ({reason}); {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory(prefix="qtune-bench-moe-") as tmp:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
        models = load_models(Path(tmp), dtype, which)
    memory = {k: model_bytes(m) for k, m in models.items()}
    impl = {k: experts_implementation(m) for k, m in models.items()}
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    steps = {k: step_fn(with_lora(k, m), ids) for k, m in models.items()}
    seconds = time_steps(steps, args.steps)

    bf16_bytes = 2 * n_params
    rows = []
    print(f"\n{'model':<8}{'memory MiB':>12}{'vs bf16':>9}{'step s':>10}{'vs float':>10}  experts implementation")
    for k in which:
        row = {"model": k, "memory_bytes": memory[k], "memory_over_bf16": memory[k] / bf16_bytes,
               "step_s": seconds[k], "step_over_float": seconds[k] / seconds["float"],
               "experts_implementation": impl[k]}
        rows.append(row)
        print(f"{k:<8}{memory[k] / 2**20:>12.1f}{row['memory_over_bf16']:>9.3f}{seconds[k]:>10.3f}"
              f"{row['step_over_float']:>10.2f}  {impl[k]}")
    q = next(r for r in rows if r["model"] == "qtune")
    verdict = {"memory": q["memory_over_bf16"] <= MEMORY_TARGET, "step": q["step_over_float"] <= STEP_TARGET}
    print(f"\nqtune: memory {q['memory_over_bf16']:.3f} x bf16 (target <= {MEMORY_TARGET}: "
          f"{'met' if verdict['memory'] else 'MISSED'}), step {q['step_over_float']:.2f} x unquantized "
          f"(target <= {STEP_TARGET}: {'met' if verdict['step'] else 'MISSED'})")
    if "bnb" in memory:
        print(f"qtune vs bitsandbytes: memory {memory['qtune'] / memory['bnb']:.3f}x, "
              f"step {seconds['qtune'] / seconds['bnb']:.2f}x")
    results: dict[str, Any] = {
        "settings": {"experts": args.experts, "hidden": args.hidden, "intermediate": args.intermediate,
                     "layers": args.layers, "top_k": args.top_k, "vocab": args.vocab, "batch": args.batch,
                     "seq": args.seq, "steps": args.steps, "threads": torch.get_num_threads(), "dtype": dname, "dtype_reason": reason,
                     "lora": "r=8 all-linear (attention); experts frozen"},
        "parameters": n_params, "bf16_bytes": bf16_bytes, "rows": rows,
        "targets": {"memory_over_bf16": MEMORY_TARGET, "step_over_float": STEP_TARGET}, "met": verdict,
        "qtune_over_bnb": ({"memory": memory["qtune"] / memory["bnb"], "step": seconds["qtune"] / seconds["bnb"]}
                           if "bnb" in memory else None),
        "load_average_start": load_start, "load_average_end": load_average(),
    }
    return write_and_report("moe", results, args.out, argv)


if __name__ == "__main__":
    raise SystemExit(main())
