"""SparseFFNAdapter: `base_ffn(x) + scale * sparse_adapter(x)` for one decoder layer.

Owns the module that replaces a layer's FFN (or, for inlined FFNs such as OPT's, its output
projection, with the FFN input captured by a forward pre-hook on the input projection). The module
holds the router gate `G_l` ([E, d], fp32, trainable, on the device) and delegates everything about
rows -- routing (which tokens are real, the budget), cache, fetches, gradient pushes, inference reads --
to the runtime (`meft.adapter.runtime.MeftRuntime.request_rows`). The adapter's rows never live in this
module. `train_keys=False` (MeftConfig.key_lr=0) freezes the rows' keys: their gradient is zero. The
buffer `expert_bias` ([E] fp32) is the router's balance bias (MeftConfig.balance="bias"; moved by the
runtime after each optimizer step, zeros and unused otherwise).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from meft.adapter.functional import sparse_adapter
from meft.adapter.router import gate_weights, token_gate_weights
from meft.adapter.token_rows import token_rows_delta

__all__ = ["SparseFFNAdapter"]


class SparseFFNAdapter(nn.Module):
    """Wraps `base` (the FFN or its output projection); adds the sparse adapter of layer `index`."""
    def __init__(self, base: nn.Module, *, index: int, layer: int, d: int, gate: Tensor,
                 expert_size: int, scale: float, active_per_token: int | None,
                 compute_dtype: torch.dtype | None, train_keys: bool = True):
        super().__init__()
        self.base = base
        self.index = index      # position among adapters (= scheduler layer id)
        self.layer = layer      # decoder-layer index in the model
        self.d = d
        self.gate = nn.Parameter(gate.float())  # [E, d] fp32 router gate
        self.register_buffer("expert_bias", torch.zeros(gate.shape[0], device=gate.device))  # [E] fp32
        self.expert_size, self.scale = expert_size, float(scale)
        self.active_per_token = active_per_token
        self.compute_dtype = compute_dtype
        self.train_keys = train_keys
        self.runtime = None     # MeftRuntime, set by wrap (plain attribute, not a submodule)
        self._tapped: Tensor | None = None  # split targets: FFN input captured at the input module
        self._request = None  # split targets: the rows requested when the input was captured
        self.enabled = True

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, index={self.index}, experts={self.gate.shape[0]}, "
                f"expert_size={self.expert_size}, scale={self.scale}")

    def tap(self, module, args) -> None:
        """Forward pre-hook for split targets: the FFN input, seen by the input module. The rows are
        requested here, before the FFN runs, so they travel while it computes."""
        self._tapped = args[0]
        self._request = self._request_rows(args[0])

    def forward(self, *args, **kwargs):
        if self._tapped is not None:
            x, request = self._tapped, self._request
        else:
            x = args[0]
            request = self._request_rows(x)  # routing and fetch issued before the base FFN (docs/design.md)
        self._tapped = self._request = None
        out = self.base(*args, **kwargs)  # the FFN computes while the rows travel
        if request is None:
            return out
        y = self._delta(x, *request)
        if isinstance(out, tuple):
            return (out[0] + y.to(out[0].dtype),) + out[1:]
        return out + y.to(out.dtype)

    def _request_rows(self, x: Tensor):
        """(x2 [T, d], routing, wait, per_token) with the fetch issued, or None when there is nothing to add.
        per_token: wait() gives the layer's whole row table and each token reads its own rows (CPU inference)."""
        if not self.enabled or self.runtime is None:
            return None
        x2 = x.reshape(-1, self.d)  # [T, d]
        if x2.shape[0] == 0:
            return None
        if self.runtime.capturing:  # background text for sparse_update's idf: record the input, add nothing
            self.runtime.capture(self, x2)
            return None
        per_token = self.runtime.per_token_rows(self, x2)  # CPU inference: (routing, the whole row table)
        if per_token is not None:
            routing, table = per_token
            return x2, routing, lambda: table, True
        return (x2, *self.runtime.request_rows(self, x2), False)

    def delta(self, x: Tensor) -> Tensor:
        """scale * sum_i coef_i relu(k_i . x) v_i over this micro-batch's active rows. x [..., d]."""
        request = self._request_rows(x)
        return torch.zeros_like(x) if request is None else self._delta(x, *request)

    def _delta(self, x: Tensor, x2: Tensor, routing, wait, per_token: bool) -> Tensor:
        shape = x.shape
        if per_token:  # no gradient, CPU: each token reads its own rows of the table [N, 2d]
            weights = token_gate_weights(x2, self.gate, routing)  # [T, k] fp32; 0 for padding
            y = token_rows_delta(x2, wait(), routing.top_idx, weights, expert_size=self.expert_size,
                                 scale=self.scale)  # [T, d] fp32
            return y.to(x.dtype).reshape(shape)
        rows = wait()  # [R, 2d] compute dtype, device: the only point that waits for the fetch
        xc = x2.to(rows.dtype)
        coef = gate_weights(x2, self.gate, routing)  # [T, n_kept] fp32, grads to x and G; 0 for padding
        slots = routing.pos if self.runtime.token_rows_apply(self, xc, rows) else None  # CPU: per-token rows
        y = sparse_adapter(xc, rows, coef, expert_size=self.expert_size, scale=self.scale,
                           active_per_token=self.active_per_token, train_keys=self.train_keys, slots=slots)  # [T, d]
        self.runtime.locality.add(self, y)  # a training forward with a background weight: its locality term
        return y.reshape(shape)
