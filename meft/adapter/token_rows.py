"""The adapter's math on the CPU where each token reads only its own experts' rows (numba kernels).

Owns:
* `token_rows_delta(x, table, experts, weights, ...)`: inference (no autograd) straight from a layer's
  whole resident row table; plain twin `reference_token_rows_delta` (torch gathers and einsums);
* `token_rows_adapter(x, rows, coef, slots, ...)`: training, an autograd Function over a micro-batch's
  gathered rows [R, 2d], with the same inputs and gradients as `meft.adapter.functional.sparse_adapter`
  (its dense twin) plus each token's slots.
Either takes `KeyedRows` (generated keys, values [R, d]; `meft.adapter.keys`) where it takes [k | v] rows:
the kernels read keys and values from two arrays (values at a column offset of d, or 0).

Why: the general path computes dense [T, R] products over all of a forward's rows (the micro-batch's
R = max_active_rows in training; in inference the union of every token's experts, up to all N rows of a
layer), although each token uses only its experts_per_token x expert_size rows: 64 of the quick start's
R = 1,024 (training) or ~4,096 (scoring 32 questions). On a GPU dense products are what the hardware is
for; on a 2-core CPU they were 20% of a quick-start training step (5 products of [326, 576] x [576, 1024]
per layer) and, in scoring, more than the backbone (32 prompts x ~20 tokens against ~4,096 rows is
~180 GFLOP over 30 layers). Here a token costs 64 x 2d x 2 FLOPs per product instead of R x 2d x 2.

Used on the CPU only, with fp32 activations and rows (bf16 tables in inference), when there is no
`active_per_token` top-K; `MeftRuntime.token_rows = False` turns both off (the tests' twin switch).

Math, per token t with slots (or experts) c and weights w_c, rows r of c = [k_r | v_r], h = k_r . x_t:
    forward   y_t      = scale * sum_c w_c * sum_r relu(h) * v_r
    backward  da_r     = scale * gy_t . v_r                   (only where h > 0: relu' = 0 elsewhere)
              dw_c     = sum_r da_r * relu(h)                  dx_t = sum_{c,r} w_c * da_r * k_r
              dv_r    += scale * w_c * relu(h) * gy_t          dk_r += w_c * da_r * x_t  (over tokens)
the dense twin's sums in another order (fp32, equal to rounding). The row gradients are reduced per slot
(one thread owns a slot's rows, tokens in ascending order), so results do not depend on thread count.
Kernels use numba's default thread count (all cores): they run on the compute thread, in place of
torch's matmuls.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from meft.adapter.keys import KeyedRows
from offload.kernels import as_numpy, load_f32

__all__ = ["token_rows_delta", "reference_token_rows_delta", "token_rows_adapter", "TokenRowsFunction"]

_NO_H = np.zeros((0, 0), dtype=np.float32)  # "do not keep h" (inference)


def _split(table, d: int):
    """(keys array, values array, values' column offset) of a contiguous [N, 2d] table or a `KeyedRows`."""
    if isinstance(table, KeyedRows):
        if table.keys.shape != table.values.shape or table.values.shape[1] != d:
            raise ValueError(f"keys {tuple(table.keys.shape)} and values {tuple(table.values.shape)} must both "
                             f"be [N, d = {d}]")
        return as_numpy(table.keys), as_numpy(table.values), 0
    if table.shape[1] != 2 * d:
        raise ValueError(f"table width {table.shape[1]} != 2 * d = {2 * d}")
    arr = as_numpy(table)
    return arr, arr, d


def token_rows_delta(x: Tensor, table, experts: Tensor, weights: Tensor, *, expert_size: int,
                     scale: float) -> Tensor:
    """Inference: x [T, d], table [N, 2d] float32 or bfloat16 (rows [k | v]) or `KeyedRows` (keys, values
    [N, d] each), experts [T, k] int64 (-1: none), weights [T, k] -> y [T, d] float32. CPU tensors; no autograd."""
    n_tok, d = x.shape
    if isinstance(table, KeyedRows):
        table = KeyedRows(table.keys.detach().contiguous(), table.values.detach().contiguous())
    else:
        table = table.detach().contiguous()
    keys, values, voff = _split(table, d)
    out = torch.empty(n_tok, d, dtype=torch.float32)  # [T, d]
    _forward(as_numpy(x.detach().float().contiguous()), keys, values, voff,
             as_numpy(experts.contiguous()), as_numpy(weights.detach().float().contiguous()), expert_size,
             np.float32(scale), _NO_H, as_numpy(out))
    return out


def reference_token_rows_delta(x: Tensor, table: Tensor, experts: Tensor, weights: Tensor, *, expert_size: int,
                               scale: float) -> Tensor:
    """Plain twin of `token_rows_delta`: gather each token's rows, relu(K x) * w, then @ V."""
    n_tok, d = x.shape
    if isinstance(table, KeyedRows):
        table = torch.cat([table.keys.float(), table.values.float()], dim=1)  # [N, 2d]
    ids = (experts.clamp(min=0)[:, :, None] * expert_size + torch.arange(expert_size)).reshape(n_tok, -1)  # [T, kS]
    w = torch.where(experts >= 0, weights.float(), 0.0).repeat_interleave(expert_size, dim=1)  # [T, kS]
    rows = table.float()[ids]  # [T, kS, 2d]
    a = torch.relu(torch.einsum("td,trd->tr", x.float(), rows[:, :, :d])) * w  # [T, kS]
    return scale * torch.einsum("tr,trd->td", a, rows[:, :, d:])  # [T, d]


class TokenRowsFunction(torch.autograd.Function):
    """(x [T, d], rows [R, 2d], coef [T, n], slots [T, k]) -> y [T, d]; grads dx, drows [R, 2d] ([dK | dV];
    dK zero with frozen keys), dcoef [T, n] (non-zero only in each token's own slots: the only entries
    `gate_weights` reads back). fp32 CPU tensors."""

    @staticmethod
    def forward(ctx, x, rows, coef, slots, expert_size: int, scale: float, train_keys: bool, keys=None):
        n_tok, d = x.shape
        k = slots.shape[1]
        x = x.contiguous()
        weights = torch.where(slots >= 0, coef.gather(1, slots.clamp(min=0)), 0.0).float().contiguous()  # [T, k]
        h = torch.empty(n_tok, k * expert_size, dtype=torch.float32)  # [T, kS] pre-activations, for backward
        y = torch.empty(n_tok, d, dtype=torch.float32)  # [T, d]
        k_arr, v_arr, voff = _split(rows if keys is None else KeyedRows(keys, rows), d)
        _forward(as_numpy(x), k_arr, v_arr, voff, as_numpy(slots), as_numpy(weights), expert_size,
                 np.float32(scale), as_numpy(h), as_numpy(y))
        ctx.save_for_backward(x, rows, slots, weights, h, keys)
        ctx.expert_size, ctx.scale, ctx.train_keys, ctx.n_slots = expert_size, scale, train_keys, coef.shape[1]
        return y

    @staticmethod
    def backward(ctx, gy):
        x, rows, slots, weights, h, keys = ctx.saved_tensors
        S, scale = ctx.expert_size, np.float32(ctx.scale)
        k_arr, v_arr, voff = _split(rows if keys is None else KeyedRows(keys, rows), x.shape[1])
        gy = gy.float().contiguous()  # [T, d]
        dx = torch.empty_like(x)  # [T, d]
        dweights = torch.empty_like(weights)  # [T, k]
        dh = torch.empty_like(h)  # [T, kS]
        _backward_tokens(k_arr, v_arr, voff, as_numpy(slots), as_numpy(weights), S, scale, as_numpy(h), as_numpy(gy),
                         as_numpy(dx), as_numpy(dweights), as_numpy(dh))
        drows = dcoef = None
        if ctx.needs_input_grad[1]:
            drows = torch.empty_like(rows)  # [R, 2d], or dV [R, d] with generated keys
            offsets, order = _assignments_by_slot(as_numpy(slots), ctx.n_slots)
            _backward_rows(as_numpy(x), as_numpy(slots), as_numpy(weights), S, scale, as_numpy(h), as_numpy(dh),
                           as_numpy(gy), offsets, order, ctx.train_keys and keys is None, voff, as_numpy(drows))
        if ctx.needs_input_grad[2]:
            dcoef = torch.zeros(x.shape[0], ctx.n_slots, dtype=torch.float32)  # [T, n]
            dcoef.scatter_add_(1, slots.clamp(min=0), dweights)  # slot -1 adds its 0 to column 0
        return dx, drows, dcoef, None, None, None, None, None


def token_rows_adapter(x: Tensor, rows: Tensor, coef: Tensor, slots: Tensor, *, expert_size: int,
                       scale: float = 1.0, train_keys: bool = True, keys: Tensor | None = None) -> Tensor:
    """Training on the CPU: `sparse_adapter(x, rows, coef, ...)` reading each token's own rows. slots [T, k]
    int64: the columns of coef (kept-expert slots) token t routes to (`Routing.pos`), -1: none."""
    return TokenRowsFunction.apply(x, rows, coef, slots, expert_size, float(scale), train_keys, keys)


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _forward(x, keys, values, voff, experts, weights, expert_size, scale, h_out, y):
    n_tok, d = x.shape
    keep_h = h_out.shape[0] > 0
    for t in prange(n_tok):
        for j in range(d):
            y[t, j] = 0.0
        for c in range(experts.shape[1]):
            e = experts[t, c]
            base = c * expert_size
            if e < 0:
                if keep_h:
                    for s in range(expert_size):
                        h_out[t, base + s] = 0.0
                continue
            w = weights[t, c]
            for s in range(expert_size):
                r = e * expert_size + s
                h = np.float32(0.0)
                for j in range(d):  # k_r . x_t (fastmath: a vectorised reduction)
                    h += x[t, j] * load_f32(keys, r, j)
                if keep_h:
                    h_out[t, base + s] = h
                if h > 0.0 and w != 0.0:
                    a = scale * w * h
                    for j in range(d):
                        y[t, j] += a * load_f32(values, r, voff + j)


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _backward_tokens(keys, values, voff, slots, weights, expert_size, scale, h, gy, dx, dweights, dh):
    n_tok, d = gy.shape
    for t in prange(n_tok):
        for j in range(d):
            dx[t, j] = 0.0
        for c in range(slots.shape[1]):
            b = slots[t, c]
            base = c * expert_size
            acc = np.float32(0.0)
            if b >= 0:
                w = weights[t, c]
                for s in range(expert_size):
                    r = b * expert_size + s
                    hv = h[t, base + s]
                    g = np.float32(0.0)
                    if hv > 0.0:  # relu' = 0 elsewhere: no da needed
                        da = np.float32(0.0)
                        for j in range(d):
                            da += gy[t, j] * values[r, voff + j]
                        da *= scale
                        acc += da * hv
                        g = da * w
                        for j in range(d):
                            dx[t, j] += g * keys[r, j]
                    dh[t, base + s] = g
            else:
                for s in range(expert_size):
                    dh[t, base + s] = 0.0
            dweights[t, c] = acc


@njit(cache=True, nogil=True)
def _assignments_by_slot(slots, n_slots):
    """CSR of the (token, c) assignments per slot, tokens ascending: (offsets [n + 1], order [A] = t * k + c)."""
    n_tok, k = slots.shape
    offsets = np.zeros(n_slots + 1, dtype=np.int64)
    for t in range(n_tok):
        for c in range(k):
            if slots[t, c] >= 0:
                offsets[slots[t, c] + 1] += 1
    for b in range(n_slots):
        offsets[b + 1] += offsets[b]
    fill = offsets[:-1].copy()
    order = np.empty(offsets[n_slots], dtype=np.int64)
    for t in range(n_tok):
        for c in range(k):
            b = slots[t, c]
            if b >= 0:
                order[fill[b]] = t * k + c
                fill[b] += 1
    return offsets, order


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _backward_rows(x, slots, weights, expert_size, scale, h, dh, gy, offsets, order, train_keys, voff, drows):
    d = x.shape[1]
    k = slots.shape[1]
    for b in prange(offsets.shape[0] - 1):  # one thread owns a slot's rows: no two threads add to one row
        for s in range(expert_size):
            for j in range(drows.shape[1]):
                drows[b * expert_size + s, j] = 0.0
        for q in range(offsets[b], offsets[b + 1]):
            t = order[q] // k
            c = order[q] % k
            w = weights[t, c]
            for s in range(expert_size):
                hv = h[t, c * expert_size + s]
                if hv > 0.0:
                    r = b * expert_size + s
                    a = scale * w * hv
                    for j in range(d):
                        drows[r, voff + j] += a * gy[t, j]
                    if train_keys:
                        g = dh[t, c * expert_size + s]
                        for j in range(d):
                            drows[r, j] += g * x[t, j]
