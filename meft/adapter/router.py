"""Key-Experts router: per-token expert scores -> the experts each real token uses and the rows they need.

Owns the routing rule (MEFT, arXiv 2406.04984, "Key-Experts"; docs/design.md "The adapter"), split in two
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

* **Fixed shapes, no host synchronisation** (docs/design.md "One training step"): the kept set always has
  `B` slots (the budget in experts, or min(E, T * k) without a budget, both known on the host from
  shapes). Used slots come first, ascending by expert id; unused slots hold -1, and so do their rows'
  ids. Nothing is removed, so no `.item()`, `nonzero` or boolean-mask index is needed; the host learns
  how many slots are used from the ids themselves when they reach it (asynchronously).
* `gate_weights(x, gate, routing)` (differentiable in x and G): each token's softmax over its routed
  experts, placed in the kept-expert columns, `[T, B]`; zero rows for padding. `token_gate_weights`: the
  same weights per token, `[T, k]` in `top_idx` order (CPU inference reads each token's own rows).
* **Scores once**: `route` computes the expert scores (`router_scores`, no grad) and keeps them on the
  Routing for the gate weights of the same forward (`Routing.take_scores`: only for the same x and gate,
  once); `gate_weights` reads its [T, k] scores from them through an autograd Function whose backward is
  that of `x @ G.T` (no second [T, d] x [d, E] product; a checkpoint recomputation, which re-uses the
  cached Routing, computes them again). On CUDA with a bf16 / fp16 model the product runs in the model's
  dtype with fp32 accumulation and output (`torch.mm(..., out_dtype=float32)`: no fp32 copy of x, G
  rounded to the model's dtype); elsewhere in fp32. Tested against the fp32 scores.
* **Compiled** (`MeftConfig.compile_router`): `route` is a thin shell over `route_core`, the pure tensor work
  with every shape and int decided on the host; `torch.compile` fuses it (dynamic token count, one graph per
  process), with results equal to the eager core (`tests/meft/adapter/test_compiled_router.py`). If the compiler
  gives up (its recompile limit, say), routing continues on the eager core and `COMPILE_FAILED` says why.
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

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from meft.config import budget_experts

__all__ = ["Routing", "route", "route_core", "compiled_route_core", "COMPILE_FAILED", "gate_weights",
           "token_gate_weights", "expert_weights", "init_gate", "update_balance_bias", "router_scores"]

_LOW = (torch.bfloat16, torch.float16)


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
    # (x, gate, scores [T, E] fp32, no grad) of the route call, for the same forward's gate weights
    _scores: tuple | None = field(default=None, repr=False, compare=False)

    def take_scores(self, x: Tensor, gate: Tensor) -> Tensor | None:
        """The scores `route` computed for exactly this x and gate, once (then None: recompute)."""
        kept, self._scores = self._scores, None
        return kept[2] if kept is not None and kept[0] is x and kept[1] is gate else None

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


def router_scores(x: Tensor, gate: Tensor) -> Tensor:
    """x [T, d], gate [E, d] fp32 -> scores [T, E] fp32. CUDA with a bf16 / fp16 x: in x's dtype, fp32
    accumulation and output; otherwise fp32."""
    if x.is_cuda and x.dtype in _LOW:
        return torch.mm(x, gate.to(x.dtype).t(), out_dtype=torch.float32)
    return x.float() @ gate.float().t()


class _TopScores(torch.autograd.Function):
    """(x [T, d], gate [E, d], top_idx [T, k], scores [T, E] or None) -> scores gathered at top_idx [T, k]
    fp32, with the gradients of `router_scores(x, gate).gather(1, top_idx)` (fp32 backward, as autograd of
    `x.float() @ gate.float().t()` computes them)."""
    @staticmethod
    def forward(ctx, x, gate, top_idx, scores):
        ctx.save_for_backward(x, gate, top_idx)
        return (router_scores(x, gate) if scores is None else scores).gather(1, top_idx)

    @staticmethod
    def backward(ctx, g):
        x, gate, top_idx = ctx.saved_tensors
        ds = torch.zeros(x.shape[0], gate.shape[0], dtype=g.dtype, device=g.device).scatter_add_(1, top_idx, g)
        dx = (ds @ gate.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        dgate = (x.float().t() @ ds).t().to(gate.dtype) if ctx.needs_input_grad[1] else None
        return dx, dgate, None, None


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
          max_active_rows: int | None, valid: Tensor | None = None, bias: Tensor | None = None,
          compiled: bool = False) -> Routing:
    """x [T, d], gate [E, d], valid [T] bool (None: every token is real), bias [E] (balance; None: off)
    -> Routing. Deterministic. `max_active_rows=None`: no budget (inference). See the module docstring.
    `compiled=True`: the same tensor work through `torch.compile` (`compiled_route_core`): equal results,
    a few fused kernels instead of ~50 small ops; the first call in a process compiles (seconds)."""
    n_tok, n_experts = x.shape[0], gate.shape[0]
    k = min(experts_per_token, n_experts)
    if max_active_rows is None:
        n_slots = min(n_experts, n_tok * k)  # room for every token's own experts
    else:
        n_slots = budget_experts(max_active_rows, expert_size, n_experts)
    reroute = n_slots < min(n_experts, n_tok * k)  # the budget can bind: re-route among the kept experts
    args = (x, gate, valid, bias, k, expert_size, n_slots, reroute)
    # under a TorchDispatchMode (op and sync counters) torch.compile cannot run: the eager core, same results
    if compiled and not is_in_torch_dispatch_mode(False) and not COMPILE_FAILED:
        try:
            out = compiled_route_core()(*args)
        except Exception as exc:  # noqa: BLE001 - the compiler gave up (e.g. its recompile limit): eager is exact
            COMPILE_FAILED.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            out = route_core(*args)
    else:
        out = route_core(*args)
    top_idx, pos, kept, ids, dropped, load, scores = out
    return Routing(top_idx=top_idx, pos=pos, kept=kept, ids=ids, expert_size=expert_size, dropped=dropped,
                   load=load, _scores=(x, gate, scores))


def route_core(x: Tensor, gate: Tensor, valid: Tensor | None, bias: Tensor | None, k: int, expert_size: int,
               n_slots: int, reroute: bool) -> tuple[Tensor, ...]:
    """The tensor work of `route` (shapes and ints decided by it): (top_idx, pos, kept, ids, dropped, load,
    scores). Pure and fixed-shape, so `torch.compile` can fuse it (`compiled_route_core`)."""
    n_tok, n_experts = x.shape[0], gate.shape[0]
    dev = x.device
    scores = router_scores(x, gate)  # [T, E] fp32
    choice = scores if bias is None else scores + bias.float()  # [T, E] what experts are chosen by
    top_s, top_idx = torch.topk(choice, k, dim=1)  # [T, k] descending; ties -> lower index
    if bias is not None:
        top_s = scores.gather(1, top_idx)  # [T, k] the unbiased scores give the weights
    real = (torch.ones(n_tok, dtype=torch.bool, device=dev) if valid is None
            else valid.to(device=dev, dtype=torch.bool))  # [T]
    pad = ~real[:, None]  # [T, 1]
    # a fill, not a product: a padding position's scores may be non-finite, and 0 * nan = nan
    g = torch.softmax(top_s, dim=1).masked_fill(pad, 0.0)  # [T, k]
    w = expert_weights(top_idx, g, n_experts)  # [E] total weight of the real tokens
    load = expert_weights(top_idx, real[:, None].expand(n_tok, k).float(), n_experts)  # [E] real tokens per expert
    chosen = load > 0  # [E]
    # stable descending sort: equal weights keep ascending index order -> ties to the lower index;
    # experts no real token chose sort last (-1), even if a softmax weight underflowed to 0
    order = torch.sort(torch.where(chosen, w, -1.0), descending=True, stable=True).indices[:n_slots]  # [B]
    used = chosen.index_select(0, order)  # [B] a used slot (an unused one otherwise)
    slots = torch.sort(torch.where(used, order, n_experts)).values  # [B] used ascending, then E
    kept = slots.masked_fill(slots == n_experts, -1)  # [B]
    col = torch.full((n_experts + 1,), -1, dtype=torch.int64, device=dev)  # [E + 1], E: the unused
    col.scatter_(0, slots, torch.arange(n_slots, device=dev))  # unused slots land in column E
    slot_of = col[:n_experts]  # [E] slot of each expert, -1 when not kept
    pos = slot_of[top_idx]  # [T, k] (a Python-scalar store into col would be a synced H2D copy)
    # [] share of real assignments whose expert was not kept (load counts each real token's k assignments)
    dropped = load.masked_fill(slot_of >= 0, 0.0).sum() / load.sum().clamp(min=1.0)
    if reroute:
        top_idx = torch.topk(choice.masked_fill(slot_of < 0, float("-inf")), k, dim=1).indices  # [T, k]
        pos = slot_of[top_idx]  # -1 only where fewer than k experts are kept
    pos = pos.masked_fill(pad, -1)  # padding routes nowhere
    # kept * S + j is negative exactly for unused slots (kept = -1, j < S): clamp them to -1
    ids = torch.arange(expert_size, device=dev).add(kept[:, None], alpha=expert_size).clamp_(min=-1).view(-1)
    return top_idx, pos, kept, ids, dropped, load, scores


_COMPILED: list = []  # the process's one compiled route_core (compiled lazily, on first use)
# why torch.compile gave up on route_core in this process (then routing stays eager: the same results); empty: it
# has not. Many routing configurations in one process (tests) can exceed dynamo's recompile limit, for example.
COMPILE_FAILED: list[str] = []


def compiled_route_core():
    """`route_core` under `torch.compile` (dynamic token count, one graph), built once per process."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(route_core, dynamic=True, fullgraph=True))
    return _COMPILED[0]


def token_gate_weights(x: Tensor, gate: Tensor, routing: Routing) -> Tensor:
    """Differentiable gate weights [T, k] fp32 of each token's routed experts (`routing.top_idx`): the
    softmax over those that have a slot; 0 for the others and for padding rows."""
    top_s = _TopScores.apply(x, gate, routing.top_idx, routing.take_scores(x, gate))  # [T, k]
    off = routing.pos < 0  # [T, k]
    # a finite floor, not -inf: a row with no slot (padding) stays finite, so no nan reaches backward
    s = top_s.masked_fill(off, torch.finfo(torch.float32).min)  # [T, k]
    return torch.softmax(s, dim=1).masked_fill(off, 0.0)  # [T, k]


def gate_weights(x: Tensor, gate: Tensor, routing: Routing) -> Tensor:
    """Differentiable gate weights [T, B] fp32: each token's softmax over its routed experts that have a
    slot, placed in their kept-expert columns. Padding rows (and slot-less experts) get 0."""
    g = token_gate_weights(x, gate, routing)  # [T, k]
    out = torch.zeros(x.shape[0], routing.kept.numel(), dtype=g.dtype, device=g.device)  # [T, B]
    return out.scatter_add(1, routing.pos.clamp(min=0), g)
