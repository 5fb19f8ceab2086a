"""The union of a layer's rows over the micro-batches of one step (gradient accumulation).

With `accum_steps > 1` a layer's active sets overlap from one micro-batch to the next. `TransferScheduler`
then moves each row of the step's union once (DESIGN.md "One training step", traffic at the analytic
minimum):

* rows down: a row already sent this step is not gathered or copied again; the device keeps the step's
  rows in `rows_dev` [U + 1, W] (wire dtype) and a fetch's rows are taken from there by slot
  (`index_select` on the compute stream). Only at staleness 0 and with staged fetches: at staleness 1 the
  previous step's update lands between two micro-batches, so later micro-batches must read rows again,
  and zero-copy reads each micro-batch's rows from the mapped mirror anyway.
* gradients up: pushes are summed on the device in fp32, `grads_dev` [U + 1, W], and cross once, at the
  layer's last push of the step, rounded to the wire dtype once (in chunks of at most max_rows rows, the
  size of a staging slot). The host update then sees `wire(sum of the step's gradients)`, as it sees
  `wire(g)` at one micro-batch per step: accumulation changes the summation, never the rounding.

Slot of a row = its order of first appearance in the step (fetch order, then position). The host worker
assigns slots when a fetch's ids have reached the host (`assign`) and stages them in `slots_host` [C]
(pinned), which cross to `slots_dev` [C] with the rows; padding positions (-1 ids) get the dummy slot U,
whose gradient row is never sent. `pushed` [U] marks slots that received a gradient: a row fetched but
never pushed (evaluation inside a step, a partial push) is not updated, as lazy AdamW requires.
`slot_of_dev` [N + 1] maps row id -> slot on the device for partial pushes with device ids (entry N is the
sink of -1 ids); it is written for the live fetch's rows before such a push and never read for others.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["StepUnion"]


class StepUnion:
    """Union state of one layer (see module docstring). Host parts are allocated now, device parts on
    the first step with accumulation (`ensure`)."""

    def __init__(self, n_rows: int, width: int):
        self.n_rows, self.width = n_rows, width
        self.slot_of_host = np.full(n_rows, -1, dtype=np.int64)  # [N] row id -> slot in this step, -1
        self.ids_host = np.empty(0, dtype=np.int64)  # [U] union row ids in slot order
        self.pushed = np.zeros(0, dtype=np.bool_)  # [U] the slot received a gradient this step
        self.n = 0  # slots assigned in `step` (written by the host worker)
        self.step = -1
        self.capacity = 0  # U
        self.rows_dev: torch.Tensor | None = None  # [U + 1, W] wire: the step's rows (row caching only)
        self.grads_dev: torch.Tensor | None = None  # [U + 1, W] fp32: the step's summed gradients
        self.slot_of_dev: torch.Tensor | None = None  # [N + 1] int64 row id -> slot (partial pushes)
        self.pending = False  # grads_dev holds gradients of this step that have not crossed yet
        self.marked_by_worker = False  # a partial push with device ids: the worker marks its rows pushed

    @property
    def dummy(self) -> int:
        """The slot of padding positions: a row of rows_dev / grads_dev that is never sent."""
        return self.capacity

    def ensure(self, engine, capacity: int, wire_dtype: torch.dtype, cache_rows: bool) -> None:
        """Device buffers for `capacity` union rows (between steps; grows, never shrinks)."""
        capacity = min(capacity, self.n_rows)
        if capacity > self.capacity:
            self.slot_of_host[self.ids_host[: self.n]] = -1  # the previous step's union is over
            self.n, self.step = 0, -1
            self.capacity = capacity
            self.ids_host = np.empty(capacity, dtype=np.int64)
            self.pushed = np.zeros(capacity, dtype=np.bool_)
            self.grads_dev = engine.alloc_device((capacity + 1, self.width), torch.float32)
            self.rows_dev = None
            self.slot_of_dev = None
        if cache_rows and self.rows_dev is None:
            self.rows_dev = engine.alloc_device((self.capacity + 1, self.width), wire_dtype)
        if self.slot_of_dev is None:
            self.slot_of_dev = engine.alloc_device((self.n_rows + 1,), torch.int64)

    def assign(self, step: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Host worker: slots of a fetch part's valid ids [n] in `step`; returns (slots [n], the ids new to the
        union in their order [m], the slot of the first of them)."""
        if step != self.step:  # the first fetch of a new step: forget the previous step's union
            self.slot_of_host[self.ids_host[: self.n]] = -1
            self.pushed[: self.n] = False
            self.n, self.step = 0, step
        slots = self.slot_of_host[ids]  # [n]
        new = slots < 0
        new_ids = ids[new]
        first, m = self.n, new_ids.shape[0]
        if first + m > self.capacity:
            raise RuntimeError(f"step union of {first + m} rows exceeds its capacity {self.capacity} "
                               "(accum_steps x live rows); begin_step(accum_steps) sizes it")
        fresh = np.arange(first, first + m, dtype=np.int64)
        slots[new] = fresh
        self.slot_of_host[new_ids] = fresh
        self.ids_host[first:first + m] = new_ids
        self.n = first + m
        return slots, new_ids, first
