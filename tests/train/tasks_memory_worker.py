"""Worker for test_tasks_smollm2.py: peak resident memory of training steps of one task on SmolLM2-135M (NF4).

``python tests/train/tasks_memory_worker.py {sft,dpo} OUT_DIR``

Both tasks see the same tokens per step: DPO takes ``PAIRS`` preference pairs (chosen + rejected, 2·PAIRS
sequences), SFT the same 2·PAIRS sequences (prompt + chosen, prompt + rejected) unpacked. The peak RSS
(``VmHWM``) is reset after the base and its adapter config are loaded, so the window holds the trainer's
construction (where a reference model would be copied), the steps, and everything they allocate.
Prints one JSON line: ``{"task", "rss_at_reset", "peak", "steps"}`` in bytes.
"""
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PAIRS = 2
STEPS = 2
MAX_LENGTH = 96


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def main() -> None:
    import torch

    from qtune.train.data import load_dataset
    from qtune.train.recipe import validate
    from qtune.train import runner

    torch.set_num_threads(1)
    task, out = sys.argv[1], Path(sys.argv[2])
    pairs = load_dataset({"source": "qtune:demo/austen-preference", "max_examples": 16},
                         required=("prompt", "chosen", "rejected"))
    if task == "sft":
        texts = [p["prompt"] + c for p in pairs for c in (p["chosen"], p["rejected"])]
        (out / "sft.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        train = {"source": str(out / "sft.jsonl")}
        batch, section = 2 * PAIRS, {}
        extra = {"packing": False, "max_length": MAX_LENGTH}
    else:
        train = {"source": "qtune:demo/austen-preference", "max_examples": 16}
        batch, section, extra = PAIRS, {"max_length": MAX_LENGTH, "beta": 0.1}, {}
    data = {"task": task, "model": {"path": "qtune:smollm2-135m-instruct", "dtype": "float32"},
            "quantization": {"format": "nf4", "compute_dtype": "float32"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "dtype": "float32"},
            "dataset": {"train": train},
            "training": {"max_steps": STEPS, "per_device_train_batch_size": batch, "learning_rate": 1e-4,
                         "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "seed": 0,
                         "activation_checkpointing": False, "dataloader_num_workers": 0, **extra},
            "output": {"dir": str(out / task), "report_to": "none", "plot": False}}
    if section:
        data[task] = section
    recipe = validate(data)
    r = runner.start_run(recipe)
    train_ds, _ = runner.load_data(recipe, r.state)
    base = runner.load_base(recipe)
    model, peft_config = runner.attach_adapter(recipe, base.model)
    interrupt = runner._interrupt_callback_class()()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss = _status("VmRSS")
    trainer = runner.build_trainer(r, base, model, peft_config, train_ds, None, [interrupt])
    trainer.train()
    print(json.dumps({"task": task, "rss_at_reset": rss, "peak": _status("VmHWM"), "steps": trainer.state.global_step,
                      "ref_model": getattr(trainer, "ref_model", None) is not None}))


if __name__ == "__main__":
    main()
