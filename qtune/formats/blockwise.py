"""Blockwise absmax quantization against a code table, and bitsandbytes' 8-bit dynamic map.

The core that NF4/FP4 (:mod:`qtune.formats.nf4`) share with their double quantization: a flat tensor is cut
into blocks of ``blocksize`` consecutive values (the last block may be partial), each scaled into [-1, 1] by
its absmax and rounded to the nearest entry of a sorted code table (ties to the lower entry, as
bitsandbytes' midpoint ``bucketize``). With bitsandbytes' signed dynamic 8-bit map as the table this is
``quantize_blockwise``, which double quantization applies to the 4-bit absmax (blocks of 256).
"""
from __future__ import annotations

import functools

import torch

NESTED_BLOCKSIZE = 256


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # bitsandbytes' signed dynamic map (Dettmers 2016, 8-bit approximations): 7 exponent levels,
    # each a linear grid of fraction values, plus 0 and 1; 256 sorted fp32 entries.
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        items = 2 ** (i + non_sign - max_exp) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``nested_quant_map``): fp32 [256], sorted; a new tensor on each
    call (layers keep it as a buffer, see :func:`qtune.formats.nf4.code_table`)."""
    return _dynamic_map_cpu().to(device, copy=True)


def absmax_scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1], with bitsandbytes' exact arithmetic."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        # bitsandbytes divides (not multiplies by the reciprocal) in the partial last block
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest ``code`` entry (ties to the lower sorted entry), int64."""
    order = torch.argsort(code)
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    q = torch.bucketize(scaled, midpoints)
    return q if torch.equal(order, torch.arange(code.numel(), device=code.device)) else order[q]


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the dynamic map (used for double quantization).

    Args:
        x: fp32 [n] values.
    Returns:
        (uint8 [n] codes, fp32 [ceil(n/blocksize)] absmax).
    """
    absmax, scaled = absmax_scaled_blocks(x.float().reshape(-1), blocksize)
    return nearest_code(scaled, dynamic_map(x.device)).to(torch.uint8), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`: fp32 [n] = code[q] · absmax[i // blocksize]."""
    vals = code[q.reshape(-1).long()]
    idx = torch.arange(vals.numel(), device=vals.device) // blocksize
    return vals * absmax[idx]
