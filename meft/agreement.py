"""General-prompt agreement: how much of a model's general behaviour a fine-tune left as it was.

The base model writes a greedy continuation of each general prompt (`meft.data.general_prompts`, asked
through the chat template as the run asks). Its reference is its own top-1 choice at every position of
that continuation, read teacher-forced from one forward over [prompt | continuation]; a fine-tuned model
is read the same way over the same token sequences, and its **agreement** is the share of continuation
positions where its top-1 token equals the reference (1.0 = untouched; the base model scores 1.0 by
construction). Teacher forcing makes the score a per-token measure over fixed text: one early change does
not derail the rest of the sequence, as it would when comparing free generations. A continuation that
ends with the end-of-sequence token is scored up to and including it.

`general_reference(model, tokenizer, ...)` -> the sequences and reference tokens (plain lists: JSON);
`general_agreement(model, reference)` -> ``{"agreement", "n_prompts", "n_tokens", "per_prompt"}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meft.data.general_prompts import GENERAL_MAX_NEW_TOKENS, GENERAL_PROMPTS
from meft.data.records import prompt_ids, with_system_prompt
from meft.evaluate import device_of, greedy_new_tokens, left_pad

__all__ = ["general_reference", "general_agreement"]


@torch.no_grad()
def _continuations(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int
                   ) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (left-padded batches), cut after the first EOS."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device, out = device_of(model), []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start:start + batch_size], pad_id)  # [B, T]
        gen = greedy_new_tokens(model, tokenizer, ids.to(device), mask.to(device), max_new_tokens, pad_id)  # [B, new]
        for row in gen.tolist():
            cut = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            out.append(row[:cut])
    return out


@torch.no_grad()
def _top1(model, sequences: Sequence[list[int]], n_prompt: Sequence[int], batch_size: int) -> list[list[int]]:
    """Teacher-forced top-1 token at each continuation position of each sequence [prompt | continuation]."""
    device, out = device_of(model), []
    for start in range(0, len(sequences), batch_size):
        chunk, lens = sequences[start:start + batch_size], n_prompt[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)              # [B, T] right-padded
        mask = torch.zeros((len(chunk), width), dtype=torch.long)             # [B, T]
        for row, s in enumerate(chunk):
            ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, :len(s)] = 1
        top = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()  # [B, T]
        for row, (s, p) in enumerate(zip(chunk, lens)):
            out.append(top[row, p - 1:len(s) - 1].tolist())  # the choice made before each continuation token
    return out


def general_reference(model, tokenizer, *, prompts: Sequence[str] = GENERAL_PROMPTS,
                      system_prompt: str | None = None, max_new_tokens: int = GENERAL_MAX_NEW_TOKENS,
                      batch_size: int = 16) -> dict:
    """The base model's greedy continuations of `prompts` and its own teacher-forced top-1 over them:
    ``{"prompts", "sequences" ([prompt | continuation] ids), "n_prompt", "reference"}``."""
    records = with_system_prompt([{"prompt": p, "completion": "-"} for p in prompts], system_prompt)
    asked = [prompt_ids(r, tokenizer) for r in records]
    was_training = model.training
    model.eval()
    try:
        cont = _continuations(model, tokenizer, asked, max_new_tokens, batch_size)
        keep = [i for i, c in enumerate(cont) if c]  # an empty continuation has nothing to score
        sequences = [asked[i] + cont[i] for i in keep]
        n_prompt = [len(asked[i]) for i in keep]
        reference = _top1(model, sequences, n_prompt, batch_size)
    finally:
        model.train(was_training)
    return {"prompts": [prompts[i] for i in keep], "sequences": sequences, "n_prompt": n_prompt,
            "reference": reference}


def general_agreement(model, reference: dict, *, batch_size: int = 16) -> dict:
    """Teacher-forced top-1 agreement of `model` with a `general_reference` (see the module docstring)."""
    was_training = model.training
    model.eval()
    try:
        top = _top1(model, reference["sequences"], reference["n_prompt"], batch_size)
    finally:
        model.train(was_training)
    hits = [sum(a == b for a, b in zip(t, r)) for t, r in zip(top, reference["reference"])]  # per prompt
    n_tokens = sum(len(r) for r in reference["reference"])
    return {"agreement": sum(hits) / n_tokens if n_tokens else None, "n_prompts": len(hits), "n_tokens": n_tokens,
            "per_prompt": [round(h / len(r), 4) for h, r in zip(hits, reference["reference"])]}
