"""Background (general) text for the sparse update's idf (MeftConfig.sparse_update).

Owns `background_token_ids(tok, n_tokens, source=)`: `n_tokens` tokens of text that stands for what a fine-tune
should leave alone, as rows of token ids. Two sources (`BACKGROUND_SOURCES`, `MeftConfig.sparse_background`):

* ``"pydoc"``: general English prose that ships offline with Python (`pydoc_data.topics`), as fixed-length rows.
  The topics are taken in *reverse* name order (only those of at least 500 characters, whole, concatenated):
  experiments/knowledge/forgetting.py scores perplexity on the *first* topics in name order (64 by default, of
  70), and 2048 background tokens come from the last two topics, so the text that decides which rows a sparse
  update leaves alone is not the text the forgetting probe measures (both are pydoc prose, though).
* ``"questions"``: questions as a chat model is asked them -- the built-in world-fact questions (every relation,
  first training phrasing, seeded order), one row each, through the tokenizer's chat template with an empty
  system turn and the generation prompt (plain text without a template). Why: the question template's tokens,
  which every question shares, never occur in prose, so against prose their experts look specific to the
  training data and are updated, and every other question routes into them (BENCHMARKS.md, "Quick start",
  compares the two).
  Countries of the trade-off probe (`meft.data.retention`) are left out, so the facts the probe scores never
  shape the update.
"""

from __future__ import annotations

import random
from pydoc_data.topics import topics

import torch

from meft.config import BACKGROUND_SOURCES
from meft.data.records import prompt_ids, with_system_prompt
from meft.data.replay import outside_questions

__all__ = ["BACKGROUND_SOURCES", "background_texts", "background_questions", "background_token_ids"]

_MIN_CHARS = 500  # shorter pydoc topics are mostly cross-references, not prose (as forgetting.py)


def background_texts() -> list[str]:
    """The pydoc topics of at least 500 characters, in reverse name order (stripped)."""
    return [t for t in (topics[name].strip() for name in sorted(topics, reverse=True)) if len(t) >= _MIN_CHARS]


def background_questions(seed: int = 0) -> list[str]:
    """Every built-in world-fact question (first training phrasing per relation and country) about a country
    outside the trade-off probe and its free prompts (`meft.data.replay.outside_questions`), in seeded order."""
    out = sorted(r["prompt"] for r in outside_questions())
    random.Random(seed).shuffle(out)
    return out


def _pydoc_rows(tok, n_tokens: int, row_tokens: int) -> list[torch.Tensor]:
    stream: list[int] = []
    for text in background_texts():
        stream.extend(tok(text, add_special_tokens=False)["input_ids"])
        if len(stream) >= n_tokens:
            break
    if len(stream) < n_tokens:
        raise ValueError(f"the pydoc background text holds {len(stream)} tokens, fewer than {n_tokens}; lower "
                         "MeftConfig.sparse_background_tokens")
    ids = torch.tensor(stream[:n_tokens], dtype=torch.int64)  # [n_tokens]
    return [row[None] for row in ids.split(row_tokens)]


def _question_rows(tok, n_tokens: int) -> list[torch.Tensor]:
    rows, total = [], 0
    for rec in with_system_prompt([{"prompt": q, "completion": "-"} for q in background_questions()], ""):
        ids = prompt_ids(rec, tok)[: n_tokens - total]  # an empty system turn: as the built-in sets are asked
        rows.append(torch.tensor(ids, dtype=torch.int64)[None])  # [1, L]
        total += len(ids)
        if total >= n_tokens:
            return rows
    raise ValueError(f"the built-in questions hold {total} tokens, fewer than {n_tokens}; lower "
                     "MeftConfig.sparse_background_tokens")


def background_token_ids(tok, n_tokens: int, row_tokens: int = 256, source: str = "pydoc") -> list[torch.Tensor]:
    """`n_tokens` background tokens of `source` as rows [1, <= row_tokens] int64: "pydoc" prose tokenized
    without special tokens, concatenated and cut into rows (the last may be shorter), so no row needs padding;
    "questions" one row per question (the last cut to fit). Raises ValueError when the source holds fewer
    tokens or is unknown."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} must be a positive int")
    if source == "pydoc":
        return _pydoc_rows(tok, n_tokens, row_tokens)
    if source == "questions":
        return _question_rows(tok, n_tokens)
    raise ValueError(f"background source {source!r}: choose one of {', '.join(BACKGROUND_SOURCES)}")
