"""GPTQModel's side of ``qtune.bench.gptq_speed``, run in a child process with GPTQModel's folder on ``sys.path``.

Importing ``gptqmodel`` patches process-wide state (safetensors, transformers, logging, environment variables;
see ``tests/integrations/gptqmodel_worker.py``), so it never runs in qtune's process.

Usage: ``python gptqmodel_worker.py JOB.pt RESULT.json`` (by file: only GPTQModel's folder is added to
``sys.path``, so that the repository's ``kernels/`` folder does not shadow Hugging Face's ``kernels``) where ``JOB.pt`` (``torch.save``) holds
``{"float": str (model folder), "out": str (folder to save to, or ""), "dtype": str ("float32"...), "bits": int,
"group_size": int, "sym": bool, "batch_size": int, "calibration": int64 [S, L],
"quantize_config": dict (extra QuantizeConfig fields)}``. ``RESULT.json`` gets ``{"quantize_s": float, "quantize_cpu_s": float, "load_s": float, "gptqmodel": version,
"quantize_config": {...}}``: ``quantize_s`` times ``model.quantize`` alone (calibration capture, Hessians,
solve and packing; not the load or the save); ``quantize_cpu_s`` is the process's CPU time over the same span
(every thread), the fairer measure on a shared machine.
"""
from __future__ import annotations

import json
import os
import sys
import time

# GPTQModel sizes its CPU pool as (cores + 1) // 2 and then asks for a 2-worker loader pool inside it, which
# fails on machines with fewer than 3 cores
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402


def main(job_path: str, result_path: str) -> None:
    from importlib import metadata

    from gptqmodel import GPTQModel, QuantizeConfig

    job = torch.load(job_path, weights_only=True)
    qc = QuantizeConfig(bits=job["bits"], group_size=job["group_size"], sym=job["sym"], offload_to_disk=False,
                        **job.get("quantize_config", {}))
    start = time.perf_counter()
    model = GPTQModel.load(job["float"], quantize_config=qc, device="cpu", dtype=getattr(torch, job["dtype"]))
    load_s = time.perf_counter() - start
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in job["calibration"]]
    start, cpu = time.perf_counter(), time.process_time()
    model.quantize(calibration, batch_size=job["batch_size"])
    quantize_s, quantize_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    if job.get("out"):
        model.save(job["out"])
    settings = {k: getattr(qc, k, None) for k in ("bits", "group_size", "sym", "desc_act", "act_group_aware",
                                                   "static_groups", "damp_percent", "true_sequential")}
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump({"quantize_s": quantize_s, "quantize_cpu_s": quantize_cpu_s, "load_s": load_s, "gptqmodel": metadata.version("gptqmodel"),
                   "quantize_config": {k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
                                       for k, v in settings.items()}}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
