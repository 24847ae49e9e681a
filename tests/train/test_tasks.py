"""Tasks beyond SFT (dpo, kto, reward, grpo, rloo, distill) on tiny quantized models: the task table, recipe
validation, the runner's one code path, the reference model without a second base, SFT → DPO from an
adapter, and the bundled demo data."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from qtune.train.recipe import RecipeError, load_recipe, validate
from qtune.train.runner import run
from qtune.train.tasks import TASKS
from tests.train.conftest import write_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCES = {"dpo": "austen-preference", "kto": "austen-kto", "reward": "austen-preference", "grpo": "austen-prompts",
           "rloo": "austen-prompts", "distill": "austen-prompts"}


def task_recipe(tiny_dir, out, task: str, **section) -> dict:
    """A two-step recipe of ``task`` on the tiny NF4 model and the bundled demo set it reads."""
    d = {"task": task, "model": {"path": str(tiny_dir / "model"), "dtype": "float32"},
         "quantization": {"format": "nf4", "blocksize": 64}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
         "dataset": {"train": {"source": "qtune:demo/" + SOURCES[task], "max_examples": 32}},
         "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 0.005, "logging_steps": 1,
                      "save_strategy": "no", "disable_tqdm": True, "seed": 0},
         "output": {"dir": str(out), "report_to": "none", "plot": False}}
    if task in ("dpo", "kto", "reward"):
        section.setdefault("max_length", 200)  # the tiny tokenizer spends ~3 tokens per word
    if task in ("grpo", "rloo"):
        section.setdefault("reward", "austen-emma")
        section.setdefault("num_generations", 4)
    if TASKS[task].generates:
        section.setdefault("max_completion_length", 8)
    d[task] = section
    return d


# ------------------------------------------------------------------------------------------------
# The table and recipe validation (no model)
# ------------------------------------------------------------------------------------------------
def test_task_table_names_trl_classes():
    import trl

    assert set(TASKS) == {"sft", "dpo", "kto", "reward", "grpo", "rloo", "distill"}
    for task in TASKS.values():
        assert issubclass(task.trainer_class(), trl.trainer.base_trainer._BaseTrainer) or task.name == "sft"
        assert task.config_class().__name__ == task.config
    assert {"beta", "loss_type", "max_length"} <= set(TASKS["dpo"].specific_fields())
    assert "learning_rate" not in TASKS["dpo"].specific_fields()  # a TrainingArguments field: training section
    assert {"num_generations", "max_completion_length", "beta"} <= set(TASKS["grpo"].specific_fields())


BASE = """\
task: grpo
model:
  path: some/model
quantization:
  format: nf4
dataset:
  train:
    source: qtune:demo/austen-prompts
training:
  learning_rate: 0.0001
output:
  dir: /tmp/out
"""


def _error(tmp_path, text: str) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "\n" not in msg
    return msg.replace(str(p), "r.yaml")


def test_task_validation_errors_name_the_line(tmp_path):
    assert _error(tmp_path, BASE).startswith("r.yaml:1: task: task grpo needs a grpo: section with grpo.reward")
    msg = _error(tmp_path, BASE + "grpo:\n  num_generations: 4\n")
    assert msg.startswith("r.yaml:13: grpo.reward: is required")
    msg = _error(tmp_path, BASE + "grpo:\n  reward: nobody\n")
    assert msg.startswith("r.yaml:14: grpo.reward: 'nobody' is not a built-in reward (austen-emma, austen-style)")
    msg = _error(tmp_path, BASE + "grpo:\n  reward: austen-emma\n  num_generation: 4\n")
    assert msg.startswith("r.yaml:15: grpo.num_generation: unknown key (did you mean 'num_generations'?)")
    msg = _error(tmp_path, BASE.replace("task: grpo", "task: dpo") + "grpo:\n  reward: austen-emma\n")
    assert msg.startswith("r.yaml:13: grpo: this section is for task: grpo; the recipe's task is 'dpo'")
    msg = _error(tmp_path, BASE.replace("task: grpo", "task: ppo"))
    assert msg.startswith("r.yaml:1: task: 'ppo' is not one of 'sft', 'dpo', 'kto', 'reward', 'grpo', 'rloo', 'distill'")
    msg = _error(tmp_path, BASE.replace("task: grpo", "task: dpo").replace("  learning_rate: 0.0001", "  beta: 0.2")
                 + "dpo:\n  beta: 0.1\n")
    assert msg.startswith("r.yaml:14: dpo.beta: also set as training.beta")
    msg = _error(tmp_path, BASE.replace("task: grpo", "task: reward").replace(
        "austen-prompts\n", "austen-prompts\n  perplexity:\n    source: x.txt\n"))
    assert msg.startswith("r.yaml:9: dataset.perplexity: task reward trains a sequence_classification model")
    msg = _error(tmp_path, BASE.replace("task: grpo", "task: dpo").replace("  path: some/model",
                                                                          "  path: some/model\n  adapter: runs/x")
                 + "lora:\n  r: 4\n")
    assert msg.startswith("r.yaml:15: lora.r: model.adapter is set")
    msg = _error(tmp_path, BASE.replace("  learning_rate: 0.0001", "  save_strategy: no") + "grpo:\n  reward: austen-emma\n")
    assert msg.startswith("r.yaml:10: training.save_strategy: expected a string (default 'steps'), got False")


def test_task_recipe_fills_and_round_trips(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(BASE.replace("  path: some/model", "  path: some/model\n  dtype: auto")
                 .replace("  format: nf4", "  format: nf4\n  compute_dtype: auto")
                 + "grpo:\n  reward: [austen-emma, tests.train.test_tasks:vowel_reward]\n  num_generations: 4\n")
    r = load_recipe(p)
    assert r.task == "grpo" and r.task_options["num_generations"] == 4
    assert r.to_dict()["grpo"] == r.task_options and r.to_dict()["task"] == "grpo"
    again = validate(json.loads(json.dumps(r.to_dict())))
    assert again.to_dict() == r.to_dict()
    # the trl config of the task: training + the task section's trl fields (qtune's own keys stay out)
    from trl import GRPOConfig

    from qtune.train.runner import task_config
    cfg = task_config(again)
    assert type(cfg) is GRPOConfig and cfg.num_generations == 4 and cfg.learning_rate == 0.0001
    assert not hasattr(cfg, "reward")
    # auto dtypes: accepted, then resolved by qtune.hardware (the choice and its reason)
    lines = r.resolve_dtypes("cpu")
    assert r.model["dtype"] in ("bfloat16", "float32") and r.quantization["compute_dtype"] == r.model["dtype"]
    assert lines[0].startswith(f"model.dtype: auto -> {r.model['dtype']} (") and len(lines) == 2
    assert r.resolve_dtypes("cpu") == []  # once


# ------------------------------------------------------------------------------------------------
# Bad data: one line naming the recipe line
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source,missing", [("qtune:demo/austen-kto", "chosen, rejected"),
                                            ("qtune:austen/emma", "prompt, chosen, rejected"),
                                            ("pairs.jsonl", "prompt")])
def test_preference_dataset_without_columns(tiny_dir, tmp_path, source, missing):
    if source == "pairs.jsonl":
        source = str(tmp_path / source)
        (tmp_path / "pairs.jsonl").write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    data = task_recipe(tiny_dir, tmp_path / "run", "dpo")
    data["dataset"]["train"] = {"source": source}
    path = write_recipe(tmp_path / "r.yaml", data)
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if t.strip().startswith("source:"))
    with pytest.raises(RecipeError) as e:
        run(load_recipe(path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:{line}: dataset.train.source: task dpo ") and f"needs column(s) {missing}" in msg
    assert not (tmp_path / "run" / "summary.json").exists()


# ------------------------------------------------------------------------------------------------
# Each task through the runner (tiny model, two steps)
# ------------------------------------------------------------------------------------------------
def test_dpo_reference_is_the_base_and_margin_rises(tiny_dir, tmp_path):
    data = task_recipe(tiny_dir, tmp_path / "run", "dpo", beta=0.1)
    data["dataset"]["train"]["max_examples"] = 64
    data["dataset"]["eval"] = {"source": "qtune:demo/austen-preference", "skip_examples": 224, "max_examples": 16}
    data["training"].update(max_steps=6, learning_rate=0.01)
    seen = {}

    from transformers import TrainerCallback

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            from qtune.nn import QuantLinear
            seen["quant_layers"] = sum(isinstance(m, QuantLinear) for m in model.modules())

    s = run(validate(data), callbacks=[Look()])
    assert s["status"] == "finished" and s["task"] == "dpo"
    assert seen["quant_layers"] == 14  # one quantized base in the trained model
    before, after = s["pair_margin_before"]["margin"], s["pair_margin_after"]["margin"]
    print(f"tiny DPO: held-out chosen-rejected margin {before:+.3f} -> {after:+.3f} nats")
    assert after > before + 0.05
    assert s["eval_metrics"]["eval_rewards/margins"] > 0
    assert s["metrics_last"]["rewards/margins"] > 0


def test_dpo_trainer_keeps_no_reference_copy(tiny_dir):
    """trl's DPOTrainer on a qtune PeftModel: ``ref_model`` is None and the reference log-probs are the
    base's with the adapter disabled."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    import qtune
    from qtune.integrations.trl import qtune_trainer

    model = qtune.load_model(tiny_dir / "model", qtune.QTuneConfig("nf4"), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    ds = Dataset.from_dict({"prompt": ["Emma Woodhouse,"] * 4, "chosen": [" handsome"] * 4, "rejected": [" rich"] * 4})
    args = DPOConfig(output_dir="unused", report_to="none", max_steps=1, per_device_train_batch_size=2,
                     use_cpu=True, save_strategy="no", disable_tqdm=True)
    cfg = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)  # random B: adapter != identity
    trainer = qtune_trainer(DPOTrainer)(model, args, train_dataset=ds, processing_class=tok, peft_config=cfg)
    assert trainer.ref_model is None
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    with trainer.model.disable_adapter():
        ids, mask = batch["input_ids"], batch["completion_mask"]
        logp = torch.log_softmax(trainer.model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
        per_seq = (logp.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]).sum(-1)
    n = ids.shape[0] // 2
    torch.testing.assert_close(ref_chosen, per_seq[:n], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ref_rejected, per_seq[n:], rtol=1e-4, atol=1e-3)
    with torch.no_grad():
        policy = torch.log_softmax(trainer.model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
    assert not torch.allclose(policy, logp)  # the adapter is on for the policy, off for the reference


def vowel_reward(prompts, completions, **kw) -> list[float]:
    """An easy reward a tiny random model can learn in a few steps: the share of vowels in the completion."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


# (steps, learning rate, steps averaged at each end, least rise of the mean reward); RLOO learns slower
RL_SETTINGS = {"grpo": (12, 0.05, 3, 0.1), "rloo": (16, 0.03, 4, 0.02)}


@pytest.mark.parametrize("task", ["grpo", "rloo"])
def test_online_rl_raises_an_easy_reward(tiny_dir, tmp_path, task):
    steps, lr, k, rise = RL_SETTINGS[task]
    data = task_recipe(tiny_dir, tmp_path / "run", task, reward="tests.train.test_tasks:vowel_reward",
                       num_generations=8, max_completion_length=8, temperature=1.0)
    # a random tiny model's logits are near uniform: the head must train for the reward to move in few steps
    data["lora"]["modules_to_save"] = ["lm_head"]
    data["training"].update(max_steps=steps, per_device_train_batch_size=8, learning_rate=lr, logging_steps=1)
    logs = _Logs()
    s = run(validate(data), callbacks=[logs])
    rewards = [h["reward"] for h in logs.history if "reward" in h]
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    print(f"tiny {task}: mean reward over the first {k} steps {first:.3f}, last {k} {last:.3f}")
    assert s["status"] == "finished" and len(rewards) == steps
    assert last > first + rise, rewards


class _Logs:
    """A TrainerCallback that keeps every logged dict."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Logs(TrainerCallback):
            def __init__(self):
                self.history = []

            def on_log(self, args, state, control, logs=None, **kw):
                self.history.append(dict(logs or {}))

        return Logs()


@pytest.mark.parametrize("task", ["kto", "reward", "distill"])
def test_other_tasks_train_and_save(tiny_dir, tmp_path, task):
    s = run(validate(task_recipe(tiny_dir, tmp_path / "run", task)))
    assert s["status"] == "finished" and s["global_step"] == 2 and s["task"] == task
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert sum("lora_A" in k for k in weights) == 14
    if task == "reward":
        # the one-output score head trains beside the adapter, in float (never quantized)
        assert [k for k in weights if "score" in k] == ["base_model.model.score.weight"]
        assert weights["base_model.model.score.weight"].shape == (1, 64)
        assert s["parameters"]["trainable"] == sum(v.numel() for v in weights.values())
        assert "accuracy" in s["metrics_last"]


# ------------------------------------------------------------------------------------------------
# SFT → DPO from the adapter, and export of the result
# ------------------------------------------------------------------------------------------------
def test_dpo_continues_from_an_sft_adapter_and_exports(tiny_dir, tmp_path):
    from tests.train.conftest import base_recipe

    sft = base_recipe(tiny_dir, tmp_path / "sft")
    sft["training"].update(max_steps=2, save_steps=100)
    sft["dataset"]["perplexity"] = None
    s1 = run(validate(sft))
    sft_weights = load_file(str(tmp_path / "sft" / "adapter" / "adapter_model.safetensors"))

    data = task_recipe(tiny_dir, tmp_path / "dpo", "dpo")
    data["model"]["adapter"] = str(tmp_path / "sft")
    data.pop("lora")
    data["training"]["learning_rate"] = 0.0  # the adapter must come through unchanged, and trainable
    s2 = run(validate(data))
    assert s2["start_adapter"] == str(tmp_path / "sft" / "adapter")
    assert s2["parameters"]["trainable"] == s1["parameters"]["trainable"]  # trl's frozen 'ref' copy is not trained
    dpo_weights = load_file(str(tmp_path / "dpo" / "adapter" / "adapter_model.safetensors"))
    assert dpo_weights.keys() == sft_weights.keys()
    for k in sft_weights:
        torch.testing.assert_close(dpo_weights[k], sft_weights[k], rtol=0, atol=0)
    # the margin measured before training already includes the SFT adapter
    # and export reads the DPO run as it reads an SFT run
    from qtune.export.source import load_source
    src = load_source(tmp_path / "dpo")
    assert src.recipe.task == "dpo" and src.adapter_dir == tmp_path / "dpo" / "adapter"

    data["training"]["learning_rate"] = 0.01
    data["output"]["dir"] = str(tmp_path / "dpo2")
    run(validate(data))
    moved = load_file(str(tmp_path / "dpo2" / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(moved[k], sft_weights[k]) for k in sft_weights)  # trainable, not frozen


def test_reward_run_exports_with_its_score_head(tiny_dir, tmp_path):
    """A reward run exports like an SFT run: merged (reloaded as a sequence classifier, the trained score head in
    the checkpoint, the (batch, 1) scores compared), adapter (the head as modules_to_save) and re-quantized."""
    from transformers import AutoModelForSequenceClassification

    import qtune
    from qtune.export import export
    from qtune.export.source import load_source
    from qtune.export.verify import logits, probe_ids

    run(validate(task_recipe(tiny_dir, tmp_path / "run", "reward")))
    trained = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))["base_model.model.score.weight"]
    src = load_source(tmp_path / "run")
    ids = probe_ids(src.tokenizer, src.model.get_base_model().config.vocab_size)
    scores = logits(src.model, ids)
    assert scores.shape == (1, 1)

    res = export(tmp_path / "run", tmp_path / "merged", mode="merged", dtype="fp32", log=lambda s: None)
    assert res.verify.rel <= 1e-5
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and "quantization_config" not in cfg
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    torch.testing.assert_close(merged["score.weight"], trained, rtol=0, atol=0)  # the trained head, not a new one
    assert "lm_head.weight" not in merged
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(reloaded, ids), scores, rtol=1e-4, atol=1e-5)

    export(tmp_path / "run", tmp_path / "adapter", mode="adapter", log=lambda s: None)
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "SEQ_CLS" and "score" in adapter_cfg["modules_to_save"]
    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))["base_model.model.score.weight"]
    torch.testing.assert_close(exported, trained, rtol=0, atol=0)
    assert logits(load_source(tmp_path / "adapter").model, ids).shape == (1, 1)

    export(tmp_path / "run", tmp_path / "q", mode="quantized", format="nf4", log=lambda s: None)
    q = qtune.load_model(tmp_path / "q", auto_class=AutoModelForSequenceClassification)
    torch.testing.assert_close(q.score.weight, trained, rtol=0, atol=0)
    assert logits(q, ids).shape == (1, 1)


def test_missing_adapter_folder_names_the_line(tiny_dir, tmp_path):
    data = task_recipe(tiny_dir, tmp_path / "run", "dpo")
    data["model"]["adapter"] = str(tmp_path / "nothing")
    data.pop("lora")
    path = write_recipe(tmp_path / "r.yaml", data)
    with pytest.raises(RecipeError, match=re.escape(f"{path}:") + r"\d+: model.adapter: .*neither a PEFT adapter"):
        run(load_recipe(path))


# ------------------------------------------------------------------------------------------------
# Demo data and reward
# ------------------------------------------------------------------------------------------------
def test_demo_sets_are_reproducible_and_well_formed(tmp_path):
    from qtune.train import demo_data

    written = demo_data.build(tmp_path)
    for name, path in written.items():
        assert path.read_bytes() == demo_data.demo_path(name).read_bytes(), name
    pairs = [json.loads(x) for x in demo_data.demo_path("austen-preference").read_text().splitlines()]
    assert len(pairs) == demo_data.PAIRS and all(p["chosen"] != p["rejected"] for p in pairs)
    assert all(len(p["prompt"].split()) == demo_data.PROMPT_WORDS for p in pairs)
    kto = [json.loads(x) for x in demo_data.demo_path("austen-kto").read_text().splitlines()]
    assert sum(k["label"] for k in kto) == len(kto) // 2


def test_austen_emma_reward_rule():
    from qtune.train.rewards import austen_emma, emma_score, resolve_reward

    assert emma_score("Emma smiled at Harriet.") == 1.0
    assert emma_score("Mr. Knightley came.") == 0.5
    assert emma_score("Anne Elliot and Captain Wentworth") == -1.0
    assert emma_score("") == 0.0 and emma_score("the weather was fine") == 0.0
    assert emma_score("word " * 40 + "Emma Harriet") == 0.0  # past the length bound
    assert austen_emma(["p"], [[{"role": "assistant", "content": "Emma and Harriet"}]]) == [1.0]
    assert resolve_reward("tests.train.test_tasks:vowel_reward") is vowel_reward
    with pytest.raises(ValueError, match="no callable 'nothing'"):
        resolve_reward("tests.train.test_tasks:nothing")


def test_austen_style_reward_is_the_naive_bayes_log_odds():
    import collections
    import math
    import re

    from qtune.assets import austen_text
    from qtune.train.rewards import austen_style, resolve_reward, style_log_odds, style_score

    # the classifier from its definition, independently of the module's counting
    counts = {n: collections.Counter(w.lower() for w in re.findall(r"[A-Za-z]+", austen_text(n)))
              for n in ("emma", "persuasion")}
    vocab = set(counts["emma"]) | set(counts["persuasion"])
    n_e, n_p = (sum(counts[n].values()) + len(vocab) for n in ("emma", "persuasion"))
    lo = style_log_odds()
    assert set(lo) == vocab
    for w in ("the", "emma", "anne", "very", "captain", "hartfield"):
        want = math.log((counts["emma"][w] + 1) / n_e) - math.log((counts["persuasion"][w] + 1) / n_p)
        assert lo[w] == pytest.approx(want, rel=1e-12)
    text = "Mr. Knightley was very much of her opinion."
    words = re.findall(r"[A-Za-z]+", text.lower())
    assert style_score(text) == pytest.approx(sum(lo[w] for w in words) / len(words), rel=1e-12)
    # dense: plain narration scores neither 0 nor the clip; Emma's world above 0, Persuasion's below
    plain = style_score("She said that it was not so, and walked out.")
    assert 0 < abs(plain) < 1
    assert style_score("Emma smiled at Harriet.") == 1.0 and style_score("Anne walked to Kellynch.") == -1.0
    assert style_score("") == 0.0 and style_score("zzzz") == 0.0  # empty; a word neither novel has
    assert style_score("the " * 40 + "Emma Emma Emma") == pytest.approx(lo["the"])  # past the length bound
    assert resolve_reward("austen-style") is austen_style
    assert austen_style(["p"], [[{"role": "assistant", "content": "Emma and Harriet"}]]) == [1.0]


# ------------------------------------------------------------------------------------------------
# DDP: two CPU processes give the single process's adapter at the same global batch
# ------------------------------------------------------------------------------------------------
def test_dpo_ddp_two_processes_match_one(tiny_dir, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 -m qtune train`` (gloo DDP on CPU, 2 pairs per process)
    against one process with 4 pairs per step: the same pairs per optimizer step, the same adapter."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = task_recipe(tiny_dir, tmp_path / "one", "dpo", beta=0.1)
    data["training"].update(max_steps=2, per_device_train_batch_size=4, learning_rate=0.01)
    data["lora"]["dtype"] = "float32"  # compare at fp32 precision (trl's QLoRA default would be bf16)
    one = run(validate(data))
    data["training"]["per_device_train_batch_size"] = 2
    data["output"]["dir"] = str(tmp_path / "two")
    path = write_recipe(tmp_path / "r2.yaml", data)
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qtune", "train", str(path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["global_step"] == one["global_step"] == 2
    assert len(two["adapter_checksums"]) == 2 and len(set(two["adapter_checksums"])) == 1
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 28
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    for k in a:
        # Adam turns float noise in near-zero gradients into ~1e-6 differences; a step moves weights by ~lr = 1e-2
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
