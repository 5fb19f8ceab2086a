"""SchedulerContext: what the parts of one `TransferScheduler` share, handed to each part at construction.

A training step's traffic is done by several parts: the staged fetch (`offload.staged`), the zero-copy
fetch (`offload.zero_copy`), the step union under gradient accumulation (`offload.union.UnionTraffic`) and
the row updates (`offload.updates.UpdateRunner`). Each takes this one object instead of a dozen
arguments and callbacks into the scheduler: the optimizers (one per layer, each over its RowStore), the
copy engine, the host worker, the traffic meter, the staging pools, the wire format and the test hook
`skip_waits`.

It also owns the error rule every part follows: an exception raised on the host worker is raised in the
caller at its next call, once, as the original object with its original traceback (`check`); after that
every call raises a RuntimeError that says the scheduler stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["SchedulerContext"]


@dataclass(eq=False)
class SchedulerContext:
    optimizers: list            # SparseAdamW per adapter layer (each owns its RowStore)
    engine: object              # offload.engine.CopyEngine: streams and events, or the CPU worker twin
    worker: object              # offload.worker.HostWorker: the one FIFO host thread
    meter: object               # offload.meter.TrafficMeter
    device: torch.device        # the compute device
    wire_dtype: torch.dtype     # dtype of rows and gradients on the wire
    max_rows: int               # rows of one fetch part / one staging slot
    d2h_pool: object            # offload.staging.SlotPool: gradients back
    h2d_pool: object | None     # offload.staging.SlotPool: rows down (None with zero-copy)
    skip_waits: set[str] = field(default_factory=set)  # test hook: {"h2d", "d2h", "mirror", "slots", "node"}
    flags: object = None        # offload.flags.DeviceFlags of the staged fetch (None: wait for the worker)
    error_reported: bool = False

    @property
    def width(self) -> int:
        """Row width W: 2d ([K | V]), or d (values only, keys generated on the device)."""
        return self.optimizers[0].store.width

    @property
    def wire_bytes(self) -> int:
        return torch.empty((), dtype=self.wire_dtype).element_size()

    def check(self) -> None:
        """Raise a host-worker exception in the caller (once, original object and traceback)."""
        err = self.worker.error
        if err is None:
            return
        if not self.error_reported:
            self.error_reported = True
            raise err
        raise RuntimeError("TransferScheduler stopped after a worker error (raised earlier); close() it "
                           "and build a new one") from err

    def meter_copy(self, ev, direction: str, meta: tuple[int, int, int]) -> None:
        """Record one finished copy (`ev`, an engine CopyEvent) of (step, micro-batch, layer) `meta`."""
        step, mb, layer = meta
        self.meter.record_transfer(step=step, micro_batch=mb, layer=layer, direction=direction,
                                   nbytes=ev.nbytes, rows=ev.rows, start=ev.start_s, end=ev.end_s,
                                   engine=self.engine.name, pageable=ev.pageable)
