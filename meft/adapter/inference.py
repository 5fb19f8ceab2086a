"""InferenceRows: the adapter rows that forwards outside training read (eval, `generate()`, no_grad).

With rows offloaded (TransferScheduler) inference would otherwise read each layer's rows through the host
at every forward, which synchronises with the device per layer per token. Here every layer's rows are
kept resident on the compute device in the wire dtype when they fit (`MeftConfig.inference_rows`:
'resident', or 'auto' when they take at most a quarter of the free device memory; the default model's
30 x 4096 rows are 283 MB in bf16), so an inference forward gathers its rows with one device
`index_select` per layer and no host synchronisation. The copy is rebuilt lazily, once, after the rows
changed (a training step ended, or stores were loaded). Otherwise ('fetch') rows are read through the
scheduler per forward (`read_rows`, which takes any number of ids). Inference has no row budget: the ids
are the union of every token's own experts (up to all N rows of a layer), more than a training fetch's
`max_rows` holds, so they never go through `scheduler.fetch`. Unused routing slots (id -1) read row 0;
their gate weight is 0.
"""

from __future__ import annotations

import psutil
import torch
from torch import Tensor

__all__ = ["InferenceRows"]
_AUTO_SHARE = 0.25  # 'auto': resident when the rows take at most this share of the free device memory


class InferenceRows:
    """See the module docstring. Owned by MeftRuntime; `invalidate()` whenever the stores change."""

    def __init__(self, mode: str, scheduler, stores, device: torch.device, wire: torch.dtype):
        self.mode, self.scheduler, self.stores = mode, scheduler, stores
        self.device, self.wire = device, wire
        self._rows: list[Tensor] | None = None  # [N, W] wire dtype on the device, per layer
        self.builds = 0  # how many times the resident copy was (re)built

    def nbytes(self) -> int:
        """Device bytes of the resident copy of every layer's rows."""
        return sum(s.n_rows * s.width for s in self.stores) * torch.empty((), dtype=self.wire).element_size()

    def resident(self) -> bool:
        if self.mode != "auto":
            return self.mode == "resident"
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = psutil.virtual_memory().available
        return self.nbytes() <= _AUTO_SHARE * free

    def invalidate(self) -> None:
        """The stores changed: the resident copy is rebuilt at the next inference forward."""
        self._rows = None

    @torch.no_grad()
    def rows(self, idx: int, ids: Tensor) -> Tensor:
        """Rows [R, W] in the wire dtype on the device for ids [R] (-1: an unused slot)."""
        if not self.resident():
            return self.scheduler.read_rows(idx, ids).to(self.wire)
        return self.table(idx).index_select(0, ids.clamp(min=0))  # [R, W]

    @torch.no_grad()
    def table(self, idx: int) -> Tensor:
        """Every row of layer `idx`, [N, W] in the wire dtype on the device (the resident copy; call only
        when `resident()`)."""
        if self._rows is None:  # the runtime has flushed delayed (staleness 1) updates before asking
            self._rows = [s.weights.to(self.wire).to(self.device) for s in self.stores]  # one bulk copy each
            self.builds += 1
        return self._rows[idx]
