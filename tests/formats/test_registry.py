"""The format registry: each config declares what qtune asks, once; names and specs resolve through it."""
import dataclasses
from typing import ClassVar

import pytest

from qtune.formats import (CONFIGS, CliOption, FormatSpec, FP4Config, GPTQConfig, Int8Config, LLMInt8Config, NF4Config,
                           QuantConfig, RTNConfig, config_from_dict, format_names, get_format, parse_format_spec,
                           register_format)

GGUF_FORMATS = ("gguf_q4_0", "gguf_q4_1", "gguf_q5_0", "gguf_q5_1", "gguf_q8_0", "gguf_q4_k", "gguf_q5_k", "gguf_q6_k")

BUILTIN = ("nf4", "fp4", "int8", "llm_int8", "gptq", "rtn", *GGUF_FORMATS)  # test modules may register more after


def test_every_builtin_format_declares_bits_calibration_and_op_family():
    assert format_names()[:len(BUILTIN)] == BUILTIN
    assert tuple(CONFIGS) == format_names()
    for name in BUILTIN:
        cls = get_format(name)
        cfg = cls()
        assert cls.format == name and isinstance(cfg.bits, int) and cfg.op_family
        assert cfg.needs_calibration is (cls is GPTQConfig)
    assert NF4Config().bits == FP4Config().bits == 4 and GPTQConfig(bits=3).bits == 3
    assert {get_format(n)().op_family for n in BUILTIN} == {"4bit", "int8", "llm_int8", "gptq", "gguf"}
    assert LLMInt8Config(arithmetic="bitsandbytes").op_family == "llm_int8_bnb"


def test_get_format_and_config_from_dict_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"'bogus' is not one of \['affine', 'fp4', 'gguf_q4_0'"):
        get_format("bogus")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bits'\] for format 'nf4'"):
        config_from_dict({"format": "nf4", "bits": 4})
    assert config_from_dict({"format": "rtn", "bits": 8, "group_size": -1}) == RTNConfig(bits=8, group_size=-1)


def test_parse_format_spec():
    assert parse_format_spec("nf4-dq") == FormatSpec("nf4", {"double_quant": True})
    assert parse_format_spec("FP4_DQ:blocksize=128").config() == FP4Config(double_quant=True, blocksize=128)
    spec = parse_format_spec("gptq:bits=3,desc-act=true,compute_dtype=bf16")
    assert spec == FormatSpec("gptq", {"bits": 3, "desc_act": True}, "bf16") and spec.needs_calibration
    assert spec.config() == GPTQConfig(bits=3, desc_act=True, compute_dtype="bf16")
    assert parse_format_spec("int8").config("float32") == Int8Config(compute_dtype="float32")
    with pytest.raises(ValueError, match="is not key=value"):
        parse_format_spec("nf4:double_quant")
    with pytest.raises(ValueError, match="blocksize=48"):
        parse_format_spec("nf4:blocksize=48")
    with pytest.raises(ValueError, match="'bogus' is not one of"):
        parse_format_spec("bogus")


def test_register_format_checks_the_declarations():
    @dataclasses.dataclass(frozen=True)
    class NoFamily(QuantConfig):
        format: ClassVar[str] = "nofamily"
        bits: ClassVar[int] = 4

    @dataclasses.dataclass(frozen=True)
    class Clash(QuantConfig):
        format: ClassVar[str] = "nf4"
        bits: ClassVar[int] = 4
        op_family: ClassVar[str] = "4bit"

    @dataclasses.dataclass(frozen=True)
    class BadOption(QuantConfig):
        format: ClassVar[str] = "badoption"
        bits: ClassVar[int] = 4
        op_family: ClassVar[str] = "4bit"
        cli_options: ClassVar[tuple] = (CliOption("nope", "not a field"),)

    with pytest.raises(ValueError, match="op_family"):
        register_format(NoFamily)
    with pytest.raises(ValueError, match="already registered by qtune.formats.nf4.NF4Config"):
        register_format(Clash)
    Impostor = type("NF4Config", (Clash,), {"__module__": __name__, "__qualname__": "NF4Config",  # same name
                                            "format": "nf4", "__annotations__": {"format": ClassVar[str]}})
    with pytest.raises(ValueError, match="already registered by qtune.formats.nf4.NF4Config"):
        register_format(dataclasses.dataclass(frozen=True)(Impostor))
    with pytest.raises(ValueError, match="does not name a field"):
        register_format(BadOption)
    with pytest.raises(TypeError):
        register_format(dict)
    assert not {"nofamily", "badoption"} & set(format_names()) and get_format("nf4") is NF4Config
