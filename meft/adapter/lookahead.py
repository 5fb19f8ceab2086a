"""Lookahead prefetch (`MeftConfig.prefetch="lookahead"`): layer l's input routed through gate l+1.

While layer l runs, its FFN input is also routed through layer l+1's gate and that fetch starts at once.
When layer l+1 runs, `start` uses the rows in flight: if the ids match, the prefetch is the fetch; if not,
only the missing rows are fetched (`scheduler.fetch_more`, exact: the same store state as a plain fetch)
and the needed rows are taken from [prefetched (sorted) | missing (sorted)] by position on the device.
push_grads then sends the needed rows' gradients only: prefetched rows nobody needed get no gradient and
no update. Both schedulers keep this contract (`offload.RowScheduler`). The hit test compares ids on the
host, so this path synchronises once per layer; `stats` counts rows needed, hit and prefetched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Lookahead"]


@dataclass(eq=False)
class _Prefetch:
    key: tuple[int, int]   # (step, micro-batch)
    ids: Tensor            # [P] int64 sorted, device
    handle: object


class Lookahead:
    """Prefetches in flight per layer, for one runtime (see module docstring)."""

    def __init__(self, scheduler, meter, fetch: Callable):
        self.scheduler, self.meter = scheduler, meter
        self._fetch = fetch  # (layer, ids, prefetch=bool) -> FetchHandle, counted by the runtime
        self.stats = {"needed": 0, "hit": 0, "prefetched": 0}  # rows: needed, of them prefetched, prefetched
        self._pending: dict[int, _Prefetch] = {}

    def clear(self) -> None:
        self._pending.clear()

    def prefetch(self, idx: int, ids: Tensor, key) -> None:
        """Start fetching rows `ids` [P] (sorted, valid only) of layer idx for micro-batch `key`."""
        self.stats["prefetched"] += ids.numel()
        self._pending[idx] = _Prefetch(key, ids, self._fetch(idx, ids, prefetch=True))

    def start(self, idx: int, ids: Tensor, key, step: int) -> Callable[[], Tensor]:
        """Issue the fetch of `ids` for layer idx, using a prefetch in flight if there is one; return a
        callable giving rows [R, 2d] in the wire dtype, in the order of `ids`."""
        pf = self._pending.pop(idx, None)
        if pf is None or pf.key != key:
            return self._fetch(idx, ids).wait
        hit = torch.isin(ids, pf.ids)  # [R] bool
        n_hit = int(hit.sum())
        self.stats["needed"] += ids.numel()
        self.stats["hit"] += n_hit
        if self.meter is not None:
            self.meter.record_lookahead(step, idx, ids.numel(), n_hit)
        if torch.equal(ids, pf.ids):
            return pf.handle.wait
        pos = torch.empty_like(ids)  # [R] position of each needed row in the chain
        pos[hit] = torch.searchsorted(pf.ids, ids[hit])
        handle, n_miss = pf.handle, ids.numel() - n_hit
        if n_miss:
            pos[~hit] = pf.ids.numel() + torch.arange(n_miss, device=ids.device)
            handle = self._fetch(idx, ids[~hit], more=True)  # exact: only the rows not in flight
        return lambda: handle.wait().index_select(0, pos)  # [R, 2d] copied out of the layer's buffer
