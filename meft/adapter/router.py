"""Key-Experts router: per-token expert scores -> the experts each real token uses and the rows they need.

Owns the routing rule (MEFT, arXiv 2406.04984, "Key-Experts"; DESIGN.md "The adapter"), split in two
halves so that gradient checkpointing can recompute the differentiable half without re-routing:

* `route(x, gate, ..., valid=...)` (discrete, no grad): each token scores the E experts (`x @ G.T`) and
  keeps its top `experts_per_token`. Only **real tokens** route: positions where `valid` is False
  (padding, outside `attention_mask`) choose nothing, count toward nothing and get no weight.

  - **Training** (`max_active_rows` given): the micro-batch's active set is the union of the real
    tokens' experts, capped by the row budget. When the union is larger, experts are kept by **total
    routing weight** (sum over real tokens of their softmax gate weight for that expert), ties to the
    lower expert index -- never by truncating sorted ids (MEFT's `idx[:S]` bias towards low ids). A token
    that lost experts is then **re-routed**: it takes its top experts among the kept ones, so it always
    has `experts_per_token` experts (fewer only when fewer are kept) and its gate weights are the softmax
    over them. The share of real assignments the budget dropped is `Routing.dropped`.
  - **Outside training** (`max_active_rows=None`): no budget. Each token keeps its own top experts
    whatever else is in the batch, so its output never depends on its batch; the rows used are the union.

* **Fixed shapes, no host synchronisation** (DESIGN.md "One training step"): the kept set always has
  `B` slots (the budget in experts, or min(E, T * k) without a budget, both known on the host from
  shapes). Used slots come first, ascending by expert id; unused slots hold -1, and so do their rows'
  ids. Nothing is removed, so no `.item()`, `nonzero` or boolean-mask index is needed; the host learns
  how many slots are used from the ids themselves when they reach it (asynchronously).
* `gate_weights(x, gate, routing)` (differentiable in x and G): each token's softmax over its routed
  experts, placed in the kept-expert columns, `[T, B]`; zero rows for padding. `token_gate_weights`: the
  same weights per token, `[T, k]` in `top_idx` order (CPU inference reads each token's own rows).
* **Balance** (`MeftConfig.balance="bias"`, DeepSeek-V3's auxiliary-loss-free balancing): a per-expert
  bias `b` [E] is added to the scores for *choosing* experts only (top-k, the re-routing); gate weights
  stay the softmax of the unbiased scores. `Routing.load` (real tokens choosing each expert) is what the
  runtime accumulates to move `b` after each optimizer step (`update_balance_bias`).

Plain-torch equivalent, for reference (real = valid tokens, budget binding):
    top = topk(x @ G.T, k);  w = zeros(E).index_add_(0, top.idx[real], softmax(top.s[real]))
    kept = argsort(-w, stable=True)[:B] (chosen experts only);  ids = rows of sorted(kept), then -1
    top = topk((x @ G.T).masked_fill(~isin(arange(E), kept), -inf), k)   # re-routed among the kept
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from meft.config import budget_experts

__all__ = ["Routing", "route", "gate_weights", "token_gate_weights", "expert_weights", "init_gate",
           "update_balance_bias"]


@dataclass
class Routing:
    """Discrete result of routing one forward's tokens through one layer (all on x's device)."""

    top_idx: Tensor   # [T, k] int64 experts each token routes to (re-routed among the kept ones)
    pos: Tensor       # [T, k] int64 slot of that expert in `kept`; -1: no weight (padding, or not kept)
    kept: Tensor      # [B] int64 kept experts: used slots ascending, then -1 (unused slots)
    ids: Tensor       # [B * expert_size] int64 row ids of the slots: active rows ascending, then -1
    expert_size: int
    dropped: Tensor | None = None  # [] fp32 share of real tokens' top-k assignments the budget dropped
    load: Tensor | None = None     # [E] fp32 real tokens that chose each expert (before the budget)

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


def init_gate(keys: Tensor, expert_size: int) -> Tensor:
    """Router gate [E, d] fp32 aligned with the keys (MEFT): row e is the unit-norm mean of expert e's key
    rows, so at step 0 a token's score for expert e is the mean pre-activation `k_i . x` of its rows
    over the norm of their mean key -- routing already prefers the experts whose neurons respond to the
    token, and no expert is favoured for a larger mean key. keys: [N, d] (N = E * expert_size)."""
    n, d = keys.shape
    if n % expert_size:
        raise ValueError(f"keys have {n} rows, not a multiple of expert_size={expert_size}")
    mean = keys.float().reshape(n // expert_size, expert_size, d).mean(dim=1)  # [E, d]
    return torch.nn.functional.normalize(mean, dim=1)  # [E, d]


def expert_weights(top_idx: Tensor, g: Tensor, n_experts: int) -> Tensor:
    """Total routing weight per expert: sum over tokens of their gate weight for it. -> [E] fp32."""
    w = torch.zeros(n_experts, dtype=torch.float32, device=g.device)
    return w.index_add_(0, top_idx.reshape(-1), g.reshape(-1).float())


@torch.no_grad()
def update_balance_bias(bias: Tensor, load: Tensor, rate: float) -> None:
    """DeepSeek-V3's bias update, in place: b_e += rate * sign(mean load - load_e) (an under-used expert
    is chosen more easily next step). bias, load: [E] fp32 on one device; no host synchronisation."""
    bias.add_(torch.sign(load.mean() - load), alpha=rate)


@torch.no_grad()
def route(x: Tensor, gate: Tensor, *, experts_per_token: int, expert_size: int,
          max_active_rows: int | None, valid: Tensor | None = None, bias: Tensor | None = None) -> Routing:
    """x [T, d], gate [E, d], valid [T] bool (None: every token is real), bias [E] (balance; None: off)
    -> Routing. Deterministic. `max_active_rows=None`: no budget (inference). See the module docstring."""
    n_tok, n_experts = x.shape[0], gate.shape[0]
    dev = x.device
    k = min(experts_per_token, n_experts)
    scores = x.float() @ gate.float().t()  # [T, E] fp32 routing, whatever the compute dtype
    choice = scores if bias is None else scores + bias.float()  # [T, E] what experts are chosen by
    top_idx = torch.topk(choice, k, dim=1).indices  # [T, k] descending; ties -> lower index
    top_s = scores.gather(1, top_idx)  # [T, k] the unbiased scores give the weights
    real = (torch.ones(n_tok, dtype=torch.bool, device=dev) if valid is None
            else valid.to(device=dev, dtype=torch.bool))  # [T]
    real_tk = real[:, None].expand(n_tok, k)  # [T, k]
    # where, not a product: a padding position's scores may be non-finite, and 0 * nan = nan
    g = torch.where(real_tk, torch.softmax(top_s, dim=1), 0.0)  # [T, k]
    w = expert_weights(top_idx, g, n_experts)  # [E] total weight of the real tokens
    load = expert_weights(top_idx, real_tk.float(), n_experts)  # [E] real tokens choosing each expert
    chosen = load > 0  # [E]
    if max_active_rows is None:
        n_slots = min(n_experts, n_tok * k)  # room for every token's own experts
    else:
        n_slots = budget_experts(max_active_rows, expert_size, n_experts)
    # stable descending sort: equal weights keep ascending index order -> ties to the lower index;
    # experts no real token chose sort last (-1), even if a softmax weight underflowed to 0
    order = torch.sort(torch.where(chosen, w, -1.0), descending=True, stable=True).indices[:n_slots]  # [B]
    used = chosen.index_select(0, order)  # [B] a used slot (an unused one otherwise)
    slots = torch.sort(torch.where(used, order, n_experts)).values  # [B] used ascending, then E
    kept = torch.where(slots < n_experts, slots, -1)  # [B]
    col = torch.full((n_experts + 1,), -1, dtype=torch.int64, device=dev)  # [E + 1], E: the unused
    col.scatter_(0, slots, torch.arange(n_slots, device=dev))  # unused slots land in column E
    slot_of = col[:n_experts]  # [E] slot of each expert, -1 when not kept
    pos = slot_of[top_idx]  # [T, k] (a Python-scalar store into col would be a synced H2D copy)
    n_real = real.sum().float() * k
    dropped = (real_tk & (pos < 0)).sum().float() / n_real.clamp(min=1.0)  # [] share of real assignments
    if n_slots < min(n_experts, n_tok * k):  # the budget can bind: re-route among the kept experts
        top_idx = torch.topk(torch.where(slot_of >= 0, choice, float("-inf")), k, dim=1).indices  # [T, k]
        pos = slot_of[top_idx]  # -1 only where fewer than k experts are kept
    pos = torch.where(real_tk, pos, -1)  # padding routes nowhere
    rows = kept[:, None] * expert_size + torch.arange(expert_size, device=dev)  # [B, S]
    ids = torch.where(kept[:, None] >= 0, rows, -1).reshape(-1)  # [B * S]
    return Routing(top_idx=top_idx, pos=pos, kept=kept, ids=ids, expert_size=expert_size, dropped=dropped,
                   load=load)


def token_gate_weights(x: Tensor, gate: Tensor, routing: Routing) -> Tensor:
    """Differentiable gate weights [T, k] fp32 of each token's routed experts (`routing.top_idx`): the
    softmax over those that have a slot; 0 for the others and for padding rows."""
    scores = x.float() @ gate.float().t()  # [T, E]
    on = routing.pos >= 0  # [T, k]
    # a finite floor, not -inf: a row with no slot (padding) stays finite, so no nan reaches backward
    s = torch.where(on, scores.gather(1, routing.top_idx), torch.finfo(torch.float32).min)  # [T, k]
    return torch.where(on, torch.softmax(s, dim=1), 0.0)  # [T, k]


def gate_weights(x: Tensor, gate: Tensor, routing: Routing) -> Tensor:
    """Differentiable gate weights [T, B] fp32: each token's softmax over its routed experts that have a
    slot, placed in their kept-expert columns. Padding rows (and slot-less experts) get 0."""
    g = token_gate_weights(x, gate, routing)  # [T, k]
    out = torch.zeros(x.shape[0], routing.kept.numel(), dtype=g.dtype, device=g.device)  # [T, B]
    return out.scatter_add(1, routing.pos.clamp(min=0), g)
