"""RowScheduler: the one surface both row schedulers keep, and the constructor arguments they share.

`offload.TransferScheduler` (rows on the host, moved asynchronously) and `offload.ResidentScheduler`
(every row on the compute device, the plain twin) both implement `RowScheduler` in full, so a caller
never probes which one it holds. `check_scheduler_args` validates the arguments both constructors take
(optimizers, wire dtype, max_rows, staleness, clip, max_norm) from one place.

Contract, per layer and micro-batch: `fetch(layer, ids)` starts a live fetch; `fetch_more(layer, ids)`
appends rows to it (rows then come as [live | added]); `push_grads(layer, ids, grads)` sends gradients
for any subset of the live rows (each once; rows not pushed get no gradient and no update) and ends
the live fetch. Gradients of a step's micro-batches accumulate per row; `finish_step()` ends the step
(staleness 0: its updates are done; staleness 1: each layer's update lands right after its next fetch
gathered, or when that fetch ends if it was made with `extendable=True`). `flush()` applies every
pending update; `read_rows` reads current rows for inference (call `flush()` first for staleness 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from offload.dtypes import check_wire_dtype
from offload.updates import check_update_args

__all__ = ["RowHandle", "RowScheduler", "check_scheduler_args"]


@runtime_checkable
class RowHandle(Protocol):
    """One live fetch (or the chain fetch + fetch_more) of a layer's rows."""

    @property
    def ids_dev(self) -> torch.Tensor:
        """[R] int64 row ids on the compute device."""

    @property
    def ids_host(self) -> torch.Tensor:
        """[R] int64 row ids on the host."""

    def wait(self) -> torch.Tensor:
        """Rows [R, width] in the wire dtype on the compute device, in the order of the ids."""

    def release(self) -> None:
        """End the fetch without gradients; the layer may be fetched again."""


@runtime_checkable
class RowScheduler(Protocol):
    """Rows of several layers' RowStores, fetched per micro-batch and updated from row gradients."""

    wire_dtype: torch.dtype  # dtype of rows down and grads back (one of offload.dtypes.WIRE_DTYPES)
    max_rows: int  # most rows one fetch (or fetch_more part, or push) moves

    def begin_step(self, accum_steps: int = 1) -> None:
        """Start the next step of `accum_steps` micro-batches (micro-batch 0 begins implicitly)."""

    def begin_micro_batch(self) -> None:
        """Start the next micro-batch of the step."""

    def fetch(self, layer: int, ids: torch.Tensor, *, extendable: bool = False) -> RowHandle:
        """Start the layer's live fetch of rows `ids` [R] int64 unique; `extendable`: fetch_more may
        complete it (a staleness-1 update then waits until the fetch ends)."""

    def fetch_more(self, layer: int, ids: torch.Tensor) -> RowHandle:
        """Append rows `ids` [M] (none live) to the layer's live fetch; wait() -> [live | added]."""

    def push_grads(self, layer: int, ids: torch.Tensor, grads: torch.Tensor) -> None:
        """Gradients [K, width] for a subset `ids` [K] of the live rows; ends the live fetch."""

    def finish_step(self) -> None:
        """End the step: its row updates run (staleness 0: done on return)."""

    def flush(self) -> None:
        """Apply every pending (staleness 1) update and wait for it."""

    def read_rows(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Current rows [R, width] fp32 on the compute device, for inference (no step bookkeeping)."""

    def reserve_live_rows(self, rows: int) -> None:
        """Let a layer's live fetch hold `rows` (>= max_rows) rows, fetch_more included; between steps."""

    def sync_to_host(self) -> None:
        """Make the RowStores current (flushed updates of device copies written back)."""

    def load_from_host(self) -> None:
        """The RowStores were loaded: refresh any copy of them the scheduler keeps."""

    def close(self) -> None:
        """Apply pending updates and release threads and buffers. Idempotent."""


def check_scheduler_args(optimizers: Sequence, wire_dtype, max_rows, staleness, clip, max_norm) -> None:
    """The constructor arguments both schedulers take (see module docstring)."""
    if not optimizers:
        raise ValueError("optimizers is empty: pass one SparseAdamW per adapter layer")
    for i, opt in enumerate(optimizers):
        if not hasattr(opt, "store") or not hasattr(opt, "accumulate"):
            raise TypeError(f"optimizers[{i}] is a {type(opt).__name__}; pass offload.SparseAdamW objects")
    widths = {opt.store.width for opt in optimizers}
    if len(widths) != 1:
        raise ValueError(f"optimizers' stores have different widths {sorted(widths)}; use one width")
    check_wire_dtype(wire_dtype)
    if not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows={max_rows!r} must be an int >= 1 (most rows one fetch moves)")
    check_update_args(staleness, clip, max_norm)
