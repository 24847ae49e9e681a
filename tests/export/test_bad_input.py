"""Bad input: adapter from another base, missing files, an existing --out, a full disk or an interrupted write,
a failed verification: a clear error, and nothing (partial or otherwise) at --out."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

import qtune.atomic as atomic
from qtune.cli.main import main
from qtune.export import VerificationError, export, export_merged, load_source
from qtune.export.verify import TOLERANCE

quiet = lambda s: None  # noqa: E731


def _nothing_at(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def _bare_adapter(run: Path, dest: Path) -> Path:
    shutil.copytree(run / "adapter", dest)
    return dest


# ------------------------------------------------------------------------------------------------
# the source
# ------------------------------------------------------------------------------------------------
def test_adapter_trained_on_another_base(run_for, tmp_path, capsys):
    from tests.train.models import tiny_tokenizer

    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = tiny_tokenizer()
    other = tmp_path / "other-base"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    tok.save_pretrained(other)
    adapter = _bare_adapter(run_for("nf4"), tmp_path / "adapter")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"trained on another base: layer model\.layers\.0\.mlp\.\w+_proj has "
                                         r"(in|out)_features 128 in the adapter .* but 96 in the base"):
        export_merged(adapter, out, base=str(other), base_format="nf4", log=quiet)
    _nothing_at(out)
    rc = main(["export", str(adapter), "--mode", "adapter", "--out", str(out), "--base", str(other),
               "--base-format", "nf4"])
    assert rc == 1 and "trained on another base" in capsys.readouterr().err
    _nothing_at(out)


def test_missing_files(run_for, tmp_path):
    run = run_for("nf4")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(tmp_path / "nope", out, mode="merged")
    with pytest.raises(FileNotFoundError, match="neither a training run folder"):
        export(tmp_path, out, mode="merged")
    adapter = _bare_adapter(run, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin .*safetensors only"):
        export(adapter, out, mode="adapter")
    (adapter / "adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors: missing"):
        export(adapter, out, mode="adapter")
    # an interrupted run: no final adapter, but a checkpoint to point at
    broken = tmp_path / "run-interrupted"
    broken.mkdir()
    shutil.copy(run / "summary.json", broken / "summary.json")
    shutil.copytree(run / "adapter", broken / "checkpoint-2")
    with pytest.raises(FileNotFoundError, match=r"no final adapter .*checkpoint-2"):
        export(broken, out, mode="merged")
    # a run whose recipe file was removed
    moved = tmp_path / "run-moved"
    shutil.copytree(run, moved)
    summary = json.loads((moved / "summary.json").read_text())
    summary["recipe"] = str(tmp_path / "gone.yaml")
    (moved / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(FileNotFoundError, match="gone.yaml no longer exists"):
        export(moved, out, mode="merged")
    # the run records its base: --base-format alone does not apply
    with pytest.raises(ValueError, match="--base-format applies with --base"):
        export(run, out, mode="merged", base_format="int8")
    # a bare adapter on a float base: how it was quantized is unknown
    bare = _bare_adapter(run, tmp_path / "bare")
    with pytest.raises(ValueError, match="--base-format"):
        export(bare, out, mode="merged")
    # GPTQ re-quantization with a calibration file that does not exist
    with pytest.raises(FileNotFoundError, match="calibration file .*missing.txt does not exist"):
        export(run, out, mode="quantized", format="gptq:group_size=32", calibration=str(tmp_path / "missing.txt"),
               log=quiet)
    _nothing_at(out)


def test_format_and_layout_mismatch(run_for, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--layout gptq holds gptq/rtn layers, not nf4"):
        export(run_for("nf4"), out, mode="quantized", format="nf4", layout="gptq", log=quiet)
    with pytest.raises(ValueError, match="does not take format"):
        export(run_for("nf4"), out, mode="merged", format="nf4")
    _nothing_at(out)


# ------------------------------------------------------------------------------------------------
# the destination
# ------------------------------------------------------------------------------------------------
def test_existing_output_is_untouched_without_overwrite(run_for, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    import qtune.export.merged as merged_mod

    monkeypatch.setattr(merged_mod, "load_source", lambda *a, **k: pytest.fail("loaded the source first"))
    with pytest.raises(FileExistsError, match="already exists"):
        export_merged(run_for("nf4"), out, log=quiet)
    assert main(["export", str(run_for("nf4")), "--mode", "merged", "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "previous export"
    monkeypatch.undo()
    res = export_merged(run_for("nf4"), out, overwrite=True, log=quiet)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file() and res.verify is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def _failing_save(exc: BaseException):
    import transformers.modeling_utils as mu

    real = mu.safe_save_file

    def save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # a partial shard, as a full disk leaves it
            f.write(b"\0" * 100)
        raise exc

    return real, save


@pytest.mark.parametrize("mode", ["adapter", "merged", "quantized"])
def test_disk_full_leaves_nothing(mode, run_for, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    full = OSError(errno.ENOSPC, "No space left on device")
    if mode == "adapter":
        import qtune.export.adapter as adapter_mod

        real = shutil.copyfile

        def copy(src, dst, **kw):
            if str(dst).endswith(".safetensors"):
                Path(dst).write_bytes(b"\0" * 10)
                raise full
            return real(src, dst, **kw)

        monkeypatch.setattr(adapter_mod.shutil, "copyfile", copy)
    else:
        monkeypatch.setattr(mu, "safe_save_file", _failing_save(full)[1])
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        export(run_for("nf4"), out, mode=mode, log=quiet)
    _nothing_at(out)


def test_disk_full_keeps_the_previous_export(run_for, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils as mu

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    monkeypatch.setattr(mu, "safe_save_file", _failing_save(OSError(errno.ENOSPC, "No space left on device"))[1])
    rc = main(["export", str(run_for("nf4")), "--mode", "merged", "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 1 and "No space left on device" in err and "nothing was written" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_interrupted_write_leaves_nothing(run_for, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    monkeypatch.setattr(mu, "safe_save_file", _failing_save(KeyboardInterrupt())[1])
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_merged(run_for("nf4"), out, log=quiet)
    _nothing_at(out)


def test_not_enough_free_space_is_refused_up_front(run_for, tmp_path, monkeypatch, capsys):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: usage._replace(free=10_000))
    out = tmp_path / "out"
    rc = main(["export", str(run_for("nf4")), "--mode", "merged", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "not enough free space for the merged checkpoint" in err and "MiB free" in err
    _nothing_at(out)


def test_failed_verification_leaves_nothing(run_for, tmp_path, monkeypatch):
    import qtune.export.merged as merged_mod

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setitem(TOLERANCE, torch.float32, -1.0)  # the merge check cannot pass
        with pytest.raises(VerificationError, match="merged model vs the trained model: .*nothing was written"):
            export_merged(run_for("nf4"), out, dtype="fp32", log=quiet)
    _nothing_at(out)
    monkeypatch.setattr(merged_mod, "RELOAD_TOLERANCE", -1.0)  # the reload check cannot pass
    with pytest.raises(VerificationError, match=r"\(reloaded\): the logits differ .*nothing was written"):
        export_merged(run_for("nf4"), out, dtype="fp32", log=quiet)
    _nothing_at(out)


def test_exported_adapter_source_is_self_contained(run_for, tmp_path):
    """An exported adapter folder moved elsewhere still rebuilds its base from qtune_base.json."""
    out = tmp_path / "adapter"
    export(run_for("int8"), out, mode="adapter", verify=False, log=quiet)
    moved = tmp_path / "elsewhere" / "adapter"
    moved.parent.mkdir()
    shutil.move(str(out), moved)
    src = load_source(moved)
    assert src.recipe.quantization["format"] == "int8" and src.run_dir is None
    assert src.metrics()["train_loss"] == 4.25
