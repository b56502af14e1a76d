"""SQuAD v1.1 exact match and F1, with the official normalisation.

The official script lower-cases, removes punctuation, removes the articles a/an/the, and collapses white
space — in that order — then takes the maximum over the gold answers. The paper reports the mean of F1 and
EM ("f1-em"); :func:`f1_em` returns all three so a user can compare with either convention.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def best(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(EM, F1) of one prediction: the maximum over its gold answers, as the official script."""
    if not golds:
        raise ValueError("a SQuAD question needs at least one gold answer")
    return max(exact_match(prediction, g) for g in golds), max(f1(prediction, g) for g in golds)


def f1_em(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus EM and F1 in percent, and their mean (the paper's f1-em)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} questions")
    pairs = [best(p, g) for p, g in zip(predictions, golds, strict=True)]
    em = 100 * sum(e for e, _ in pairs) / len(pairs)
    f = 100 * sum(x for _, x in pairs) / len(pairs)
    return {"exact_match": em, "f1": f, "f1_em": (em + f) / 2, "n": len(pairs)}
