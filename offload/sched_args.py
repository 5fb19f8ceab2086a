"""Argument checks and the clipping rule of the TransferScheduler (kept apart to keep scheduler.py short)."""

from __future__ import annotations

import math

import torch

__all__ = ["CLIP_MODES", "clip_scale", "numba_threads_setter", "validate_args"]

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
