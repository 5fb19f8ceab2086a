"""SparseUpdate: which active rows a training micro-batch may update (`MeftConfig.sparse_update`).

Owns sparse memory finetuning (Lin et al. 2025, arXiv 2510.15103; docs/design.md "The adapter") for
one wrapped model: each training micro-batch updates only the rows of the t active experts per layer with the
highest tf x idf, where

* tf = the micro-batch's real tokens routed to the expert (after the budget's re-routing: the assignments that
  produce its row gradients), and
* idf = log((B + 1) / (bg + 1)), bg = how many of B background tokens route to it (eval routing, no budget).

The background tokens' FFN inputs are captured once, at wrap, from the model as it is then (`capture_background`;
with values at 0 that is the base model), kept on the device ([B, d] per layer), and routed through the
*current* gate (and balance bias) at each step's first routing of the layer, so the idf follows a training
router; it does not follow how earlier layers' trained adapters (or a trained backbone) move the background's
hidden states. The mask [R] bool (fixed shape, no host sync) travels with the row gradients
(`push_grads(keep=)`); masked rows get no update at all. With grad_accum_steps > 1 the mask is per micro-batch
(a row is updated when any micro-batch of the step keeps it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from meft.adapter.router import Routing

__all__ = ["SparseUpdate"]


class SparseUpdate:
    """The background, its per-step idf and the update masks of one runtime. `route_eval(adapter, x [B, d])`
    routes without a budget through the adapter's current gate and bias (the runtime's eval routing)."""

    def __init__(self, t: int, route_eval: Callable[[object, Tensor], Routing]):
        self.t = t
        self._route_eval = route_eval
        self.background: dict[int, Tensor] = {}  # layer -> [B, d] background FFN inputs
        self._capture: dict[int, list[Tensor]] | None = None  # capture_background is running
        self._idf: dict[int, tuple[int, Tensor]] = {}  # layer -> (step, [E] fp32 idf of that step)
        self._updated: dict[int, Tensor] = {}  # layer -> [] rows the latest micro-batch updates

    # ---- the background ---------------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        """capture_background is running: adapters hand their FFN input here and add nothing."""
        return self._capture is not None

    def capture(self, adapter, x2: Tensor) -> None:
        """During capture_background: keep adapter's FFN input x2 [T, d] (detached)."""
        self._capture.setdefault(adapter.index, []).append(x2.detach().clone())

    @torch.no_grad()
    def capture_background(self, model, rows: list[Tensor], adapters, device, forward_kw: dict) -> None:
        """Run `model` (eval mode, no grad) over the background token rows (each [1, L] int64) and keep every
        adapted layer's FFN inputs, [B, d] per layer (B = the tokens). The adapters add nothing meanwhile (they
        only capture), so this is the model as it is without its adapter."""
        was = model.training
        self._capture = {}
        model.eval()
        try:
            for r in rows:
                model(input_ids=r.to(device), **forward_kw)
            captured = self._capture
        finally:
            self._capture = None
            model.train(was)
        missing = [ad.index for ad in adapters if ad.index not in captured]
        if missing:
            raise RuntimeError(f"capture_background: adapters {missing} saw no background token; the model's "
                               "forward did not reach their FFN")
        self.background = {i: torch.cat(xs) for i, xs in captured.items()}  # [B, d] per layer
        self._idf.clear()

    # ---- per step ---------------------------------------------------------------------------------
    def idf(self, adapter, step: int) -> Tensor:
        """[E] fp32 idf of the layer's experts: log((B + 1) / (bg_e + 1)), bg_e = background tokens routed
        to e by the current gate and bias (eval routing: no budget). Once per step and layer; no sync."""
        idx = adapter.index
        cached = self._idf.get(idx)
        if cached is not None and cached[0] == step:
            return cached[1]
        xb = self.background.get(idx)
        if xb is None:
            raise RuntimeError(
                f"adapter {idx} (layer {adapter.layer}): sparse_update={self.t} needs the background text's FFN "
                "inputs, and none were captured (meft.wrap found no tokenizer for this model); fix: call "
                "model.meft.capture_background(model, meft.data.background.background_token_ids(tokenizer, "
                "config.sparse_background_tokens)) before training, or pass meft.wrap(model, config, "
                "tokenizer=tok)")
        bg = self._route_eval(adapter, xb).load  # [E] fp32 background tokens per expert
        idf = torch.log((xb.shape[0] + 1.0) / (bg + 1.0))  # [E]
        self._idf[idx] = (step, idf)
        return idf

    def mask(self, adapter, routing: Routing, step: int) -> Tensor:
        """[R] bool: the rows of the `t` kept experts with the highest tf x idf (tf > 0), in the order of
        routing.ids. Fixed shapes: top-k over the B slots, scatter, repeat; no host sync."""
        kept = routing.kept  # [B] experts of the slots, -1 unused
        n_slots, used = kept.numel(), kept >= 0
        on = routing.pos >= 0  # [T, k] assignments that reach a slot (real tokens, kept experts)
        tf = torch.zeros(n_slots, dtype=torch.float32, device=kept.device)
        tf.index_add_(0, routing.pos.clamp(min=0).reshape(-1), on.float().reshape(-1))  # [B] tokens per slot
        idf = self.idf(adapter, step).index_select(0, kept.clamp(min=0))  # [B]
        score = torch.where(used & (tf > 0), tf * idf, -1.0)  # [B]; unused or unrouted slots rank last
        top = torch.topk(score, min(self.t, n_slots)).indices  # [t]
        keep_slot = torch.zeros(n_slots, dtype=torch.bool, device=kept.device).scatter_(0, top, True)
        keep_slot &= score >= 0  # never an unused or unrouted slot (their rows get no useful gradient)
        keep = keep_slot.repeat_interleave(routing.expert_size)  # [B * S] as routing.ids
        self._updated[adapter.index] = keep.sum()
        return keep

    def updated_rows(self) -> float:
        """Rows the latest micro-batch updates, averaged over layers (synchronises: for logging)."""
        return float(torch.stack(list(self._updated.values())).float().mean()) if self._updated else 0.0
