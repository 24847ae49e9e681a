"""``qtune train``: end to end on a tiny model folder, SIGINT + --resume, and DDP on CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from qtune.cli.main import main
from qtune.train import load_recipe
from qtune.train.runner import run
from tests.train.conftest import base_recipe, write_recipe

REPO = Path(__file__).resolve().parents[2]


def test_cli_end_to_end(tiny_dir, tmp_path, capsys):
    data = base_recipe(tiny_dir, tmp_path / "run")
    data["dataset"]["eval"] = {"source": str(tiny_dir / "train.txt"), "chunk_chars": 300, "max_examples": 4}
    data["output"]["merge"] = True
    recipe = write_recipe(tmp_path / "r.yaml", data, header="# qtune train r.yaml\n")
    assert main(["train", str(recipe), "training.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "held-out perplexity: before" in out and "trainable parameters" in out
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "finished" and s["global_step"] == 3 and s["overrides"] == ["training.max_steps=3"]
    assert s["perplexity_after"]["perplexity"] < s["perplexity_before"]["perplexity"]
    assert s["eval_loss"] > 0 and s["tokens_per_s"] > 0 and s["memory"]["peak_rss_gib"] > 0
    assert s["parameters"]["trainable"] > 0 and s["parameters"]["quantized"] > 0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    assert "re-quantization error" in s["merge"]
    # the run folder records the recipe as resolved (file + overrides + defaults)
    resolved = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert resolved.to_dict() == load_recipe(recipe, ["training.max_steps=3"]).to_dict()
    assert resolved.training["max_steps"] == 3
    # the merged checkpoint reloads as a quantized model
    from qtune.integrations.layouts import load_model
    from qtune.nn import QuantLinear
    merged = load_model(tmp_path / "run" / "merged")
    assert sum(isinstance(m, QuantLinear) for m in merged.modules()) == 14
    # an existing run is not silently overwritten
    data["output"]["overwrite"] = False
    assert main(["train", str(write_recipe(tmp_path / "r2.yaml", data))]) == 1
    assert "--resume" in capsys.readouterr().err


class _SigintAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter a finished run saved: peft's tensor names → fp32 tensors."""
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_adapters_close(got: dict, want: dict, *, rtol: float, atol: float) -> None:
    assert got.keys() == want.keys() and len(want) == 2 * 14
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


def _assert_adapter_moved(adapter: dict) -> None:
    # peft starts lora_B at zero: a trained adapter has every lora_B away from it
    b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert len(b) == 14 and all(float(v.abs().max()) > 1e-3 for v in b.values()), \
        {k: float(v.abs().max()) for k, v in b.items()}


def test_sigint_saves_checkpoint_and_resume_continues(tiny_dir, tmp_path):
    """An interrupted and resumed run ends with the adapter of the same run left alone."""
    data = base_recipe(tiny_dir, tmp_path / "run")
    data["training"].update(max_steps=5, save_steps=100)  # only the interrupt writes a checkpoint
    data["dataset"]["perplexity"] = None
    # fp32 adapters: with lora.dtype auto (bf16) a resumed run continues in fp32 (see test_resume_keeps_adapter_dtype)
    data["lora"]["dtype"] = "float32"
    path = write_recipe(tmp_path / "r.yaml", data)
    previous = signal.getsignal(signal.SIGINT)  # SIG_IGN when the test process runs as a background job
    s1 = run(load_recipe(path), callbacks=[_SigintAt(2)])
    # the signal arrives during step 2's end; step 3 finishes, then the checkpoint is written
    assert s1["status"] == "interrupted" and s1["global_step"] == 3
    assert (tmp_path / "run" / "checkpoint-3" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "run" / "adapter").exists()
    assert signal.getsignal(signal.SIGINT) is previous  # handler restored
    s2 = run(load_recipe(path), resume=True)
    assert s2["status"] == "finished" and s2["start_step"] == 3 and s2["global_step"] == 5
    state = json.loads((tmp_path / "run" / "checkpoint-5" / "trainer_state.json").read_text())
    losses = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    assert list(losses) == [1, 2, 3, 4, 5]  # every step once: none lost, none repeated
    # the same recipe without the interrupt: same losses and same adapter. Resuming restores weights,
    # optimizer, scheduler, RNG and data position; a checkpoint stores the fp32 adapter and Adam state exactly,
    # so the runs agree to fp32 rounding (measured: bit-identical in one process); 1e-6 leaves room for
    # a different thread count. Dropping the optimizer state alone moves lora_A by 1e-2 (measured).
    ref = run(load_recipe(path, ["output.dir=" + str(tmp_path / "ref")]))
    assert ref["status"] == "finished" and ref["global_step"] == 5
    ref_state = json.loads((tmp_path / "ref" / "checkpoint-5" / "trainer_state.json").read_text())
    ref_losses = {h["step"]: h["loss"] for h in ref_state["log_history"] if "loss" in h}
    assert all(abs(losses[k] - ref_losses[k]) <= 1e-5 * abs(ref_losses[k]) for k in ref_losses), (losses, ref_losses)
    resumed, uninterrupted = _adapter(tmp_path / "run"), _adapter(tmp_path / "ref")
    _assert_adapter_moved(uninterrupted)
    _assert_adapters_close(resumed, uninterrupted, rtol=1e-6, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(load_recipe(path, ["output.dir=" + str(tmp_path / "empty")]), resume=True)


def test_resume_keeps_adapter_dtype(tiny_dir, tmp_path):
    data = base_recipe(tiny_dir, tmp_path / "run")
    data["training"].update(max_steps=3, save_steps=100)
    data["dataset"]["perplexity"] = None
    path = write_recipe(tmp_path / "r.yaml", data)
    assert run(load_recipe(path), callbacks=[_SigintAt(1)])["status"] == "interrupted"
    saved = load_file(str(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}  # trl's choice for a quantized base
    assert run(load_recipe(path), resume=True)["global_step"] == 3
    assert {v.dtype for v in _adapter(tmp_path / "run").values()} == {torch.bfloat16}


def test_ddp_cpu_two_processes_match_single_process(tiny_dir, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 -m qtune train`` on CPU: gloo DDP trains the adapter
    a single process trains at the same global batch (2 ranks × 2 sequences = 1 × 4).

    (accelerate 1.15's ``--cpu`` flag selects its single-process launcher unless an MPI hostfile is
    given; ``--multi_gpu`` starts the processes with torchrun, and the runner's ``use_cpu`` gives gloo.)
    """
    data = base_recipe(tiny_dir, tmp_path / "ddp")
    data["training"].update(max_steps=2, per_device_train_batch_size=2)
    data["dataset"]["perplexity"] = None
    data["lora"]["dtype"] = "float32"  # a bf16 adapter would round the two runs' fp32 summation-order differences to bf16 ulps
    path = write_recipe(tmp_path / "r.yaml", data)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qtune", "train", str(path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"DDP run took {time.perf_counter() - t0:.0f} s")
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["global_step"] == 2
    single = run(load_recipe(path, ["output.dir=" + str(tmp_path / "single"), "training.per_device_train_batch_size=4"]))
    assert single["global_step"] == 2
    # DDP averages the ranks' mean losses; with packed, equal-length sequences that is the mean over the
    # global batch, so the gradients agree up to fp32 summation order. Measured after two Adam steps:
    # max |Δ| 2.7e-7 on weights of magnitude 0.1 (lora_A) and 0.0075 (lora_B); bound 10× that.
    torch.testing.assert_close(torch.tensor(s["train_loss"]), torch.tensor(single["train_loss"]), rtol=1e-5, atol=0)
    ddp_adapter, single_adapter = _adapter(tmp_path / "ddp"), _adapter(tmp_path / "single")
    _assert_adapter_moved(ddp_adapter)
    _assert_adapters_close(ddp_adapter, single_adapter, rtol=1e-5, atol=3e-6)
    sums = s["adapter_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]


def test_gptq_calibrated_in_the_runner(tiny_dir, tmp_path):
    data = base_recipe(tiny_dir, tmp_path / "run")
    data["quantization"] = {"format": "gptq", "bits": 4, "group_size": 32,
                            "calibration": {"source": str(tiny_dir / "train.txt"), "samples": 4, "seq_len": 32}}
    data["training"]["max_steps"] = 2
    data["dataset"]["perplexity"] = None
    s = run(load_recipe(write_recipe(tmp_path / "r.yaml", data)))
    assert s["status"] == "finished" and s["parameters"]["quantized"] > 0


def test_bitsandbytes_backend_for_comparison(tiny_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    data = base_recipe(tiny_dir, tmp_path / "run")
    data["quantization"]["backend"] = "bitsandbytes"
    data["training"]["max_steps"] = 3
    s = run(load_recipe(write_recipe(tmp_path / "r.yaml", data)))
    assert s["status"] == "finished" and "perplexity_before" not in s and s["perplexity_after"]["perplexity"] > 0
    assert s["parameters"]["quantized"] == 0  # bitsandbytes layers, not qtune's
