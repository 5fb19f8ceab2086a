"""The training step `meft plan` measures, built from a model config alone (no host stores).

Owns:
* `build_model(hf_config, dtype)`: the HF causal LM, called inside a FakeTensorMode (fake CPU tensors:
  nothing is allocated; CPU kernels' shapes, e.g. SDPA's flash-attention-for-CPU, are what a GPU's
  flash kernel saves, unlike the meta device's math path with its [B, H, T, T] scores).
* `PlanRuntime`: stands in for `meft.adapter.runtime.MeftRuntime` during a plan. Same device-side behaviour:
  per-layer row buffers `rows_dev [max_rows, 2d]` (wire dtype) and ids `[max_rows]` made at wrap
  time; each adapter call routes (the [T, E] score temporaries), takes R = budget rows (the worst
  case: the row budget is full) as `rows_dev[:R].to(compute dtype)` -- a copy only when the dtypes
  differ, a view otherwise, exactly as the runtime does -- caches them until their gradient is pushed
  (checkpoint recomputation reuses them), and on push casts the gradient into a lazily made
  `grads_dev [max_rows, 2d]` when it is not already wire dtype (as TransferScheduler does). With generated
  keys (`MeftConfig.key_source`) the rows are values [R, d] and each call adds the [R, d] keys the device
  generates and keeps for backward. No fetch,
  no RowStore, no scheduler: those live in host RAM.
* `attach_meft` (the dense baseline is `meft.adapter.dense`), and a fake-tensor-safe AdamW step
  (`adamw_states`, `adamw_step`; torch.optim.AdamW reads its step count with .item(), which fake
  tensors cannot answer).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from meft.adapter.dense import freeze
from meft.adapter.keys import KeyedRows
from meft.adapter.layer import SparseFFNAdapter
from meft.adapter.locality import LocalityTerm
from meft.adapter.router import Routing
from meft.adapter.runtime import in_backward
from meft.adapter.targets import find_targets, hidden_size_of
from meft.config import MeftConfig

__all__ = ["build_model", "PlanRuntime", "attach_meft", "adamw_states", "adamw_step"]


def build_model(hf_config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `hf_config` in `dtype` (call inside FakeTensorMode to allocate nothing)."""
    from transformers import AutoModelForCausalLM

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=dtype)
    finally:
        torch.set_default_dtype(prev)
    return model.train()


class PlanRuntime:
    """See the module docstring. `buffers` are the device tensors that exist before any step."""
    def __init__(self, config: MeftConfig, adapters, d: int, wire: torch.dtype):
        self.config, self.adapters, self.wire = config, adapters, wire
        self.capturing = False  # the adapters ask (MeftRuntime.capturing: sparse_update's background capture)
        self.locality = LocalityTerm(config.locality_margin)  # the adapters add to it; no weight set: inert
        self.max_rows = config.budget_rows  # = wrap's scheduler max_rows
        # lookahead: the runtime reserves 2 x max_rows live rows per layer (prefetch + misses)
        live = self.max_rows * (2 if config.prefetch == "lookahead" else 1)
        self.d = d
        width = config.row_width(d)  # d (values) with generated keys, else 2d
        self.rows_dev = [torch.zeros(live, width, dtype=wire) for _ in adapters]  # [M, W]
        self.ids_dev = [torch.zeros(live, dtype=torch.int64) for _ in adapters]  # [M]
        self.grads_dev: list[Tensor | None] = [None] * len(adapters)
        self._cache: dict[int, tuple[Routing, Tensor]] = {}

    @property
    def buffers(self) -> list[Tensor]:
        return self.rows_dev + self.ids_dev

    @torch.no_grad()
    def _routing(self, adapter, x2: Tensor) -> Routing:
        c = self.config
        scores = x2.float() @ adapter.gate.float().t()  # [T, E] as router.route
        k = min(c.experts_per_token, adapter.gate.shape[0])
        top_s, top_idx = torch.topk(scores, k, dim=1)  # [T, k]
        torch.softmax(top_s, dim=1)
        n_kept = c.budget_experts
        kept = torch.arange(n_kept)  # [n]
        return Routing(top_idx=top_idx, pos=top_idx.remainder(n_kept), kept=kept,
                       ids=torch.arange(n_kept * c.expert_size), expert_size=c.expert_size)

    def per_token_rows(self, adapter, x2: Tensor) -> None:
        """As MeftRuntime.per_token_rows, for a device step: never (CPU inference only)."""
        return None

    def token_rows_apply(self, adapter, x2: Tensor, rows: Tensor) -> bool:
        """As MeftRuntime.token_rows_apply, for a device step: the dense products, as a GPU computes them."""
        return False

    def request_rows(self, adapter, x2: Tensor):
        """As MeftRuntime.request_rows: (routing, wait); nothing travels here, so wait returns at once."""
        routing, rows = self.rows_for(adapter, x2)
        return routing, lambda: rows

    def rows_for(self, adapter, x2: Tensor) -> tuple[Routing, Tensor]:
        idx = adapter.index
        if in_backward() and idx in self._cache:
            return self._cache[idx]  # checkpoint recomputation: no re-route, no second fetch
        routing = self._routing(adapter, x2)
        n = routing.ids.numel()
        compute = adapter.compute_dtype or x2.dtype
        rows = self.rows_dev[idx][:n].to(compute).detach().requires_grad_(True)  # [R, 2d]
        rows.register_post_accumulate_grad_hook(lambda leaf: self._push(idx, leaf, n))
        if self.config.generated_keys:  # keys made on the device per fetch, kept for backward: [R, d]
            rows = KeyedRows(torch.zeros(n, self.d, dtype=compute), rows)
        self._cache[idx] = (routing, rows)
        return routing, rows

    def _push(self, idx: int, leaf: Tensor, n: int) -> None:
        g = leaf.grad  # [R, 2d] compute dtype
        if g.dtype != self.wire or not g.is_contiguous():
            if self.grads_dev[idx] is None:
                self.grads_dev[idx] = torch.empty(self.max_rows, g.shape[1], dtype=self.wire)
            self.grads_dev[idx][:n].copy_(g)  # cast to the wire dtype, as TransferScheduler does
        leaf.grad = None
        self._cache.pop(idx, None)


def attach_meft(model: nn.Module, config: MeftConfig) -> PlanRuntime:
    """Put SparseFFNAdapters (router gates on the device) into `model` as meft.wrap does, minus stores."""
    targets = find_targets(model, config.target_module)
    chosen = [targets[i] for i in config.layer_indices(len(targets))]
    d = hidden_size_of(model)
    if config.backbone == "frozen":
        freeze(model)
    adapters = []
    for i, t in enumerate(chosen):
        gate = torch.zeros(config.n_experts, d)  # [E, d] fp32
        ad = SparseFFNAdapter(getattr(t.parent, t.out_name), index=i, layer=t.layer, d=d, gate=gate,
                              expert_size=config.expert_size, scale=config.scale,
                              active_per_token=config.active_per_token,
                              compute_dtype=config.compute)
        setattr(t.parent, t.out_name, ad)
        if t.split:
            getattr(t.parent, t.in_name).register_forward_pre_hook(ad.tap)
        adapters.append(ad)
    rt = PlanRuntime(config, adapters, d, config.wire)
    for ad in adapters:
        ad.runtime = rt
    return rt


def adamw_states(params, tracker=None) -> list[tuple[Tensor, Tensor]]:
    """Steady-state AdamW moments (fp32, as mixed-precision AdamW keeps them) for `params`."""
    states = [(torch.zeros(p.shape), torch.zeros(p.shape)) for p in params]
    if tracker is not None:
        tracker.mark_optimizer_state(*[t for s in states for t in s])
    return states


@torch.no_grad()
def adamw_step(params, states, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, t: int = 2) -> None:
    """One AdamW update per parameter (fp32 math, written back in the param dtype); frees grads."""
    b1, b2 = betas
    for p, (m, v) in zip(params, states):
        if p.grad is None:
            continue
        g = p.grad.float()
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / (1 - b2**t) ** 0.5).add_(eps)
        p32 = p.float() if p.dtype != torch.float32 else p
        p32.addcdiv_(m, denom, value=-lr / (1 - b1**t))
        if p32 is not p:
            p.copy_(p32)
        del g, denom, p32
    for p in params:
        p.grad = None
