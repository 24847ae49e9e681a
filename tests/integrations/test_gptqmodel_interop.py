"""GPTQ v1 checkpoints shared with GPTQModel, a second and independent GPTQ implementation, both ways.

* qtune quantizes (sequential GPTQ) and writes the GPTQ layout → GPTQModel loads it;
* GPTQModel quantizes with its own GPTQ and saves → ``qtune.load_model`` loads it;

and in both cases the two libraries must decode the same weights and compute the same logits.

GPTQModel runs in a child process (``gptqmodel_worker.py``, same interpreter): importing it patches
safetensors, Triton, transformers, logging and environment variables for the whole process. Its
pure-PyTorch kernel (``BACKEND.GPTQ_TORCH``, ``TorchLinear``) is used on CPU; that kernel loads in fp16
or bf16 only, so every float tensor of the tiny model is made fp16-exact up front: GPTQModel's fp16 load
then changes nothing, and after ``.float()`` both libraries hold bit-identical weights.

Tolerances:

* dequantized weights: bit-identical (``torch.equal``). Both compute ``scale · (q − zero)`` in fp32 from
  the same fp16 scales and the same integers: one rounding, the same in both.
* fp32 logits: ``max|Δ| ≤ 1e-5`` against logits of magnitude ≈ 0.6 (measured: 0, bit-identical here).
  The weights are the same, so only the order of floating-point sums may differ (BLAS, threads).
* fp16 logits (GPTQModel as it loads, in fp16) against qtune's fp32: ``max|Δ| ≤ 3e-3 · max|logit|``
  (measured 3.7e-4 to 4.4e-4, i.e. ≤ 8e-4 relative): every activation is rounded to fp16 (unit
  roundoff 2⁻¹¹ ≈ 4.9e-4) through two decoder blocks.

Not covered, because GPTQModel 7.7.0 does not allow it: an asymmetric (``sym=False``) v1 checkpoint
written by anything but GPTQModel ≥ 0.9.0 (it checks ``meta.quantizer``) is refused with "Loading of
a sym=False model with format=FORMAT.GPTQ is only supported if produced by gptqmodel version >= 0.9.0".
qtune's side therefore writes symmetric checkpoints; GPTQModel's side covers asymmetric ones.

Zero points of 0 (asymmetric groups whose minimum is 0): GPTQModel encodes them in v1 with a
whole-word borrow; qtune decodes its files the way GPTQModel does (``test_qtune_loads_gptqmodel_zero_point_zero``)
and writes such zeros back in the same encoding.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtune import GPTQConfig
from qtune.calibration import gptq_quantize_model
from qtune.integrations.layouts import load_model, save_quantized
from qtune.integrations.transformers import mark_quantized
from qtune.nn import LinearGPTQ
from tests.integrations.tiny_models import make_tiny, make_tokenizer, tokens

# GPTQModel lives in its own folder (QTUNE_GPTQMODEL_PATH, default <repo>/.deps/gptqmodel, where .ci/run
# installs it) that only the worker process puts on sys.path: importing gptqmodel patches a process (see the
# worker's docstring), and installed in site-packages it makes peft demand optimum for every LoRA layer.
GPTQMODEL_PATH = Path(os.environ.get("QTUNE_GPTQMODEL_PATH", Path(__file__).resolve().parents[2] / ".deps" / "gptqmodel"))
pytestmark = pytest.mark.skipif(
    not (GPTQMODEL_PATH / "gptqmodel").is_dir(),
    reason=f"GPTQModel not found in {GPTQMODEL_PATH}: pip install --no-deps --target .deps/gptqmodel gptqmodel==7.7.0 "
           "logbar==0.4.15 tokenicer==0.0.14 device-smi==0.5.7 pypcre==0.6.4 defuser==0.0.28 threadpoolctl==3.8.0 "
           "(CI installs it)")

WORKER = Path(__file__).with_name("gptqmodel_worker.py")
FP32_ATOL = 1e-5
FP16_REL = 3e-3

# qtune: (bits, group_size, ordering, sym), the ordering's GPTQConfig fields in ORDERINGS; GPTQModel: (bits,
# group_size, desc_act, sym). The tiny Llama has in_features 64 and 128.
ORDERINGS = {"default": {}, "act-order": {"static_groups": False}, "group-aware": {"desc_act": False}}
QTUNE_WRITES = [(4, 32, "act-order", True), (3, 32, "default", True), (8, 64, "group-aware", True),
                (2, 64, "default", True)]
GPTQMODEL_WRITES = [(4, 32, True, False), (8, 64, False, False), (3, 32, False, True)]


def case_id(case) -> str:
    bits, group_size, order, sym = case
    order = f"-{order}" if isinstance(order, str) else "-act" if order else ""
    return f"{bits}bit-g{group_size}" + order + ("-sym" if sym else "-asym")


def calibration() -> torch.Tensor:
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(3))


def run_gptqmodel(jobs: list[dict], workdir: Path) -> dict:
    """Run ``gptqmodel_worker.py`` on ``jobs`` in a child process; returns its results by job name."""
    jobs_path, results_path = workdir / "jobs.pt", workdir / "results.pt"
    torch.save({"ids": tokens(), "jobs": jobs}, jobs_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(GPTQMODEL_PATH), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(WORKER), str(jobs_path), str(results_path)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=workdir)  # GPTQModel writes logs/ to cwd
    if proc.returncode != 0:
        pytest.fail(f"GPTQModel worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return torch.load(results_path, weights_only=True)


@pytest.fixture(scope="module")
def llama_fp16(tmp_path_factory) -> Path:
    """A tiny random Llama saved in fp16, with a tokenizer (GPTQModel.load requires one)."""
    from qtune.assets import austen_text

    path = make_tiny("llama", tmp_path_factory.mktemp("gptqmodel") / "llama-fp16", dtype=torch.float16)
    make_tokenizer(path, austen_text("emma")[:20_000])
    return path


@pytest.fixture(scope="module")
def llama_fp16_nonneg(llama_fp16, tmp_path_factory) -> Path:
    """``llama_fp16`` with rows 0-7 of layer 0's q_proj made positive, so their GPTQ zero points are 0."""
    model = AutoModelForCausalLM.from_pretrained(llama_fp16, dtype=torch.float16)
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight
        w[:8] = w[:8].abs() + 0.01
    out = tmp_path_factory.mktemp("gptqmodel") / "llama-fp16-nonneg"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(llama_fp16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qtune_written(llama_fp16, tmp_path_factory) -> dict:
    """qtune quantizes each QTUNE_WRITES case and saves the GPTQ layout; one GPTQModel process loads all."""
    root = tmp_path_factory.mktemp("qtune_written")
    tok = AutoTokenizer.from_pretrained(llama_fp16)
    jobs = []
    for case in QTUNE_WRITES:
        bits, group_size, order, sym = case
        model = AutoModelForCausalLM.from_pretrained(llama_fp16, dtype=torch.float32)
        gptq_quantize_model(model, calibration(), GPTQConfig(bits=bits, group_size=group_size, sym=sym,
                                                             **ORDERINGS[order]), progress=False)
        mark_quantized(model)
        folder = save_quantized(model, root / case_id(case), layout="gptq", tokenizer=tok)
        jobs.append({"name": case_id(case), "folder": str(folder), "quantize": None})
    return {"folders": {j["name"]: Path(j["folder"]) for j in jobs}, "results": run_gptqmodel(jobs, root)}


@pytest.fixture(scope="module")
def gptqmodel_written(llama_fp16, llama_fp16_nonneg, tmp_path_factory) -> dict:
    """GPTQModel quantizes each GPTQMODEL_WRITES case (and the zero-point-0 case) and saves it."""
    root = tmp_path_factory.mktemp("gptqmodel_written")
    jobs = []
    for name, src, case in [(case_id(c), llama_fp16, c) for c in GPTQMODEL_WRITES] + \
                           [("zero-point-0", llama_fp16_nonneg, (4, 32, False, False))]:
        bits, group_size, desc_act, sym = case
        jobs.append({"name": name, "folder": str(root / name),
                     "quantize": {"float": str(src), "bits": bits, "group_size": group_size, "sym": sym,
                                  "desc_act": desc_act, "calibration": calibration()}})
    return {"folders": {j["name"]: Path(j["folder"]) for j in jobs}, "results": run_gptqmodel(jobs, root)}


def check_same_model(folder: Path, theirs: dict, bits: int) -> None:
    """qtune's load of ``folder`` against GPTQModel's results for it (weights, fp32 and fp16 logits)."""
    ours = load_model(folder, dtype=torch.float32)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LinearGPTQ)}
    assert len(layers) == 14 and all(m.bits == bits for m in layers.values())
    assert theirs["kernels"] == dict.fromkeys(layers, "TorchLinear")  # the pure-PyTorch kernel, nothing compiled
    for name, m in layers.items():
        assert torch.equal(m.dequantize(torch.float32), theirs["weights"][name]), name
    with torch.no_grad():
        ref = ours(tokens()).logits
    fp32 = float((theirs["logits_fp32"] - ref).abs().max())
    fp16 = float((theirs["logits_fp16"].float() - ref).abs().max())
    assert fp32 <= FP32_ATOL, f"fp32 logits differ by {fp32:.3g}"
    assert fp16 <= FP16_REL * float(ref.abs().max()), f"fp16 logits differ by {fp16:.3g}"


@pytest.mark.parametrize("case", QTUNE_WRITES, ids=case_id)
def test_gptqmodel_loads_qtune_gptq(case, qtune_written):
    folder = qtune_written["folders"][case_id(case)]
    qc = json.loads((folder / "quantize_config.json").read_text())
    bits, group_size, order, sym = case
    # desc_act describes the layout: only classic act-order permutes g_idx; the default records static_groups
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"], qc["checkpoint_format"]) == \
        (bits, group_size, order == "act-order", sym, "gptq")
    assert (qc["static_groups"], qc["act_group_aware"]) == (order == "default", order == "group-aware")
    check_same_model(folder, qtune_written["results"][case_id(case)], case[0])


@pytest.mark.parametrize("case", GPTQMODEL_WRITES, ids=case_id)
def test_qtune_loads_gptqmodel_gptq(case, gptqmodel_written):
    folder = gptqmodel_written["folders"][case_id(case)]
    qc = json.loads((folder / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"], qc["checkpoint_format"]) == (*case, "gptq")
    assert qc["meta"]["quantizer"][0].startswith("gptqmodel:")
    check_same_model(folder, gptqmodel_written["results"][case_id(case)], case[0])


def test_qtune_loads_gptqmodel_zero_point_zero(gptqmodel_written):
    folder, theirs = gptqmodel_written["folders"]["zero-point-0"], gptqmodel_written["results"]["zero-point-0"]
    ours = load_model(folder, dtype=torch.float32)
    differing = {}
    for name, m in ours.named_modules():
        if isinstance(m, LinearGPTQ):
            rows = (m.dequantize(torch.float32) != theirs["weights"][name]).any(dim=1).nonzero().flatten().tolist()
            if rows:
                differing[name] = rows
    assert not differing, f"qtune decodes other weights than GPTQModel in {differing}"
    # the checkpoint really holds zero points of 0 (else this test would not test the borrow)
    from qtune.formats.gptq import qzeros_to_checkpoint, unpack_zeros
    q_proj = ours.get_submodule("model.layers.0.self_attn.q_proj")
    assert int(unpack_zeros(q_proj.qzeros, q_proj.bits, q_proj.out_features).min()) == 0
    # and qtune writes them back as GPTQModel wrote them
    from safetensors import safe_open
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("model.layers.0.self_attn.q_proj.qzeros")
    assert torch.equal(qzeros_to_checkpoint(q_proj.qzeros, q_proj.bits, q_proj.out_features), stored)
