"""Evaluation: QA accuracy by greedy generation, perplexity on text.

Works for any HF causal LM, wrapped or not: it only calls ``model.generate(...)`` and ``model(...)``
and reads ``.logits``. Prompts are built exactly as in training (`meft.data.records.prompt_ids`: chat template
with generation prompt for instruct tokenizers), left-padded for batched generation, and sorted by
length so batches waste little padding; results come back in the input order.

Shared prompt prefix (the fast path of `generate_answers`, on by default): chat prompts all start with
the same system message and user header (24 of the default model's ~40 prompt tokens), so the
key/value cache of the longest common token prefix is computed once per call and copied into every
batch; each batch then runs only its suffixes, laid out ``[prefix | left padding | suffix]`` with the
padding masked out. Positions come from the attention mask, so every real token has the position it has
in the plain layout ``[left padding | prefix | suffix]`` (`share_prefix=False`, the plain twin); answers
agree with it (tested; logits agree to fp32 rounding, as between any two batch compositions). Models whose
forward takes no KV cache argument, or caches without `batch_repeat_interleave`, use the plain path.

Answers are scored by `meft.data.answers` (`exact_match`, `contains_match`, re-exported here).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from meft.data.answers import contains_match, exact_match, normalize_answer
from meft.data.records import IGNORE_INDEX, prompt_ids, reference_answers

__all__ = ["normalize_answer", "exact_match", "contains_match", "generate_answers", "qa_accuracy",
           "perplexity", "common_prefix_length", "left_pad", "device_of", "greedy_new_tokens"]

_MIN_SHARED_PREFIX = 8  # below this the prefix saves little compute, so the plain path runs

def left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences left-padded for batched generation: (ids [B, T], attention mask [B, T])."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)      # [B, T]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)            # [B, T]
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s):] = 1
    return ids, mask


def device_of(model) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="item")


def common_prefix_length(seqs: Sequence[list[int]]) -> int:
    """Length of the longest token prefix every sequence in `seqs` starts with."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def _cache_arg(model) -> str | None:
    """The forward's KV-cache keyword ('cache' in transformers >= 5.2x, 'past_key_values' before), or None."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _prefix_cache(model, prefix: list[int], device: torch.device, cache_arg: str):
    """KV cache of one sequence `prefix` (batch 1), or None when the model returns none that can be
    repeated over a batch (then the plain path runs)."""
    ids = torch.tensor([prefix], dtype=torch.long, device=device)                 # [1, P]
    params = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # the prefix's logits are not used
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **keep)
    cache = getattr(out, cache_arg, None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    return cache


def greedy_new_tokens(model, tokenizer, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pad_id: int,
                      **cache) -> torch.Tensor:
    """Greedy decoding of a left-padded batch: the new token ids [B, <= max_new_tokens] on the CPU."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **cache)  # [B, T + new]
    return out[:, ids.shape[1]:].cpu()


def generate_answers(model, tokenizer, prompts: Sequence[list[int]], *, batch_size: int = 16,
                     max_new_tokens: int = 16, progress: bool = False, share_prefix: bool = True) -> list[str]:
    """Greedy answers to tokenized prompts (batched, left-padded); decoded without special tokens.

    `share_prefix`: compute the prompts' common prefix once (the module docstring's fast path); False
    runs the plain twin, every batch from its first token."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")
    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    device = device_of(model)
    # every prompt keeps at least one token of its own: generation starts from a real forward of it
    n_prefix = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
    cache_arg = _cache_arg(model) if share_prefix and n_prefix >= _MIN_SHARED_PREFIX else None
    prefix = None
    if cache_arg is not None and not getattr(model.config, "is_encoder_decoder", False):
        with torch.no_grad():
            prefix = _prefix_cache(model, list(prompts[0][:n_prefix]), device, cache_arg)
    with _progress(len(prompts), progress, "eval") as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            if prefix is None:
                ids, mask = left_pad([prompts[i] for i in chunk], pad_id)
                new = greedy_new_tokens(model, tokenizer, ids.to(device), mask.to(device), max_new_tokens, pad_id)
            else:
                tail_ids, tail_mask = left_pad([prompts[i][n_prefix:] for i in chunk], pad_id)  # [B, S]
                head = torch.tensor(prompts[chunk[0]][:n_prefix], dtype=torch.long).expand(len(chunk), -1)
                ids = torch.cat([head, tail_ids], dim=1)                                       # [B, P + S]
                mask = torch.cat([torch.ones_like(head), tail_mask], dim=1)                    # [B, P + S]
                cache = copy.deepcopy(prefix)  # generate extends the cache in place
                cache.batch_repeat_interleave(len(chunk))
                new = greedy_new_tokens(model, tokenizer, ids.to(device), mask.to(device), max_new_tokens, pad_id,
                                **{cache_arg: cache})
            for row, i in enumerate(chunk):
                answers[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
            bar.update(len(chunk))
    return answers


def qa_accuracy(model, tokenizer, records: Sequence[dict], *, batch_size: int = 16,
                max_new_tokens: int = 16, chat: bool | None = None, progress: bool = False,
                share_prefix: bool = True) -> dict:
    """Greedy-decode an answer to each QA/chat record and score it (see the module docstring).

    Returns ``{"exact_match": float, "contains": float, "n": int, "items": [{"prompt", "prediction",
    "answers", "exact", "contains"}, ...]}``; the accuracies are fractions in [0, 1]. Accepted answers
    are ``record["answers"]`` if present, else the completion / last assistant message. `share_prefix`:
    see `generate_answers`.
    """
    if not records:
        raise ValueError("qa_accuracy got no records; fix: pass at least one QA record")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            prompts = [prompt_ids(r, tokenizer, chat) for r in records]
            preds = generate_answers(model, tokenizer, prompts, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, progress=progress,
                                     share_prefix=share_prefix)
    finally:
        model.train(was_training)
    items = []
    for rec, pred in zip(records, preds):
        answers = reference_answers(rec)
        items.append({"prompt": rec.get("prompt") or rec.get("messages"), "prediction": pred,
                      "answers": answers, "exact": exact_match(pred, answers),
                      "contains": contains_match(pred, answers)})
    n = len(items)
    return {"exact_match": sum(i["exact"] for i in items) / n,
            "contains": sum(i["contains"] for i in items) / n, "n": n, "items": items}


def _text_windows(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    windows = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        windows += [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    return [w for w in windows if len(w) >= 2]


def _right_pad(windows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)         # [B, T]
    labels = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    for row, w in enumerate(windows):
        ids[row, :len(w)] = torch.tensor(w, dtype=torch.long)
        labels[row, :len(w)] = torch.tensor(w, dtype=torch.long)
    return ids, labels


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 4, max_length: int = 512,
               progress: bool = False) -> dict:
    """Token-level perplexity of `texts`: ``exp(sum NLL / n_tokens)`` over every predicted token.

    Each text is tokenized alone and cut into non-overlapping windows of `max_length` tokens (no
    context crosses a window). Returns ``{"perplexity", "loss" (mean NLL, nats), "n_tokens"}``.
    """
    windows = _text_windows(tokenizer, texts, max_length)
    if not windows:
        raise ValueError("perplexity needs at least one text of 2+ tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device, total, count = device_of(model), 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _progress(len(windows), progress, "perplexity") as bar:
            for start in range(0, len(windows), batch_size):
                chunk = windows[start:start + batch_size]
                ids, labels = _right_pad(chunk, pad_id)
                mask = (labels != IGNORE_INDEX).long()                                   # [B, T]
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, T, V]
                targets = labels[:, 1:].flatten().to(device)                             # [B * (T-1)]
                nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets,
                                      ignore_index=IGNORE_INDEX, reduction="sum")
                total += float(nll)
                count += int((labels[:, 1:] != IGNORE_INDEX).sum())
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    loss = total / count
    return {"perplexity": math.exp(loss), "loss": loss, "n_tokens": count}
