"""FSDP2 shards the quantized base when its packed weights use float storage (CPU, gloo, two processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"


def _run(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("variant", ["lora", pytest.param("qa", marks=pytest.mark.slow)])
def test_fsdp2_shards_packed_weights_and_matches_single_process(tiny_dir, tmp_path, variant):
    model = str(tiny_dir / "model")
    extra = ["qa"] if variant == "qa" else []
    _run([sys.executable, str(WORKER), model, str(tmp_path), "single", *extra], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(WORKER), model, str(tmp_path), "fsdp", *extra], tmp_path)
    single, fsdp = (json.loads((tmp_path / f"{m}.json").read_text()) for m in ("single", "fsdp"))
    assert fsdp["layers"] == 14
    # each rank holds half of the packed bytes of a layer (FSDP shards dim 0 of the bf16 storage)
    assert fsdp["packed_local"] * 2 == fsdp["packed_full"]
    assert fsdp["losses"][-1] < fsdp["losses"][0]
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    a, b = load_file(str(tmp_path / "single.safetensors")), load_file(str(tmp_path / "fsdp.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 14
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    if variant == "qa":  # QA-LoRA (pooled A [r, in/32]) on Q4_1 with bf16 storage, then its exact merge
        assert a[next(k for k in a if "layers.0.self_attn.q_proj.lora_A" in k)].shape == (4, 64 // 32)
        assert single["exact_layers"] == 14
        torch.testing.assert_close(torch.tensor(single["merged_logits"]), torch.tensor(single["unmerged_logits"]),
                                   rtol=0, atol=2e-3)
