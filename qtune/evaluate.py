"""Perplexity with sliding windows, and throughput.

Perplexity over a token sequence ``t_0 … t_{T-1}`` is ``exp(−1/|P| Σ_{i∈P} log p(t_i | context))`` where
``P`` are the predicted positions. Windows of ``seq_len`` tokens start every ``stride`` tokens (default
``stride = seq_len``: disjoint windows, the usual "T tokens, L-token windows" setting, where the first
token of each window has no context and is not scored). With ``stride < seq_len`` each window scores
only the tokens not scored by the previous window, each with at least ``seq_len − stride`` tokens of
context (the transformers "perplexity of fixed-length models" recipe).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from .sources import read_text  # noqa: F401  (text of any source: a file, qtune:austen/<novel>, ...)


@dataclasses.dataclass
class PerplexityResult:
    """``perplexity`` = exp(``nll`` / ``predicted``); ``tokens_per_s`` counts every token fed to the model."""

    perplexity: float
    nll: float
    predicted: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def tokenize_text(text: str, tokenizer: Any, *, tokens: int | None = None) -> Tensor:
    """The first ``tokens`` token ids of ``text`` (all when ``None``), int64 [n], no special tokens added."""
    if tokens is not None:
        # tokenizing a whole novel for 2k tokens is wasteful: cut the text generously first
        text = text[: max(tokens * 12, 10_000)]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if tokens is not None:
        if ids.numel() < tokens:
            raise ValueError(f"the text has {ids.numel()} tokens, fewer than the {tokens} requested")
        ids = ids[:tokens]
    return ids


def _windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position within the window) for every window."""
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + seq_len, n)
        first = max(prev_end - begin, 1)  # position 0 has no context
        if end - begin >= 2 and first < end - begin:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            return out
        begin += stride


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, *, seq_len: int = 512, stride: int | None = None,
               batch_size: int = 4, device: torch.device | str | None = None, eval_mode: bool = True) -> PerplexityResult:
    """Perplexity of a causal LM over ``ids`` with sliding windows (see the module docstring).

    Args:
        model: a transformers causal LM (returns ``.logits``) or any module mapping ids [B, L] to logits [B, L, V].
        ids: int [n] or [1, n] token ids.
        seq_len: window length. stride: window step (default ``seq_len``).
        batch_size: windows of the same length per forward.
        device: where ids go (default: the model's first parameter's device).
        eval_mode: switch the model to ``eval()`` for the measurement (restored after). ``False`` keeps its
            mode, e.g. to run bitsandbytes' train-mode kernels on a model without dropout.
    Returns:
        :class:`PerplexityResult` (NLL summed in fp64).
    Raises:
        ValueError: bad sizes.
    """
    ids = ids.reshape(-1)
    stride = seq_len if stride is None else stride
    if seq_len < 2 or not (1 <= stride <= seq_len):
        raise ValueError(f"need seq_len ≥ 2 and 1 ≤ stride ≤ seq_len, got seq_len={seq_len}, stride={stride}")
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens, got {ids.numel()}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    if eval_mode:
        model.eval()
    windows = _windows(ids.numel(), seq_len, stride)
    nll, predicted, fed = 0.0, 0, 0
    warm = ids[: min(16, ids.numel())].reshape(1, -1).to(device)  # first-call overheads stay out of tokens/s
    model(input_ids=warm, use_cache=False) if _is_hf(model) else model(warm)
    start = time.perf_counter()
    i = 0
    while i < len(windows):
        length = windows[i][1] - windows[i][0]
        group = [windows[i]]
        while i + len(group) < len(windows) and len(group) < batch_size \
                and windows[i + len(group)][1] - windows[i + len(group)][0] == length:
            group.append(windows[i + len(group)])
        batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        out = model(input_ids=batch, use_cache=False) if _is_hf(model) else model(batch)
        logits = (out.logits if hasattr(out, "logits") else out).float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = batch[:, 1:]
        tok_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [B, L-1]: log p(t_{j+1} | t_≤j)
        for row, (_, _, first) in enumerate(group):
            scored = tok_logp[row, first - 1:]
            nll -= float(scored.double().sum())
            predicted += scored.numel()
        fed += batch.numel()
        i += len(group)
    seconds = time.perf_counter() - start
    model.train(was_training)
    return PerplexityResult(math.exp(nll / predicted), nll, predicted, fed, seconds)


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def model_bits_per_param(model: nn.Module) -> float:
    """Bits per weight over the linear layers (quantized ones at their packed size with scales, float ones
    at their dtype), excluding the output embeddings (``lm_head``); embeddings and norms are not counted."""
    from .nn import QuantLinear, linear_modules

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    bits, params = 0.0, 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m is not out_emb:
            bits += 8 * m.quantized_bytes()
            params += m.in_features * m.out_features
    for _, m in linear_modules(model):
        if m is out_emb:
            continue
        w = m.weight
        bits += 8 * w.numel() * w.element_size()
        params += w.numel()
    return bits / params if params else 0.0


__all__ = ["perplexity", "PerplexityResult", "tokenize_text", "model_bits_per_param", "read_text"]
