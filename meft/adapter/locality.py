"""The locality term: how far the adapter moves the model on tokens the run does not teach.

Owns `LocalityTerm` (`model.meft.locality`), the per-token background weight of a training forward and the
term computed from it. Why: the adapter's rows also fire on inputs the run never taught, and there they
overwrite what the model knew. A locality loss in the spirit of WISE (arXiv 2405.14768) puts background
questions (built-in world-fact questions outside the run, no labels) into every micro-batch and pushes the
adapter output on their tokens towards zero, so rows that fire there learn to stay silent while the
language-model loss teaches the facts (`MeftConfig.locality_weight`, `locality_margin`, `locality_background`;
`meft train` builds the batches, `meft.data.locality`).

For the training forward that follows `set_weight(w)` (w [T] fp32 over the forward's flattened tokens,
batch-major as the adapters flatten their input), every adapted layer l adds, from its adapter output
delta_h [T, d] (what is added to the FFN output),

    term_l = sum_t w_t * relu(||delta_h_t|| - margin)^2

and `term()` is the mean of term_l over the layers that added one: a differentiable scalar for the loss.
The weight carries the normalisation (`meft.data.locality` gives each background token 1 / their count, so
the term is a mean over background tokens, and a token shared by several background rows -- a packed
prompt prefix -- the number of rows it stands for), so gradient accumulation stays exact: split a
micro-batch and give each part its share of the same weights. Every operation is a device op with fixed
shapes: no sync, no boolean-mask indexing (the adapter path's rule, docs/design.md "One training step").
Nothing is added outside a training forward (eval, no_grad, gradient-checkpoint recomputation). Non-reentrant
gradient checkpointing keeps the term exact (its backward recomputes the layer, and the term's ops with it, so
the recomputation saves what the forward saved); reentrant checkpointing runs layers without gradients, which
`add` refuses.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LocalityTerm", "locality_term"]


def locality_term(y: Tensor, weight: Tensor, margin: float = 0.0) -> Tensor:
    """sum_t weight_t * relu(||y_t|| - margin)^2 for y [T, d] and weight [T] fp32 (fp32 scalar).
    margin 0: sum_t weight_t ||y_t||^2 (no square root, so no infinite gradient at y = 0, where values start);
    margin > 0: the norm is taken of the squared norm clamped at margin^2, which is the same where the norm
    exceeds the margin and has zero gradient elsewhere."""
    sq = y.float().pow(2).sum(-1)  # [T]
    if margin > 0:
        sq = (sq.clamp_min(margin * margin).sqrt() - margin).pow(2)  # [T] relu(||y|| - margin)^2
    return (weight * sq).sum()


class LocalityTerm:
    """See the module docstring. One per runtime; `open` / `close` bracket each training forward."""
    def __init__(self, margin: float = 0.0):
        self.margin = float(margin)
        self._pending: Tensor | None = None  # [T] fp32 weight for the next training forward
        self._weight: Tensor | None = None   # [T] fp32 weight of the running training forward
        self._terms: list[Tensor] = []        # per-layer terms of the latest training forward
        self._active = False                  # inside a training forward
        self.last: Tensor | None = None       # the latest `with_term`'s term, detached (for metrics)

    def set_weight(self, weight: Tensor | None) -> None:
        """The per-token background weight [T] (float, on the compute device) of the next training forward;
        None: that forward adds no term. Any shape [..] flattens to [T] (e.g. [B, L] for a batch)."""
        if weight is not None and not weight.is_floating_point():
            raise TypeError(f"locality weight: a float tensor over the forward's tokens, got dtype {weight.dtype}; "
                            "fix: flags.float() / count (meft.data.locality gives it)")
        self._pending = None if weight is None else weight.reshape(-1).float()

    def open(self) -> None:
        """A training forward starts: it takes the pending weight; the previous forward's terms are dropped."""
        self._weight, self._pending, self._terms, self._active = self._pending, None, [], True

    def close(self) -> None:
        self._active = False

    def add(self, adapter, y: Tensor) -> None:
        """Adapter output y [T, d] of `adapter` in the running training forward: record its term."""
        w = self._weight
        # non-reentrant checkpoint recomputation (inside backward, after the forward closed) must save the tensors
        # the forward saved: the term's ops run again there, and their result is dropped
        recompute = not self._active and torch._C._current_graph_task_id() != -1 and torch.is_grad_enabled()
        if w is None or not (self._active or recompute):
            return
        if w.shape[0] != y.shape[0]:
            raise ValueError(
                f"locality weight has {w.shape[0]} entries but adapter {adapter.index} (layer {adapter.layer}) "
                f"sees {y.shape[0]} tokens: set model.meft.locality.set_weight() before each training forward "
                "with one weight per token of that forward's input (batch x length, flattened)")
        if not y.requires_grad:  # reentrant checkpointing runs the layer without gradients: the term would be inert
            raise RuntimeError(
                f"adapter {adapter.index} (layer {adapter.layer}): its output has no gradient in this training "
                "forward, so the locality term could not train it (reentrant gradient checkpointing runs layers "
                "without gradients); fix: non-reentrant checkpointing (use_reentrant=False, what meft train uses) "
                "or none")
        term = locality_term(y, w.to(y.device), self.margin)
        if self._active:
            self._terms.append(term)

    def term(self) -> Tensor | None:
        """The latest training forward's term, averaged over adapted layers (differentiable fp32 scalar);
        None when it had no weight."""
        if self._weight is None:
            return None
        if not self._terms:
            return torch.zeros((), device=self._weight.device)
        return torch.stack(self._terms).mean()

    def with_term(self, loss: Tensor, weight: float) -> tuple[Tensor, Tensor | None]:
        """(loss + weight * term, the term detached) for the latest training forward; (loss, None) without one.
        What a loop (or a Trainer's compute_loss) backpropagates."""
        term = self.term()
        if term is None:
            return loss, None
        self.last = term.detach()
        return loss + weight * term, self.last
