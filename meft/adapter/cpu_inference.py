"""The adapter's output for inference on the CPU: each token reads only its own experts' rows.

Owns `token_rows_delta(x, table, experts, weights, ...)` (a numba kernel over tokens) and its plain twin
`reference_token_rows_delta` (torch: gather each token's rows, then two batched products).

Why: outside training there is no row budget, so a forward's rows are the union of every token's
experts. The general path (`meft.adapter.functional.sparse_adapter`) gathers that union ([R, 2d], up to
all N rows of a layer), converts it to the compute dtype and computes the dense [T, R] products, although
each token uses only its experts_per_token x expert_size rows (64 of the default 4,096). On a prompt of
T tokens that is T x R x 2d x 2 FLOPs per layer: for 32 quick-start questions (~640 prompt tokens,
R ~ 4,096) about 180 GFLOP over 30 layers, ~2 s on two cores, most of the adapter's scoring cost. Here
each token reads its own rows straight from the resident table (bf16 or fp32, no gather, no conversion):
T x 64 x 2d x 2 FLOPs. Used by `MeftRuntime.per_token_rows` when the forward needs no gradient, the
device is the CPU, the rows are resident (`InferenceRows`) and there is no `active_per_token` top-K;
everything else takes the general path, which is also the twin the tests compare against
(tests/meft/adapter/test_cpu_inference.py).

Math (per token t, its routed experts e_c with gate weights w_c, rows r of expert e_c = [k_r | v_r]):
    y_t = scale * sum_c w_c * sum_{r in e_c} relu(k_r . x_t) * v_r
the same sum as the general path in another order (fp32 accumulation, equal to rounding).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from offload.kernels import as_numpy, load_f32, run_kernel

__all__ = ["token_rows_delta", "reference_token_rows_delta"]


def token_rows_delta(x: Tensor, table: Tensor, experts: Tensor, weights: Tensor, *, expert_size: int,
                     scale: float) -> Tensor:
    """x [T, d] float32, table [N, 2d] float32 or bfloat16 (each row [k | v]), experts [T, k] int64 (each in
    [0, N / expert_size)), weights [T, k] float32 (0: the expert adds nothing, e.g. padding) -> y [T, d]
    float32. CPU tensors; no autograd (inference only)."""
    n_tok, d = x.shape
    if table.shape[1] != 2 * d:
        raise ValueError(f"table width {table.shape[1]} != 2 * d = {2 * d}")
    x = x.detach().float().contiguous()
    out = torch.empty(n_tok, d, dtype=torch.float32)  # [T, d]
    work = n_tok * experts.shape[1] * expert_size * table.shape[1] * table.element_size()
    run_kernel(_token_rows_delta, work, as_numpy(x), as_numpy(table.detach().contiguous()),
               as_numpy(experts.contiguous()), as_numpy(weights.detach().float().contiguous()),
               expert_size, np.float32(scale), as_numpy(out))
    return out


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _token_rows_delta(x, table, experts, weights, expert_size, scale, out):
    n_tok, d = x.shape
    for t in prange(n_tok):
        for j in range(d):
            out[t, j] = 0.0
        for c in range(experts.shape[1]):
            w = weights[t, c]
            if w == 0.0:
                continue
            first = experts[t, c] * expert_size
            for r in range(first, first + expert_size):
                h = np.float32(0.0)
                for j in range(d):  # k_r . x_t (fastmath: a vectorised reduction)
                    h += x[t, j] * load_f32(table, r, j)
                if h > 0.0:
                    a = scale * w * h
                    for j in range(d):
                        out[t, j] += a * load_f32(table, r, d + j)


def reference_token_rows_delta(x: Tensor, table: Tensor, experts: Tensor, weights: Tensor, *, expert_size: int,
                               scale: float) -> Tensor:
    """Plain twin of `token_rows_delta`: gather each token's rows, relu(K x) * w, then @ V."""
    n_tok, d = x.shape
    k = experts.shape[1]
    ids = (experts[:, :, None] * expert_size + torch.arange(expert_size)).reshape(n_tok, -1)  # [T, k * S]
    rows = table.float()[ids]  # [T, k * S, 2d]
    h = torch.einsum("td,trd->tr", x.float(), rows[:, :, :d])  # [T, k * S]
    a = torch.relu(h) * weights.float().repeat_interleave(expert_size, dim=1)  # [T, k * S]
    assert a.shape[1] == k * expert_size
    return scale * torch.einsum("tr,trd->td", a, rows[:, :, d:])  # [T, d]
