"""Rule-based reward functions for GRPO/RLOO recipes (``grpo.reward`` / ``rloo.reward``).

A recipe names a reward either by its built-in name (:data:`REWARDS`) or as ``package.module:function``.
Every reward follows trl's reward-function protocol: ``f(prompts, completions, **columns) -> list[float]``
with one float per completion; completions are strings (standard datasets) or message lists
(conversational; the last message's content is scored).

The built-in ``austen-emma`` reward is **demo material, not a benchmark**: it is deterministic and
verifiable, and it rewards a continuation of an Emma passage for staying in *Emma*'s world::

    words  = the first WINDOW_WORDS words of the completion (the length bound: longer text earns nothing more)
    E      = number of words in words that name Emma's people and places (EMMA_NAMES)
    P      = number of words that name Persuasion's (PERSUASION_NAMES)
    reward = clip((E - P) / 2, -1, 1)         (0 for an empty completion)

so a continuation naming two of Emma's characters scores 1, one naming Persuasion's scores below 0.

Names are rare in a short completion, so most completions score 0 and a group of them has no advantage to
learn from. The built-in ``austen-style`` reward is dense: a tiny classifier, unigram naive Bayes of *Emma*
against *Persuasion* (both bundled), scores every word::

    c_E(w), c_P(w) = counts of w in Emma and in Persuasion (lower-cased words); V = the union of both vocabularies
    lo(w)  = log((c_E(w) + 1) / (N_E + |V|)) - log((c_P(w) + 1) / (N_P + |V|))      (add-one smoothing)
    reward = clip(mean of lo(w) over the first WINDOW_WORDS words, -1, 1)            (0 for an empty completion)

Common words score near 0, words of Emma's world (names, places, its own turns of phrase) above, Persuasion's
below; the mean rewards a completion's share of Emma-like words whatever its length.
"""
from __future__ import annotations

import collections
import functools
import importlib
import math
import re
from typing import Any, Callable

WINDOW_WORDS = 40
EMMA_NAMES = frozenset({
    "emma", "woodhouse", "harriet", "smith", "knightley", "elton", "weston", "churchill", "frank", "fairfax",
    "jane", "bates", "martin", "taylor", "perry", "hartfield", "highbury", "randalls", "donwell", "isabella",
})
PERSUASION_NAMES = frozenset({
    "anne", "elliot", "wentworth", "musgrove", "russell", "kellynch", "uppercross", "croft", "benwick",
    "harville", "louisa", "henrietta", "mary", "walter", "lyme", "bath",
})
_WORD = re.compile(r"[A-Za-z]+")


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def emma_score(text: str) -> float:
    """The ``austen-emma`` reward of one completion (see the module docstring)."""
    words = [w.lower() for w in _WORD.findall(text)[:WINDOW_WORDS]]
    if not words:
        return 0.0
    e = sum(w in EMMA_NAMES for w in words)
    p = sum(w in PERSUASION_NAMES for w in words)
    return max(-1.0, min(1.0, (e - p) / 2))


def austen_emma(prompts: list, completions: list, **columns: Any) -> list[float]:
    """trl reward function: :func:`emma_score` of each completion."""
    return [emma_score(_text(c)) for c in completions]


@functools.lru_cache(maxsize=1)
def style_log_odds() -> dict[str, float]:
    """``lo(w)`` of the ``austen-style`` classifier for every word of either novel (built once per process)."""
    from ..assets import austen_text

    emma, persuasion = (collections.Counter(w.lower() for w in _WORD.findall(austen_text(name)))
                        for name in ("emma", "persuasion"))
    vocab = emma.keys() | persuasion.keys()
    n_e, n_p = sum(emma.values()) + len(vocab), sum(persuasion.values()) + len(vocab)
    return {w: math.log((emma[w] + 1) / n_e) - math.log((persuasion[w] + 1) / n_p) for w in vocab}


def style_score(text: str) -> float:
    """The ``austen-style`` reward of one completion (see the module docstring)."""
    words = [w.lower() for w in _WORD.findall(text)[:WINDOW_WORDS]]
    if not words:
        return 0.0
    lo = style_log_odds()
    return max(-1.0, min(1.0, sum(lo.get(w, 0.0) for w in words) / len(words)))


def austen_style(prompts: list, completions: list, **columns: Any) -> list[float]:
    """trl reward function: :func:`style_score` of each completion."""
    return [style_score(_text(c)) for c in completions]


REWARDS: dict[str, Callable[..., list[float]]] = {"austen-emma": austen_emma, "austen-style": austen_style}


def check_reward_spec(spec: str) -> str | None:
    """An error message for a reward name that can never resolve (checked while validating a recipe)."""
    if ":" in spec:
        module, _, func = spec.partition(":")
        if not module or not func.isidentifier():
            return f"{spec!r}: expected 'package.module:function'"
        return None
    if spec not in REWARDS:
        return f"{spec!r} is not a built-in reward ({', '.join(sorted(REWARDS))}) nor 'package.module:function'"
    return None


def resolve_reward(spec: str) -> Callable[..., list[float]]:
    """The reward function a recipe names.

    Raises:
        ValueError: unknown built-in name, module not importable, or no such callable in it.
    """
    msg = check_reward_spec(spec)
    if msg:
        raise ValueError(msg)
    if ":" not in spec:
        return REWARDS[spec]
    module, _, func = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import {module}: {e}") from None
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {module} has no callable {func!r}")
    return fn
