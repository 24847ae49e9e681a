"""The GPU dispatch policy (qtune.ops.dispatch), the routing wrappers, device guards and deterministic
launch configs, on CPU under the Triton interpreter."""
import json
import math

import pytest
import torch

pytest.importorskip("triton")

import qtune  # noqa: E402,F401
from qtune.kernels import _common, routing  # noqa: E402
from qtune.kernels import matmul_4bit, matmul_affine, matmul_gguf, matmul_gptq, matmul_int8  # noqa: E402
from qtune.ops import dequantize as ref_ops  # noqa: E402
from qtune.ops import dispatch  # noqa: E402

from .cases import GGUF, activations, affine_weight, assert_product_close, gguf_weight, gptq_weight, int8_weight, nf4_weight  # noqa: E402,E501


@pytest.fixture(autouse=True)
def clean_policy(monkeypatch, tmp_path):
    """No user override, environment or crossover file leaks into (or out of) a test."""
    monkeypatch.delenv(dispatch.ENV_MAX_M, raising=False)
    monkeypatch.setenv(dispatch.ENV_FILE, str(tmp_path / "dispatch.json"))
    monkeypatch.setattr(dispatch, "_user", {})
    dispatch.reload()
    yield
    dispatch.reload()


# -- the policy -------------------------------------------------------------------------------------------
def test_default_table_fused_for_small_m_forward_dequant_backward():
    for fam in ("4bit", "int8", "gptq", "gguf", "affine"):
        assert dispatch.choose(fam, "forward", 1, "cpu") == "fused"
        assert dispatch.choose(fam, "forward", 16, "cpu") == "fused"
        assert dispatch.choose(fam, "forward", 17, "cpu") == "dequant"
        assert dispatch.choose(fam, "forward", 4096, "cpu") == "dequant"
        assert dispatch.choose(fam, "grad_input", 1, "cpu") == "dequant"
    assert dispatch.choose("llm_int8", "forward", 4096, "cpu") == "fused"    # its int8 GEMM at every M
    assert dispatch.choose("llm_int8", "grad_input", 1, "cpu") == "dequant"


def test_override_order_force_then_process_then_env_then_file_then_arch_default(monkeypatch, tmp_path):
    monkeypatch.setattr(dispatch, "device_arch", lambda device: "sm_100")
    assert dispatch.fused_max_m("4bit", "forward", "cpu") == 4                       # arch default
    dispatch.save_crossovers("sm_100", {"4bit": {"forward": 48, "grad_input": 0}})
    assert dispatch.fused_max_m("4bit", "forward", "cpu") == 48                      # measured file
    assert json.loads((tmp_path / "dispatch.json").read_text())["crossovers"]["sm_100"]["4bit"]["forward"] == 48
    monkeypatch.setenv(dispatch.ENV_MAX_M, "4bit.forward=100,gptq=7")
    assert dispatch.fused_max_m("4bit", "forward", "cpu") == 100                     # environment
    assert dispatch.fused_max_m("gptq", "grad_input", "cpu") == 7                    # family alone: both directions
    dispatch.set_fused_max_m("4bit", "forward", 3)
    assert dispatch.fused_max_m("4bit", "forward", "cpu") == 3                       # process
    assert dispatch.choose("4bit", "forward", 4, "cpu") == "dequant"
    with dispatch.force("fused"):
        assert dispatch.choose("4bit", "forward", 4, "cpu") == "fused"               # context
        with dispatch.force(None):
            assert dispatch.choose("4bit", "forward", 4, "cpu") == "dequant"
    dispatch.set_fused_max_m("4bit", "forward", None)
    assert dispatch.fused_max_m("4bit", "forward", "cpu") == 100
    monkeypatch.setenv(dispatch.ENV_MAX_M, "inf")
    assert dispatch.fused_max_m("int8", "grad_input", "cpu") == math.inf


def test_crossover_file_merges_architectures_and_rejects_garbage(tmp_path):
    path = tmp_path / "x.json"
    dispatch.save_crossovers("sm_80", {"int8": {"forward": 256}}, path)
    dispatch.save_crossovers("sm_90", {"int8": {"forward": 32}}, path)
    table = dispatch.load_crossovers(path)
    assert table["sm_80"]["int8"]["forward"] == 256 and table["sm_90"]["int8"]["forward"] == 32
    path.write_text(json.dumps({"version": 1, "crossovers": {"sm_90": {"nf5": {"forward": 3}}}}))
    assert dispatch.load_crossovers(path)["sm_90"]["int8"]["forward"] == 32    # read once per process
    dispatch.reload()
    with pytest.raises(ValueError, match="nf5"):
        dispatch.load_crossovers(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        dispatch.load_crossovers(path)


def test_bad_overrides_are_named(monkeypatch):
    with pytest.raises(ValueError, match="direction"):
        dispatch.set_fused_max_m("4bit", "backward", 3)
    with pytest.raises(ValueError, match="≥ 0"):
        dispatch.set_fused_max_m("4bit", "forward", -1)
    with pytest.raises(ValueError, match="no dequantize"):
        dispatch.set_fused_max_m("llm_int8", "forward", 16)
    with pytest.raises(ValueError, match="branch"):
        with dispatch.force("cublas"):
            pass
    monkeypatch.setenv(dispatch.ENV_MAX_M, "4bit.forward=lots")
    with pytest.raises(ValueError, match="lots"):
        dispatch.fused_max_m("4bit", "forward")


# -- the workspace ----------------------------------------------------------------------------------------
def test_workspace_is_reused_across_layers_and_dtypes():
    dispatch.release_workspaces()
    a = dispatch.workspace((64, 128), torch.float16, "cpu")
    b = dispatch.workspace((32, 100), torch.bfloat16, "cpu")      # smaller: same storage, no allocation
    c = dispatch.workspace((64, 64), torch.float32, "cpu")
    assert a.data_ptr() == b.data_ptr() == c.data_ptr()
    assert b.shape == (32, 100) and b.dtype == torch.bfloat16 and b.is_contiguous()
    assert dispatch.workspace_bytes() == 64 * 128 * 2
    d = dispatch.workspace((128, 128), torch.float32, "cpu")      # larger: grows once
    assert dispatch.workspace_bytes() == 128 * 128 * 4
    assert dispatch.workspace((64, 128), torch.float16, "cpu").data_ptr() == d.data_ptr()
    dispatch.release_workspaces()
    assert dispatch.workspace_bytes() == 0


def test_dequantize_kernels_write_into_out_and_check_it():
    w = nf4_weight(24, 64, double_quant=True)
    out = dispatch.workspace((24, 64), torch.float16, "cpu")
    from qtune.kernels import dequantize_4bit

    assert dequantize_4bit(*w, torch.float16, out=out) is out
    assert torch.equal(out, ref_ops.dequantize_4bit(*w, torch.float16))
    with pytest.raises(ValueError, match="out is"):
        dequantize_4bit(*w, torch.float16, out=torch.empty(24, 63, dtype=torch.float16))


# -- the routing wrappers (what is registered for the ops) ------------------------------------------------
ROUTED_CASES = {
    "4bit": (lambda: nf4_weight(40, 96, double_quant=True), routing.linear_4bit, routing.linear_4bit_grad_input,
             lambda w: ref_ops.dequantize_4bit(*w, torch.float32)),
    "int8": (lambda: int8_weight(40, 96, symmetric=False, group_size=32), routing.linear_int8,
             routing.linear_int8_grad_input, lambda w: ref_ops.dequantize_int8(*w, torch.float32)),
    "gptq": (lambda: gptq_weight(40, 96, 3, act_order=True), routing.linear_gptq, routing.linear_gptq_grad_input,
             lambda w: ref_ops.dequantize_gptq(*w, torch.float32)),
    # one op family for every GGUF type: Q5_1 (32-weight blocks) here, the K-quants in test_matmul_gguf.py
    "gguf": (lambda: gguf_weight(GGUF["Q5_1"], 40, 96), routing.linear_gguf, routing.linear_gguf_grad_input,
             lambda w: ref_ops.dequantize_gguf(*w, torch.float32)),
    # 3-bit codes straddle bytes; K = 96 is three groups of 32
    "affine": (lambda: affine_weight(40, 96, 3, 32), routing.linear_affine, routing.linear_affine_grad_input,
               lambda w: ref_ops.dequantize_affine(*w, torch.float32)),
}


@pytest.mark.parametrize("family", list(ROUTED_CASES))
@pytest.mark.parametrize("m", [3, 40])
def test_routing_picks_the_branch_by_m_and_both_branches_are_right(family, m):
    make, fwd, bwd, dense = ROUTED_CASES[family]
    w = make()
    w32 = dense(w)
    x = activations(m, 96, torch.bfloat16)
    dy = activations(m, 40, torch.bfloat16, seed=3)
    bias = activations(1, 40, torch.bfloat16, seed=2).view(40)
    with dispatch.record() as log:
        y = fwd(x, *w, bias)
        dx = bwd(dy, *w)
    expected = "fused" if m <= 16 else "dequant"
    assert log == [(family, "forward", m, expected), (family, "grad_input", m, "dequant")]
    assert_product_close(y, x, w32.t(), bias, f"{family} forward {expected}")
    assert_product_close(dx, dy, w32, None, f"{family} grad_input dequant")
    with dispatch.force("fused"), dispatch.record() as log:
        dx = bwd(dy, *w)
    assert log == [(family, "grad_input", m, "fused")]
    assert_product_close(dx, dy, w32, None, f"{family} grad_input fused")


def test_dequant_branch_allocates_no_weight_per_call(monkeypatch):
    w = nf4_weight(40, 96)
    x = activations(32, 96, torch.float16)
    dispatch.release_workspaces()
    with dispatch.force("dequant"):
        routing.linear_4bit(x, *w, None)
        ptr = dispatch.workspace((40, 96), torch.float16, "cpu").data_ptr()
        seen = []
        real = routing.dequantize_4bit
        monkeypatch.setattr(routing, "dequantize_4bit", lambda *a, out, **k: seen.append(out.data_ptr()) or real(*a, out=out, **k))
        routing.linear_4bit(x, *w, None)
        routing.linear_4bit_grad_input(activations(32, 40, torch.float16), *w)
    assert seen == [ptr, ptr]


# -- device guard -----------------------------------------------------------------------------------------
def test_every_launch_runs_under_the_device_guard_of_its_tensors(monkeypatch):
    entered = []
    real = _common.device_guard

    def recording_guard(t):
        entered.append(t.device)
        return real(t)

    monkeypatch.setattr(_common, "device_guard", recording_guard)
    launches = []
    real_launch = _common.launch

    def counting_launch(jit_fn, *a, **k):
        launches.append(jit_fn.__name__ if hasattr(jit_fn, "__name__") else str(jit_fn))
        return real_launch(jit_fn, *a, **k)

    for mod in ("dequant_4bit", "dequant_int8", "dequant_gptq", "dequant_gguf", "dequant_affine", "matmul_4bit",
                "matmul_gptq", "matmul_int8", "matmul_llm_int8", "matmul_gguf", "matmul_affine"):
        monkeypatch.setattr(f"qtune.kernels.{mod}.launch", counting_launch)
    from qtune import kernels as K

    dev = torch.device("cpu")
    x = activations(2, 96, torch.float16)
    dy = activations(2, 40, torch.float16)
    w4, w8, wg = nf4_weight(40, 96), int8_weight(40, 96), gptq_weight(40, 96, 4)
    K.linear_4bit(x, *w4, None), K.linear_4bit_grad_input(dy, *w4), K.dequantize_4bit(*w4, torch.float16)
    K.linear_int8(x, *w8, None), K.linear_int8_grad_input(dy, *w8), K.dequantize_int8(*w8, torch.float16)
    K.linear_gptq(x, *wg, None), K.linear_gptq_grad_input(dy, *wg), K.dequantize_gptq(*wg, torch.float16)
    wq = gguf_weight(GGUF["Q6_K"], 40, 256)
    xq, dyq = activations(2, 256, torch.float16), activations(2, 40, torch.float16)
    K.linear_gguf(xq, *wq, None), K.linear_gguf_grad_input(dyq, *wq), K.dequantize_gguf(*wq, torch.float16)
    wa = affine_weight(40, 96, 4, 32)
    K.linear_affine(x, *wa, None), K.linear_affine_grad_input(dy, *wa), K.dequantize_affine(*wa, torch.float16)
    K.linear_llm_int8(x, w8[0], w8[1][:, 0].contiguous(), 6.0, None)
    assert len(launches) == 17 and len(entered) == len(launches), (launches, entered)  # llm_int8: quantize + GEMM
    assert set(entered) == {dev}


def test_device_guard_sets_the_tensors_cuda_device(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: seen.append(d) or _NullCtx())
    t = torch.empty(0, device="meta")
    with _common.device_guard(t):
        pass
    assert seen == []                                   # not a CUDA tensor: no CUDA call at all

    class FakeCuda:
        device = torch.device("cuda", 1)

    with _common.device_guard(FakeCuda()):
        pass
    assert seen == [torch.device("cuda", 1)]


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- deterministic mode -----------------------------------------------------------------------------------
@pytest.fixture
def deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("module", [matmul_4bit, matmul_int8, matmul_gptq, matmul_gguf, matmul_affine])
def test_deterministic_mode_picks_decode_configs_without_atomics(module, deterministic):
    for direction, split in (("fwd", "SPLIT_K"), ("bwd", "SPLIT_N")):
        name = _common.config_set(direction, 1, torch.float16, module.DECODE_MAX_M)
        assert name == f"{direction}_decode_det"
        assert all(cfg.kwargs[split] == 1 for cfg in module.CONFIGS[name])
        assert _common.split_of(None, split, 1, module.DECODE_MAX_M) == 1
        buf = _common.reduction_buffer(1, 8, torch.empty(1, 8, dtype=torch.float16), 1)
        assert buf.dtype == torch.float16                 # no fp32 zero fill, no cast launch
    torch.use_deterministic_algorithms(False)
    assert _common.config_set("fwd", 1, torch.float16, module.DECODE_MAX_M) == "fwd_decode"
    assert any(cfg.kwargs["SPLIT_K"] > 1 for cfg in module.CONFIGS["fwd_decode"])  # what the mode avoids


def test_deterministic_mode_refuses_an_explicit_split(deterministic):
    w = nf4_weight(40, 96)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "SPLIT_K": 2}
    with pytest.raises(RuntimeError, match="atomic_add"):
        matmul_4bit.linear_4bit(activations(2, 96, torch.float16), *w, None, config=cfg)
    y = matmul_4bit.linear_4bit(activations(2, 96, torch.float16), *w, None, config={**cfg, "SPLIT_K": 1})
    assert y.shape == (2, 40)


# -- Triton < 3.4 -----------------------------------------------------------------------------------------
def test_interpret_setting_without_triton_knobs(monkeypatch):
    import types

    monkeypatch.setattr(_common, "triton", types.SimpleNamespace())     # Triton 3.2/3.3: no triton.knobs
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _common._interpret_setting() is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _common._interpret_setting() is False
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _common._interpret_setting() is False


def test_force_holds_in_other_threads_like_autograds_backward_threads():
    import threading

    seen = []
    with dispatch.force("fused"):
        t = threading.Thread(target=lambda: seen.append(dispatch.choose("4bit", "grad_input", 4096, "cpu")))
        t.start()
        t.join()
    assert seen == ["fused"]
    assert dispatch.choose("4bit", "grad_input", 4096, "cpu") == "dequant"
