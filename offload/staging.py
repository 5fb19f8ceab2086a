"""Fixed pools of host staging slots: where rows wait between the host worker and a copy (backpressure).

`SlotPool`: `n_slots` staging slots, each a rows buffer [max_rows, width] in the wire dtype plus an ids
buffer [max_rows] int64 (plus, with `keep=True`, a sparse update's row mask [max_rows] bool), allocated
(and touched) once through the copy engine (pinned on CUDA).
`acquire()` blocks while every slot is busy: a full pool is backpressure, never an unbounded queue.
`staging_bytes` counts, before anything is allocated, every host byte a TransferScheduler's pools and
per-layer buffers pin (what `meft.wrap`'s RAM check and `meft plan` count).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from offload.worker import POLL_S

__all__ = ["StagingSlot", "SlotPool", "check_n_slots", "staging_bytes"]


def check_n_slots(n_slots) -> None:
    if not isinstance(n_slots, int) or n_slots < 1:
        raise ValueError(f"n_slots={n_slots!r} must be an int >= 1 (staging slots per direction)")


def staging_bytes(n_layers: int, max_rows: int, width: int, wire_dtype: torch.dtype, n_slots: int = 2,
                  max_live_rows: int | None = None, zero_copy_rows: int = 0, update_mask: bool = False) -> int:
    """Host bytes the device reads or writes that a TransferScheduler allocates (pinned, at exact size, on
    CUDA): two pools (H2D, D2H) of `n_slots` slots of rows [max_rows, width] + ids [max_rows], and each
    layer's ids and union-slots buffers [max_live_rows] int64; zero-copy (`zero_copy_rows` = rows per
    store > 0): no H2D pool, and each layer's mirror [zero_copy_rows, width] wire. `update_mask`: the D2H
    slots also hold a row mask [max_rows] bool each (a sparse update)."""
    wire = torch.empty((), dtype=wire_dtype).element_size()
    live = max_rows if max_live_rows is None else max_live_rows
    pools = 1 if zero_copy_rows else 2
    mirrors = n_layers * zero_copy_rows * width * wire
    masks = n_slots * max_rows if update_mask else 0
    return pools * n_slots * max_rows * (width * wire + 8) + n_layers * live * 16 + mirrors + masks


class StagingSlot:
    __slots__ = ("rows", "ids", "keep")

    def __init__(self, rows: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor | None = None):
        self.rows = rows  # [max_rows, width] wire dtype, host (pinned on CUDA)
        self.ids = ids  # [max_rows] int64, host
        self.keep = keep  # [max_rows] bool, host: rows a sparse update applies (None: no mask)


class SlotPool:
    """`n_slots` staging slots; `acquire()` blocks while all are in use."""

    def __init__(self, engine, n_slots: int, max_rows: int, width: int, dtype: torch.dtype, keep: bool = False):
        self.slots = [StagingSlot(engine.alloc_host((max_rows, width), dtype),
                                  engine.alloc_host((max_rows,), torch.int64),
                                  engine.alloc_host((max_rows,), torch.bool) if keep else None)
                      for _ in range(n_slots)]
        self.nbytes = sum(s.rows.nbytes + s.ids.nbytes + (0 if s.keep is None else s.keep.nbytes)
                          for s in self.slots)
        self._free = list(reversed(self.slots))
        self._cond = threading.Condition()
        self.in_use = 0
        self.peak_in_use = 0
        self.waits = 0  # how many acquires had to wait (backpressure events)

    def acquire(self, check: Callable[[], None]) -> StagingSlot:
        with self._cond:
            if not self._free:
                self.waits += 1
            while not self._free:
                self._cond.wait(POLL_S)  # protects the slots: wait for a copy or task to give one back
                if not self._free:
                    check()
            slot = self._free.pop()
            self.in_use += 1
            self.peak_in_use = max(self.peak_in_use, self.in_use)
            return slot

    def release(self, slot: StagingSlot) -> None:
        with self._cond:
            if any(s is slot for s in self._free):
                return  # already released (e.g. by an error path)
            self._free.append(slot)
            self.in_use -= 1
            self._cond.notify()
