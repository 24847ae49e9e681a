"""The column-by-column GPTQ solver, kept as the reference the fast blocked solver is tested against.

This is qtune's ``gptq_quantize`` as it was before the solve was restructured (commit 67f294f): one
column at a time, each column's error applied to the rest of its 128-column lazy batch by an
elementwise outer product, on ``W`` in ``[N, K]`` layout. Not imported by the package.
"""
from __future__ import annotations

import torch

from qtune.formats.base import check_weight
from qtune.formats.gptq import (GPTQConfig, GPTQHessian, GPTQTensors, _check_cfg, _cholesky, _group_params,
                                _pack_result, _quantize_codes, group_aware_order)


def gptq_quantize_reference(weight: torch.Tensor, hessian: torch.Tensor | GPTQHessian, cfg: GPTQConfig, name: str = "weight",
                  *, scale_dtype: torch.dtype = torch.float16) -> GPTQTensors:
    """The column-by-column solver qtune shipped before the blocked one (kept verbatim as the spec)."""
    _check_cfg(cfg, (GPTQConfig,), "gptq_quantize")
    check_weight(weight, name=name)
    n, k = weight.shape
    device = weight.device
    if isinstance(hessian, GPTQHessian):
        if hessian.nsamples == 0:
            raise ValueError(f"{name}: the GPTQHessian has no calibration samples; call add_batch() first")
        hessian = hessian.H
    if not isinstance(hessian, torch.Tensor):
        raise TypeError(f"{name}: hessian must be a Tensor or GPTQHessian, got {type(hessian).__name__}")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"{name}: hessian has shape {tuple(hessian.shape)}, expected [{k}, {k}] for weight "
                         f"of shape {tuple(weight.shape)}")
    H = hessian.to(device=device, dtype=torch.float32, copy=True)
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"{name}: hessian holds NaN/Inf")
    W = weight.to(dtype=torch.float32, copy=True)

    bits, maxq = cfg.bits, 2**cfg.bits - 1
    gs = k if cfg.group_size == -1 else cfg.group_size
    n_groups = -(-k // gs)

    # An input that is always 0 carries no information; its weight cannot affect the output.
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    # static_groups applies only with act-order (added with the act-order-static default)
    static = cfg.static_groups and cfg.desc_act
    scales = torch.empty(n_groups, n, dtype=torch.float32, device=device)
    zeros = torch.empty(n_groups, n, dtype=torch.float32, device=device)
    if static:
        for g in range(n_groups):
            cols = W[:, g * gs:(g + 1) * gs]
            scales[g], zeros[g] = _group_params(cols.amin(1), cols.amax(1), bits, cfg.sym, scale_dtype, name)

    perm = None
    group_aware = cfg.act_group_aware and not cfg.desc_act and cfg.group_size != -1
    if cfg.desc_act:
        # stable: equal diagonals keep their order, so the result does not depend on the sort backend.
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    elif group_aware:
        perm = group_aware_order(torch.diagonal(H), gs)
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]

    damp = cfg.damp_percent * torch.mean(torch.diagonal(H))
    H.diagonal().add_(damp)
    L = _cholesky(H, name, cfg.damp_percent)
    Hinv = _cholesky(torch.cholesky_inverse(L), name, cfg.damp_percent, upper=True)
    del H, L

    # Group of each (permuted) column: static groups (and group-aware order, whose groups stay whole)
    # follow the original column, dynamic act-order groups follow the order.
    if static or group_aware:
        col_group = (perm if perm is not None else torch.arange(k, device=device)) // gs
    else:
        col_group = torch.arange(k, device=device) // gs
    col_group = col_group.tolist()

    codes = torch.zeros(n, k, dtype=torch.float32, device=device)
    for i1 in range(0, k, cfg.block_size):
        i2 = min(i1 + cfg.block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % gs == 0:
                # The group's current values: in-block columns live in W1; columns past the block have
                # not yet received this block's lazy update, so it is applied to the slice here. (The
                # reference reads the stale W instead, which only agrees when groups start on block starts.)
                end = min(col + gs, k)
                cur = W1[:, i:i + (end - col)]
                if end > i2:
                    rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:end]
                    cur = torch.cat([cur, rest], dim=1)
                g = col_group[col]
                scales[g], zeros[g] = _group_params(cur.amin(1), cur.amax(1), bits, cfg.sym, scale_dtype, name)
            s, z = scales[col_group[col]], zeros[col_group[col]]
            w = W1[:, i]
            q = _quantize_codes(w, s, z, maxq)
            codes[:, col] = q
            err = (w - s * (q - z)) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g_idx = torch.arange(k, device=device) // gs
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        if not (static or group_aware):
            # Column perm[i] was quantized i-th, with the parameters of group i // gs.
            g_idx = torch.empty_like(g_idx)
            g_idx[perm] = torch.arange(k, device=device) // gs
    return _pack_result(codes.T, scales, zeros, g_idx, bits, cfg.group_size, scale_dtype)
