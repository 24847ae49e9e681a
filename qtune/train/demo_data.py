"""Offline demo data for the preference and RL tasks, built from the bundled Austen novels.

**Demo data, not a benchmark**: small, deterministic sets that let the ``dpo``/``kto``/``reward``/``grpo``/
``rloo``/``distill`` recipes run offline, with an effect one can measure in a few CPU steps. Bundled under
``qtune/data/demo/`` (JSON lines) and named in recipes as ``qtune:demo/<name>``:

- ``austen-preference`` (``prompt``, ``chosen``, ``rejected``): ``prompt`` is the opening
  :data:`PROMPT_WORDS` words of a paragraph of *Emma*, ``chosen`` the next :data:`COMPLETION_WORDS` words
  of that paragraph (the real continuation), ``rejected`` as many words from the middle of a paragraph of
  *Persuasion* (a fluent continuation from another novel, about other people);
- ``austen-kto`` (``prompt``, ``completion``, ``label``): the same pairs unpaired: even rows keep the
  chosen continuation (``label`` true), odd rows the rejected one (``label`` false);
- ``austen-prompts`` (``prompt``): openings of :data:`PROMPT_WORDS` words of other *Emma* paragraphs, for
  GRPO/RLOO/distillation, scored by the rule-based reward ``austen-emma`` (:mod:`qtune.train.rewards`).

Paragraphs are taken in book order (every eligible one, no randomness); :func:`build` rewrites the files
and ``tests/train/test_tasks.py`` checks that it reproduces the bundled bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..assets import demo_dir, demo_path  # noqa: F401  (demo_path: where the sets live, kept importable here)

PROMPT_WORDS = 32
COMPLETION_WORDS = 16
PAIRS = 256
PROMPTS = 128


def _words(name: str, min_words: int) -> list[list[str]]:
    from .. import assets
    from .data import paragraphs

    out = []
    for p in paragraphs(assets.austen_text(name)):
        w = p.split()
        # narrative paragraphs only: long enough, not chapter headings or short dialogue lines
        if len(w) >= min_words and not p.isupper() and not p.startswith("CHAPTER"):
            out.append(w)
    return out


def build_sets() -> dict[str, list[dict]]:
    """The three demo sets as lists of records (see the module docstring)."""
    emma = _words("emma", PROMPT_WORDS + COMPLETION_WORDS)
    persuasion = _words("persuasion", 2 * COMPLETION_WORDS)
    if len(emma) < PAIRS + PROMPTS or len(persuasion) < PAIRS:
        raise ValueError(f"too few paragraphs for the demo sets: emma {len(emma)}, persuasion {len(persuasion)}")
    pairs = []
    for i in range(PAIRS):
        w, other = emma[2 * i], persuasion[i]
        mid = (len(other) - COMPLETION_WORDS) // 2
        pairs.append({"prompt": " ".join(w[:PROMPT_WORDS]),
                      "chosen": " " + " ".join(w[PROMPT_WORDS:PROMPT_WORDS + COMPLETION_WORDS]),
                      "rejected": " " + " ".join(other[mid:mid + COMPLETION_WORDS])})
    kto = [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"], "label": i % 2 == 0}
           for i, p in enumerate(pairs)]
    prompts = [{"prompt": " ".join(emma[2 * i + 1][:PROMPT_WORDS])} for i in range(PROMPTS)]
    return {"austen-preference": pairs, "austen-kto": kto, "austen-prompts": prompts}


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def build(folder: str | Path | None = None) -> dict[str, Path]:
    """Write ``<name>.jsonl`` for every demo set into ``folder`` (default: the bundled folder)."""
    folder = Path(folder) if folder is not None else demo_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, records in build_sets().items():
        path = folder / f"{name}.jsonl"
        path.write_text(_jsonl(records), encoding="utf-8")
        out[name] = path
    return out


if __name__ == "__main__":
    for n, p in build().items():
        print(n, p)
