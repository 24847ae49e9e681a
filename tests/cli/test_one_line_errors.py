"""Every bad input to every ``qtune`` command ends in exactly one line on stderr: ``qtune CMD: error: ...``.

No traceback, no usage block, no warning or log line around it, and a non-zero exit code. The commands run
in-process (as ``qtune.cli.main.main``); warnings and log records are written to stderr as a bare
``python -m qtune`` process would write them (Python's default ``showwarning`` and logging's last-resort
handler), so they count against the one line.
"""
from __future__ import annotations

import logging
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from qtune.cli.main import main
from tests.integrations.tiny_models import make_tiny, make_tokenizer
from tests.train.conftest import base_recipe, write_recipe
from tests.train.models import CORPUS, save_tiny_model_dir


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny float model (+ tokenizer), a recipe that trains it, texts, and broken inputs."""
    from qtune.assets import austen_text

    root = tmp_path_factory.mktemp("bad_input")
    model = make_tiny("llama", root / "model")
    make_tokenizer(model, austen_text("emma")[:20_000])
    (root / "text.txt").write_text(austen_text("persuasion")[:5_000])
    (root / "empty.txt").write_text("")
    assert main(["quantize", str(model), "--format", "nf4", "--out", str(root / "qmodel")]) == 0
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "notes.txt").write_text("no config.json here")
    truncated = root / "truncated"
    shutil.copytree(model, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "taken").mkdir()
    (root / "taken" / "keep.txt").write_text("keep")
    # recipes: one that is valid, and broken ones
    train_dir = root / "train"
    save_tiny_model_dir(train_dir / "model")
    (train_dir / "train.txt").write_text(CORPUS * 4)
    recipe = base_recipe(train_dir, root / "run")
    write_recipe(root / "ok.yaml", recipe)
    write_recipe(root / "unknown-key.yaml", {**recipe, "training": {**recipe["training"], "max_stepz": 3}})
    write_recipe(root / "bad-value.yaml", {**recipe, "lora": {**recipe["lora"], "r": "eight"}})
    write_recipe(root / "no-model.yaml", {**recipe, "model": {**recipe["model"], "path": str(root / "gone")}})
    (root / "syntax.yaml").write_text("model:\n  path: [unclosed\n")
    (root / "list.yaml").write_text(yaml.safe_dump(["not", "a", "mapping"]))
    # an adapter folder without its weights
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    return root


@pytest.fixture
def as_a_process(capsys):
    """Warnings and WARNING+ log records go to (captured) stderr, as in a bare ``python -m qtune``."""
    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    handler = logging.StreamHandler()  # what logging.lastResort does: sys.stderr at emit time, WARNING+
    handler.setLevel(logging.WARNING)
    handler.stream = _CurrentStderr()
    root_logger = logging.getLogger()
    root_logger.addHandler(handler)
    with warnings.catch_warnings():
        warnings.resetwarnings()  # Python's own default filters, not pytest's
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        warnings.showwarning = show
        yield capsys
    root_logger.removeHandler(handler)


class _CurrentStderr:
    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()


R = "{root}"


def to_o(*argv: str) -> list[str]:
    """``argv`` writing to ``{root}/o`` (which must never appear)."""
    return [*argv, "--out", R + "/o"]


CASES = {
    "quantize": [
        (to_o(R + "/missing", "--format", "nf4"), r"missing does not exist"),
        (to_o(R + "/not-a-model", "--format", "nf4"), r"config\.json"),
        (to_o(R + "/truncated", "--format", "nf4"), r"truncated safetensors file"),
        (to_o(R + "/model", "--format", "bogus"), r"invalid choice: 'bogus'"),
        ([R + "/model", "--format", "nf4"], r"--out"),
        (to_o(R + "/model", "--format", "rtn", "--bits", "5"), r"--bits: invalid choice"),
        (to_o(R + "/model", "--format", "nf4", "--blocksize", "48"), r"blocksize"),
        (to_o(R + "/model", "--format", "nf4", "--blocksize", "x"), r"--blocksize: invalid int"),
        (to_o(R + "/model", "--format", "nf4", "--dtype", "float8"), r"--dtype='float8'"),
        (to_o(R + "/model", "--format", "nf4", "--override", "down_proj"), r"down_proj"),
        (to_o(R + "/model", "--format", "nf4", "--override", "down_proj=bogus"), r"bogus"),
        (to_o(R + "/model", "--format", "nf4", "--layout", "gptq"), r"--layout gptq holds"),
        (to_o(R + "/model", "--format", "gptq"), r"needs --calibration"),
        (to_o(R + "/model", "--format", "gptq", "--calibration", R + "/missing.txt"),
         r"missing\.txt does not exist"),
        (to_o(R + "/model", "--format", "gptq", "--calibration", "austen:nope"), r"nope"),
        (to_o(R + "/model", "--format", "gptq", "--calibration", R + "/text.txt", "--samples", "0"),
         r"--samples must be ≥ 1"),
        (to_o(R + "/model", "--format", "rtn", "--group-size", "48", "--layout", "gptq"),
         r"group_size 48 does not divide"),
        ([R + "/model", "--format", "nf4", "--out", R + "/taken"], r"already exists"),
    ],
    "eval": [
        ([R + "/missing", "--text", R + "/text.txt"], r"missing does not exist"),
        ([R + "/model", "--text", R + "/missing.txt"], r"missing\.txt does not exist"),
        ([R + "/model"], r"--text"),
        ([R + "/model", "--text", R + "/empty.txt"], r"empty\.txt"),
        ([R + "/model", "--text", R + "/text.txt", "--quant", "bogus"], r"bogus"),
        ([R + "/model", "--text", R + "/text.txt", "--quant", "gptq"], r"calibration"),
        ([R + "/model", "--text", R + "/text.txt", "--tokens", "0"], r"--tokens must be ≥ 2"),
        ([R + "/model", "--text", R + "/text.txt", "--tokens", "many"], r"--tokens: invalid int"),
        ([R + "/model", "--text", R + "/text.txt", "--seq-len", "0"], r"--seq-len must be ≥ 2"),
        ([R + "/model", "--text", R + "/text.txt", "--stride", "0"], r"--stride must be ≥ 1"),
        ([R + "/model", "--text", R + "/text.txt", "--batch-size", "0"], r"--batch-size must be ≥ 1"),
        ([R + "/model", "--text", R + "/text.txt", "--dtype", "float8"], r"--dtype='float8'"),
        ([R + "/qmodel", "--text", R + "/text.txt", "--quant", "nf4"], r"already quantized"),
    ],
    "inspect": [
        ([R + "/missing"], r"missing does not exist"),
        ([R + "/not-a-model"], r"config\.json"),
        ([R + "/model", "--format", "gptq"], r"round-to-nearest"),
        ([R + "/model", "--format", "bogus"], r"bogus"),
        ([R + "/model", "--plot", R + "/p.png", "--layer", "model.nope"], r"--layer 'model\.nope' is not a layer"),
        ([R + "/model", "--reference", R + "/missing"], r"missing does not exist"),
        ([R + "/model", "--dtype", "int4"], r"--dtype='int4'"),
    ],
    "plan": [
        ([R + "/missing.yaml"], r"missing\.yaml"),
        ([R + "/syntax.yaml"], r"syntax\.yaml"),
        ([R + "/list.yaml"], r"list\.yaml"),
        ([R + "/unknown-key.yaml"], r"max_stepz"),
        ([R + "/ok.yaml", "training.max_steps"], r"training\.max_steps"),
        ([R + "/ok.yaml", "training.nope=1"], r"nope"),
        ([R + "/ok.yaml", "training.max_steps=abc"], r"max_steps"),
        ([R], r"bad_input"),
    ],
    "train": [
        ([R + "/missing.yaml"], r"missing\.yaml"),
        ([R + "/unknown-key.yaml"], r"max_stepz"),
        ([R + "/bad-value.yaml"], r"lora.*r"),
        ([R + "/ok.yaml", "lora.nope=1"], r"nope"),
        ([R + "/ok.yaml", "--resume"], r"no checkpoint"),
        ([R + "/no-model.yaml"], r"gone"),
    ],
    "export": [
        (to_o(R + "/missing", "--mode", "adapter"), r"missing: does not exist"),
        (to_o(R + "/not-a-model", "--mode", "merged"), r"neither a training run folder"),
        (to_o(R + "/adapter", "--mode", "adapter"), r"adapter_model\.safetensors"),
        (to_o(R + "/adapter", "--mode", "bogus"), r"--mode: invalid choice"),
        ([R + "/adapter", "--mode", "adapter"], r"--out"),
        (to_o(R + "/adapter", "--mode", "adapter", "--format", "nf4"), r"--format applies to --mode"),
        (to_o(R + "/adapter", "--mode", "adapter", "--private"), r"--private applies"),
        ([R + "/adapter", "--mode", "adapter", "--out", R + "/taken"], r"already exists"),
    ],
}


@pytest.mark.parametrize("command,argv,message", [(c, a, m) for c, cases in CASES.items() for a, m in cases],
                         ids=[f"{c}-{i}" for c, cases in CASES.items() for i in range(len(cases))])
def test_bad_input_is_one_line_on_stderr(command, argv, message, root, as_a_process):
    import re

    argv = [a.replace(R, str(root)) for a in argv]
    try:
        code = main([command, *argv])
    except SystemExit as e:  # argparse exits; a real process would too
        code = e.code
    out, err = as_a_process.readouterr()
    assert code not in (0, None), f"qtune {command} {argv} succeeded: {out[-500:]}"
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr of qtune {command} {' '.join(argv)} has {len(lines)} lines:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith(f"qtune {command}: error: "), err
    assert re.search(message, lines[0]), (message, err)
    assert not (root / "o").exists() and (root / "taken" / "keep.txt").read_text() == "keep"


def test_one_line_in_a_real_process(root):
    """The same in a fresh ``python -m qtune`` (import-time log lines included): a recipe error is found after
    trl, peft and bitsandbytes were imported, and bitsandbytes logs on import on AVX512-BF16 CPUs."""
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "qtune", "plan", str(root / "unknown-key.yaml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("qtune plan: error: "), proc.stderr


@pytest.mark.parametrize("argv,message", [(["bogus"], r"invalid choice: 'bogus'"),
                                          (["env", "--bogus"], r"unrecognized arguments: --bogus")])
def test_top_level_usage_errors_are_one_line(argv, message, capsys):
    import re

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qtune: error: ") and re.search(message, lines[0]), lines
