"""Corrupt GGUF files fail in one line naming the file, never with a numpy/gguf traceback, and never load with a
weight transformers would initialise at random (more cases in tests/integrations/test_gguf.py)."""
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

import qtune  # noqa: E402
from tests.integrations.test_gguf import write_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf-bad") / "tiny.gguf")


def _corrupt(tiny: Path, tmp_path: Path, edit) -> Path:
    data = bytearray(tiny.read_bytes())
    edit(data)
    out = tmp_path / "bad.gguf"
    out.write_bytes(bytes(data))
    return out


def _one_line(e: pytest.ExceptionInfo) -> bool:
    return "\n" not in str(e.value) and "bad.gguf" in str(e.value)


def test_a_misnamed_tensor_is_refused_not_initialised_at_random(tiny, tmp_path):
    def rename(data: bytearray) -> None:
        at = bytes(data).index(b"blk.1.attn_v.weight")
        data[at + len(b"blk.1.attn_v.weight") - 1] = ord("x")

    with pytest.raises(ValueError, match=r"bad\.gguf: no tensor for model\.layers\.1\.self_attn\.v_proj\.weight "
                                         r"\(1 weights missing\)") as e:
        qtune.load_model(_corrupt(tiny, tmp_path, rename))
    assert _one_line(e)


def test_a_corrupt_token_string_is_named(tiny, tmp_path):
    def break_token(data: bytearray) -> None:
        key = b"tokenizer.ggml.tokens"
        at = bytes(data).index(key) + len(key) + 4 + 4 + 8 + 8  # value type, item type, count, first length
        assert data[at] == ord("!")
        data[at] = 0xFF  # not UTF-8

    with pytest.raises(ValueError, match=r"bad\.gguf: ") as e:
        qtune.load_model(_corrupt(tiny, tmp_path, break_token))
    assert _one_line(e)


@pytest.mark.parametrize("offset", [4, 8, 16, 24])  # version, tensor count, key/value count, first key's length
def test_flipped_header_words_are_named(tiny, tmp_path, offset):
    def flip(data: bytearray) -> None:
        data[offset + 3] ^= 0x7F

    with pytest.raises(ValueError, match=r"bad\.gguf: ") as e:
        qtune.load_model(_corrupt(tiny, tmp_path, flip))
    assert _one_line(e)
