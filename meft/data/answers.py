"""Scoring one generated answer against the accepted ones: exact match and whole-word containment.

Answer normalisation (`normalize_answer`, SQuAD-style plus accent folding): Unicode NFKD with
combining marks dropped ("Bogotá" -> "bogota"), lower case, every punctuation/symbol character
replaced by a space ("+33" -> "33", ".fr" -> "fr"), the articles "a", "an", "the" dropped, whitespace
collapsed. ``exact``: normalised prediction equals a normalised accepted answer. ``contains``: a
normalised accepted answer occurs in the normalised prediction as whole words ("paris" is contained in
"the capital is paris", "1" is not contained in "+12").
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

__all__ = ["normalize_answer", "exact_match", "contains_match"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Accent-fold, lower-case, punctuation -> space, drop articles, collapse whitespace."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def contains_match(prediction: str, answers: Sequence[str]) -> bool:
    pred = f" {normalize_answer(prediction)} "
    return any(normalize_answer(a) and f" {normalize_answer(a)} " in pred for a in answers)
