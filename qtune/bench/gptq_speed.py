"""Time of sequential GPTQ on a real model: qtune against GPTQModel, in one run on one machine.

``python -m qtune.bench.gptq_speed [--model smollm2] [--samples 128] [--seq-len 512] [--out FILE]``

Both quantize the same float model to GPTQ-4 g128 (each library's default ordering: qtune's act-order with static
groups, GPTQModel's group-aware order; ``--spec gptq:bits=4,group_size=128,desc_act=false`` gives qtune the same
order as GPTQModel) on the same ``--samples``
random windows of ``--seq-len`` tokens of the calibration text, with the same batch size, on the CPU. The time
is the quantization alone (calibration capture, block forwards, Hessians, solve, packing), not loading or
saving. GPTQModel 7.7 runs in a child process with its folder (``QTUNE_GPTQMODEL_PATH``, default
``.deps/gptqmodel``, where ``.ci/run`` installs it) on ``sys.path`` (:mod:`qtune.bench.gptqmodel_worker`). qtune's
time is also split per part (block forwards, Hessian accumulation, solve and packing), summed over the blocks.

The machine may be shared: the load average at the start and end of each side is recorded with the times, and
each side's CPU time (``quantize_cpu_s``, all threads of the process) next to its wall time. The result goes to ``bench/results/gptq-speed.json`` (``--out`` elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .results import bench_command, load_average, write_results


def default_gptqmodel_path() -> Path:
    return Path(os.environ.get("QTUNE_GPTQMODEL_PATH", Path.cwd() / ".deps" / "gptqmodel"))


def time_qtune(path: Path, windows: torch.Tensor, spec: str, batch_size: int) -> dict:
    """Quantize the float model at ``path`` with qtune's sequential GPTQ; seconds in all and per part."""
    from transformers import AutoModelForCausalLM

    from .. import QTuneConfig
    from ..calibration import gptq_quantize_model

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    qc = QTuneConfig.from_spec(spec)
    parts: dict[str, float] = {}
    blocks: list[float] = []

    def progress(info) -> None:
        blocks.append(round(info.seconds, 3))
        for k, v in info.parts.items():
            parts[k] = parts.get(k, 0.0) + v
        print(info.line(), flush=True)

    load = load_average()
    start, cpu = time.perf_counter(), time.process_time()
    gptq_quantize_model(model, windows, qc.default_config(), skip_modules=qc.skip_modules,
                        overrides=qc.override_configs(), batch_size=batch_size, device="cpu", progress=progress)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return {"quantize_s": round(seconds, 2), "quantize_cpu_s": round(cpu_seconds, 2),
            "config": qc.default_config().to_dict(),
            "parts_s": {k: round(v, 2) for k, v in parts.items()},
            "block_s": blocks, "load_average_start": load, "load_average_end": load_average(),
            "threads": torch.get_num_threads()}


def time_gptqmodel(path: Path, windows: torch.Tensor, batch_size: int, gptqmodel_path: Path, dtype: str, *,
                   bits: int = 4, group_size: int = 128, sym: bool = True, quantize_config: dict | None = None,
                   out: Path | None = None) -> dict:
    """Quantize the float model at ``path`` with GPTQModel in a child process (:mod:`.gptqmodel_worker`).

    Its default ordering unless ``quantize_config`` (extra ``QuantizeConfig`` fields, e.g. ``{"desc_act": True,
    "act_group_aware": False}``) says otherwise; ``out``: folder where GPTQModel saves the checkpoint (none by
    default). Returns the worker's times and settings with the load averages around the run.
    """
    if not (gptqmodel_path / "gptqmodel").is_dir():
        raise SystemExit(f"GPTQModel not found in {gptqmodel_path}: pip install --no-deps --target .deps/gptqmodel "
                         "gptqmodel==7.7.0 logbar==0.4.15 tokenicer==0.0.14 device-smi==0.5.7 pypcre==0.6.4 "
                         "defuser==0.0.28 threadpoolctl==3.8.0, or pass --skip-gptqmodel")
    with tempfile.TemporaryDirectory(prefix="qtune-gptq-speed-") as tmp:
        job, result = Path(tmp) / "job.pt", Path(tmp) / "result.json"
        torch.save({"float": str(Path(path).resolve()), "out": str(Path(out).resolve()) if out else "", "dtype": dtype,
                    "bits": bits, "group_size": group_size, "sym": sym, "batch_size": batch_size,
                    "calibration": windows, "quantize_config": dict(quantize_config or {})}, job)
        env = dict(os.environ)
        # GPTQModel's folder only: the repository root would put qtune's kernels/ where Hugging Face's `kernels` goes
        env["PYTHONPATH"] = str(gptqmodel_path)
        load = load_average()
        start = time.perf_counter()
        worker = Path(__file__).with_name("gptqmodel_worker.py")
        # in the temporary folder: GPTQModel writes a logs/ folder into its working directory
        # -P: the script's folder (qtune/bench, which holds a kernels.py) is not put on sys.path either
        proc = subprocess.run([sys.executable, "-P", str(worker), str(job), str(result)], env=env, cwd=tmp)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"GPTQModel's worker failed with exit status {proc.returncode} (output above)")
        out = json.loads(result.read_text(encoding="utf-8"))
    out.update(quantize_s=round(out["quantize_s"], 2), quantize_cpu_s=round(out["quantize_cpu_s"], 2),
               load_s=round(out["load_s"], 2), process_s=round(wall, 2),
               dtype=dtype, load_average_start=load, load_average_end=load_average())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="float model folder, or 'smollm2' (the bundled SmolLM2-135M)")
    p.add_argument("--calibration", default="qtune:austen/emma", help="calibration text (file, or qtune:austen/NAME)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward, both libraries")
    p.add_argument("--spec", default="gptq:bits=4,group_size=128",
                   help="qtune's format spec (default: GPTQ-4 g128 in qtune's default ordering, act-order with "
                        "static groups)")
    p.add_argument("--gptqmodel-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype GPTQModel loads the float model in (qtune calibrates in float32)")
    p.add_argument("--skip-gptqmodel", action="store_true", help="time qtune alone")
    p.add_argument("--out", help="results file (default bench/results/gptq-speed.json)")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from ..assets import resolve_model
    from ..calibration import calibration_windows
    from ..hardware import cpu_capability, cpu_name

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = calibration_windows(args.calibration, tokenizer, samples=args.samples, seq_len=args.seq_len)
    results: dict = {"settings": {"model": args.model, "calibration": args.calibration, "samples": args.samples,
                                  "seq_len": args.seq_len, "batch_size": args.batch_size, "spec": args.spec},
                     "cpu": cpu_name(), "cpu_capability": cpu_capability(), "cores": os.cpu_count()}
    print(f"qtune: {args.spec}, {args.samples} windows x {args.seq_len} tokens", flush=True)
    results["qtune"] = time_qtune(path, windows, args.spec, args.batch_size)
    print(f"qtune: {results['qtune']['quantize_s']:.1f} s", flush=True)
    if not args.skip_gptqmodel:
        print("GPTQModel: default QuantizeConfig(bits=4, group_size=128)", flush=True)
        results["gptqmodel"] = time_gptqmodel(path, windows, args.batch_size, default_gptqmodel_path(),
                                              args.gptqmodel_dtype)
        ratio = results["qtune"]["quantize_s"] / results["gptqmodel"]["quantize_s"]
        cpu_ratio = results["qtune"]["quantize_cpu_s"] / results["gptqmodel"]["quantize_cpu_s"]
        results["ratio_qtune_over_gptqmodel"] = round(ratio, 3)
        results["cpu_ratio_qtune_over_gptqmodel"] = round(cpu_ratio, 3)
        print(f"GPTQModel: {results['gptqmodel']['quantize_s']:.1f} s; qtune / GPTQModel = {ratio:.2f} "
              f"(CPU time {cpu_ratio:.2f})", flush=True)
    out = args.out or str(Path("bench") / "results" / "gptq-speed.json")
    path_written = write_results("gptq-speed", results, out, command=bench_command("qtune.bench.gptq_speed", argv))
    print(f"wrote {path_written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
