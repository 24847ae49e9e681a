"""The top-level API: every name in ``qtune.__all__`` resolves; ``import qtune`` alone registers with transformers."""
import subprocess
import sys

import qtune


def test_every_public_name_resolves():
    for name in qtune.__all__:
        assert getattr(qtune, name) is not None, name
    assert set(qtune._LAZY) <= set(dir(qtune))


def test_unknown_attribute_is_an_attribute_error():
    try:
        qtune.no_such_thing
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_import_qtune_registers_quant_method_and_defers_peft_trl():
    code = ("import sys, qtune\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING\n"
            "assert AUTO_QUANTIZATION_CONFIG_MAPPING['qtune'] is qtune.QTuneConfig\n"
            "assert 'qtune' in AUTO_QUANTIZER_MAPPING\n"
            "assert 'trl' not in sys.modules, 'import qtune pulled in trl'\n"
            "qtune.prepare_model_for_kbit_training\n"
            "assert 'trl' in sys.modules\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
