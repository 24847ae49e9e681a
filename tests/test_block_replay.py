"""Forward replay of sequential GPTQ (qtune/block_replay.py): fewer computations, the same bits."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qtune.block_replay as block_replay
from qtune import GPTQConfig
from qtune.block_replay import BlockReplay
from qtune.calibration import gptq_quantize_model
from tests.integrations.tiny_models import make_tiny


@pytest.fixture
def replay_stats(monkeypatch):
    """(hits, most bytes held) of every block's replay store, read when the block closes it."""
    stats: list[tuple[int, int]] = []
    peak = {"bytes": 0}
    close, call = BlockReplay.close, BlockReplay._call

    def spy_call(self, *args):
        out = call(self, *args)
        peak["bytes"] = max(peak["bytes"], self.bytes)
        return out

    def spy_close(self):
        stats.append((self.hits, peak["bytes"]))
        peak["bytes"] = 0
        close(self)

    monkeypatch.setattr(BlockReplay, "_call", spy_call)
    monkeypatch.setattr(BlockReplay, "close", spy_close)
    return stats


def _quantize_both(arch, tmp_path, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny(arch, tmp_path / arch), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(0))
    replayed, plain = copy.deepcopy(model), copy.deepcopy(model)
    gptq_quantize_model(replayed, ids, GPTQConfig(group_size=32), progress=False, batch_size=2, **kwargs)
    gptq_quantize_model(plain, ids, GPTQConfig(group_size=32), progress=False, batch_size=2, replay_budget=0)
    return replayed.state_dict(), plain.state_dict()


@pytest.mark.parametrize("arch,hits_per_batch", [("llama", 7), ("gpt2", 4), ("gpt_neox", 4)])
def test_replay_is_bit_identical_and_used(tmp_path, replay_stats, arch, hits_per_batch):
    """Every quantized tensor and float parameter equals the plain forwards' result, and the store was read:
    Llama per batch of windows: q/k/v in the o pass, the attention in the gate/up pass, the attention and
    gate/up in the last pass (7 hits)."""
    replayed, plain = _quantize_both(arch, tmp_path)
    assert replayed.keys() == plain.keys()
    for k in plain:
        assert torch.equal(replayed[k], plain[k]), k
    n_blocks = 2
    assert len(replay_stats) == 2 * n_blocks  # the plain run opens (empty) stores too
    assert [h for h, _ in replay_stats[:n_blocks]] == [3 * hits_per_batch] * n_blocks  # 3 batches of windows
    assert [h for h, _ in replay_stats[n_blocks:]] == [0] * n_blocks


def test_replay_keeps_to_its_budget(tmp_path, replay_stats):
    budget = 2 * 32 * 64 * 4  # one batch's q output (2 windows x 32 tokens x 64 features, fp32)
    replayed, plain = _quantize_both("llama", tmp_path, replay_budget=budget)
    for k in plain:
        assert torch.equal(replayed[k], plain[k]), k
    used = replay_stats[:2]
    assert all(0 < peak <= budget for _, peak in used), used
    assert all(hits > 0 for hits, _ in used), used


def test_replay_budget_is_checked():
    with pytest.raises(ValueError, match="replay_budget"):
        gptq_quantize_model(nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.int64), GPTQConfig(), replay_budget=-1)


class _Block(nn.Module):
    """``p`` and ``s`` read ``x`` (one group); ``r`` reads ``p``'s output, after ``p`` ran; ``scale`` is modified in
    place by the block after it returns."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.p, self.r, self.s, self.scale = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        y = self.r(self.p(x)) + self.s(x)
        z = self.scale(x)
        z.mul_(2)
        return y + z


def _pass(block, replay, batches, **kw):
    outs = []
    for b, x in enumerate(batches):
        with replay.forward(b, **kw):
            outs.append(block(x))
    return outs


def test_output_computed_after_a_pending_layer_is_not_stored():
    """``r`` holds only done layers, but it ran after the pending ``p``: its output must not be replayed once
    ``p`` changes (a store of it would replay the output of the old ``p``)."""
    block = _Block()
    batches = [torch.randn(3, 4), torch.randn(3, 4)]
    replay = BlockReplay(block, budget=1 << 20)
    replay.update(done={"r", "scale"}, pending={"p", "s"})
    _pass(block, replay, batches)
    with torch.no_grad():
        block.p.weight.mul_(0.5)  # "quantizing" p changes its output
    replay.update(done={"r", "scale", "p", "s"}, pending=set())
    got = _pass(block, replay, batches)
    replay.close()
    want = [block(x) for x in batches]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_output_modified_in_place_is_recomputed():
    block = _Block()
    batches = [torch.randn(3, 4)]
    replay = BlockReplay(block, budget=1 << 20)
    replay.update(done={"scale"}, pending=set())
    with torch.no_grad():
        first = _pass(block, replay, batches)
        second = _pass(block, replay, batches)
    replay.close()
    assert torch.equal(first[0], second[0])
    assert replay.hits == 0  # the stored output of `scale` was doubled in place after it was stored
    assert "forward" not in block.scale.__dict__  # close() gave the module its own forward back


def test_default_budget_reads_the_host_memory():
    assert block_replay.default_budget(torch.device("cpu")) > 0
    assert block_replay.default_budget(torch.device("meta")) == 0
