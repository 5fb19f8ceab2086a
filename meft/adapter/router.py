"""Key-Experts router: per-token expert scores -> the micro-batch's active expert set under a row budget.

Owns the routing rule (MEFT, arXiv 2406.04984, "Key-Experts"), split in two halves so that gradient
checkpointing can recompute the differentiable half without re-routing:

* `route(x, gate, ...)` (discrete, no grad): each token scores the E experts (`x @ G.T`), keeps its top
  `experts_per_token`; the active set is the union of the tokens' experts. When the union has more rows
  than `max_active_rows`, experts are kept by **total routing weight** (sum over tokens of their softmax
  gate weight for that expert), ties broken by lower expert index -- never by truncating sorted ids
  (MEFT's `idx[:S]` bias towards low ids). Tokens keep their weights for kept experts only (dropped
  experts contribute zero; weights are not renormalised).
* **Fixed shapes, no host synchronisation** (DESIGN.md "One training step"): the kept set always has
  `B = budget_experts` slots. The used slots come first, ascending by expert id; unused slots (fewer
  experts chosen than the budget) hold -1, and so do their rows' ids. Nothing is removed, so no
  `.item()`, `nonzero` or boolean-mask index is needed; the host learns how many slots are used from
  the ids themselves when they reach it (asynchronously), and only those rows cross PCIe.
* `gate_weights(x, gate, routing)` (differentiable in x and G): the per-token softmax weights scattered
  into the kept-expert columns, `[T, n_kept]`.

Plain-torch equivalent of the active set, for reference:
    w = zeros(E).index_add_(0, top_idx.flatten(), softmax(top_scores).flatten())
    kept = argsort(-w, stable=True)[:budget] if union > budget else union;  ids = rows of sorted(kept)
    (then padded with -1 to `budget` experts / `budget * expert_size` rows)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from meft.config import budget_experts

__all__ = ["Routing", "route", "gate_weights", "expert_weights", "init_gate"]


@dataclass
class Routing:
    """Discrete result of routing one micro-batch through one layer (all on x's device)."""

    top_idx: Tensor   # [T, k] int64 expert chosen by each token (by score, descending)
    pos: Tensor       # [T, k] int64 slot of that expert in `kept`, -1 when dropped by the budget
    kept: Tensor      # [B] int64 kept experts: used slots ascending, then -1 (unused slots)
    ids: Tensor       # [B * expert_size] int64 row ids of the slots: active rows ascending, then -1
    expert_size: int

    @property
    def n_rows(self) -> int:
        """Active rows (used slots x expert_size). Reading it synchronises: for reports and tests only."""
        return int((self.ids >= 0).sum())

    def active_kept(self) -> Tensor:
        """[n] the used slots' experts, ascending (synchronises: for reports, tests and reference twins)."""
        return self.kept[self.kept >= 0]

    def active_ids(self) -> Tensor:
        """[n * expert_size] the active row ids, ascending (synchronises, as active_kept)."""
        return self.ids[self.ids >= 0]


def init_gate(n_experts: int, d: int, seed: int, std: float = 0.02) -> Tensor:
    """Seeded N(0, std) router gate [E, d] fp32 (distinct scores so tokens spread over experts)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_experts, d, generator=g) * std  # [E, d]


def _top(x: Tensor, gate: Tensor, k: int) -> tuple[Tensor, Tensor]:
    scores = x.float() @ gate.float().t()  # [T, E] fp32 routing, whatever the compute dtype
    top_s, top_idx = torch.topk(scores, k, dim=1)  # [T, k] descending; ties -> lower index
    return top_s, top_idx


def expert_weights(top_idx: Tensor, g: Tensor, n_experts: int) -> Tensor:
    """Total routing weight per expert: sum over tokens of their gate weight for it. -> [E] fp32."""
    w = torch.zeros(n_experts, dtype=torch.float32, device=g.device)
    return w.index_add_(0, top_idx.reshape(-1), g.reshape(-1).float())


@torch.no_grad()
def route(x: Tensor, gate: Tensor, *, experts_per_token: int, expert_size: int,
          max_active_rows: int) -> Routing:
    """x [T, d], gate [E, d] -> Routing. Deterministic; see the module docstring for the rule."""
    n_experts = gate.shape[0]
    k = min(experts_per_token, n_experts)
    top_s, top_idx = _top(x, gate, k)  # [T, k]
    g = torch.softmax(top_s, dim=1)  # [T, k]
    w = expert_weights(top_idx, g, n_experts)  # [E]; > 0 exactly for the experts some token chose
    budget = budget_experts(max_active_rows, expert_size, n_experts)
    # stable descending sort: equal weights keep ascending index order -> ties to the lower index
    order = torch.sort(w, descending=True, stable=True).indices[:budget]  # [B] the budget's best experts
    used = w.index_select(0, order) > 0  # [B] chosen by some token (an unused slot otherwise)
    slots = torch.sort(torch.where(used, order, n_experts)).values  # [B] used ascending, then E
    kept = torch.where(slots < n_experts, slots, -1)  # [B]
    col = torch.full((n_experts + 1,), -1, dtype=torch.int64, device=x.device)  # [E + 1], E: the unused
    col.scatter_(0, slots, torch.arange(budget, device=x.device))  # unused slots land in column E
    pos = col[:n_experts][top_idx]  # [T, k] (a Python-scalar store into col would be a synced H2D copy)
    rows = kept[:, None] * expert_size + torch.arange(expert_size, device=x.device)  # [B, S]
    ids = torch.where(kept[:, None] >= 0, rows, -1).reshape(-1)  # [B * S]
    return Routing(top_idx=top_idx, pos=pos, kept=kept, ids=ids, expert_size=expert_size)


def gate_weights(x: Tensor, gate: Tensor, routing: Routing) -> Tensor:
    """Differentiable gate weights [T, n_kept] fp32: softmax over each token's top experts, placed in
    the kept-expert columns (dropped experts: weight discarded)."""
    scores = x.float() @ gate.float().t()  # [T, E]
    g = torch.softmax(scores.gather(1, routing.top_idx), dim=1)  # [T, k]
    keep = routing.pos >= 0  # [T, k]
    g = g * keep
    out = torch.zeros(x.shape[0], routing.kept.numel(), dtype=g.dtype, device=g.device)  # [T, n]
    return out.scatter_add(1, routing.pos.clamp(min=0), g)
