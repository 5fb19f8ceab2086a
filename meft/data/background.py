"""Background (general) text for the sparse update's idf (MeftConfig.sparse_update; issue 13, item 6).

Owns `background_token_ids(tok, n_tokens)`: `n_tokens` tokens of general English text that ships offline
with Python (`pydoc_data.topics`), as fixed-length rows. The topics are taken in *reverse* name order
(only those of at least 500 characters, whole, concatenated): experiments/knowledge/forgetting.py scores
perplexity on the *first* topics in name order (64 by default, of 70), and 2048 background tokens come
from the last two topics, so the text that decides which rows a sparse update leaves alone is not the
text the forgetting probe measures (both are pydoc prose, though: the same domain).
"""

from __future__ import annotations

from pydoc_data.topics import topics

import torch

__all__ = ["background_texts", "background_token_ids"]

_MIN_CHARS = 500  # shorter pydoc topics are mostly cross-references, not prose (as forgetting.py)


def background_texts() -> list[str]:
    """The pydoc topics of at least 500 characters, in reverse name order (stripped)."""
    return [t for t in (topics[name].strip() for name in sorted(topics, reverse=True)) if len(t) >= _MIN_CHARS]


def background_token_ids(tok, n_tokens: int, row_tokens: int = 256) -> list[torch.Tensor]:
    """`n_tokens` background tokens as rows [1, <= row_tokens] int64 (the last row may be shorter): the
    topics of `background_texts()` tokenized without special tokens, concatenated, cut into rows, so no
    row needs padding. Raises ValueError when the topics hold fewer tokens."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} must be a positive int")
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
