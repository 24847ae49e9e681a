"""LoRA/DoRA on qtune's quantized layers through peft's custom-module mapping."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel
from torch import nn

import qtune
from qtune.integrations import peft as qpeft
from qtune.integrations.peft import QuantLoraLinear
from qtune.nn import QuantLinear
from tests.train.models import FORMATS, quantize, tiny_model

FMTS = list(FORMATS)


def _qlayer(fmt: str, in_features: int = 64, out_features: int = 48, bias: bool = True) -> QuantLinear:
    torch.manual_seed(1)
    m = tiny_model()  # only for its seed discipline; the layer is built standalone below
    del m
    dense = nn.Linear(in_features, out_features, bias=bias)
    cfg = FORMATS[fmt]
    kwargs = {}
    if isinstance(cfg, qtune.GPTQConfig):
        from qtune.formats.gptq import GPTQHessian
        h = GPTQHessian(in_features)
        h.add_batch(torch.randn(256, in_features))
        kwargs["hessian"] = h
    return qtune.nn.layer_class_for(cfg).from_float(dense, cfg, name=fmt, **kwargs)


class _Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _randomize_lora(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            noise = torch.randn(p.shape, generator=g).to(p.dtype) * 0.05
            # DoRA magnitudes start at the weight's column norms and stay near them
            p.data = p.data * (1 + noise) if "magnitude" in name else noise


# ----------------------------------------------------------------------------------------------------
# the mechanism
# ----------------------------------------------------------------------------------------------------
def test_peft_still_offers_custom_module_mapping():
    # qtune depends on this experimental peft API; fail loudly the day peft drops or renames it
    cfg = LoraConfig(r=2, target_modules=["proj"])
    assert hasattr(cfg, "_register_custom_module"), "peft dropped LoraConfig._register_custom_module"
    qpeft.register_lora_config(cfg)
    assert cfg._custom_modules == {QuantLinear: QuantLoraLinear}
    model = qpeft.get_peft_model(_Wrap(_qlayer("nf4")), cfg)
    assert isinstance(model.base_model.model.proj, QuantLoraLinear), "peft no longer dispatches _custom_modules"


def test_unregistered_config_is_refused_by_peft():
    # without the mapping peft must refuse the layer (its default LoRA would add deltas into packed bytes)
    import peft
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(_Wrap(_qlayer("nf4")), LoraConfig(r=2, target_modules=["proj"]))


def test_register_rejects_non_lora():
    from peft import IA3Config
    with pytest.raises(TypeError, match="LoRA"):
        qpeft.register_lora_config(IA3Config(target_modules=["proj"], feedforward_modules=[]))


@pytest.mark.parametrize("arch,fmt", [("llama", "nf4"), ("llama", "gptq"), ("gpt2", "int8"), ("gpt2", "gptq")])
def test_all_linear_targets_every_quant_layer(arch, fmt):
    model = quantize(tiny_model(arch), fmt)
    qnames = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert qnames
    peft_model = qpeft.get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
               if isinstance(m, QuantLoraLinear)}
    assert wrapped == qnames
    if arch == "gpt2":  # the Conv1D layers became QuantLinear (from_conv1d) and are targeted
        assert any(m.get_base_layer().from_conv1d for m in peft_model.modules() if isinstance(m, QuantLoraLinear))
    # the output head stays untouched
    assert not any("lm_head" in n and "lora_" in n for n, _ in peft_model.named_parameters())


def test_all_linear_includes_unquantized_linear_and_explicit_names():
    model = tiny_model()
    qtune.quantize_model(model, qtune.NF4Config(), skip_modules=("lm_head", "down_proj"))
    names = qpeft.all_linear_names(model)
    assert any(n.endswith("down_proj") for n in names) and not any(n.endswith("lm_head") for n in names)
    pm = qpeft.get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert kinds == {"q_proj": "QuantLoraLinear", "down_proj": "Linear"}


# ----------------------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_grads_match_float_reference(fmt, variant):
    """LoRA output and gradients equal those of peft's own LoRA on nn.Linear(dequantized weight)."""
    opts = {"rslora": {"use_rslora": True}, "dora": {"use_dora": True}}.get(variant, {})
    cfg = dict(r=4, lora_alpha=8, target_modules=["proj"], **opts)
    qlayer = _qlayer(fmt)
    dense = nn.Linear(qlayer.in_features, qlayer.out_features)
    dense.weight.data = qlayer.dequantize(torch.float32)
    dense.bias.data = qlayer.bias.data.float()
    q = qpeft.get_peft_model(_Wrap(qlayer), LoraConfig(**cfg))
    ref = qpeft.get_peft_model(_Wrap(dense), LoraConfig(**cfg))
    _randomize_lora(q)
    ref.load_state_dict({k: v for k, v in q.state_dict().items() if "lora_" in k}, strict=False)
    x = torch.randn(3, 5, qlayer.in_features)
    r = torch.randn(3, 5, qlayer.out_features)
    xq, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yq, yr = q(xq), ref(xr)
    # LLM.int8 quantizes activations in forward, so only its forward differs from the float reference
    tol = dict(atol=0.15, rtol=0.05) if fmt == "llm_int8" else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(yq, yr, **tol)
    (yq * r).sum().backward()
    (yr * r).sum().backward()
    gq = {n: p.grad for n, p in q.named_parameters() if p.requires_grad}
    gr = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert gq.keys() == gr.keys() and gq
    for n in gq:
        # DoRA's magnitude grad depends on the forward output, which LLM.int8 changes
        t = tol if (fmt == "llm_int8" and "magnitude" in n) else dict(atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gq[n], gr[n], **t, msg=n)
    torch.testing.assert_close(xq.grad, xr.grad, atol=1e-5, rtol=1e-4)


def test_lora_options_dropout_bias_modules_to_save():
    model = quantize(tiny_model("gpt2"), "nf4")
    cfg = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, bias="all", target_modules="all-linear",
                     modules_to_save=["ln_f"])
    pm = qpeft.get_peft_model(model, cfg)
    layer = next(m for m in pm.modules() if isinstance(m, QuantLoraLinear))
    assert isinstance(layer.lora_dropout["default"], nn.Dropout) and layer.scaling["default"] == 4.0
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any(n.endswith("c_attn.base_layer.bias") for n in trainable)  # QuantLinear bias trains with bias="all"
    assert any("ln_f.modules_to_save" in n for n in trainable)
    x = torch.randint(0, 300, (2, 12))
    pm(x, labels=x).loss.backward()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
    # packed weights are buffers and never trainable
    assert not any(p.dtype in (torch.uint8, torch.int8, torch.int32) for p in pm.parameters())


# ----------------------------------------------------------------------------------------------------
# save / reload
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["nf4", "gptq"])
def test_adapter_save_reload_identical(fmt, tmp_path):
    base = quantize(tiny_model(), fmt)
    base_copy = copy.deepcopy(base)
    pm = qpeft.get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", use_dora=(fmt == "gptq")))
    _randomize_lora(pm)
    pm.eval()
    x = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        want = pm(x).logits
    pm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    loaded = qpeft.load_adapter(base_copy, str(tmp_path / "adapter"))
    assert isinstance(loaded, PeftModel)
    assert sum(isinstance(m, QuantLoraLinear) for m in loaded.modules()) == 14
    with torch.no_grad():
        got = loaded(x).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # a second adapter onto the PeftModel: registered again, trainable on request
    qpeft.load_adapter(loaded, str(tmp_path / "adapter"), adapter_name="second", is_trainable=True)
    loaded.set_adapter("second")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------
# merge / unmerge
# ----------------------------------------------------------------------------------------------------
def _merge_target(layer: QuantLoraLinear, w0: torch.Tensor, dora: bool) -> torch.Tensor:
    """The exact merged weight ``W'`` [out, in] fp32: ``W0 + ΔW`` (LoRA) or ``m/‖W0 + ΔW‖_row · (W0 + ΔW)`` (DoRA)."""
    merged = w0 + layer.get_delta_weight("default")
    if dora:
        magnitude = layer.lora_magnitude_vector["default"].weight.detach().float()
        merged = (magnitude / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged
    return merged


def _expected_merge_buffers(base: QuantLinear, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """What merging must store: ``quantize(W')`` by a fresh layer, or for GPTQ the re-rounding on the kept grid.

    GPTQ keeps its scales, zeros and ``g_idx`` (its codes came from a Hessian the merge does not have), so
    the codes must be ``clamp(round(W'ᵀ / s[g]) + z[g], 0, 2^b − 1)``.
    """
    if isinstance(base.config, qtune.GPTQConfig):
        from qtune.formats import gptq as gptq_format
        g = base.g_idx.long()
        scales = base.scales.float()[g]
        zeros = gptq_format.unpack_zeros(base.qzeros, base.bits, base.out_features)[g].float()
        codes = (torch.round(target.T / scales) + zeros).clamp(0, 2**base.bits - 1).to(torch.int64)
        return {"qweight": gptq_format.pack_rows(codes, base.bits), "qzeros": base.qzeros.clone(),
                "scales": base.scales.clone(), "g_idx": base.g_idx.clone()}
    dense = nn.Linear(base.in_features, base.out_features, bias=False)
    dense.weight.data = target.clone()
    fresh = qtune.nn.layer_class_for(base.config).from_float(dense, base.config, name="expected")
    return {k: v for k, v in fresh.state_dict().items() if k != "bias"}


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_round_trip(fmt, dora):
    """Merge stores exactly ``quantize(W')``, keeps ΔW, and unmerge restores the packed bytes."""
    pm = qpeft.get_peft_model(_Wrap(_qlayer(fmt)), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                               use_dora=dora))
    _randomize_lora(pm)
    layer = pm.base_model.model.proj
    base = layer.get_base_layer()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x = torch.randn(4, base.in_features)
    with torch.no_grad():
        y_lora = pm(x)
        w0 = base.dequantize(torch.float32)
        target = _merge_target(layer, w0, dora)
        expected = _expected_merge_buffers(base, target)
        pm.merge_adapter()
        y_merged = pm(x)
    # the packed tensors are those of quantize(W'), bit for bit
    got = base.state_dict()
    assert set(expected) <= set(got)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        torch.testing.assert_close(got[k], v, atol=0, rtol=0, msg=f"{fmt} merged {k} is not quantize(W')")
    # the merge kept the adapter's change: the projection of Q(W') − W0 on D = W' − W0 is ≈ D
    # (measured with this seed: 0.96–1.03 for the 4- and 8-bit formats, 0.88–0.90 for GPTQ on its kept grid,
    # whose clamped codes lose part of ΔW; a merge of W0 instead of W' keeps ≈ 0)
    w1 = base.dequantize(torch.float32)
    d = target - w0
    kept = float(((w1 - w0) * d).sum() / (d * d).sum())
    assert 0.8 < kept < 1.2, kept
    err = layer.merge_errors["default"]
    assert 0 < err.max_abs < 0.5 and err.rel_weight < 0.2
    # the recorded error is the error against W'
    torch.testing.assert_close(torch.tensor(err.max_abs), (w1 - target).abs().max(), atol=1e-6, rtol=0)
    # the merged quantized layer computes approximately what base + LoRA computed
    rel = (y_merged - y_lora).norm() / y_lora.norm()
    assert rel < 0.2, float(rel)
    pm.unmerge_adapter()
    for k, v in base.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0, msg=k)  # exact: the packed tensors are restored
    with torch.no_grad():
        torch.testing.assert_close(pm(x), y_lora, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["nf4", "int8", "gptq"])
def test_unmerge_by_requantization(fmt):
    pm = qpeft.get_peft_model(_Wrap(_qlayer(fmt)), LoraConfig(r=4, target_modules=["proj"]))
    _randomize_lora(pm)
    layer = pm.base_model.model.proj
    layer.keep_unmerged = False
    w0 = layer.get_base_layer().dequantize(torch.float32)
    pm.merge_adapter()
    pm.unmerge_adapter()
    w1 = layer.get_base_layer().dequantize(torch.float32)
    # two re-quantizations: within a couple of quantization steps of the original
    assert float((w1 - w0).norm() / w0.norm()) < 0.15


def test_gptq_zero_delta_merge_is_identity():
    pm = qpeft.get_peft_model(_Wrap(_qlayer("gptq")), LoraConfig(r=4, target_modules=["proj"]))
    base = pm.base_model.model.proj.get_base_layer()
    q0 = base.qweight.clone()
    pm.merge_adapter()  # lora_B is zero at init
    assert torch.equal(base.qweight, q0)
    assert pm.base_model.model.proj.merge_errors["default"].max_abs == 0.0


def test_merge_and_unload_reports_error():
    model = quantize(tiny_model(), "nf4")
    pm = qpeft.get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    _randomize_lora(pm)
    x = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        want = pm(x).logits
    merged, report = qpeft.merge_and_unload(pm)
    assert not any(isinstance(m, QuantLoraLinear) for m in merged.modules())
    assert sum(isinstance(m, QuantLinear) for m in merged.modules()) == 14
    assert len(report.layers) == 14 and 0 < report.max_abs and 0 < report.mean_rel_delta < 2
    assert "re-quantization error" in report.summary()
    with torch.no_grad():
        got = merged(x).logits
    # 14 re-quantized 4-bit layers of a random model, each carrying a delta half the size of its weights
    assert float((got - want).norm() / want.norm()) < 0.25
