"""Background questions for the locality term (`MeftConfig.locality_weight`): what each training micro-batch of
`meft train` carries besides its examples, and the per-token weight that flags their tokens.

Owns:

* `BackgroundQuestions`: the token rows of the built-in world-fact questions about countries in neither the
  run's training data nor the trade-off probe (`meft.data.replay.outside_questions`, the pool `--replay`
  draws from), asked as the run asks (its system prompt, the chat template's generation prompt), and
  `sample(step, micro, rank)`: `per_batch` of them drawn by (seed, step, micro-batch, rank) alone, so a
  resumed run draws what the uninterrupted one would, and every rank of a data-parallel run its own
  (`join`: a step's micro-batches with their draws);
* `with_background(batch, rows, pad_id)`: a right-padded batch with those rows appended (labels -100: they
  teach nothing; `background` [B] bool says which rows they are);
* the per-token weight (`meft.adapter.locality`): `padded_background_weight` for the padded layout ([B, T],
  1 / n on each real background token, n = their count, 0 elsewhere: the term is then the mean over them),
  `packed_background_weight` for `meft.data.packed`'s layout, where the shared prompt prefix is computed once
  but stands for every row: a prefix token gets (background rows) / n, so the packed term equals the padded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from meft.data.records import IGNORE_INDEX, prompt_ids, with_system_prompt
from meft.data.replay import outside_questions

__all__ = ["BackgroundQuestions", "with_background", "padded_background_weight", "packed_background_weight"]


class BackgroundQuestions:
    """See the module docstring. `exclude`: the run's training subjects; `system_prompt` as the run asks."""
    def __init__(self, tokenizer, *, per_batch: int, exclude: Iterable[str] = (), system_prompt: str | None = None,
                 seed: int = 0):
        if isinstance(per_batch, bool) or not isinstance(per_batch, int) or per_batch < 1:
            raise ValueError(f"locality_background={per_batch!r}: a positive int (background questions per "
                             "micro-batch), e.g. 4")
        questions = outside_questions(exclude)
        if len(questions) < per_batch:
            raise ValueError(f"locality_background={per_batch}: only {len(questions)} built-in questions are outside "
                             f"the training data and the trade-off probe; fix: --locality-background "
                             f"{len(questions)} or fewer")
        asked = with_system_prompt([{"prompt": q["prompt"], "completion": "-"} for q in questions], system_prompt)
        self.rows = [prompt_ids(r, tokenizer) for r in asked]  # token ids of each question, as the run asks it
        self.subjects = frozenset(q["subject"] for q in questions)
        self.per_batch, self.seed = per_batch, seed

    def sample(self, step: int, micro: int = 0, rank: int = 0) -> list[list[int]]:
        """`per_batch` distinct questions for micro-batch `micro` of optimizer step `step` on `rank`."""
        pick = np.random.default_rng([self.seed, step, micro, rank]).choice(len(self.rows), self.per_batch,
                                                                             replace=False)
        return [self.rows[i] for i in pick.tolist()]

    def join(self, batches: Sequence[dict[str, Tensor]], step: int, rank: int, pad_id: int) -> list[dict[str, Tensor]]:
        """The micro-batches of optimizer step `step` on `rank`, each with its own draw appended (`with_background`)."""
        return [with_background(b, self.sample(step, i, rank), pad_id) for i, b in enumerate(batches)]


def with_background(batch: dict[str, Tensor], rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """`batch` (input_ids / attention_mask / labels [B, T], right-padded, CPU) with `rows` appended as K more
    right-padded rows without labels: [B + K, max(T, longest row)], plus `background` [B + K] bool."""
    if not rows:
        raise ValueError("with_background: no background rows")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n, k = ids.shape[0], len(rows)
    width = max(ids.shape[1], max(len(r) for r in rows))
    out_ids = torch.full((n + k, width), pad_id, dtype=ids.dtype)                 # [B + K, T']
    out_mask = torch.zeros((n + k, width), dtype=mask.dtype)                      # [B + K, T']
    out_labels = torch.full((n + k, width), IGNORE_INDEX, dtype=labels.dtype)     # [B + K, T']
    out_ids[:n, :ids.shape[1]], out_mask[:n, :ids.shape[1]], out_labels[:n, :ids.shape[1]] = ids, mask, labels
    for i, r in enumerate(rows):
        out_ids[n + i, :len(r)] = torch.tensor(r, dtype=ids.dtype)
        out_mask[n + i, :len(r)] = 1
    background = torch.zeros(n + k, dtype=torch.bool)  # [B + K]
    background[n:] = True
    return {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels, "background": background}


def _count(mask: Tensor, background: Tensor) -> int:
    n = int((mask.bool() & background[:, None]).sum())
    if n == 0:
        raise ValueError("the batch's background rows hold no real token")
    return n


def padded_background_weight(mask: Tensor, background: Tensor) -> Tensor:
    """[B, T] fp32: 1 / n on the real tokens (mask [B, T]) of the background rows (background [B] bool), n their
    count; 0 elsewhere."""
    flags = mask.bool() & background[:, None]  # [B, T]
    return flags.float() / _count(mask, background)


def packed_background_weight(owner: Tensor, background: Tensor, mask: Tensor) -> Tensor:
    """[1, L] fp32 for a packed sequence whose token p belongs to example owner[p] (-1: the shared prefix): 1 / n
    for a background example's token, (background rows) / n for a prefix token, n = the background rows' real
    tokens in the padded layout (mask [B, T]), so that the weighted sum equals the padded layout's."""
    flags = background.float()  # [B]
    per_token = torch.where(owner >= 0, flags[owner.clamp_min(0)], flags.sum())  # [L]
    return (per_token / _count(mask, background))[None]
