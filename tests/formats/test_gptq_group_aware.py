"""Group-aware reordering (GAR) for GPTQ: contiguous groups, act-order-like quality, plain ``g_idx``.

GAR is the order without act-order (``desc_act=False``); these tests pass ``desc_act=False`` explicitly."""
from __future__ import annotations

import pytest
import torch

from qtune.formats.gptq import GPTQConfig, GPTQHessian, gptq_quantize, group_aware_order


def _loop_order(diag: torch.Tensor, g: int) -> list[int]:
    """GAR written out as in its paper: groups by max diagonal, columns inside by diagonal."""
    k = diag.numel()
    groups = [list(range(s, min(s + g, k))) for s in range(0, k, g)]
    full = [grp for grp in groups if len(grp) == g]
    tail = [grp for grp in groups if len(grp) < g]
    full.sort(key=lambda grp: -max(diag[i].item() for i in grp))
    out = []
    for grp in full + tail:
        out += sorted(grp, key=lambda i: -diag[i].item())
    return out


@pytest.mark.parametrize("k,g", [(64, 16), (70, 16), (10, 16)])
def test_order_is_the_paper_order_with_whole_groups(k, g):
    diag = torch.rand(k, generator=torch.Generator().manual_seed(k))
    perm = group_aware_order(diag, g)
    assert perm.tolist() == _loop_order(diag, g)
    for j in range(k // g):
        assert len(set((perm[j * g:(j + 1) * g] // g).tolist())) == 1  # one original group per slot


def _layer(n=48, k=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # inputs with very different scales per column, and correlated: ordering matters
    x = torch.randn(2048, k, generator=gen) * torch.logspace(-1.5, 1.0, k)[torch.randperm(k, generator=gen)]
    x = x + 0.3 * x.roll(1, dims=1)
    w = torch.randn(n, k, generator=gen)
    h = GPTQHessian(k)
    h.add_batch(x)
    return w, h, x


@pytest.mark.parametrize("bits,k", [(2, 96), (3, 96), (4, 96), (4, 100)])
def test_group_aware_equals_natural_gptq_on_the_reordered_problem(bits, k):
    """GAR is plain GPTQ run on the permuted columns: same codes, and each original group gets the
    scale/zero that the permuted problem fitted at its new position; ``g_idx`` stays ``k // g``."""
    w, h, _ = _layer(k=k)
    g = 16
    cfg = GPTQConfig(bits=bits, group_size=g, desc_act=False, act_group_aware=False)  # the natural order
    perm = group_aware_order(torch.diagonal(h.H), g)
    gar = gptq_quantize(w, h, GPTQConfig(bits=bits, group_size=g, desc_act=False, act_group_aware=True))
    ref = gptq_quantize(w[:, perm], h.H[perm][:, perm], cfg)
    assert torch.equal(gar.g_idx, torch.arange(k) // g)  # kernels need no gather
    inverse = torch.argsort(perm)
    from qtune.formats.gptq import unpack_rows
    codes_gar = unpack_rows(gar.qweight, bits, k)
    codes_ref = unpack_rows(ref.qweight, bits, k)[inverse]
    assert torch.equal(codes_gar, codes_ref)
    group_at = perm[::g] // g  # original group quantized at each position-group
    assert torch.equal(gar.scales[group_at], ref.scales)
    assert torch.equal(gar.dequantize()[:, perm], ref.dequantize())


def test_identity_order_gives_the_natural_result_bit_for_bit():
    # diagonal already descending inside each group and groups already by descending max: GAR's
    # permutation is the identity, so its result must be the natural-order result exactly.
    k = 64
    w = torch.randn(32, k, generator=torch.Generator().manual_seed(1))
    r = torch.randn(k, k, generator=torch.Generator().manual_seed(2))
    h = torch.diag(torch.linspace(3.0, 0.5, k) ** 2) + 0.01 * (r @ r.T) / k  # diagonal strictly descending
    assert torch.equal(group_aware_order(torch.diagonal(h), 16), torch.arange(k))
    a = gptq_quantize(w, h, GPTQConfig(bits=4, group_size=16, desc_act=False, act_group_aware=False))
    b = gptq_quantize(w, h, GPTQConfig(bits=4, group_size=16, desc_act=False, act_group_aware=True))
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_config_rejects_a_non_bool():
    with pytest.raises(ValueError, match="act_group_aware"):
        GPTQConfig(act_group_aware="yes")


def test_group_aware_is_the_order_without_act_order():
    assert GPTQConfig().act_group_aware and GPTQConfig(desc_act=False).ordering == "group-aware"
    assert GPTQConfig(desc_act=False, act_group_aware=False).ordering == "natural"
    assert GPTQConfig(desc_act=False, group_size=-1).ordering == "natural"  # one group: nothing to reorder
