"""MeftOptimizer: the adapter-side `torch.optim.Optimizer` of a wrapped model (`model.meft.optimizer`).

Owns the optimizer a plain PyTorch loop (and any `torch.optim.lr_scheduler`) drives:

* param group 0 ("router"): the router gates G_l, updated here on the device with AdamW;
* param group 1 ("adapter_rows"): no tensors; the runtime copies its `lr` / `weight_decay` / betas / eps
  into every layer's `offload.SparseAdamW` when a step opens (its first training forward), and the
  scheduler fixes them per update when it queues that update.

`step()` updates the gates, then calls the runtime's `end_step()` (-> `scheduler.finish_step()`); the
next training forward begins the next step. `state_dict()` holds the router AdamW state plus each
layer's SparseAdamW state (which references -- does not copy -- the host stores).
With clip != "none" the gates are clipped by their own norm (torch's `clip_grad_norm_`); the rows are
clipped by the scheduler. Under torch.distributed the gates' gradients are averaged across ranks first
(`meft.adapter.distributed.average_gradients`); the rows' are combined by the scheduler.
"""

from __future__ import annotations

import torch

from meft.adapter.distributed import average_gradients

__all__ = ["MeftOptimizer"]


class MeftOptimizer(torch.optim.Optimizer):
    """See the module docstring. Built by `meft.wrap`."""

    def __init__(self, runtime, sparse_optimizers, gates, *, router_lr: float, adapter_lr: float, weight_decay: float,
                 betas=(0.9, 0.999), eps: float = 1e-8, clip: str = "none", max_norm: float = 1.0):
        defaults = dict(lr=router_lr, betas=tuple(betas), eps=eps, weight_decay=0.0)
        groups = [
            dict(params=list(gates), lr=router_lr, weight_decay=0.0, name="router"),
            dict(params=[], lr=adapter_lr, weight_decay=weight_decay, name="adapter_rows"),
        ]
        super().__init__(groups, defaults)
        self.runtime = runtime  # its end_step() ends the step; sync_to_host / stores_changed around state
        self.sparse_optimizers = list(sparse_optimizers)  # SparseAdamW per adapter layer (their state_dicts)
        self.clip, self.max_norm = clip, float(max_norm)

    @property
    def router_group(self) -> dict:
        return self.param_groups[0]

    @property
    def rows_group(self) -> dict:
        return self.param_groups[1]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._router_step(self.router_group)
        self.runtime.end_step()
        return loss

    def _router_step(self, group: dict) -> None:
        average_gradients(group["params"])  # data parallel: the ranks' mean (no-op in one process)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if self.clip != "none":
            torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            t = float(st["step"])
            grad = p.grad.float()
            p.mul_(1.0 - lr * wd)  # decoupled weight decay (torch.optim.AdamW)
            st["exp_avg"].lerp_(grad, 1.0 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
            denom = (st["exp_avg_sq"].sqrt() / (1.0 - b2**t) ** 0.5).add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-lr / (1.0 - b1**t))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the router gates' grads. Row gradients are pushed to the host during backward and
        consumed by step(); there is nothing to clear for them."""
        super().zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        self.runtime.sync_to_host()
        sd = super().state_dict()
        sd["adapter_rows"] = [opt.state_dict() for opt in self.sparse_optimizers]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        rows = sd.pop("adapter_rows", None)
        super().load_state_dict(sd)
        if rows is not None:
            opts = self.sparse_optimizers
            if len(rows) != len(opts):
                raise ValueError(f"state_dict has {len(rows)} adapter layers, this model has {len(opts)}; "
                                 f"load a state_dict saved from the same MeftConfig.layers")
            for opt, s in zip(opts, rows):
                opt.load_state_dict(s)
            self.runtime.stores_changed()  # device copies (resident twin, inference rows) follow
