from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.train.models import CORPUS, save_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A float tiny Llama + tokenizer saved as a Hugging Face folder, and a text file to train on."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_model_dir(root / "model")
    paras = [CORPUS[i:i + 300] for i in range(0, len(CORPUS) - 300, 37)]
    (root / "train.txt").write_text("\n\n".join(paras * 2))
    return root


def base_recipe(tiny_dir: Path, out: Path) -> dict:
    return {
        "model": {"path": str(tiny_dir / "model"), "dtype": "float32"},
        "quantization": {"format": "nf4", "blocksize": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "dataset": {
            "train": {"source": str(tiny_dir / "train.txt"), "chunk_chars": 300},
            "perplexity": {"source": str(tiny_dir / "train.txt"), "max_tokens": 512, "window": 64},
        },
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 0.005, "logging_steps": 1,
                     "max_length": 64, "packing": True, "packing_strategy": "wrapped", "save_steps": 2,
                     "disable_tqdm": True, "seed": 0},
        "output": {"dir": str(out), "report_to": "none"},
    }


def write_recipe(path: Path, data: dict, header: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(copy.deepcopy(data), sort_keys=False))
    return path
