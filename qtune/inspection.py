"""Per-layer inspection of a model (``qtune inspect``): format, bits, bytes, bits/parameter, error, plots.

``bytes`` of a quantized layer are its packed weight and scales (buffers), without the bias;
``bits/param = 8·bytes / (in_features·out_features)``. A float layer reports its weight's dtype. The
relative quantization error of a layer is ``‖W − Ŵ‖_F / ‖W‖_F`` against the float weight ``W``, when one
is known (a float model quantized for the inspection, or ``reference=``).

A fused mixture-of-experts module (quantized :class:`~qtune.nn.experts.QuantExperts` or float) is one row:
``params`` counts every expert weight (``gate_up_proj``/``up_proj`` and ``down_proj`` of all experts), and its
error is over all of them (dequantized one expert at a time).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .nn import QuantLinear, float_weight_of, linear_modules
from .nn.experts import QuantExperts, fused_experts_modules


@dataclasses.dataclass
class LayerInfo:
    name: str
    format: str
    bits: int
    bytes: int
    params: int
    error: float | None = None

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.bytes / self.params if self.params else 0.0


def layer_table(model: nn.Module, reference: dict[str, Any] | None = None) -> list[LayerInfo]:
    """One :class:`LayerInfo` per linear layer and per fused experts module (quantized or float), in module order.

    Args:
        model: the model.
        reference: ``{layer name: float weight [out, in]}`` (experts modules: ``{name: {weight name: [E, ...]}}``,
            as :func:`float_weights` returns) to compute each quantized layer's relative error.
    """
    reference = reference or {}
    floats = {n for n, _ in linear_modules(model)}
    float_experts = {n for n, _ in fused_experts_modules(model)}
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QuantExperts):
            err = _experts_error(m, reference[name]) if name in reference else None
            out.append(LayerInfo(name, m.quant_config.format, int(m.quant_config.bits), m.quantized_bytes(),
                                 m.num_weights(), err))
            continue
        if name in float_experts:
            ws = [getattr(m, n) for n in ("gate_up_proj" if m.has_gate else "up_proj", "down_proj")]
            out.append(LayerInfo(name, str(ws[0].dtype).removeprefix("torch."), ws[0].element_size() * 8,
                                 sum(w.numel() * w.element_size() for w in ws), sum(w.numel() for w in ws),
                                 0.0 if name in reference else None))
            continue
        if isinstance(m, QuantLinear):
            err = None
            if name in reference:
                w = reference[name].float()
                err = float(torch.linalg.norm(w - m.dequantize(torch.float32)) / torch.linalg.norm(w).clamp_min(1e-30))
            out.append(LayerInfo(name, m.config.format, int(m.config.bits), m.quantized_bytes(),
                                 m.in_features * m.out_features, err))
        elif name in floats:
            w, _ = float_weight_of(m, name)
            out.append(LayerInfo(name, str(w.dtype).removeprefix("torch."), w.element_size() * 8,
                                 w.numel() * w.element_size(), w.numel(), 0.0 if name in reference else None))
    return out


def format_table(infos: list[LayerInfo]) -> str:
    """A fixed-width text table with a total row (bits/param over all listed layers)."""
    width = max([len(i.name) for i in infos] + [5])
    has_err = any(i.error is not None for i in infos)
    head = f"{'layer':<{width}}  {'format':<9} {'bits':>4} {'bytes':>11} {'params':>11} {'bits/param':>10}"
    head += f" {'rel.err':>9}" if has_err else ""
    lines = [head, "-" * len(head)]
    for i in infos:
        line = f"{i.name:<{width}}  {i.format:<9} {i.bits:>4} {i.bytes:>11,} {i.params:>11,} {i.bits_per_param:>10.3f}"
        if has_err:
            line += f" {i.error:>9.4f}" if i.error is not None else f" {'':>9}"
        lines.append(line)
    total_b, total_p = sum(i.bytes for i in infos), sum(i.params for i in infos)
    lines.append("-" * len(head))
    lines.append(f"{'total (' + str(len(infos)) + ' layers)':<{width}}  {'':<9} {'':>4} {total_b:>11,} {total_p:>11,} "
                 f"{(8.0 * total_b / total_p if total_p else 0.0):>10.3f}")
    return "\n".join(lines)


#: the names transformers configs give the number of experts each token is routed to (most families use the
#: first; ``attribute_map`` aliases some others to it, e.g. Ernie 4.5's ``moe_k``, Hunyuan's ``moe_topk``)
TOP_K_NAMES = ("num_experts_per_tok", "moe_topk", "moe_k", "moe_top_k", "num_experts_per_token", "experts_per_token")


def experts_per_token(config: Any) -> int | None:
    """The routed experts per token of a transformers config (``top_k``), or ``None`` when it names none.

    Reads :data:`TOP_K_NAMES` on the config, its text config (multimodal models) and DBRX's ``ffn_config``
    (``moe_top_k``); a per-layer list counts when all its entries agree.
    """
    places = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        places.append(get_text())
    for sub in ("text_config", "ffn_config"):
        if getattr(config, sub, None) is not None:
            places.append(getattr(config, sub))
    for place in places:
        for name in TOP_K_NAMES:
            v = place.get(name) if isinstance(place, dict) else getattr(place, name, None)
            if isinstance(v, (list, tuple)) and v and len(set(v)) == 1:
                v = v[0]
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def parameter_counts(model: nn.Module) -> tuple[int, int | None]:
    """``(total, active per token)`` weights of ``model``, counting quantized weights as the float ones they
    replace. Active: every weight outside the fused experts (attention, shared experts, routers, embeddings,
    norms, expert biases) plus ``top_k / E`` of the expert weights, with ``E`` the experts modules' own number of
    experts and ``top_k`` from the config (:func:`experts_per_token`); ``None`` when the model has experts but its
    config names no ``top_k``, or when its experts modules differ in ``E``. A model without fused experts is all
    active. Works on a meta-device skeleton (``qtune plan``).
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # tied weights once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    experts_weights, n_experts = 0, set()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            total += m.in_features * m.out_features
        elif isinstance(m, QuantExperts):
            total += m.num_weights()
            experts_weights += m.num_weights()
            n_experts.add(m.num_experts)
    for _, m in fused_experts_modules(model):
        experts_weights += sum(getattr(m, n).numel() for n in ("gate_up_proj" if m.has_gate else "up_proj", "down_proj"))
        n_experts.add(getattr(m, "down_proj").shape[0])
    if not experts_weights:
        return total, total
    top_k = experts_per_token(getattr(model, "config", None))
    if top_k is None or len(n_experts) != 1:
        return total, None
    return total, total - experts_weights + experts_weights * top_k // n_experts.pop()


def float_tensors(model: nn.Module, min_elements: int = 4096) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Floating-point parameters and buffers of ``model`` with more than ``min_elements`` elements, as
    ``(name, shape, dtype)``: what quantization left in 16/32 bits (embeddings, skipped layers, weights of a
    module qtune does not quantize). A quantized layer's own scales and code tables (``absmax``, nested quant
    maps, GPTQ ``scales``) are not listed; a float ``weight`` inside one would be. Tied tensors count once.
    """
    quantized = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts)))
    out = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith(quantized) and not name.endswith(".weight"):
            continue
        if t.is_floating_point() and t.numel() > min_elements:
            out.append((name, tuple(t.shape), t.dtype))
    return out


def _experts_error(m: QuantExperts, reference: dict[str, Tensor]) -> float:
    """``‖W − Ŵ‖_F / ‖W‖_F`` over every expert weight of ``m``, one expert dequantized at a time."""
    num = den = 0.0
    for wname in m.weight_names:
        stack, w = m._modules[wname], reference[wname]
        for e in range(stack.num_experts):
            we = (w[e].t() if stack.transposed else w[e]).float()
            num += float(torch.linalg.norm(we - stack.dequantize(e, torch.float32).to(we.device)) ** 2)
            den += float(torch.linalg.norm(we) ** 2)
    return (num / max(den, 1e-60)) ** 0.5


def float_weights(model: nn.Module) -> dict[str, Any]:
    """``{name: weight [out, in]}`` of the float linear layers and ``{name: {weight name: [E, ...]}}`` of the
    float fused experts modules (views, no copies)."""
    out: dict[str, Any] = {n: float_weight_of(m, n)[0] for n, m in linear_modules(model)}
    for n, m in fused_experts_modules(model):
        out[n] = {w: getattr(m, w).detach() for w in ("gate_up_proj" if m.has_gate else "up_proj", "down_proj")}
    return out


def quantized_copy(model: nn.Module, config: Any) -> nn.Module:
    """A deep copy of a float model quantized with ``config`` (QTuneConfig, QuantConfig or format name), RTN only."""
    from .integrations.layouts.qtune import as_qtune_config
    from .nn import quantize_model

    q = copy.deepcopy(model)
    quantize_model(q, None, plan=as_qtune_config(config).layer_plan(q))
    return q


def plot(model: nn.Module, out: str | Path, *, reference: dict[str, Tensor] | None = None, layer: str | None = None,
         bins: int = 200) -> Path:
    """Draw the weight histogram of one layer before/after quantization and the per-layer relative error.

    Args:
        model: the quantized model.
        out: PNG path.
        reference: float weights (``{name: [out, in]}``); without it only the dequantized histogram is drawn.
        layer: the layer to histogram (default: the quantized layer with the largest relative error,
            else the first quantized layer).
    Raises:
        ValueError: no quantized layer, or ``layer`` is not one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    infos = [i for i in layer_table(model, reference) if i.name in dict(model.named_modules())
             and isinstance(model.get_submodule(i.name), QuantLinear)]
    if not infos:
        raise ValueError("plot: the model has no quantized layers")
    if layer is None:
        with_err = [i for i in infos if i.error is not None]
        layer = max(with_err, key=lambda i: i.error).name if with_err else infos[0].name
    if layer not in {i.name for i in infos}:
        raise ValueError(f"plot: {layer!r} is not a quantized layer (e.g. {infos[0].name})")
    q = model.get_submodule(layer)
    after = q.dequantize(torch.float32).reshape(-1).cpu().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    if reference is not None and layer in reference:
        before = reference[layer].float().reshape(-1).cpu().numpy()
        lo, hi = float(min(before.min(), after.min())), float(max(before.max(), after.max()))
        ax.hist(before, bins=bins, range=(lo, hi), alpha=0.6, label="before (float)", log=True)
        ax.hist(after, bins=bins, range=(lo, hi), alpha=0.6, label=f"after ({q.config.format})", log=True)
    else:
        ax.hist(after, bins=bins, alpha=0.8, label=f"dequantized ({q.config.format})", log=True)
    ax.set_title(f"{layer}: weight distribution")
    ax.set_xlabel("weight value")
    ax.set_ylabel("count (log)")
    ax.legend()
    ax = axes[1]
    errs = [i.error if i.error is not None else 0.0 for i in infos]
    ax.bar(range(len(infos)), errs, color=["C3" if i.name == layer else "C0" for i in infos])
    ax.set_title("relative quantization error ‖W−Ŵ‖/‖W‖ per layer" if any(i.error is not None for i in infos)
                 else "relative error unavailable (no float reference)")
    ax.set_xlabel("layer index (module order)")
    ax.set_ylabel("relative error")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = ["LayerInfo", "layer_table", "format_table", "float_weights", "quantized_copy", "plot", "parameter_counts"]
