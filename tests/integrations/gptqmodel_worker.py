"""GPTQModel's side of ``test_gptqmodel_interop.py``, run in a child process.

Importing ``gptqmodel`` changes process-wide state: it wraps ``safetensors.torch.save_file``, Triton's
``Autotuner``, transformers' ``GptqHfQuantizer`` and ``lazy_load_kernel``, registers a ``paroquant``
quantizer, puts a ``causal_conv1d`` module in ``sys.modules``, adds root logging handlers and sets
environment variables (``HF_HOME``, ``PYTORCH_ALLOC_CONF``, ...). None of that may leak into the test
session, so GPTQModel only ever runs here.

Usage: ``python gptqmodel_worker.py JOBS.pt RESULTS.pt``. ``JOBS.pt`` (``torch.save``) holds::

    {"ids": int64 [B, T],                      # the input ids every model is run on
     "jobs": [{"name": str, "folder": str,     # the GPTQ checkpoint to load
               "quantize": None | {"float": str, "bits": int, "group_size": int, "sym": bool,
                                   "desc_act": bool, "calibration": int64 [S, L]}}]}

A job with ``"solve"`` instead runs GPTQModel's layer solver alone (``gptqmodel.quantization.gptq.GPTQ.quantize``)
on a given weight and Hessian: ``{"name": str, "solve": {"weight": fp32 [N, K], "hessian": fp32 [K, K] (the
final H, injected as if accumulated), "bits": int, "group_size": int, "sym": bool, "desc_act": bool,
"act_group_aware": bool, "static_groups": bool, "damp_percent": float, "blocksize": int}}``; its result is
``{"weight": fp32 [N, K] (the dequantized Q, fp32 scales), "scale": fp32 [N, G], "zero": fp32 [N, G],
"g_idx": int32 [K], "damp": float (the damp_percent used)}``.

With ``quantize``, GPTQModel first quantizes the float folder ``float`` with its own GPTQ and saves the
result to ``folder``. Every ``folder`` is then loaded with the pure-PyTorch ``TorchLinear`` kernel
(``BACKEND.GPTQ_TORCH``) in fp16, the only dtypes that kernel accepts besides bf16. ``RESULTS.pt`` maps
each name to::

    {"logits_fp16": fp16 [B, T, V],            # GPTQModel as loaded
     "logits_fp32": fp32 [B, T, V],            # the same model after .float() (scales become fp32)
     "weights": {layer: fp32 [N, K]},          # TorchLinear.dequantize_weight() after .float()
     "kernels": {layer: class name}}
"""
from __future__ import annotations

import os
import sys

# GPTQModel compiles nothing here (no C++ compiler needed, ~45 s saved on 2 cores); the same PyTorch
# code runs eagerly instead:
# * TorchLinear.post_init() wraps its dequantization in torch.compile (inductor), which JIT-builds C++
#   on CPU (13 s for the tiny model);
# * packing after quantization JIT-builds the pack_block_cpu extension (~30 s, cached under
#   ~/.cache/gptqmodel); disabled, GPTQModel packs with its PyTorch code.
os.environ["TORCHDYNAMO_DISABLE"] = "1"
os.environ["GPTQMODEL_DISABLE_PACK_EXT"] = "1"
# GPTQModel sizes its CPU thread pool as (cores + 1) // 2 and then asks for a 2-worker loader pool
# inside it, which fails with "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu'
# only has 1" on machines with fewer than 3 cores.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402


def quantize(spec: dict, out: str) -> None:
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    qc = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"],
                        desc_act=spec["desc_act"],
                        offload_to_disk=False)  # no temporary offload folder for a model this small
    model = GPTQModel.load(spec["float"], quantize_config=qc, device="cpu", dtype=torch.float16)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in spec["calibration"]]
    model.quantize(calibration, batch_size=1, backend=BACKEND.GPTQ_TORCH)
    model.save(out)


def solve(spec: dict) -> dict:
    """GPTQModel's GPTQ solve of one ``nn.Linear`` on the Hessian ``spec["hessian"]`` (no calibration forward)."""
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    weight, hessian = spec["weight"], spec["hessian"]
    n, k = weight.shape
    layer = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    qc = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"], desc_act=spec["desc_act"],
                        act_group_aware=spec["act_group_aware"], static_groups=spec["static_groups"],
                        damp_percent=spec["damp_percent"], damp_auto_increment=0.0, offload_to_disk=False)
    gptq = GPTQ(layer, qc)
    gptq.quantizer.configure(perchannel=True)  # as GPTQProcessor.preprocess does
    # the final Hessian, as materialize_global_hessian() leaves it (a clean H is used as is)
    gptq.H = hessian.clone()
    gptq.nsamples = 1
    gptq._hessian_dirty = False
    q, scale, zero, g_idx, _, _, damp, _ = gptq.quantize(blocksize=spec["blocksize"])
    return {"weight": q.float(), "scale": scale.float(), "zero": zero.float(), "g_idx": g_idx.to(torch.int32),
            "damp": float(damp)}


def run(folder: str, ids: torch.Tensor) -> dict:
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    model = GPTQModel.load(folder, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
    hf = model.model.eval()
    result = {}
    with torch.no_grad():
        result["logits_fp16"] = hf(ids).logits
        hf.float()
        result["logits_fp32"] = hf(ids).logits.float()
        layers = {n: m for n, m in hf.named_modules() if isinstance(m, BaseQuantLinear)}
        result["weights"] = {n: m.dequantize_weight().T.float().contiguous() for n, m in layers.items()}
        result["kernels"] = {n: type(m).__name__ for n, m in layers.items()}
    return result


def main(jobs_path: str, results_path: str) -> None:
    spec = torch.load(jobs_path, weights_only=True)
    results = {}
    for job in spec["jobs"]:
        if job.get("solve") is not None:
            results[job["name"]] = solve(job["solve"])
            continue
        if job.get("quantize") is not None:
            quantize(job["quantize"], job["folder"])
        results[job["name"]] = run(job["folder"], spec["ids"])
    torch.save(results, results_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
