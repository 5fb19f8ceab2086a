"""Causal-LM loss that only pays for the LM head where a label exists.

With completion-only labels (QA) most positions carry no label, yet `model(**batch, labels=...)`
computes vocabulary logits for every position: for SmolLM2-135M (49k vocabulary) the LM head is ~40%
of the forward FLOPs. `causal_lm_loss` asks the model for logits only at the positions that predict a
labelled token (`logits_to_keep` as a tensor of positions, which transformers' decoder models accept)
and computes the same mean cross-entropy. Models whose forward has no `logits_to_keep` fall back to
the plain HF loss. The plain twin is `model(**batch).loss` (a test compares them).

`step_loss` is the loss a training micro-batch uses: when a fused backbone optimizer (Lomo / AdaLomo)
trains the LM head, `meft.lomo.lm_loss`, whose head runs in vocabulary chunks and, under Lomo, updates the
head's rows inside backward, so no [V, d] head gradient ever exists (for a 128k vocabulary at d=4096 in
bf16 that is 1 GiB of GPU memory); otherwise `causal_lm_loss`. Both are the same mean cross-entropy.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from meft.data.records import IGNORE_INDEX
from meft.lomo.head import lm_loss, lm_loss_supported

__all__ = ["causal_lm_loss", "step_loss", "IGNORE_INDEX"]



def _accepts_logits_to_keep(model) -> bool:
    cached = getattr(model, "_meft_logits_to_keep", None)
    if cached is None:
        cached = "logits_to_keep" in inspect.signature(model.forward).parameters
        model._meft_logits_to_keep = cached
    return cached


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens (labels == IGNORE_INDEX are skipped).

    `batch`: input_ids / attention_mask / labels, each [B, T] (or a packed batch, `meft.data.packed`:
    a 4-D attention mask and position_ids as well). Equal (to fp32 rounding) to
    `model(**batch).loss` for HF causal LMs.
    """
    labels = batch["labels"]                                  # [B, T]
    if not _accepts_logits_to_keep(model):
        return model(**batch).loss
    targets = labels[:, 1:]                                   # [B, T-1]: position p predicts token p+1
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # [K] positions with a label
    if keep.numel() == 0:
        raise ValueError("batch has no labelled token (every label is -100); fix: check the data's "
                         "completions and max_length")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits      # [B, K, V]
    picked = targets[:, keep]                                 # [B, K]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), picked.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def step_loss(model, batch: dict[str, torch.Tensor], backbone_optimizer=None) -> torch.Tensor:
    """The loss of one training micro-batch (see the module docstring). `backbone_optimizer`: the run's
    Lomo / AdaLomo (`model.meft.backbone_optimizer`), or None for a frozen backbone."""
    head = model.get_output_embeddings() if backbone_optimizer is not None else None
    if head is not None and head.weight.requires_grad and lm_loss_supported(model):
        return lm_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids"), opt=backbone_optimizer)
    return causal_lm_loss(model, batch)
