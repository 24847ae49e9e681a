"""``python -m qtune.bench.loftq --steps 0`` on a tiny model: both initialisations of each format land in the file."""
from __future__ import annotations

import math
import textwrap

from qtune.bench import loftq
from tests.bench.conftest import check_results_file


def test_loftq_bench_init_rows(tiny_model_dir, tmp_path, one_thread):
    text = tiny_model_dir / "train.txt"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model:
          path: {tiny_model_dir / 'model'}
          dtype: float32
        quantization:
          format: nf4
          compute_dtype: float32
        lora:
          r: 4
          alpha: 8
          dropout: 0.0
        dataset:
          train:
            source: {text}
          perplexity:
            source: {text}
            max_tokens: 128
            window: 64
        training:
          max_length: 64
        output:
          dir: {tmp_path / 'unused'}
        """))
    out = tmp_path / "loftq.json"
    argv = ["--recipe", str(recipe), "--steps", "0", "--format", "affine:bits=2,group_size=32", "--loftq-iters", "2",
            "--train-tokens", "128", "--workdir", str(tmp_path / "runs"), "--out", str(out)]
    assert loftq.main(argv) == 0
    payload = check_results_file(out, "loftq", "python -m qtune.bench.loftq --recipe")
    rows = payload["results"]["rows"]
    assert [(r["format"], r["init"]) for r in rows] == [("affine:bits=2,group_size=32", "default"),
                                                        ("affine:bits=2,group_size=32", "loftq")]
    for r in rows:
        # a mean token loss: below log(vocab) + a margin for a random tiny model, and positive
        assert 0 < r["step0_loss"] < math.log(320) + 2 and r["perplexity_before"] > 1 and r["train_tokens"] == 128
    ratio = payload["results"]["loftq_over_default"]["affine:bits=2,group_size=32"]["step0_loss"]
    assert ratio == rows[1]["step0_loss"] / rows[0]["step0_loss"]
