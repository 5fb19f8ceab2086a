"""Padding-free training micro-batches: a right-padded batch repacked as one sequence whose shared
prompt prefix is computed once.

Owns `pack_batch(batch)` (the layout), `packing_supported(model)` (which models take it) and
`resolve_packing(mode, model)` (the `meft train --packing` choice).

Why: a micro-batch of chat QA examples is mostly the same template tokens and padding. On the quick
start (16 examples, ~28 real tokens each, padded to ~32) every example starts with the same 8 tokens
(`<|im_start|>system\\n<|im_end|>\\n<|im_start|>user\\n`) and 13% of the cells are padding, so the
forward and backward compute [16, 32] = 512 positions for 446 real tokens of which 16 x 8 are the same
prefix again and again. Packed, the micro-batch is one sequence

    [ prefix (P tokens, once) | example 0 after the prefix | example 1 after the prefix | ... ]   [1, L]

with L = P + sum_i (n_i - P) (326 instead of 512 on the quick start's first batch: the backbone's forward + backward
took 1.75 s instead of 2.58 s), an additive attention mask [1, 1, L, L] in which each example's tokens see
the prefix and their own earlier tokens (the prefix sees itself, causally) and position ids that restart
after the prefix for every example, i.e. every token has the position it has in the padded layout.

Same math as the padded batch (the plain twin; tests/meft/data/test_packed.py compares loss and
gradients, and `meft train` runs with `--packing off`): the prefix's hidden states are the same in every
example, so computing them once and letting every example attend to them gives the same outputs, and
autograd sums the examples' gradients into the shared prefix exactly as it sums them over the copies.
Labels: the prefix is cut before the first labelled position (a label predicted from a prefix token
would be counted once instead of once per example), and each example's first packed position gets no
label (in the padded layout nothing predicts position 0).

What differs from the padded batch: routing sees the shared prefix once instead of once per example, so
the row budget (`MeftConfig.max_active_rows`) and the load-balance statistics count its tokens once; in
the padded layout the quick start's 8 template tokens carried 28% of the micro-batch's routing weight. The
attention mask is dense, so attention costs L^2 over the packed sequence: a micro-batch packs only when
L <= `max_tokens` (2048 by default), and otherwise keeps its padded layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from meft.data.locality import packed_background_weight
from meft.data.records import IGNORE_INDEX

__all__ = ["pack_batch", "packing_supported", "resolve_packing", "check_packing_mode", "PACKING_MODES",
           "PACK_MAX_TOKENS"]

PACKING_MODES = ("auto", "on", "off")
PACK_MAX_TOKENS = 2048  # longest packed micro-batch: its dense [L, L] attention mask costs L^2
# architectures whose HF forward takes a custom 4-D additive mask and position_ids as given (transformers'
# masking_utils returns a 4-D mask as is); each is compared against its padded twin in the tests
_SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def packing_supported(model) -> bool:
    """Whether `pack_batch`'s layout gives `model` the same outputs as the padded batch."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _SUPPORTED_TYPES:
        return False
    impl = getattr(config, "_attn_implementation", None)
    return impl in (None, "sdpa", "eager")


def check_packing_mode(mode: str) -> None:
    if mode not in PACKING_MODES:
        raise ValueError(f"--packing {mode!r}: choose one of {', '.join(PACKING_MODES)}")


def resolve_packing(mode: str, model) -> bool:
    """`meft train --packing`: 'auto' packs for supported models, 'on' insists, 'off' keeps padding."""
    check_packing_mode(mode)
    if mode == "off":
        return False
    supported = packing_supported(model)
    if mode == "on" and not supported:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"--packing on: model type {kind!r} is not one whose forward is known to take a packed "
                         f"batch (supported: {', '.join(_SUPPORTED_TYPES)}, sdpa or eager attention); fix: "
                         "--packing auto (packs where supported) or --packing off")
    return supported


def _prefix_length(ids: Tensor, labels: Tensor, lengths: Tensor) -> int:
    """Tokens every example shares at its start, cut before the first position a label is predicted from."""
    same = (ids == ids[:1]).all(dim=0).long().cumprod(dim=0)  # [T] 1 while every row has row 0's token
    shared = int(same.sum())
    labelled = labels != IGNORE_INDEX  # [B, T]
    first = torch.where(labelled.any(dim=1), labelled.long().argmax(dim=1), lengths)  # [B] first labelled position
    # position p predicts label p + 1: prefix positions [0, P) predict labels 1..P, which must all be unlabelled
    return max(0, min(shared, int(first.min()) - 1, int(lengths.min()) - 1))


def pack_batch(batch: dict[str, Tensor], *, dtype: torch.dtype = torch.float32,
               max_tokens: int = PACK_MAX_TOKENS) -> dict[str, Tensor] | None:
    """The packed layout of a right-padded `batch` (input_ids / attention_mask / labels [B, T], on the CPU),
    or None when it does not pack (not right-padded, or longer than `max_tokens`).

    Returns input_ids [1, L], labels [1, L], position_ids [1, L] and attention_mask [1, 1, L, L] (additive,
    `dtype`: 0 where a query may attend, the dtype's minimum elsewhere). A batch with `background` [B] bool
    (`meft.data.locality.with_background`) also gets `background_weight` [1, L] (`packed_background_weight`)."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    if mask.dim() != 2 or set(batch) - {"input_ids", "labels", "attention_mask", "background"}:
        return None
    lengths = mask.sum(dim=1)  # [B]
    cells = torch.arange(mask.shape[1])[None, :] < lengths[:, None]  # [B, T] where a right-padded row is real
    if not torch.equal(cells, mask.bool()) or int(lengths.min()) < 1:
        return None
    P = _prefix_length(ids, labels, lengths)
    total = P + int((lengths - P).sum())
    if total > max_tokens:
        return None
    # the prefix predicts no label (nothing predicts position 0, and P was cut before the first labelled one)
    seg_ids, seg_labels = [ids[0, :P]], [torch.full((P,), IGNORE_INDEX, dtype=labels.dtype)]
    seg_pos, seg_owner = [torch.arange(P)], [torch.full((P,), -1)]
    for i, n in enumerate(lengths.tolist()):
        lab = labels[i, P:n].clone()
        lab[0] = IGNORE_INDEX  # predicted, in the packed sequence, by the previous example's last token
        seg_ids.append(ids[i, P:n])
        seg_labels.append(lab)
        seg_pos.append(torch.arange(P, n))
        seg_owner.append(torch.full((n - P,), i))
    owner = torch.cat(seg_owner)  # [L] example of each packed token, -1: the shared prefix
    q = torch.arange(total)
    visible = (q[:, None] >= q[None, :]) & ((owner[None, :] == -1) | (owner[:, None] == owner[None, :]))  # [L, L]
    additive = torch.zeros(total, total, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    out = {"input_ids": torch.cat(seg_ids)[None], "labels": torch.cat(seg_labels)[None],
           "position_ids": torch.cat(seg_pos)[None], "attention_mask": additive[None, None]}
    if "background" in batch:  # locality background rows (meft.data.locality): their per-token weight [1, L]
        out["background_weight"] = packed_background_weight(owner, batch["background"], mask)
    return out
