"""GPTQ on fused experts (issue 14 item 3): each expert's Hessians come from the tokens the model's own router
sends to it; experts with too few tokens fall back to round-to-nearest and the report lists them; the quantized
model saves, reloads with identical logits and stays close to the float model (tiny Mixtral, Qwen3-MoE, OLMoE)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qtune.calibration import (_capture_block_inputs, expert_hessians, find_blocks, float_up, gptq_quantize_model,
                               routed_tokens)
from qtune.formats import GPTQConfig, RTNConfig
from qtune.formats import gptq as gptq_fmt
from qtune.integrations.layouts import load_model, save_quantized
from qtune.nn import QuantExperts, QuantLinear, fused_experts_modules
from tests.integrations.test_moe import E, H, I, MOE_ARCHS, moe_config, tokens

CFG = GPTQConfig(bits=4, group_size=32)


def float_moe(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(moe_config(arch), dtype=torch.float32).eval()


def calibration(n: int = 6, length: int = 16, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def block0_routing(model, calib):
    """The input of block 0's MoE block [T, H], and the experts each token goes to, computed by hand from the
    router weight: softmax is monotonic, so the top-k of the logits ``x W_rᵀ`` (every family here)."""
    mlp = model.model.layers[0].mlp
    seen = []
    handle = mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, H)))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    handle.remove()
    x = torch.cat(seen)
    top_k = model.config.num_experts_per_tok
    index = torch.topk(x @ mlp.gate.weight.t(), top_k, dim=-1).indices
    return x, index


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_hessians_come_only_from_the_tokens_routed_to_each_expert(arch):
    model = float_moe(arch)
    calib = calibration()
    x, index = block0_routing(model, calib)
    blocks_name, blocks = find_blocks(model)
    inputs = _capture_block_inputs(model, blocks[0], [calib[:3], calib[3:]])
    experts = blocks[0].mlp.experts
    h_up, h_down = expert_hessians(blocks[0], "mlp.experts", inputs, torch.device("cpu"), up=float_up(experts))
    assert len(h_up) == len(h_down) == E
    counts = [int((index == e).any(-1).sum()) for e in range(E)]
    assert sum(counts) == x.shape[0] * model.config.num_experts_per_tok
    assert [h.nsamples for h in h_up] == counts == [h.nsamples for h in h_down]
    for e in range(E):
        xe = x[(index == e).any(-1)]
        if xe.shape[0] == 0:
            assert torch.count_nonzero(h_up[e].H) == 0
            continue
        torch.testing.assert_close(h_up[e].H, 2 / xe.shape[0] * xe.t() @ xe, rtol=1e-5, atol=1e-6)
        gate, up = (xe @ experts.gate_up_proj[e].t()).chunk(2, dim=-1)  # silu gating, gate half first
        z = F.silu(gate) * up
        torch.testing.assert_close(h_down[e].H, 2 / z.shape[0] * z.t() @ z, rtol=1e-5, atol=1e-6)
    assert routed_tokens(torch.tensor([[0, E], [2, 0]]), E).keys() == {0, 2}  # an expert-parallel sentinel id


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_rarely_routed_experts_fall_back_to_rtn_and_the_report_lists_them(arch, capsys, monkeypatch):
    """Only the experts quantized (GPTQ): block 0's routing is the float model's, so the token counts are
    known by hand; the threshold sits between the smallest and the largest count."""
    import qtune.calibration as cal

    ups = []  # true-sequential: the down_proj Hessians are taken on the *quantized* gate_up_proj's activations
    real = cal.expert_hessians

    def spy(block, name, inputs, device, *, up=None):
        ups.append(up)
        return real(block, name, inputs, device, up=up)
    monkeypatch.setattr(cal, "expert_hessians", spy)
    model = float_moe(arch)
    calib = calibration()
    x, index = block0_routing(model, calib)
    counts = sorted((int((index == e).any(-1).sum()), e) for e in range(E))
    threshold = counts[0][0] + 1
    assert counts[-1][0] >= threshold
    ref = copy.deepcopy(model)
    report = gptq_quantize_model(model, calib, None, overrides={"experts": CFG}, min_expert_tokens=threshold,
                                 batch_size=3)
    assert sum(isinstance(m, QuantExperts) for m in model.modules()) == 2
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    name = "model.layers.0.mlp.experts"
    fallen = {f.expert: f.tokens for f in report.expert_fallbacks if f.module == name}
    assert fallen == {e: n for n, e in counts if n < threshold}
    assert all(f.tokens < threshold for f in report.expert_fallbacks)
    assert {r.name for r in report.layers} == {name, "model.layers.1.mlp.experts"}
    assert f"{name}[{counts[0][1]}] ({counts[0][0]} tokens)" in report.summary()
    assert "quantized round-to-nearest" in capsys.readouterr().out

    q, f = model.model.layers[0].mlp.experts, ref.model.layers[0].mlp.experts
    rtn = RTNConfig(bits=4, group_size=32)
    for e in range(E):
        for wname in ("gate_up_proj", "down_proj"):
            stack, w = q._modules[wname], getattr(f, wname)[e].detach()
            t = gptq_fmt.quantize_rtn(w, rtn)
            same = torch.equal(stack.qweight[e], t.qweight) and torch.equal(stack.scales[e], t.scales)
            assert same is (e in fallen), (e, wname)  # RTN exactly where the report says, GPTQ elsewhere
    assert len(ups) == 4 and ups[0] is None and ups[2] is None  # per block: gate_up pass, then down pass
    probe = torch.randn(3, H)
    for e in range(E):
        torch.testing.assert_close(ups[1](e, probe), probe @ q.gate_up_proj.dequantize(e).t(), rtol=1e-5, atol=1e-5)
    # GPTQ used each expert's own Hessian: on the tokens routed to it, its gate_up error beats RTN's
    e = counts[-1][1]
    xe = x[(index == e).any(-1)]
    w = f.gate_up_proj[e].detach()
    err_gptq = (xe @ (q.gate_up_proj.dequantize(e) - w).t()).pow(2).mean()
    err_rtn = (xe @ (gptq_fmt.quantize_rtn(w, rtn).dequantize() - w).t()).pow(2).mean()
    assert err_gptq < err_rtn


@pytest.mark.parametrize("arch,sequential", [(a, True) for a in MOE_ARCHS] + [("mixtral", False)],
                         ids=[*MOE_ARCHS, "mixtral-all_at_once"])
def test_gptq_moe_model_saves_reloads_identically_and_stays_close_to_float(arch, sequential, tmp_path):
    model = float_moe(arch)
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
    report = gptq_quantize_model(model, calibration(n=8, length=32), CFG, true_sequential=sequential,
                                 min_expert_tokens=8, progress=False)
    assert not fused_experts_modules(model)
    assert {m.quant_config.format for m in model.modules() if isinstance(m, QuantExperts)} == {"gptq"}
    assert sum(r.name.endswith("experts") for r in report.layers) == 2
    model.config.quantization_config = None  # the qtune layout writes its own
    with torch.no_grad():
        out = model(ids).logits
    rel = float((out - ref).norm() / ref.norm())
    assert 0.0 < rel < 0.2, rel  # 4-bit everywhere on random weights: RTN gives 0.12-0.14 here
    back = load_model(save_quantized(model, tmp_path / "q")).eval()
    assert isinstance(back.model.layers[1].mlp.experts.quant_config, GPTQConfig)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, out)


def test_gptq_experts_need_hessians_and_refuse_experts_outside_the_blocks():
    from qtune.nn.experts import QuantExpertStack

    experts = float_moe("mixtral").model.layers[0].mlp.experts
    with pytest.raises(ValueError, match=r"experts: format 'gptq' needs calibration: quantize the model with"):
        QuantExperts.from_float(experts, CFG, name="experts")
    stack = QuantExpertStack(E, H, 2 * I, CFG)
    with pytest.raises(ValueError, match="hessians are for formats that need calibration, one per expert; got 1 for"):
        stack.quantize_(experts.gate_up_proj, name="experts.gate_up_proj", hessians=[None])
    with pytest.raises(ValueError, match="min_expert_tokens=0 must be a positive integer"):
        gptq_quantize_model(float_moe("mixtral"), calibration(), CFG, min_expert_tokens=0)
