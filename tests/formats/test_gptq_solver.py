"""The blocked GPTQ solver against the column-by-column reference it replaced (tests/formats/gptq_reference.py)."""
from __future__ import annotations

import pytest
import torch

from qtune.formats.gptq import GPTQConfig, GPTQHessian, gptq_quantize, unpack_rows, unpack_zeros

from tests.formats.gptq_reference import gptq_quantize_reference

# gptq_quantize runs on one CPU thread; so does the reference here, so that LAPACK's threading (which changes
# the last bits of H⁻¹) is not mistaken for a difference of the algorithms
pytestmark = pytest.mark.usefixtures("one_thread")

ORDERS = {
    "natural": {"desc_act": False, "act_group_aware": False},
    "act-order": {"desc_act": True, "static_groups": False},
    "act-order-static": {"desc_act": True, "static_groups": True},
    "group-aware": {"desc_act": False, "act_group_aware": True},
}


def _layer(n: int, k: int, seed: int) -> tuple[torch.Tensor, GPTQHessian]:
    gen = torch.Generator().manual_seed(seed)
    # correlated inputs with very different column scales, so that ordering and compensation matter
    x = torch.randn(1024, k, generator=gen) * torch.logspace(-1.5, 1.0, k)[torch.randperm(k, generator=gen)]
    x = x + 0.3 * x.roll(1, dims=1)
    h = GPTQHessian(k)
    h.add_batch(x)
    return torch.randn(n, k, generator=gen), h


def _assert_same_codes(fast, ref, bits: int, k: int, n: int) -> None:
    """Codes within one step of each other (a tie of w/scale may round either way after a fused multiply-add),
    and such ties rare; scales, zeros and g_idx equal wherever the codes are."""
    cf, cr = unpack_rows(fast.qweight, bits, k), unpack_rows(ref.qweight, bits, k)
    diff = (cf - cr).abs()
    assert int(diff.max()) <= 1
    assert float((diff > 0).float().mean()) <= 0.002
    assert torch.equal(fast.g_idx, ref.g_idx)
    if not bool((diff > 0).any()):
        assert torch.equal(fast.scales, ref.scales)
        assert torch.equal(unpack_zeros(fast.qzeros, bits, n), unpack_zeros(ref.qzeros, bits, n))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_blocked_solver_equals_column_by_column_reference(bits, order, sym):
    n, k = 24, 160
    w, h = _layer(n, k, seed=bits)
    # group 48 starts groups inside lazy batches of 64 and spans two of them (the group's look-ahead path)
    for group_size, block_size in ((32, 64), (48, 64), (-1, 128)):
        cfg = GPTQConfig(bits=bits, group_size=group_size, sym=sym, block_size=block_size, **ORDERS[order])
        _assert_same_codes(gptq_quantize(w, h, cfg), gptq_quantize_reference(w, h, cfg), bits, k, n)


def test_blocked_solver_odd_shapes_and_dead_inputs():
    # K not a multiple of the block or of the group, a partial last group, a dead input column
    n, k = 7, 70
    w, h = _layer(n, k, seed=5)
    h.H[3, :] = 0
    h.H[:, 3] = 0
    for cfg in (GPTQConfig(bits=3, group_size=32, sym=False, desc_act=True, static_groups=False, block_size=16),
                GPTQConfig(bits=3, group_size=32, sym=False, block_size=16),  # the default, act-order static
                GPTQConfig(bits=4, group_size=16, desc_act=False, act_group_aware=True, block_size=24)):
        fast, ref = gptq_quantize(w, h, cfg), gptq_quantize_reference(w, h, cfg)
        _assert_same_codes(fast, ref, cfg.bits, k, n)
        assert (fast.dequantize()[:, 3] == 0).all()
