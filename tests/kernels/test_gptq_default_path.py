"""The default GPTQ checkpoint takes the kernels' no-gather path.

The fused GPTQ kernels (``kernels/matmul_gptq.py``, ``kernels/dequant_gptq.py``) load a tile's scales and zeros
once and broadcast them when ``g_idx == k // group_size`` (``trivial_group_size`` returns the group size, the
``GROUP_SIZE > 0`` specialization); otherwise (``0``) they gather them per input row through ``g_idx``. The test
quantizes a tiny model, writes it in the GPTQ layout, loads it back with ``qtune.load_model`` and asks the
kernels' own detection about every layer: the default ``GPTQConfig`` (act-order with static groups) and
group-aware order must take the no-gather path and say ``desc_act: false`` in the checkpoint; classic act-order
(``static_groups=False``) is the contrast that must take the gather path and say ``desc_act: true``.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from qtune import GPTQConfig  # noqa: E402
from qtune.calibration import gptq_quantize_model  # noqa: E402
from qtune.integrations.layouts import load_model, save_quantized  # noqa: E402
from qtune.kernels.dequant_gptq import trivial_group_size  # noqa: E402
from qtune.nn import LinearGPTQ  # noqa: E402
from tests.integrations.tiny_models import make_tiny  # noqa: E402


def _kernel_paths(folder) -> tuple[dict[str, int], set[str]]:
    """Each layer's kernel path (``trivial_group_size``), and the orderings the loaded layers' configs say."""
    model = load_model(folder, dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LinearGPTQ)}
    assert layers
    paths = {n: trivial_group_size(m.g_idx, m.scales.shape[0], m.in_features) for n, m in layers.items()}
    return paths, {m.config.ordering for m in layers.values()}


@pytest.mark.parametrize("cfg,gather", [(GPTQConfig(group_size=32), False),
                                        (GPTQConfig(group_size=32, desc_act=False), False),
                                        (GPTQConfig(group_size=32, static_groups=False), True)],
                         ids=["default", "group-aware", "classic-act-order"])
def test_gptq_checkpoint_kernel_path(tmp_path, cfg, gather):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny("llama", tmp_path / "float"), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    gptq_quantize_model(model, ids, cfg, progress=False)
    save_quantized(model, tmp_path / "q", layout="gptq")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    paths, orderings = _kernel_paths(tmp_path / "q")
    assert orderings == {cfg.ordering}  # read back as it was quantized
    assert qc["desc_act"] is gather  # readers of the checkpoint take their act-order path only when they must
    assert qc["static_groups"] is (cfg.ordering == "act-order-static")
    if gather:
        assert set(paths.values()) == {0}, paths
    else:
        assert set(paths.values()) == {32}, paths  # scales/zeros loaded once per tile, no g_idx gather
