"""Data parallel row updates: the row gradients of every rank, combined for the union of their rows.

With `TransferScheduler(..., process_group=pg)` over a torch.distributed group of W ranks, each rank
fetches and pushes the rows of its own micro-batches; before a layer's update the host worker of every
rank combines the layer's pending gradients across ranks (`RowGradReducer.reduce`):

  1. all_gather the number of pending rows, then the pending row ids (padded with -1 to the largest);
  2. the union U of all ranks' ids, sorted: the same on every rank;
  3. each rank scatters its pending gradients into a zero [|U|, width] fp32 block, and one all_reduce
     (SUM) adds the blocks; divided by W (the gradient average, as DistributedDataParallel takes it);
  4. the layer's pending buffer is replaced by (U, block): every rank applies the same update to the same
     rows, so the row stores stay identical replicas.

Only torch.distributed collectives move data (ids and the union's gradients, never whole stores), and each
reduce is metered as the transfer kind "collective" (payload bytes this rank sends: its ids and the fp32
block). Collectives run on the host worker thread, in the order the layers' gradients complete, which is
the same on every rank (the scheduler's FIFO order); use a process group of its own for the scheduler so
no other thread issues collectives on it at the same time.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["RowGradReducer"]


class RowGradReducer:
    """Combines one layer's pending row gradients across the ranks of `group` (see module docstring)."""

    def __init__(self, group, meter=None):
        self.group, self.meter = group, meter  # meter: the scheduler's TrafficMeter (set by the scheduler)
        self.world = dist.get_world_size(group)

    def reduce(self, opt, layer: int, step: int) -> None:
        """On the host worker, before the layer's update: `opt`'s pending gradients become the rank average over
        the union of all ranks' pending rows (every rank calls this for the same layers in the same order)."""
        t0 = time.perf_counter()
        ids_local = opt.pending_ids()  # [n] int64, slot order
        grads_local = opt.pending_grads()  # [n, W] fp32 (a view of the pending buffer)
        n = torch.tensor([ids_local.numel()], dtype=torch.int64)
        counts = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(counts, n, group=self.group)
        longest = max(int(c) for c in counts)
        padded = torch.full((longest,), -1, dtype=torch.int64)
        padded[: ids_local.numel()] = ids_local
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded, group=self.group)
        union = np.unique(torch.cat(gathered).numpy())
        union = union[union >= 0]  # [U] sorted: the same on every rank
        block = torch.zeros(union.shape[0], grads_local.shape[1])  # [U, W] fp32
        if ids_local.numel():
            block[torch.from_numpy(np.searchsorted(union, ids_local.numpy()))] = grads_local
        dist.all_reduce(block, op=dist.ReduceOp.SUM, group=self.group)
        block.div_(self.world)
        opt.zero_grad()
        if union.shape[0]:
            opt.accumulate(torch.from_numpy(union), block)
        if self.meter is not None:
            self.meter.record_transfer(step=step, micro_batch=0, layer=layer, direction="collective",
                                       nbytes=8 * (1 + longest) + block.numel() * 4, rows=int(union.shape[0]),
                                       start=t0, end=time.perf_counter(), engine="torch.distributed")
