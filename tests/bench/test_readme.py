"""``python -m qtune.bench.readme``: the README's benchmark tables come from the results files, and --check
fails when they differ."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtune.bench import readme
from qtune.bench.results import write_results

REPO = Path(__file__).resolve().parents[2]

# the shapes the benches write (tests/bench/test_*_bench.py check the benches against the same keys)
FORMATS = {"settings": {"out_features": 64, "in_features": 128, "tokens": 8, "dtype": "fp32", "repeat": 3},
           "threads": 2, "load_average_start": [1.5, 1.0, 0.5], "dense_ms": {"forward": 1.25, "fwd+bwd": 2.5},
           "rows": [{"format": "nf4", "qtune_ms": {"quantize": 1.0, "dequantize": 2.0, "forward": 3.0, "fwd+bwd": 4.0},
                     "bnb_ms": {"quantize": 2.0, "dequantize": 2.0, "forward": 3.0, "fwd+bwd": 5.0},
                     "ratio": {"quantize": 0.5, "dequantize": 1.0, "forward": 1.0, "fwd+bwd": 0.8},
                     "fwd_bwd_over_dense": 1.6},
                    {"format": "rtn4-g128", "qtune_ms": {"quantize": 1.0, "dequantize": 2.0, "forward": 3.0,
                                                         "fwd+bwd": 4.0},
                     "bnb_ms": None, "ratio": None, "fwd_bwd_over_dense": 1.6}]}
PERPLEXITY = {"settings": {"model": "smollm2", "text": "austen:persuasion", "calibration": "austen:emma",
                           "tokens": 1024, "seq_len": 512, "samples": 32, "cal_seq_len": 512, "batch_size": 4},
              "model_name": "smollm2-135m-instruct", "eval_tokens": 1024, "threads": 2, "load_average_start": None,
              "complete": True,
              "rows": [{"name": "fp32", "bits_per_param": 32.0, "load_quantize_s": 0.1, "perplexity": 37.0,
                        "vs_fp32": 0.0},
                       {"name": "qtune nf4", "bits_per_param": 4.5, "load_quantize_s": 3.0, "perplexity": 45.714,
                        "vs_fp32": 45.714 / 37 - 1},
                       {"name": "bnb nf4", "bits_per_param": 4.5, "load_quantize_s": 2.0, "perplexity": 45.709,
                        "vs_fp32": 45.709 / 37 - 1}]}
RUN = {"backend": "qtune", "command": "qtune train r.yaml", "status": "finished", "steps": 40, "wall_s": 208.4,
       "train_s": 190.0, "step_s": 4.76, "tokens_per_s": 215.0, "peak_rss_gib": 3.76, "perplexity_before": 48.81,
       "perplexity_after": 38.92, "train_loss": 3.1, "model_dtype": "bfloat16", "compute_dtype": "bfloat16",
       "dtype_choice": ["model.dtype: auto -> bfloat16 (native bf16)"]}
DEMO = {"recipe": "r.yaml", "overrides": [], "load_average_start": [2.0, 1.0, 1.0],
        "runs": [RUN, {**RUN, "backend": "bitsandbytes", "step_s": 5.65, "perplexity_before": None,
                       "command": "qtune train r.yaml quantization.backend=bitsandbytes"}],
        "ratios_qtune_over_bitsandbytes": {"step_s": 0.84, "wall_s": 0.9, "peak_rss_gib": 0.88}}

TEMPLATE = """# t
demo (<!-- bench:demo:summary -->stale<!-- /bench:demo:summary -->)

<!-- bench:formats -->
stale
<!-- /bench:formats -->
text in between stays
<!-- bench:perplexity -->
<!-- /bench:perplexity -->
<!-- bench:demo -->
<!-- /bench:demo -->
<!-- bench:gpu -->
<!-- /bench:gpu -->
"""


@pytest.fixture
def tree(tmp_path):
    results = tmp_path / "bench" / "results"
    write_results("formats", FORMATS, results, command="python -m qtune.bench.formats --dtype fp32")
    write_results("perplexity", PERPLEXITY, results, command="python -m qtune.bench.perplexity --samples 32")
    write_results("demo", DEMO, results, command="python -m qtune.bench.demo --backend bitsandbytes")
    (tmp_path / "README.md").write_text(TEMPLATE)
    return tmp_path


def _main(tree, *extra):
    return readme.main(["--readme", str(tree / "README.md"), "--results", str(tree / "bench" / "results"), *extra])


def test_render_then_check(tree, capsys):
    assert _main(tree, "--check") == 1  # the template is stale
    assert _main(tree) == 0
    text = (tree / "README.md").read_text()
    assert "stale" not in text and "text in between stays" in text and text.startswith("# t\n")
    assert "-->48.81 → 38.92 after 40 steps in 3 min 28 s on 2 cores (" in text
    # every table is followed by its command and the file, linked relative to the README
    for bench, command in (("formats", "python -m qtune.bench.formats --dtype fp32"),
                           ("perplexity", "python -m qtune.bench.perplexity --samples 32"),
                           ("demo", "python -m qtune.bench.demo --backend bitsandbytes")):
        assert f"Command: `{command}` → [`bench/results/{bench}.json`](bench/results/{bench}.json)" in text
    assert "| nf4 | 0.50 | 1.00 | 1.00 | 0.80 | 3.0 / 4.0 | 3.0 / 5.0 |" in text
    assert "| rtn4-g128 | – | – | – | – | 3.0 / 4.0 | – |" in text
    assert "| qtune nf4 | 4.50 | 45.714 | +23.55% | 3 | 45.709 (4.50 bits) |" in text
    assert "GPTQ calibrated" not in text and "bitsandbytes 0." in text  # no GPTQ row; a bnb row
    assert "| 4.76 | 3.76 | 48.81 → 38.92 | bfloat16 / bfloat16 |" in text
    assert "(not run) → 38.92" in text and "s/step 0.84, wall time 0.90, peak RSS 0.88" in text
    assert "<!-- bench:gpu -->\n<!-- /bench:gpu -->" in text  # optional, absent: nothing
    assert _main(tree) == 0 and (tree / "README.md").read_text() == text  # idempotent
    capsys.readouterr()
    assert _main(tree, "--check") == 0


def test_check_fails_when_a_number_changes(tree, capsys):
    assert _main(tree) == 0
    path = tree / "bench" / "results" / "demo.json"
    payload = json.loads(path.read_text())
    payload["results"]["runs"][0]["step_s"] = 4.91
    path.write_text(json.dumps(payload))
    capsys.readouterr()
    assert _main(tree, "--check") == 1
    out = capsys.readouterr()
    assert "+| qtune |" in out.out and "| 4.91 |" in out.out and "out of date" in out.err


def test_gpu_section_when_its_file_exists(tree):
    gpu = {"device": "NVIDIA H200", "stages": ["correct", "bench"], "ok": True, "failures": [],
           "correct": {"passed": 10, "checked": 10, "ok": True, "rows": []},
           "bench": {"rows": [{"format": "nf4_dq", "family": "4bit", "direction": "forward", "dtype": "bf16", "m": m,
                               "n": 4096, "k": 4096, "ms": 0.05, "gbps": 1000.0, "tflops": 2.0,
                               "vs_dequant_matmul": 1.5, "vs_dense": 0.9} for m in (1, 16, 4096)],
                     "crossover_by_dtype": {"arch": "sm_90", "tokens": [1, 16, 4096],
                                            "thresholds": {"4bit": {"forward": {"bf16": 16}}}}}}
    write_results("gpu", gpu, tree / "bench" / "results", command="python -m qtune.bench.gpu")
    assert _main(tree) == 0
    text = (tree / "README.md").read_text()
    assert "GPU: NVIDIA H200" in text and "10 of 10 kernel checks" in text
    assert "| nf4_dq | forward | bf16 | 4096 | 0.050 |" in text and "| nf4_dq | forward | bf16 | 16 |" not in text
    assert "| 4bit | forward | bf16 | 16 |" in text
    assert "Command: `python -m qtune.bench.gpu` → [`bench/results/gpu.json`]" in text


def test_missing_file_and_unpaired_marker_are_errors(tree):
    (tree / "bench" / "results" / "demo.json").unlink()
    with pytest.raises(FileNotFoundError, match="bench:demo.*demo.json does not exist"):
        _main(tree)
    (tree / "README.md").write_text("<!-- bench:formats -->\n<!-- /bench:formats -->\n<!-- bench:perplexity -->\n")
    with pytest.raises(ValueError, match="markers"):
        _main(tree)


def test_an_incomplete_perplexity_run_says_so(tree):
    path = tree / "bench" / "results" / "perplexity.json"
    payload = json.loads(path.read_text())
    payload["results"]["complete"] = False
    path.write_text(json.dumps(payload))
    assert _main(tree) == 0
    assert "stopped after its first 3 rows" in (tree / "README.md").read_text()


def test_gptq_rows_show_their_quantize_times(tree):
    path = tree / "bench" / "results" / "perplexity.json"
    payload = json.loads(path.read_text())
    payload["results"]["rows"].append({"name": "gptqmodel gptq-4 g128", "bits_per_param": 4.21, "load_quantize_s": 95.0,
                                       "quantize_s": 88.4, "quantize_cpu_s": 160.2, "perplexity": 44.12,
                                       "vs_fp32": 44.12 / 37 - 1})
    path.write_text(json.dumps(payload))
    assert _main(tree) == 0
    text = (tree / "README.md").read_text()
    assert "| gptqmodel gptq-4 g128 | 4.21 | 44.120 | +19.24% | 95 | 88 / 160 |" in text
    assert "| qtune nf4 | 4.50 | 45.714 | +23.55% | 3 |  | 45.709 (4.50 bits) |" in text  # not a GPTQ row: no time


def test_study_rows_show_their_specs(tree):
    """Rows of qtune.bench.gptq_study carry the spec they were measured with; the table shows it."""
    path = tree / "bench" / "results" / "perplexity.json"
    payload = json.loads(path.read_text())
    for row in payload["results"]["rows"]:
        row["spec"] = "float" if row["name"] == "fp32" else f"qtune:{row['name'].split()[-1]}"
    payload["results"]["rows"].append({"name": "qtune natural d0.01", "spec": "qtune:gptq:bits=3,act_group_aware=false",
                                       "bits_per_param": 3.27, "load_quantize_s": 95.0, "quantize_s": 88.4,
                                       "quantize_cpu_s": 160.2, "perplexity": 110.5, "vs_fp32": 110.5 / 37 - 1})
    path.write_text(json.dumps(payload))
    assert _main(tree) == 0
    text = (tree / "README.md").read_text()
    assert "| qtune natural d0.01 | 3.27 | 110.500 | +198.65% | 95 | 88 / 160 | | `qtune:gptq:bits=3,act_group_aware=false` |" \
        in text.replace("|  |", "| |")
    assert "GPTQ calibrated on" in text and "| spec |" in text


def test_qalora_section(tree):
    table = [{"row": "base (Q4_1 GGUF)", "perplexity": 39.2857, "over_trained": None},
             {"row": "QA-LoRA trained (adapter on the base)", "perplexity": 36.2377, "over_trained": 1.0},
             {"row": "QA-LoRA exported GGUF, exact merge (qtune)", "perplexity": 36.2367, "over_trained": 0.999973}]
    qalora = {"recipe": "q.yaml", "model": "m.gguf", "steps": 20, "recipe_steps": 40, "train_dtype": "bfloat16",
              "eval_dtype": "float32", "heldout": {"source": "qtune:austen/persuasion"}, "heldout_tokens": 2048,
              "table": table, "qalora_over_lora_trained": 1.0263,
              "runs": {"qalora": {"kept_mean": 0.99996}, "lora": {"kept_mean": 0.062}}}
    write_results("qalora", qalora, tree / "bench" / "results", command="python -m qtune.bench.qalora --steps 20")
    (tree / "README.md").write_text("<!-- bench:qalora -->\n<!-- /bench:qalora -->\n")
    assert _main(tree) == 0
    text = (tree / "README.md").read_text()
    assert "| QA-LoRA exported GGUF, exact merge (qtune) | 36.237 | 0.99997 |" in text
    assert "| base (Q4_1 GGUF) | 39.286 |  |" in text
    assert "20 steps (the recipe has 40)" in text and "float32 evaluation" in text
    assert "QA-LoRA 100.0%" in text and "standard LoRA 6.2%" in text and "+2.6% in trained perplexity" in text


def test_loftq_section(tree):
    rows = [{"format": "nf4", "init": "default", "loftq_iters": None, "steps": 20, "step0_loss": 4.1835,
             "final_loss": 3.819, "perplexity_before": 48.81, "perplexity_after": 40.03},
            {"format": "nf4", "init": "loftq", "loftq_iters": 1, "steps": 20, "step0_loss": 4.1493,
             "final_loss": 3.7894, "perplexity_before": 47.18, "perplexity_after": 39.92}]
    write_results("loftq", {"recipe": "r.yaml", "steps": 20, "loftq_iters": 1, "overrides": [], "rows": rows},
                  tree / "bench" / "results", command="python -m qtune.bench.loftq --steps 20 --format nf4")
    (tree / "README.md").write_text("<!-- bench:loftq -->\n<!-- /bench:loftq -->\n")
    assert _main(tree) == 0
    text = (tree / "README.md").read_text()
    assert "| nf4 | default | 4.184 | 3.819 | 48.81 → 40.03 |" in text
    assert "| nf4 | loftq (T=1) | 4.149 | 3.789 | 47.18 → 39.92 |" in text and "20 steps" in text


def test_gptq_speed_section(tree):
    speed = {"settings": {"model": "smollm2", "calibration": "qtune:austen/emma", "samples": 128, "seq_len": 512,
                          "batch_size": 8, "spec": "gptq:bits=4,group_size=128"},
             "cpu": "AMD EPYC", "cpu_capability": "AVX2", "cores": 2,
             "qtune": {"quantize_s": 250.4, "quantize_cpu_s": 480.2, "block_s": [8.0] * 30,
                       "parts_s": {"forwards": 150.0, "hessians": 70.0, "solve": 20.0}},
             "gptqmodel": {"quantize_s": 830.6, "quantize_cpu_s": 820.0, "gptqmodel": "7.7.0",
                           "quantize_config": {"bits": 4, "desc_act": False, "act_group_aware": True,
                                               "damp_percent": 0.05}},
             "ratio_qtune_over_gptqmodel": 0.301, "cpu_ratio_qtune_over_gptqmodel": 0.586}
    write_results("gptq-speed", speed, tree / "bench" / "results",
                  command="python -m qtune.bench.gptq_speed --samples 128")
    (tree / "README.md").write_text("<!-- bench:gptq-speed -->\n<!-- /bench:gptq-speed -->\n")
    assert _main(tree) == 0
    text = (tree / "README.md").read_text()
    assert "| qtune (`gptq:bits=4,group_size=128`) | 250 | 480 |" in text
    assert "| GPTQModel 7.7.0 (its defaults: desc_act=False, act_group_aware=True, damp_percent=0.05) | 831 | 820 |" in text
    assert "(30 blocks) on 128×512 tokens" in text and "torch CPU capability AVX2" in text
    assert "forwards 150 s, hessians 70 s, solve 20 s" in text and "**0.30×** wall time, 0.59× CPU time" in text


def test_committed_readme_matches_the_committed_results():
    """The README in the repository quotes exactly what bench/results/ holds (regenerate with
    ``python -m qtune.bench.readme`` after rerunning a bench)."""
    assert readme.main(["--readme", str(REPO / "README.md"), "--results", str(REPO / "bench" / "results"),
                        "--check"]) == 0
