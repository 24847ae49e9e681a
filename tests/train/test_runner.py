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
    from qtune.integrations.checkpoints import load_model
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


def test_sigint_saves_checkpoint_and_resume_continues(tiny_dir, tmp_path):
    data = base_recipe(tiny_dir, tmp_path / "run")
    data["training"].update(max_steps=5, save_steps=100)  # only the interrupt writes a checkpoint
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
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4, 5]  # every step once: none lost, none repeated
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(load_recipe(path, ["output.dir=" + str(tmp_path / "empty")]), resume=True)


def test_ddp_cpu_two_processes_agree(tiny_dir, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 -m qtune train`` on CPU: gloo DDP, two steps, same adapters.

    (accelerate 1.15's ``--cpu`` flag selects its single-process launcher unless an MPI hostfile is
    given; ``--multi_gpu`` starts the processes with torchrun, and the runner's ``use_cpu`` gives gloo.)
    """
    data = base_recipe(tiny_dir, tmp_path / "run")
    data["training"].update(max_steps=2, per_device_train_batch_size=2)
    data["dataset"]["perplexity"] = None
    path = write_recipe(tmp_path / "r.yaml", data)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qtune", "train", str(path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["global_step"] == 2
    sums = s["adapter_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    print(f"DDP run took {time.perf_counter() - t0:.0f} s")


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
