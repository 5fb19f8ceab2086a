"""What a wrapped model's training did, read back for logs: routing statistics and traffic totals.

`RoutingStats` keeps, per adapted layer, the latest training routing's kept experts and dropped share as
device tensors (recording them never synchronises); `read` averages them over the layers, synchronising
once, when the caller logs. `traffic_totals` reads the traffic meter's running totals.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RoutingStats", "traffic_totals"]


class RoutingStats:
    """Latest training routing per layer (see module docstring)."""

    def __init__(self):
        self._latest: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> (kept experts [], dropped share [])

    def record(self, idx: int, routing) -> None:
        self._latest[idx] = ((routing.kept >= 0).sum(), routing.dropped)  # device ops, no sync

    def read(self) -> dict:
        """`distinct_experts` (experts kept per layer) and `dropped_share` (share of real tokens'
        token->expert assignments the row budget dropped; those tokens were re-routed among the kept
        experts), averaged over adapted layers. Synchronises with the device once."""
        if not self._latest:
            return {"distinct_experts": 0.0, "dropped_share": 0.0}
        kept = torch.stack([k for k, _ in self._latest.values()]).float().mean()
        dropped = torch.stack([d for _, d in self._latest.values()]).mean()
        return {"distinct_experts": float(kept), "dropped_share": float(dropped)}


def traffic_totals(meter) -> tuple[int, int, int, float]:
    """(bytes down, bytes up, rows down, CPU update ms) so far, from `meter` (zeros without one)."""
    if meter is None:
        return 0, 0, 0, 0.0
    rep = meter.report()
    h2d, d2h = rep["totals"].get("h2d", {}), rep["totals"].get("d2h", {})
    return (h2d.get("bytes", 0), d2h.get("bytes", 0), h2d.get("rows", 0),
            rep["cpu"].get("update", {}).get("ms", 0.0))
