"""The calibration passes of sequential GPTQ: one Hessian per shared input, forwards cut short, quantized
layers read through dequantized stand-ins while their block is calibrated.

All are speed-ups that must not change a single bit of the result: the reference below is the
straightforward driver (one Hessian per layer over full block forwards).
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qtune import calibration
from qtune.calibration import _groups_in_order, _hessians_from, _run_block, _shared_hessians, find_blocks
from qtune.formats import GPTQConfig


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _inputs(model):
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    _, blocks = find_blocks(model)
    batches = [ids[i:i + 2] for i in range(0, 6, 2)]
    return blocks[0], calibration._capture_block_inputs(model, blocks[0], batches)


@torch.no_grad()
def test_shared_hessian_equals_per_layer_hessians_over_full_forwards():
    model = _tiny()
    block, inputs = _inputs(model)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    groups = _groups_in_order(block, names, inputs[0], torch.device("cpu"))
    assert groups == [names[:3], names[3:4], names[4:6], names[6:]]
    full = _hessians_from(block, names, lambda: _run_block(block, inputs, torch.device("cpu")), torch.device("cpu"))
    for group in groups:
        shared = _shared_hessians(block, group, inputs, torch.device("cpu"))
        for n in group:
            assert torch.equal(shared[n].H, full[n].H), n
            assert shared[n].nsamples == full[n].nsamples == 6 * 16


@torch.no_grad()
def test_forwards_stop_after_the_groups_last_layer():
    model = _tiny()
    block, inputs = _inputs(model)
    calls = []
    handle = block.mlp.down_proj.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        _shared_hessians(block, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], inputs,
                         torch.device("cpu"))
        assert calls == []  # the MLP never ran for the attention inputs
        _shared_hessians(block, ["mlp.down_proj"], inputs, torch.device("cpu"))
        assert len(calls) == len(inputs)
    finally:
        handle.remove()


def _reference_gptq_model(model, ids, cfg):
    """The driver before the speed-ups: per-layer Hessians, full block forwards per group, the quantized
    layers' own forwards (no dequantized stand-ins) and no forward replay."""
    original, stand_in = calibration._shared_hessians, calibration._Dequantized

    def per_layer(block, group, inputs, device, times=None, replay=None):
        return _hessians_from(block, group, lambda: _run_block(block, inputs, device), device)
    calibration._shared_hessians = per_layer
    calibration._Dequantized = lambda layer: layer
    try:
        return calibration.gptq_quantize_model(model, ids, cfg, progress=False, replay_budget=0)
    finally:
        calibration._shared_hessians, calibration._Dequantized = original, stand_in


@pytest.mark.parametrize("cfg", [GPTQConfig(bits=4, group_size=16),
                                 GPTQConfig(bits=3, group_size=32, static_groups=False)],
                         ids=["4bit", "3bit-act-order"])
def test_gptq_model_is_bit_identical_to_the_straightforward_driver(cfg):
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    fast, ref = _tiny(), _tiny()
    calibration.gptq_quantize_model(fast, ids, cfg, progress=False)
    _reference_gptq_model(ref, ids, cfg)
    fs, rs = fast.state_dict(), ref.state_dict()
    assert fs.keys() == rs.keys()
    for k in fs:
        assert torch.equal(fs[k], rs[k]), k
