"""``--mode adapter``: the PEFT adapter folder, a model card, and the record of the base it needs.

Written: ``adapter_config.json`` and ``adapter_model.safetensors`` (copied byte for byte), the tokenizer
when the run has one, ``README.md`` (base model, its quantization, recipe, training metrics) and
``qtune_base.json`` (the full recipe, so ``qtune export``/:func:`qtune.export.load_source` can rebuild
the exact quantized base from this folder alone).

Verification loads the written folder as a second adapter on the rebuilt qtune base (through
:func:`qtune.integrations.peft.load_adapter`, which registers qtune's LoRA layer with peft before
``PeftModel`` reads it) and checks that it gives the same logits as the trained adapter.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from ..atomic import atomic_output, check_output
from .report import ExportResult
from .source import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FILE, ExportSource, load_source
from .verify import VerificationError, compare_logits, logits, probe_ids

__all__ = ["export_adapter"]

_VERIFY_NAME = "qtune_export_verify"


def _verify(src: ExportSource, folder: Path):
    from ..integrations.peft import load_adapter

    model = src.model
    active = list(model.active_adapters)
    ids = probe_ids(src.tokenizer, model.get_base_model().config.vocab_size)
    expected = logits(model, ids)
    load_adapter(model, str(folder), adapter_name=_VERIFY_NAME)
    try:
        model.set_adapter(_VERIFY_NAME)
        got = logits(model, ids)
    finally:
        model.set_adapter(active[0] if len(active) == 1 else active)
        model.delete_adapter(_VERIFY_NAME)
    diff = compare_logits(got, expected)
    if not diff.rel <= 1e-6:
        raise VerificationError(f"{folder}: the exported adapter, reloaded with PEFT on the qtune base, gives other "
                                f"logits than the trained one ({diff}); nothing was written")
    return diff


def export_adapter(source: str | Path | ExportSource, out: str | Path, *, overwrite: bool = False,
                   verify: bool = True, push_to_hub: str | None = None, private: bool = False,
                   token: str | None = None, base: str | None = None, base_format: str | None = None,
                   log: Callable[[str], None] = print) -> ExportResult:
    """Write the adapter folder with its model card and base record.

    Args:
        source: a run/adapter folder (see :func:`qtune.export.load_source`) or an :class:`ExportSource`.
        out: the export folder (atomic; must not exist unless ``overwrite``).
        verify: reload the written adapter with PEFT on the rebuilt base and compare logits.
        push_to_hub, private, token: upload afterwards (:func:`qtune.export.hub.push_folder`).
        base, base_format: see :func:`qtune.export.load_source`.
    Returns:
        :class:`ExportResult`.
    Raises:
        FileExistsError, FileNotFoundError, ValueError: see :func:`qtune.export.load_source`; verification
            failure. Nothing is left at ``out`` on any error.
    """
    from . import card, hub

    start = time.perf_counter()
    out = check_output(out, overwrite=overwrite)
    if push_to_hub:
        hub.check_repo(push_to_hub, overwrite=overwrite, token=token)
    src = source if isinstance(source, ExportSource) else load_source(source, base=base, base_format=base_format)
    result = ExportResult(mode="adapter", out=out)
    with atomic_output(out, overwrite=overwrite) as tmp:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(src.adapter_dir / name, tmp / name)
        if src.tokenizer is not None:
            src.tokenizer.save_pretrained(tmp)
        (tmp / BASE_FILE).write_text(json.dumps(src.base_record(), indent=2) + "\n", encoding="utf-8")
        if verify:
            result.verify = _verify(src, tmp)
        result.seconds = time.perf_counter() - start
        (tmp / "README.md").write_text(card.adapter_card(src, result), encoding="utf-8")
        result.files = sorted(p.name for p in tmp.iterdir())
    if push_to_hub:
        result.hub_url = hub.push_after_export(out, push_to_hub, private=private, overwrite=overwrite, token=token,
                                               log=log)
    result.seconds = time.perf_counter() - start
    log(result.summary())
    return result
