"""Worker for test_fsdp.py: QLoRA steps on a tiny qtune model, either alone or sharded with FSDP2 (gloo, CPU).

``python tests/train/fsdp_worker.py MODEL_DIR OUT_DIR single [qa]``
``python -m torch.distributed.run --nproc_per_node 2 tests/train/fsdp_worker.py MODEL_DIR OUT_DIR fsdp``

Both modes see the same batch on every rank, so FSDP's averaged gradient equals the single process's
and the adapters must end up equal. ``qa``: a quantization-aware adapter on GGUF Q4_1 layers instead, merged
exactly into their offsets after the steps (``merged_logits``/``unmerged_logits`` in the JSON). Writes ``OUT_DIR/<mode>.safetensors`` (full adapter weights) and
``OUT_DIR/<mode>.json`` (losses, shard sizes).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import qtune  # noqa: E402


def main() -> None:
    model_dir, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    qa = sys.argv[4:] == ["qa"]
    from peft import LoraConfig
    from safetensors.torch import save_file

    distributed = mode == "fsdp"
    if distributed:
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    quant = qtune.QTuneConfig("gguf_q4_1") if qa else qtune.QTuneConfig("nf4", overrides={"down_proj": {"format": "int8"}})
    model = qtune.load_model(model_dir, quant, dtype=torch.float32)
    model = qtune.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = qtune.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights="gaussian"), quantization_aware=qa)
    info = {"layers": qtune.set_storage_dtype(model, torch.bfloat16)}
    if distributed:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
        packed = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        assert isinstance(packed, DTensor), type(packed)
        info["packed_local"] = packed.to_local().numel()
        info["packed_full"] = packed.numel()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    info["losses"] = losses
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            state[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).contiguous()
    if qa and not distributed:  # the exact merge of what was trained, with the float storage still in place
        model.eval()
        with torch.no_grad():
            info["unmerged_logits"] = model(input_ids=ids).logits.flatten()[:64].tolist()
            merged, report = qtune.merge_and_unload(model)
            info["merged_logits"] = merged(input_ids=ids).logits.flatten()[:64].tolist()
        info["exact_layers"] = report.exact
    if not distributed or torch.distributed.get_rank() == 0:
        save_file(state, str(out / f"{mode}.safetensors"))
        (out / f"{mode}.json").write_text(json.dumps(info))
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
