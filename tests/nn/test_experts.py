"""Quantized fused experts (qtune.nn.experts) against the families' own float experts modules."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qtune.formats import FP4Config, Int8Config, LLMInt8Config, NF4Config, RTNConfig
from qtune.formats import nf4 as nf4_fmt
from qtune.nn import Linear4bit, layer_class_for
from qtune.nn.experts import QuantExperts, QuantExpertStack, fused_experts_modules, is_fused_experts

E, H, I = 6, 64, 48  # I = 48: blocks of 64 straddle the rows of down_proj [H, I] (bitsandbytes' flat layout)


def _family(name: str):
    import transformers as tf

    if name == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls
        cfg = tf.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E)
    elif name == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls
        cfg = tf.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E)
    elif name == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeExperts as cls
        cfg = tf.OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E)
    elif name == "gpt_oss":  # transposed, interleaved gate/up, biases, clamped gating
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls
        cfg = tf.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E)
    elif name == "nemotron_h":  # no gate: up_proj + relu²
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts as cls
        cfg = tf.NemotronHConfig(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E)
    elif name == "aria":  # transposed, concatenated
        from transformers.models.aria.modeling_aria import AriaExperts as cls
        cfg = tf.AriaTextConfig(hidden_size=H, intermediate_size=I, moe_num_experts=E)
    elif name == "muse_spark":  # post-expert norm
        from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig
        from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts as cls
        cfg = MuseSparkTextConfig(hidden_size=H, moe_hidden_size=H, moe_intermediate_size=I, num_local_experts=E,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    else:
        raise ValueError(name)
    cfg._experts_implementation = "eager"
    return cls, cfg


FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "nemotron_h", "aria", "muse_spark")
CONFIGS = {"nf4": NF4Config(), "nf4_dq": NF4Config(double_quant=True), "fp4": FP4Config(blocksize=32),
           "int8": Int8Config(), "int8_g32_asym": Int8Config(group_size=32, symmetric=False),
           "rtn4": RTNConfig(bits=4, group_size=32), "llm_int8": LLMInt8Config()}


def make_experts(family: str, seed: int = 0) -> nn.Module:
    cls, cfg = _family(family)
    torch.manual_seed(seed)
    m = cls(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(0, 0.05 if n.endswith("bias") else 0.2)
    return m.eval()


def routing(tokens: int = 12, top_k: int = 2, seed: int = 1, skip: tuple[int, ...] = (E - 1,)):
    """Random distinct top-k experts per token, never the experts in ``skip``."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in skip])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:top_k]] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    x = torch.randn(tokens, H, generator=g)
    return x, idx, weights / weights.sum(-1, keepdim=True)


def dense_twin(q: QuantExperts, float_experts: nn.Module, impl: str) -> nn.Module:
    """The family's own float experts module holding ``q``'s dequantized weights (the reference)."""
    ref = copy.deepcopy(float_experts)
    ref.config = copy.copy(float_experts.config)
    ref.config._experts_implementation = impl
    with torch.no_grad():
        for n in q.weight_names:
            getattr(ref, n).copy_(q._modules[n].dense(torch.float32))
    return ref


def test_detection_and_rejection():
    m = make_experts("mixtral")
    assert is_fused_experts(m)
    assert not is_fused_experts(nn.Linear(4, 4))
    holder = nn.ModuleDict({"experts": m})
    assert [n for n, _ in fused_experts_modules(holder)] == ["experts"]
    with pytest.raises(TypeError, match="block.mlp: Linear is not a transformers fused experts module"):
        QuantExperts.from_float(nn.Linear(4, 4), NF4Config(), name="block.mlp")
    from qtune.formats import GPTQConfig
    with pytest.raises(ValueError, match="layers.0.mlp.experts: format 'gptq' needs calibration"):
        QuantExperts.from_float(m, GPTQConfig(bits=4, group_size=32), name="layers.0.mlp.experts")
    bad = make_experts("mixtral")
    with torch.no_grad():
        bad.down_proj[3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"experts\.down_proj\[3\]"):
        QuantExperts.from_float(bad, NF4Config(), name="experts")


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_per_expert_tensors_are_the_formats_quantization_of_each_slice(family, fmt):
    config = CONFIGS[fmt]
    m = make_experts(family)
    q = QuantExperts.from_float(m, config, name="experts")
    per_layer_bytes = 0
    for n in q.weight_names:
        stack: QuantExpertStack = q._modules[n]
        w = getattr(m, n).detach()
        assert stack.param_shape == tuple(w.shape[1:])
        for e in range(E):
            we = w[e].t() if m.is_transposed else w[e]  # the [out, in] weight of a linear layer
            lin = nn.Linear(we.shape[1], we.shape[0], bias=False)
            lin.weight.data.copy_(we)
            ref = layer_class_for(config).from_float(lin, config)
            for b, t in ref.named_buffers():
                assert torch.equal(getattr(stack, b)[e], t), (n, e, b)
            per_layer_bytes += ref.quantized_bytes()
            assert torch.equal(stack.dequantize(e), ref.dequantize())
        if fmt.startswith("nf4"):  # and the format's pure-PyTorch reference quantizer (the spec)
            for e in range(E):
                we = w[e].t() if m.is_transposed else w[e]
                t = nf4_fmt.quantize_4bit(we, config)
                assert torch.equal(stack.weight[e], t.packed) and torch.equal(stack.absmax[e], t.absmax)
    assert q.quantized_bytes() == per_layer_bytes  # E quantized layers' bytes, nothing more


#: transformers' experts implementations that run on CPU (its registry also holds CUDA-only kernels)
IMPLS = ("eager", "batched_mm", "grouped_mm")
CUDA_ONLY_IMPLS = {"deepgemm", "sonicmoe"}


def test_every_cpu_experts_implementation_of_transformers_is_compared():
    """A new implementation in transformers' registry fails here until it is added to IMPLS (or, when it needs
    CUDA, to CUDA_ONLY_IMPLS)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert set(ALL_EXPERTS_FUNCTIONS) | {"eager"} == set(IMPLS) | CUDA_ONLY_IMPLS


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_input_gradient_equal_the_familys_experts_on_dequantized_weights(family, impl):
    m = make_experts(family)
    q = QuantExperts.from_float(m, NF4Config(double_quant=True), name="experts")
    ref = dense_twin(q, m, impl)
    x, idx, w = routing()
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y, y_ref = q(x1, idx, w1), ref(x2, idx, w2)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-5)  # the router's gradient


@pytest.mark.parametrize("fmt", ["int8", "rtn4", "fp4"])
def test_other_formats_forward(fmt):
    m = make_experts("qwen3_moe")
    q = QuantExperts.from_float(m, CONFIGS[fmt], name="experts")
    ref = dense_twin(q, m, "eager")
    x, idx, w = routing()
    torch.testing.assert_close(q(x, idx, w), ref(x, idx, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("permuted", [False, True], ids=["g_idx_trivial", "act_order"])
def test_gptq_experts_per_expert_hessians_and_fallback(permuted, impl):
    """GPTQ stacks: each expert quantized with its own Hessian (act-order: its own g_idx), expert 2 without one
    (round-to-nearest on the same grid); the forward equals the family's experts on the dequantized weights."""
    from qtune.formats import GPTQConfig
    from qtune.formats import gptq as gptq_fmt

    cfg = GPTQConfig(bits=4, group_size=16, static_groups=not permuted)  # act-order, static groups or classic
    m = make_experts("qwen3_moe")
    g = torch.Generator().manual_seed(3)
    hessians = {}
    for n in ("gate_up_proj", "down_proj"):
        k = getattr(m, n).shape[2]
        hs = []
        for e in range(E):
            h = gptq_fmt.GPTQHessian(k)
            h.add_batch(torch.randn(64, k, generator=g) * torch.linspace(0.1, 3, k))
            hs.append(None if e == 2 else h)
        hessians[n] = hs
    q = QuantExperts.from_float(m, cfg, name="experts", hessians=hessians)
    for n in ("gate_up_proj", "down_proj"):
        stack, w = q._modules[n], getattr(m, n).detach()
        for e in range(E):
            t = (gptq_fmt.quantize_rtn(w[e], cfg.without_calibration()) if e == 2
                 else gptq_fmt.gptq_quantize(w[e], hessians[n][e], cfg))
            assert torch.equal(stack.qweight[e], t.qweight) and torch.equal(stack.g_idx[e], t.g_idx), (n, e)
        assert permuted is any(not torch.equal(stack.g_idx[e], stack.g_idx[2]) for e in range(E))
    ref = dense_twin(q, m, impl)
    x, idx, w = routing(skip=())
    torch.testing.assert_close(q(x, idx, w), ref(x, idx, w), rtol=1e-5, atol=1e-5)


def test_bf16_compute_follows_quantlinear():
    m = make_experts("mixtral").to(torch.bfloat16)
    q = QuantExperts.from_float(m, NF4Config(), name="experts")
    assert q.gate_up_proj.compute_dtype == torch.bfloat16
    ref = dense_twin(q, m, "eager").to(torch.bfloat16)
    x, idx, w = routing()
    y = q(x.bfloat16(), idx, w.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref(x.bfloat16(), idx, w.bfloat16()), rtol=2e-2, atol=2e-2)


def test_only_routed_experts_are_dequantized(monkeypatch):
    import qtune.ops.linear as linear_ops

    m = make_experts("mixtral")
    q = QuantExperts.from_float(m, NF4Config(), name="experts")
    x, idx, w = routing(skip=(0, 4))
    routed = sorted(set(idx.reshape(-1).tolist()))
    assert routed == [1, 2, 3, 5]
    touched, shapes = [], []
    real_expert, real_dequantize = QuantExpertStack.expert, linear_ops.dequantize

    def expert(self, e):
        touched.append((self.out_features, e))
        return real_expert(self, e)

    def dequantize(family, args, dtype):
        out = real_dequantize(family, args, dtype)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(QuantExpertStack, "expert", expert)
    monkeypatch.setattr(linear_ops, "dequantize", dequantize)
    x.requires_grad_()
    y = q(x, idx, w)
    assert sorted(e for n, e in touched if n == 2 * I) == routed
    assert sorted(e for n, e in touched if n == H) == routed
    assert sorted(shapes) == sorted([(2 * I, H)] * len(routed) + [(H, I)] * len(routed))
    shapes.clear()
    y.sum().backward()  # backward re-dequantizes each routed expert once per projection
    assert sorted(shapes) == sorted([(2 * I, H)] * len(routed) + [(H, I)] * len(routed))
    # an expert-parallel sentinel id (== num_experts) is skipped, as in transformers
    touched.clear()
    q(x.detach(), torch.full_like(idx, E), w)
    assert touched == []


def test_forward_never_allocates_a_dense_expert_stack():
    """Every allocation in forward and backward stays below one dense [E, 2I, H] fp32 stack (the largest
    allowed is one expert's dequantized weight)."""
    from torch.profiler import ProfilerActivity, profile

    m = make_experts("mixtral")
    q = QuantExperts.from_float(m, NF4Config(), name="experts")
    x, idx, w = routing(tokens=4)
    x.requires_grad_()
    dense_bytes = E * 2 * I * H * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        q(x, idx, w).sum().backward()
    biggest = max(ev.self_cpu_memory_usage for ev in prof.events())
    assert biggest <= 2 * I * H * 4 < dense_bytes // 2, biggest
    # the check sees a dense copy (what this test guards against)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        q.gate_up_proj.dense(torch.float32)
    assert max(ev.self_cpu_memory_usage for ev in prof.events()) >= dense_bytes


def test_to_float_and_module_state():
    m = make_experts("gpt_oss")
    q = QuantExperts.from_float(m, NF4Config(), name="experts")
    assert q.alpha == m.alpha and q.limit == m.limit and q.is_transposed and not q.is_concatenated
    assert set(dict(q.named_parameters())) == {"gate_up_proj_bias", "down_proj_bias"}
    assert not any(b.is_floating_point() and b.dim() == 3 and b.shape[1:] == m.gate_up_proj.shape[1:]
                   for b in q.buffers())
    keys = set(q.state_dict())
    assert {"gate_up_proj.weight", "gate_up_proj.absmax", "down_proj.weight", "gate_up_proj_bias"} <= keys
    assert q.gate_up_proj.weight.shape[0] == E
    f = q.to_float()
    assert type(f) is type(m) and f.gate_up_proj.shape == m.gate_up_proj.shape
    x, idx, w = routing()
    torch.testing.assert_close(f(x, idx, w), q(x, idx, w), rtol=1e-5, atol=1e-5)
    assert isinstance(q.gate_up_proj.expert(0), Linear4bit)


def test_llm_int8_experts_compute_what_each_experts_llm_int8_layer_computes():
    """LLM.int8 is not dequantize + matmul (int8 activations, fp16 outliers): each routed expert must compute
    what a ``LinearLLMInt8`` of its slice computes."""
    m = make_experts("mixtral")
    q = QuantExperts.from_float(m, LLMInt8Config(), name="experts")
    x, idx, w = routing()
    x = x * 4  # some activations above the outlier threshold (6.0)
    assert (x.abs() > 6).any()
    expected = torch.zeros_like(x)
    for e in sorted(set(idx.reshape(-1).tolist())):
        layers = []
        for n in ("gate_up_proj", "down_proj"):
            lin = nn.Linear(getattr(m, n).shape[2], getattr(m, n).shape[1], bias=False)
            lin.weight.data.copy_(getattr(m, n)[e])
            layers.append(layer_class_for(LLMInt8Config()).from_float(lin, LLMInt8Config()))
        t, j = torch.where(idx == e)
        h = layers[1](m._apply_gate(layers[0](x[t])))
        expected.index_add_(0, t, h * w[t, j, None])
    torch.testing.assert_close(q(x, idx, w), expected, rtol=0, atol=0)


def test_to_device_drops_the_views_of_the_old_buffers():
    q = QuantExperts.from_float(make_experts("mixtral"), NF4Config(), name="experts")
    x, idx, w = routing()
    q(x, idx, w)
    assert q.gate_up_proj._view.weight is not None
    q.to("cpu")  # any _apply
    assert q.gate_up_proj._view.weight is None
    torch.testing.assert_close(q(x, idx, w), q(x, idx, w))
