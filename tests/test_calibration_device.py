"""Sequential GPTQ's block movement (one block at a time on the compute device), its stand-ins and its progress.

There is no second device on a CPU-only machine, so the compute device is ``torch.device("cpu", 0)``: the same
memory, but a device argument that compares unequal to the model's ``torch.device("cpu")``. Every move the
driver makes goes through ``calibration._move_block``; the test logs those moves and checks, at every block
forward, that the running block is the one at the compute device and every other block is at home.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qtune import calibration
from qtune.calibration import BlockProgress, find_blocks, gptq_quantize_model
from qtune.formats import GPTQConfig, RTNConfig
from qtune.nn import LinearGPTQ

COMPUTE = torch.device("cpu", 0)


def _tiny(layers=3):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _ids():
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))


def test_one_block_at_a_time_on_the_compute_device_and_back(monkeypatch):
    model = _tiny()
    _, blocks = find_blocks(model)
    where = {id(b): torch.device("cpu") for b in blocks}
    moves = []
    real_move = calibration._move_block

    def logged_move(block, device):
        where[id(block)] = torch.device(device)
        moves.append((list(blocks).index(block), torch.device(device)))
        real_move(block, device)
    monkeypatch.setattr(calibration, "_move_block", logged_move)

    forwards = []

    def check(i):
        def hook(module, args, kwargs):
            if not moves:  # the model's own forward that captures block 0's inputs (stopped before the block)
                return
            forwards.append(i)
            assert where[id(module)] == COMPUTE, f"block {i} runs away from the compute device"
            others = [j for j, b in enumerate(blocks) if j != i and where[id(b)] == COMPUTE]
            assert others == [], f"blocks {others} are on the compute device while block {i} runs"
        return hook
    handles = [b.register_forward_pre_hook(check(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        gptq_quantize_model(model, _ids(), GPTQConfig(bits=4, group_size=32), device=COMPUTE, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert moves == [(i, d) for i in range(3) for d in (COMPUTE, torch.device("cpu"))]
    assert all(where[id(b)] == torch.device("cpu") for b in blocks)
    assert sorted(set(forwards)) == [0, 1, 2]  # every block calibrated (at least one forward each)


def test_stand_ins_are_gone_and_every_layer_is_quantized():
    model = _tiny(layers=2)
    gptq_quantize_model(model, _ids(), GPTQConfig(bits=4, group_size=32), progress=False,
                        overrides={"mlp.down_proj": RTNConfig(bits=8, group_size=32)})
    kinds = {type(m).__name__ for m in model.modules()}
    assert "_Dequantized" not in kinds
    n = sum(isinstance(m, LinearGPTQ) for m in model.modules())
    assert n == 2 * 7


@torch.no_grad()
def test_stand_in_computes_the_quantized_layer():
    model = _tiny(layers=1)
    gptq_quantize_model(model, _ids(), GPTQConfig(bits=3, group_size=32, sym=False), progress=False)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(4))
    assert torch.equal(calibration._Dequantized(layer)(x), layer(x))


def test_progress_reports_every_block_with_its_parts():
    seen: list[BlockProgress] = []
    gptq_quantize_model(_tiny(), _ids(), GPTQConfig(bits=4, group_size=32), progress=seen.append)
    assert [p.index for p in seen] == [0, 1, 2] and all(p.total == 3 for p in seen)
    for p in seen:
        assert set(p.parts) == {"forwards", "hessians", "solve"}
        assert all(v >= 0 for v in p.parts.values()) and p.seconds >= sum(p.parts.values()) - 1e-3
    assert seen[-1].eta == 0
    assert seen[0].line().startswith("GPTQ block 1/3 ") and "ETA" in seen[0].line()


def test_default_device_is_cuda_when_available(monkeypatch):
    model = _tiny(layers=1)
    assert calibration.default_device(model) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert calibration.default_device(model) == torch.device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_calibration_leaves_the_model_on_the_cpu():
    model = _tiny()
    gptq_quantize_model(model, _ids(), GPTQConfig(bits=4, group_size=32), device="cuda", progress=False)
    assert {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {"cpu"}
