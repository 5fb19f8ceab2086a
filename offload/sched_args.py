"""Argument checks and the clipping rule of the TransferScheduler (kept apart to keep scheduler.py short)."""

from __future__ import annotations

import math

import torch

__all__ = ["CLIP_MODES", "check_extend", "check_grads", "check_ids", "check_live_rows", "check_subset", "clip_scale",
           "numba_threads_setter", "validate_args"]

CLIP_MODES = ("none", "layer", "global")


def clip_scale(sq_norm: float, max_norm: float) -> float:
    """Gradient scale for clipping to `max_norm`: min(1, max_norm / (sqrt(sq_norm) + 1e-6))."""
    return min(1.0, max_norm / (math.sqrt(sq_norm) + 1e-6))


def numba_threads_setter(n):
    """`host_threads`: numba threads of the host worker's kernels (thread-local in numba). Tiny
    parallel kernels on an oversubscribed machine wait for a time slice per parallel region; 1 avoids it."""
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= limit:
        raise ValueError(f"host_threads={n!r} must be an int in [1, {limit}] (NUMBA_NUM_THREADS) or None")
    return lambda: numba.set_num_threads(n)


def validate_args(optimizers, wire_dtype, max_rows, n_slots, staleness, clip, max_norm) -> None:
    if not optimizers:
        raise ValueError("optimizers is empty: pass one SparseAdamW per adapter layer")
    for i, opt in enumerate(optimizers):
        if not hasattr(opt, "store") or not hasattr(opt, "accumulate"):
            raise TypeError(f"optimizers[{i}] is a {type(opt).__name__}; pass offload.SparseAdamW objects")
    widths = {opt.store.width for opt in optimizers}
    if len(widths) != 1:
        raise ValueError(f"optimizers' stores have different widths {sorted(widths)}; use one width")
    if wire_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"wire_dtype={wire_dtype!r} must be torch.bfloat16 or torch.float32")
    if not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows={max_rows!r} must be an int >= 1 (most rows one fetch moves)")
    if not isinstance(n_slots, int) or n_slots < 1:
        raise ValueError(f"n_slots={n_slots!r} must be an int >= 1 (staging slots per direction)")
    if staleness not in (0, 1):
        raise ValueError(f"staleness={staleness!r} must be 0 (exact) or 1 (delayed update)")
    if clip not in CLIP_MODES:
        raise ValueError(f"clip={clip!r} must be one of {CLIP_MODES}")
    if not (isinstance(max_norm, (int, float)) and max_norm > 0):
        raise ValueError(f"max_norm={max_norm!r} must be a number > 0")


def check_live_rows(max_live_rows, max_rows: int) -> int:
    """`max_live_rows` (rows one layer's live fetch may hold, fetch_more included): None -> max_rows."""
    if max_live_rows is None:
        return max_rows
    if not isinstance(max_live_rows, int) or isinstance(max_live_rows, bool) or max_live_rows < max_rows:
        raise ValueError(f"max_live_rows={max_live_rows!r} must be an int >= max_rows={max_rows} (rows one "
                         f"layer's live fetch holds; a lookahead prefetch plus its misses needs 2 * max_rows "
                         f"= {2 * max_rows}) or None")
    return max_live_rows


def check_ids(ids, what: str, max_rows: int, device: torch.device) -> int:
    """Validate row ids of a fetch / push: 1-D int64, at most `max_rows`, on the CPU or `device`."""
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{what}: ids must be a 1-D int64 tensor [R], got {got}")
    if ids.numel() > max_rows:
        raise ValueError(f"{what}: {ids.numel()} ids exceed max_rows={max_rows}; raise max_rows or "
                         "lower the router's row budget")
    if ids.device.type not in ("cpu", device.type):
        raise ValueError(f"{what}: ids are on {ids.device}; pass them on the CPU or on {device}")
    return ids.numel()


def check_grads(grads, k: int, width: int, layer: int, device: torch.device) -> None:
    """push_grads: grads must be a float tensor [k, width] on the compute device."""
    if not isinstance(grads, torch.Tensor) or not grads.is_floating_point():
        got = grads.dtype if isinstance(grads, torch.Tensor) else type(grads).__name__
        raise TypeError(f"push_grads: grads must be a floating-point tensor [R, {width}], got {got}")
    if tuple(grads.shape) != (k, width):
        raise ValueError(f"push_grads: grads has shape {tuple(grads.shape)}, expected ({k}, {width}) = "
                         f"(ids pushed for layer {layer}, width)")
    if grads.device.type != device.type:
        raise ValueError(f"push_grads: grads are on {grads.device}, expected {device}")


def check_subset(ids_host: torch.Tensor, live_host: torch.Tensor, layer: int) -> None:
    """A partial push: `ids_host` [K] must be unique and all among the live fetch's ids `live_host` [n]."""
    inside = torch.isin(ids_host, live_host)  # [K] bool
    if not bool(inside.all()):
        bad = ids_host[~inside]
        raise ValueError(f"push_grads: ids differ from the ids fetched for layer {layer}: {bad.numel()} of "
                         f"{ids_host.numel()} (e.g. {bad[:4].tolist()}) are not among the {live_host.numel()} "
                         "rows of its live fetch; push the fetched ids or a subset of them (fetch_more adds "
                         "rows to a live fetch)")
    if torch.unique(ids_host).numel() != ids_host.numel():
        raise ValueError(f"push_grads: ids for layer {layer} repeat a row; pass each row once")


def check_extend(base, m: int, layer: int, step: int, micro_batch: int, capacity: int, max_rows: int) -> None:
    """fetch_more(layer, ids [m]) onto live fetch `base` (the layer's newest handle or None)."""
    if base is None or base.step != step or base.micro_batch != micro_batch:
        raise ValueError(f"fetch_more: layer {layer} has no live fetch in micro-batch {micro_batch} of step "
                         f"{step}; call fetch({layer}, ids) first")
    if m == 0:
        raise ValueError(f"fetch_more: ids is empty; nothing to add to layer {layer}'s fetch")
    if base.n_rows + m > capacity:
        raise ValueError(f"fetch_more: layer {layer}'s live fetch would hold {base.n_rows} + {m} rows, more "
                         f"than max_live_rows={capacity}; build the scheduler with max_live_rows={2 * max_rows} "
                         f"(2 * max_rows) or call reserve_live_rows({2 * max_rows})")
    root = base.parts()[0]
    if root.owes_update is None and root.emitted_update:
        raise ValueError(f"fetch_more: layer {layer}'s delayed (staleness 1) update already follows its fetch, "
                         "so added rows would be read after it; fetch with extendable=True")
