"""Perplexity with sliding windows, checked against brute force; bits/param; text reading."""
from __future__ import annotations

import gzip
import math

import pytest
import torch
from torch import nn

from qtune import NF4Config, quantize_model
from qtune.evaluate import _windows, model_bits_per_param, perplexity, read_text, tokenize_text


class Bigram(nn.Module):
    """logits[t] depend on token t only: a model whose exact NLL is easy to compute by hand."""

    def __init__(self, vocab=11):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids):
        return self.table[ids]


class Uniform(nn.Module):
    def __init__(self, vocab=37):
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab) + self.w


def brute_nll(model, ids, seq_len, stride):
    """Position i is scored once, with context from the window that scores it."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + seq_len, ids.numel())
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[begin:end][None])[0], -1)
        for pos in range(max(prev_end, begin + 1), end):
            total -= float(logp[pos - begin - 1, ids[pos]])
            count += 1
        prev_end = end
        if end == ids.numel():
            break
    return total, count


@pytest.mark.parametrize("n,seq_len,stride", [(100, 16, 16), (100, 16, 5), (97, 10, 10), (64, 64, 64), (50, 8, 1)])
def test_perplexity_matches_brute_force(n, seq_len, stride):
    model = Bigram()
    ids = torch.randint(0, 11, (n,), generator=torch.Generator().manual_seed(1))
    res = perplexity(model, ids, seq_len=seq_len, stride=stride, batch_size=3)
    total, count = brute_nll(model, ids, seq_len, stride)
    assert res.predicted == count
    assert res.nll == pytest.approx(total, rel=1e-9)
    assert res.perplexity == pytest.approx(math.exp(total / count), rel=1e-9)
    assert res.tokens_per_s > 0


def test_uniform_model_has_vocab_perplexity_and_disjoint_windows_skip_first_tokens():
    res = perplexity(Uniform(37), torch.arange(2048) % 37, seq_len=512)
    assert res.perplexity == pytest.approx(37.0, rel=1e-6)  # log_softmax in fp32
    assert res.predicted == 2048 - 4 and res.tokens == 2048  # 4 windows, each first token unscored
    assert _windows(10, 4, 4) == [(0, 4, 1), (4, 8, 1), (8, 10, 1)]
    assert _windows(10, 4, 2) == [(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 10, 2)]


def test_bad_sizes():
    with pytest.raises(ValueError, match="stride"):
        perplexity(Uniform(), torch.arange(10), seq_len=4, stride=5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(Uniform(), torch.arange(1), seq_len=4)


def test_bits_per_param_of_linear_layers():
    model = nn.Sequential(nn.Linear(128, 64, bias=False), nn.Linear(64, 128, bias=False))
    assert model_bits_per_param(model) == 32.0
    quantize_model(model, NF4Config(), skip_modules=())
    # 4 bits + one fp32 absmax per 64 weights + the 16-entry fp32 code table of each layer
    expected = (8 * (4096 + 128 * 4 + 64)) * 2 / (2 * 8192)
    assert model_bits_per_param(model) == pytest.approx(expected)


def test_read_text_and_tokenize(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress("héllo wörld".encode()))
    assert read_text(tmp_path / "a.txt.gz") == "héllo wörld"
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        read_text(tmp_path / "missing.txt")

    class CharTok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 50 for c in text]}

    assert tokenize_text("abcdef" * 10, CharTok(), tokens=7).tolist() == [ord(c) % 50 for c in "abcdefa"]
    with pytest.raises(ValueError, match="fewer than the 100 requested"):
        tokenize_text("abc", CharTok(), tokens=100)
