"""Sparse adapter math over gathered rows (fast path) and its dense masked reference twin.

Owns `y = scale * sum_{i active} coef_i(x) * relu(k_i . x) * v_i` for one layer:

* `sparse_adapter(x, rows, coef, ...)`: a `torch.autograd.Function` over the gathered active rows
  `rows [R, 2d] = [K_A | V_A]`, or with generated keys (`MeftConfig.key_source`) `KeyedRows(K_A, V_A)`
  whose row gradient is dV [R, d] only (the keys are not a row: they never go back). Backward returns the
  row gradient as one contiguous `[R, 2d]` tensor
  (`[dK | dV]`, what the scheduler sends back to the host in one copy), plus dx and dcoef. It saves
  `h = x @ K_A.T` ([T, R]) instead of the activations so backward needs no extra matmul. With frozen
  keys (`train_keys=False`, `MeftConfig.key_lr=0`) dK is not computed and is sent as zeros: the host
  AdamW then never moves the keys (zero gradient, zero moments -> a zero step).
* `dense_adapter(x, keys, values, gate, routing, ...)`: all N rows on the device as ordinary tensors,
  masked to the same active set, plain autograd. The reference the fast path is tested against.

Plain-PyTorch equivalent of the fast path (what the Function computes, xformers-style):
    h = x @ rows[:, :d].T                                  # [T, R]
    a = relu(h) * coef.repeat_interleave(S, dim=1)         # [T, R]   coef [T, n], R = n * S
    a = a * topk_mask(a, active_per_token)                 # optional exact per-token top-K
    y = scale * a @ rows[:, d:]                            # [T, d]
"""

from __future__ import annotations

import torch
from torch import Tensor

from meft.adapter.keys import KeyedRows
from meft.adapter.router import Routing, gate_weights
from meft.adapter.token_rows import token_rows_adapter

__all__ = ["SparseAdapterFunction", "sparse_adapter", "dense_adapter", "topk_mask"]


def topk_mask(a: Tensor, k: int | None) -> Tensor | None:
    """Bool mask [T, R] of each token's k largest entries of a (None when k is None or >= R)."""
    if k is None or k >= a.shape[1]:
        return None
    idx = torch.topk(a, k, dim=1).indices  # [T, k]
    return torch.zeros_like(a, dtype=torch.bool).scatter_(1, idx, True)


def _expand(coef: Tensor, expert_size: int) -> Tensor:
    return coef.repeat_interleave(expert_size, dim=1)  # [T, n] -> [T, n * S]


class SparseAdapterFunction(torch.autograd.Function):
    """(x [T, d], rows [R, 2d], coef [T, n]) -> y [T, d]; grads dx, drows [R, 2d], dcoef [T, n].
    With `keys` [R, d] (generated, no gradient) rows are the values [R, d] and drows is dV [R, d]."""
    @staticmethod
    def forward(ctx, x, rows, coef, expert_size: int, scale: float, active_per_token, train_keys: bool = True,
                keys=None):
        d = x.shape[1]
        k_rows, v_rows = (rows[:, :d], rows[:, d:]) if keys is None else (keys, rows)  # [R, d] each
        h = x @ k_rows.t()  # [T, R]
        T, R = h.shape
        # relu(h) * coef.repeat_interleave(S, dim=1), without materialising the repeated coef
        a = (torch.relu(h).view(T, R // expert_size, expert_size) * coef.to(x.dtype)[:, :, None]).view(T, R)
        mask = topk_mask(a, active_per_token)
        if mask is not None:
            a = a * mask
        y = a @ v_rows  # [T, d]
        if scale != 1.0:
            y = y * scale
        ctx.save_for_backward(x, rows, coef, h, mask, keys)
        ctx.expert_size, ctx.scale, ctx.train_keys = expert_size, scale, train_keys
        return y

    @staticmethod
    def backward(ctx, gy):
        x, rows, coef, h, mask, keys = ctx.saved_tensors
        S, d = ctx.expert_size, x.shape[1]
        k_rows, v_rows = (rows[:, :d], rows[:, d:]) if keys is None else (keys, rows)  # [R, d] each
        T, R = h.shape
        gy = gy.to(x.dtype) * ctx.scale  # [T, d]
        coef_c = _expand(coef.to(x.dtype), S)  # [T, R]
        act = torch.relu(h)  # [T, R]
        da = gy @ v_rows.t()  # [T, R]
        if mask is not None:
            da = da * mask
        dx = drows = dcoef = None
        dh = da * coef_c * (h > 0)  # [T, R]
        if ctx.needs_input_grad[1]:
            a = act * coef_c if mask is None else act * coef_c * mask  # [T, R]
            dv = a.t() @ gy  # [R, d]
            if keys is not None:
                drows = dv  # generated keys: the values are the whole row
            else:
                dk = dh.t() @ x if ctx.train_keys else torch.zeros_like(dv)  # [R, d]
                drows = torch.cat([dk, dv], dim=1)  # [R, 2d] = [dK | dV], one block
        if ctx.needs_input_grad[0]:
            dx = dh @ k_rows  # [T, d]
        if ctx.needs_input_grad[2]:
            dcoef = (da * act).view(T, R // S, S).sum(-1).to(coef.dtype)  # [T, n]
        return dx, drows, dcoef, None, None, None, None, None


def sparse_adapter(x: Tensor, rows, coef: Tensor, *, expert_size: int, scale: float = 1.0,
                   active_per_token: int | None = None, train_keys: bool = True, slots: Tensor | None = None) -> Tensor:
    """Fast path. x [T, d], rows [R, 2d] (same dtype as x) or `KeyedRows` (generated keys [R, d] + values
    [R, d]: the row gradient is dV [R, d]), coef [T, R / expert_size] -> [T, d].
    `train_keys=False`: the row gradient's key half is zero (frozen keys). `slots` [T, k] (`Routing.pos`,
    fp32 CPU tensors, no active_per_token): each token reads only its own slots' rows
    (`meft.adapter.token_rows`; same values and gradients)."""
    keys = None
    if isinstance(rows, KeyedRows):
        keys, rows = rows.keys, rows.values
        if keys.shape != rows.shape or rows.shape[1] != x.shape[1]:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(rows.shape)} must both be [R, d = "
                             f"{x.shape[1]}]")
    elif rows.shape[1] != 2 * x.shape[1]:
        raise ValueError(f"rows width {rows.shape[1]} != 2 * d = {2 * x.shape[1]}")
    if slots is not None:
        if active_per_token is not None:
            raise ValueError("slots (per-token rows) with active_per_token: the top-K needs the dense path")
        return token_rows_adapter(x, rows, coef, slots, expert_size=expert_size, scale=scale, train_keys=train_keys,
                                  keys=keys)
    return SparseAdapterFunction.apply(x, rows, coef, expert_size, float(scale), active_per_token, train_keys, keys)


def dense_adapter(x: Tensor, keys: Tensor, values: Tensor, gate: Tensor, routing: Routing, *,
                  scale: float = 1.0, active_per_token: int | None = None, train_keys: bool = True) -> Tensor:
    """Reference: keys/values [N, d] (all rows), gate [E, d]; masked to routing's active set.
    `train_keys=False`: keys are used detached (no key gradient), as the fast path's frozen keys."""
    if not train_keys:
        keys = keys.detach()
    n_exp, S = gate.shape[0], routing.expert_size
    coef = gate_weights(x, gate, routing)  # [T, n_kept]
    coef_full = torch.zeros(x.shape[0], n_exp + 1, dtype=coef.dtype, device=x.device)  # column E: unused slots
    slots = torch.where(routing.kept >= 0, routing.kept, n_exp)  # [B]
    coef_full = coef_full.index_copy(1, slots, coef)[:, :n_exp]  # [T, E]
    a = torch.relu(x @ keys.t()) * _expand(coef_full.to(x.dtype), S)  # [T, N]
    mask = topk_mask(a, active_per_token)
    if mask is not None:
        a = a * mask
    return scale * (a @ values)  # [T, d]
