"""LoftQ initialisation on qtune layers: it lowers the weight error at step 0 and the step-0 loss, refuses what it
cannot re-quantize, and the recipe key is validated."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

import qtune
from qtune.integrations.loftq import loftq_factors, loftq_init_
from qtune.nn import QuantLinear
from tests.train.models import CORPUS, save_tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def _lora(r=4):
    return LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _batch(tok):
    enc = tok([CORPUS[i:i + 300] for i in range(0, 1200, 300)], return_tensors="pt", truncation=True, max_length=64,
              padding="max_length")
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    """A tiny Llama whose linear layers (embeddings and head frozen) were trained a little on the batch the tests
    score, so that the function lives in the layers that get quantized and 2-bit quantization raises the loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    folder = save_tiny_model_dir(tmp_path_factory.mktemp("loftq") / "float")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    batch = _batch(AutoTokenizer.from_pretrained(folder))
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("proj.weight"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(30):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(folder)
    return folder


def _float_weights(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _errors(peft_model, weights) -> tuple[float, float]:
    """Σ‖W − deq(Q)‖² and Σ‖W − (deq(Q) + s·BA)‖² over the LoRA layers on quantized bases."""
    base_err = full_err = 0.0
    for name, m in peft_model.named_modules():
        if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), QuantLinear):
            w = weights[name.removeprefix("base_model.model.")]
            deq = m.base_layer.dequantize(torch.float32)
            ba = m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float() * m.scaling["default"]
            base_err += float((w - deq).pow(2).sum())
            full_err += float((w - deq - ba.detach()).pow(2).sum())
    return base_err, full_err


def test_factors_are_the_scaled_truncated_svd():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(20, 12, generator=g)
    b, a = loftq_factors(r, 4, 2.0)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    torch.testing.assert_close(2.0 * b @ a, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=1e-5)
    b, a = loftq_factors(r[:3], 8, 1.0)  # rank above min(N, K): the extra factors are zero
    torch.testing.assert_close(b @ a, r[:3], atol=1e-5, rtol=1e-5)
    assert b.shape == (3, 8) and a.shape == (8, 12)


def _build(float_dir, spec, loftq_iters=0):
    model = qtune.load_model(float_dir, qtune.QTuneConfig.from_spec(spec), dtype=torch.float32)
    return qtune.get_peft_model(model, _lora(), loftq_weights=float_dir if loftq_iters else None,
                                loftq_iters=max(loftq_iters, 1))


@pytest.mark.parametrize("spec,iters", [("nf4", 1), ("affine:bits=2,group_size=32", 3)])
def test_loftq_lowers_the_weight_error(float_dir, spec, iters):
    weights = _float_weights(float_dir)
    d_base, d_full = _errors(_build(float_dir, spec), weights)
    l_base, l_full = _errors(_build(float_dir, spec, iters), weights)
    assert d_full == pytest.approx(d_base)  # the default init: B = 0, the adapter adds nothing
    assert l_full < 0.9 * d_full, (d_full, l_full)


def test_loftq_lowers_the_step0_loss(float_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    enc = _batch(AutoTokenizer.from_pretrained(float_dir))
    spec = "affine:bits=2,group_size=32"
    models = {"float": AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32),
              "default": _build(float_dir, spec), "loftq": _build(float_dir, spec, 3)}
    with torch.no_grad():
        losses = {k: float(m(**enc).loss) for k, m in models.items()}
    assert losses["float"] < losses["loftq"] < losses["default"], losses


def test_report_and_mapping_source(float_dir):
    weights = _float_weights(float_dir)
    model = qtune.load_model(float_dir, qtune.QTuneConfig("nf4"), dtype=torch.float32)
    peft_model = qtune.get_peft_model(model, _lora())
    lines = []
    report = loftq_init_(peft_model, weights, iters=2, log=lines.append)
    n = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert report.layers == n and 0 < report.relative_error < 1 and "LoftQ (2 steps)" in lines[-1]
    _, full = _errors(peft_model, weights)
    assert full == pytest.approx(report.error_after, rel=1e-4)


def test_refusals(float_dir, tmp_path):
    from qtune.formats import GPTQConfig
    from qtune.nn import layer_class_for
    from qtune.formats.gptq import GPTQHessian

    model = qtune.load_model(float_dir, qtune.QTuneConfig("nf4"), dtype=torch.float32)
    peft_loftq = _lora()
    peft_loftq.init_lora_weights = "loftq"  # (a real LoftQConfig needs scipy, which peft's bitsandbytes path uses)
    with pytest.raises(ValueError, match="init_lora_weights='loftq'.*loftq_weights="):
        qtune.get_peft_model(model, peft_loftq)
    peft_model = qtune.get_peft_model(model, _lora())
    with pytest.raises(ValueError, match="iters=0"):
        loftq_init_(peft_model, float_dir, iters=0)
    with pytest.raises(ValueError, match=r"has no tensor 'model\.layers\.0\.\S+\.weight'"):
        loftq_init_(peft_model, save_tiny_model_dir(tmp_path / "other", "gpt2"))
    # GPTQ: refused before any layer is touched
    model = qtune.load_model(float_dir, qtune.QTuneConfig("nf4"), dtype=torch.float32)
    lin = model.model.layers[0].self_attn.q_proj
    h = GPTQHessian(lin.in_features)
    h.add_batch(torch.randn(64, lin.in_features))
    before = {n: b.clone() for n, b in model.model.layers[0].mlp.up_proj.named_buffers()}
    gptq = GPTQConfig(bits=4, group_size=32)
    model.model.layers[0].self_attn.q_proj = layer_class_for(gptq).from_float(
        torch.nn.Linear(lin.in_features, lin.out_features), gptq, hessian=h)
    peft_model = qtune.get_peft_model(model, _lora())
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj is gptq, which needs calibration"):
        loftq_init_(peft_model, float_dir)
    after = dict(model.model.layers[0].mlp.up_proj.base_layer.named_buffers())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_recipe_key_is_validated(tmp_path):
    import textwrap

    from qtune.train.recipe import RecipeError, load_recipe

    base = textwrap.dedent("""\
        model:
          path: some/model
        quantization:
          format: {fmt}
        lora:
          r: 8
          {lora}
        dataset:
          train:
            source: data.jsonl
        output:
          dir: /tmp/out
        """)

    def load(fmt, lora):
        p = tmp_path / "r.yaml"
        p.write_text(base.format(fmt=fmt, lora=lora))
        return load_recipe(p)

    r = load("affine", "init: loftq\n  loftq_iters: 3")
    assert r.lora["init"] == "loftq" and r.lora["loftq_iters"] == 3
    assert load("nf4", "dropout: 0.1").lora["init"] == "default"
    for fmt, lora, msg in (("pretrained", "init: loftq", "lora.init: loftq re-quantizes the base"),
                           ("nf4", "init: lofty", "lora.init: 'lofty' is not one of 'default', 'loftq'"),
                           ("nf4", "loftq_iters: 2", "lora.loftq_iters: applies to lora.init: loftq only"),
                           ("nf4", "init: loftq\n  loftq_iters: 0", "lora.loftq_iters: must be > 0"),
                           ("nf4", "init: loftq\n  use_dora: true", "lora.use_dora: must be false with lora.init")):
        with pytest.raises(RecipeError, match=msg.replace("(", r"\(")):
            load(fmt, lora)
