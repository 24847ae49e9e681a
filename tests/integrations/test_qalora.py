"""Quantization-aware LoRA (peft's QA-LoRA variant on qtune layers) and its exact merge into float offsets."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel
from torch import nn

import qtune
from qtune.formats.affine import AffineConfig
from qtune.formats.gguf import GGUFQ4_0Config, GGUFQ4_1Config, GGUFQ4_KConfig, GGUFQ5_1Config, GGUFQ8_0Config
from qtune.integrations import peft as qpeft
from qtune.integrations.peft import QuantLoraLinear, QuantQALoraLinearVariant, qalora_delta
from qtune.nn import QuantLinear
from tests.train.models import tiny_model

OFFSET_FORMATS = {"q4_1": GGUFQ4_1Config(), "q5_1": GGUFQ5_1Config()}


def _model(cfg, seed: int = 0) -> nn.Module:
    m = tiny_model(seed=seed)
    qtune.quantize_model(m, cfg)
    return m


def _qa_model(cfg, **lora) -> nn.Module:
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", **lora})
    return qpeft.get_peft_model(_model(cfg), config, quantization_aware=True)


def _train(model: nn.Module, steps: int = 4, seed: int = 0, lr: float = 1e-2) -> None:
    """A few Adam steps on random tokens, so that lora_B is not zero."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 300, (2, 24), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _offset_mask(layer: QuantLinear) -> torch.Tensor:
    """True on the bytes of each block's fp16 ``m`` (bytes 2..3 of every Q4_1/Q5_1 block)."""
    mask = torch.zeros(layer.weight.shape[1] // layer.config.type_size, layer.config.type_size, dtype=torch.bool)
    mask[:, 2:4] = True
    return mask.reshape(1, -1).expand_as(layer.weight)


IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------------------------------
# the adapter: peft's QA-LoRA maths on the quantized layer
# ----------------------------------------------------------------------------------------------------
def test_forward_is_peft_qalora_maths_on_the_dequantized_weight():
    torch.manual_seed(0)
    dense = nn.Linear(128, 24)
    base = qtune.nn.layer_class_for(GGUFQ4_1Config()).from_float(dense, GGUFQ4_1Config())

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    model = qpeft.get_peft_model(Wrap(), LoraConfig(r=3, lora_alpha=6, target_modules=["proj"], lora_dropout=0.0),
                                 quantization_aware=True)
    layer = model.base_model.model.proj
    assert isinstance(layer, QuantLoraLinear) and isinstance(layer.lora_variant["default"], QuantQALoraLinearVariant)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert tuple(a.shape) == (3, 128 // 32)
    with torch.no_grad():
        b.normal_(0, 0.1)
    x = torch.randn(5, 7, 128)
    y = model(x)
    # peft's forward (variants.QALoraLinearVariant) written out: the group means times the number of groups
    pooled = x.reshape(5, 7, 4, 32).mean(-1) * 4
    want = base(x) + (pooled @ a.t() @ b.t()) * layer.scaling["default"]
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    # and the dense change qtune merges: the same layer as one float matmul with W + ΔW
    w = base.dequantize(torch.float32) + layer.get_delta_weight("default")
    torch.testing.assert_close(y, x @ w.t() + base.bias, rtol=1e-5, atol=1e-5)
    delta = layer.get_delta_weight("default")
    assert torch.equal(delta, delta[:, ::32].repeat_interleave(32, dim=1))  # constant within each group
    y.sum().backward()  # gradients reach the pooled A
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_group_size_comes_from_the_layers():
    assert _qa_model(GGUFQ4_1Config()).peft_config["default"].qalora_group_size == 32
    cfg = qpeft.quantization_aware_config(_model(AffineConfig(group_size=64)),
                                         LoraConfig(r=2, target_modules="all-linear"))
    assert cfg.use_qalora and cfg.qalora_group_size == 64
    # mixed groups (Q4_1 blocks of 32, affine groups of 64): their lcm, constant within every layer's offset groups
    m = tiny_model()
    qtune.quantize_model(m, GGUFQ4_1Config(), overrides={"down_proj": AffineConfig(group_size=64)})
    groups = {type(l.config) for l in m.modules() if isinstance(l, QuantLinear)}
    assert groups == {GGUFQ4_1Config, AffineConfig}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both merge exactly: nothing to warn about
        cfg = qpeft.quantization_aware_config(m, LoraConfig(r=2, target_modules="all-linear"))
    assert cfg.qalora_group_size == 64


@pytest.mark.parametrize("cfg, match", [
    (qtune.Int8Config(), "no quantization group along in_features"),
    (qtune.LLMInt8Config(), "no quantization group along in_features"),
])
def test_formats_without_groups_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match) as e:
        qpeft.quantization_aware_config(_model(cfg), LoraConfig(r=2, target_modules="all-linear"))
    assert "model.layers.0" in str(e.value)  # names the layer


def test_dora_and_untargeted_are_refused():
    with pytest.raises(ValueError, match="DoRA"):
        qpeft.quantization_aware_config(_model(GGUFQ4_1Config()), LoraConfig(r=2, target_modules="all-linear",
                                                                            use_dora=True))
    with pytest.raises(ValueError, match="targets no quantized layer"):
        qpeft.quantization_aware_config(_model(GGUFQ4_1Config()), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="not a multiple of qalora_group_size=48"):
        qpeft.prepare_lora_config(_model(GGUFQ4_1Config()), LoraConfig(r=2, target_modules="all-linear",
                                                                       use_qalora=True, qalora_group_size=48))


# formats whose merge could only re-quantize: no offset at all, integer zeros (RTN, as GPTQ); the K-quants' 6-bit
# mins (in_features % 256, wider than the tiny model) in test_k_quant_mins_are_not_float_offsets
NO_OFFSET = {"nf4": qtune.NF4Config(blocksize=32), "rtn": qtune.RTNConfig(group_size=32), "q4_0": GGUFQ4_0Config(),
             "q8_0": GGUFQ8_0Config()}
REFUSED = r"quantization-aware LoRA: layer model\.layers\.0\.self_attn\.q_proj \(format {}\) has no per-group float offset"


@pytest.mark.parametrize("fmt", list(NO_OFFSET))
def test_base_without_float_offsets_is_refused_on_every_path(fmt):
    cfg = NO_OFFSET[fmt]
    match = REFUSED.format(cfg.format)

    def config():
        return LoraConfig(r=2, target_modules="all-linear")

    for attach in (lambda m: qpeft.quantization_aware_config(m, config()),
                   lambda m: qpeft.get_peft_model(m, config(), quantization_aware=True),
                   lambda m: qtune.get_peft_model(m, config(), quantization_aware=True),
                   lambda m: qpeft.prepare_lora_config(m, LoraConfig(r=2, target_modules="all-linear", use_qalora=True,
                                                                     qalora_group_size=32))):
        with pytest.raises(ValueError, match=match) as e:
            attach(_model(cfg))
        msg = str(e.value)
        assert "\n" not in msg and "GGUF Q4_1/Q5_1 or affine" in msg and "standard LoRA" in msg
        assert "target_modules" in msg
    # leaving the layers out is the way through: a QA adapter on the Q4_1 layers of a mixed model
    m = tiny_model()
    qtune.quantize_model(m, GGUFQ4_1Config(), overrides={"down_proj": cfg})
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.mlp\.down_proj \(format " + cfg.format):
        qpeft.quantization_aware_config(m, config())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
    assert qpeft.quantization_aware_config(m, LoraConfig(r=2, target_modules=targets)).qalora_group_size == 32


def test_offsets_the_group_does_not_cover_are_refused():
    # affine offsets per 64 inputs; a QA group of 32 changes within an offset group: not exact
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj \(format affine\) has float "
                                         r"offsets per 64 inputs, which do not divide the QA-LoRA group of 32"):
        qpeft.prepare_lora_config(_model(AffineConfig(group_size=64)), LoraConfig(
            r=2, target_modules="all-linear", use_qalora=True, qalora_group_size=32))


def test_plain_peft_and_add_adapter_are_refused_by_the_layer(tmp_path):
    """Paths that bypass qtune's config checks (peft's own API on a registered config) hit the layer's check."""
    config = qpeft.register_lora_config(LoraConfig(r=2, target_modules=["q_proj"], use_qalora=True,
                                                   qalora_group_size=32))
    with pytest.raises(ValueError, match=REFUSED.format("gguf_q4_0")):
        PeftModel(_model(GGUFQ4_0Config()), config)
    peft_model = qpeft.get_peft_model(_model(GGUFQ4_0Config()), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=REFUSED.format("gguf_q4_0")):
        qpeft.add_adapter(peft_model, "qa", LoraConfig(r=2, target_modules=["q_proj"], use_qalora=True,
                                                       qalora_group_size=32))


def test_load_adapter_onto_a_base_without_offsets_names_the_file_and_layer(tmp_path):
    model = _qa_model(GGUFQ4_1Config())
    model.save_pretrained(tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    for base in (_model(GGUFQ4_0Config()), qpeft.get_peft_model(_model(GGUFQ4_0Config()),
                                                                LoraConfig(r=2, target_modules=["q_proj"]))):
        with pytest.raises(ValueError) as e:
            qpeft.load_adapter(base, str(tmp_path / "a"), adapter_name="qa")
        msg = str(e.value)
        assert msg.startswith(f"{config_file}: quantization-aware LoRA: layer model.layers.0.self_attn.q_proj "
                              "(format gguf_q4_0) has no per-group float offset"), msg
        assert "\n" not in msg
    with pytest.raises(ValueError, match=r"adapter_config\.json: quantization-aware LoRA: layer .* \(format gguf_q4_0\)"):
        qtune.load_adapter(_model(GGUFQ4_0Config()), str(tmp_path / "a"))


def test_k_quant_mins_are_not_float_offsets():
    layer = qtune.nn.layer_class_for(GGUFQ4_KConfig())(256, 4, False, GGUFQ4_KConfig())
    assert qpeft.qalora_offset_error("blk.0.attn_q", layer, 32) == (
        "quantization-aware LoRA: layer blk.0.attn_q (format gguf_q4_k) has no per-group float offset, so the "
        "adapter's change cannot merge into it exactly; only GGUF Q4_1/Q5_1 or affine layers take it exactly: train "
        "a standard LoRA instead (quantization_aware false, no use_qalora) or leave this layer out of target_modules")
    q4_1 = qtune.nn.layer_class_for(GGUFQ4_1Config())(256, 4, False, GGUFQ4_1Config())
    assert qpeft.qalora_offset_error("x", q4_1, 32) is None and qpeft.qalora_offset_error("x", q4_1, 64) is None


# ----------------------------------------------------------------------------------------------------
# the exact merge
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(OFFSET_FORMATS))
def test_trained_qa_adapter_merges_exactly(fmt):
    model = _qa_model(OFFSET_FORMATS[fmt])
    _train(model)
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    before = {n: l.get_base_layer().weight.clone() for n, l in model.named_modules() if isinstance(l, QuantLoraLinear)}
    with torch.no_grad():
        want = model(IDS).logits
    merged, report = qpeft.merge_and_unload(model)
    with torch.no_grad():
        got = merged(IDS).logits
    # the offsets' fp16 rounding (≈ 2⁻¹¹ of |m|) is all that separates the two
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))
    assert report.exact == len(report.layers) == len(before) == 14
    assert 0.99 < report.mean_kept < 1.01
    assert all(e.rel_delta < 0.05 for e in report.layers.values())
    for name, old in before.items():
        layer = merged.get_submodule(name.removeprefix("base_model.model."))
        new, mask = layer.weight, _offset_mask(layer)
        assert torch.equal(new[~mask], old[~mask]), name     # d and every code: bit-identical
        assert not torch.equal(new[mask], old[mask]), name   # the offsets moved


def test_exact_merge_keeps_codes_a_requantization_would_move():
    """Blocks whose codes do not span 0..15 (llama.cpp's imatrix quantizations, edited files): re-quantizing
    W + ΔW fits a new min/max and moves the codes, the offsets path does not."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 16)
    cfg = GGUFQ4_1Config()
    base = qtune.nn.layer_class_for(cfg).from_float(dense, cfg)
    blocks = base.weight.view(-1, 20)
    q = torch.cat([blocks[:, 4:] & 0x0F, blocks[:, 4:] >> 4], dim=1).clamp(2, 13)  # codes 2..13 only
    blocks[:, 4:] = q[:, :16] | (q[:, 16:] << 4)
    exact, requant = [copy.deepcopy(base) for _ in range(2)]
    delta = torch.randn(16, 2) * 0.01
    w = base.dequantize(torch.float32) + delta.repeat_interleave(32, dim=1)
    exact.add_to_offsets_(delta)
    qpeft.requantize_(requant, w)
    mask = _offset_mask(base)
    assert torch.equal(exact.weight[~mask], base.weight[~mask])
    assert not torch.equal(requant.weight[~mask], base.weight[~mask])
    err_exact = (exact.dequantize(torch.float32) - w).abs().max()
    err_requant = (requant.dequantize(torch.float32) - w).abs().max()
    assert err_exact < 1e-4 < err_requant


def test_merge_unmerge_restores_the_bytes():
    model = _qa_model(GGUFQ4_1Config())
    _train(model, steps=2)
    layer = next(l for l in model.modules() if isinstance(l, QuantLoraLinear))
    old = layer.get_base_layer().weight.clone()
    layer.merge()
    assert layer.merge_errors["default"].exact and not torch.equal(layer.get_base_layer().weight, old)
    layer.unmerge()
    assert torch.equal(layer.get_base_layer().weight, old)


def test_standard_lora_into_q4_1_is_requantized_and_reports_the_loss():
    model = qpeft.get_peft_model(_model(GGUFQ4_1Config()), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                      target_modules="all-linear"))
    _train(model, steps=2, lr=1e-3)  # a fine-tune's change: small against Q4_1's steps
    _, report = qpeft.merge_and_unload(model)
    assert report.exact == 0
    assert report.mean_kept < 0.9  # Q4_1's grid rounds most of a small change away
    assert report.mean_rel_delta > 0.3
    assert "re-quantization error" in report.summary() and "exactly" not in report.summary()


def test_add_to_offsets_errors_name_the_layer():
    model = _model(GGUFQ4_0Config())
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(TypeError, match="q_proj: format gguf_q4_0 has no per-group float offset"):
        layer.add_to_offsets_(torch.zeros(64, 2), name="q_proj")


# ----------------------------------------------------------------------------------------------------
# files: adapter_config.json records the mode; reload with qtune and with peft's own API
# ----------------------------------------------------------------------------------------------------
def test_save_and_reload(tmp_path):
    model = _qa_model(GGUFQ4_1Config())
    _train(model, steps=2)
    with torch.no_grad():
        want = model(IDS).logits
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["use_qalora"] is True and saved["qalora_group_size"] == 32
    again = qpeft.load_adapter(_model(GGUFQ4_1Config()), str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, want)
    # plain peft, with the custom-module mapping qtune registers on the config (peft's API)
    from peft import PeftConfig

    config = qpeft.register_lora_config(PeftConfig.from_pretrained(str(tmp_path / "a")))
    plain = PeftModel.from_pretrained(_model(GGUFQ4_1Config()), str(tmp_path / "a"), config=config)
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, want)


def test_qalora_delta_matches_peft_scaling():
    # peft scales the group mean by the number of groups: ΔW = s·(K/g)/g·(BA) expanded over each group
    a, b = torch.randn(2, 4), torch.randn(3, 2)
    d = qalora_delta(a, b, 0.5, 32, 128)
    assert tuple(d.shape) == (3, 128)
    torch.testing.assert_close(d[:, 32 * 2], (b @ a)[:, 2] * 0.5 * 4 / 32)


def test_groups_and_offsets_per_gguf_type():
    from qtune.formats.gguf import GGUF_CONFIGS

    want = {"Q4_0": (32, None), "Q4_1": (32, 32), "Q5_0": (32, None), "Q5_1": (32, 32), "Q8_0": (32, None),
            "Q4_K": (32, None), "Q5_K": (32, None), "Q6_K": (16, None)}  # K-quant mins are 6-bit codes: not exact
    for cls in GGUF_CONFIGS:
        layer = qtune.nn.layer_class_for(cls())(256, 4, False, cls())
        assert (layer.quant_group_size, layer.offset_group_size) == want[cls.type_name], cls.type_name
    nf4 = qtune.nn.layer_class_for(qtune.NF4Config())(128, 4, False, qtune.NF4Config(blocksize=64))
    assert (nf4.quant_group_size, nf4.offset_group_size) == (64, None)
