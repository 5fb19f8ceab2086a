"""Data parallel meft under torch.distributed: which group the adapter uses, and that every rank agrees.

Owns what `meft.wrap` needs when a process group is initialised with more than one rank (launched by
`torchrun`): `data_parallel_group(config)` checks that every rank wraps with the same MeftConfig (an
all-gathered fingerprint; a difference is an error on every rank naming the differing fields and the
ranks' values, instead of a hang or silently different replicas later) and returns the process group
the row scheduler combines row gradients over (a gloo group of its own: the exchange runs on host
tensors from the scheduler's worker thread, whatever the backend of the default group), or None in a
single process. `average_gradients(params)` averages the router gates' gradients across ranks (the
device-resident, trained parameters of the adapter), as DistributedDataParallel would. The node layout
(which ranks share one host copy of the stores) is `offload.node.node_of(group)`, called by `meft.wrap`
right after `data_parallel_group`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["data_parallel_group", "average_gradients", "world_size"]


def world_size() -> int:
    """Ranks of the default process group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def data_parallel_group(config) -> object | None:
    """None in one process; else check every rank's MeftConfig (ValueError naming the differing fields) and
    return a new gloo group for the scheduler's row-gradient exchange. Every rank must call it (wrap does)."""
    if world_size() == 1:
        return None
    if not config.offload:
        raise ValueError("MeftConfig.offload = False under torch.distributed: the resident twin has no data "
                         "parallel path; use offload=True (the default) with torchrun")
    mine = config.to_dict()
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    differing = sorted({k for other in every for k in set(mine) | set(other) if other.get(k) != mine.get(k)})
    if differing:
        per_rank = "; ".join(f"{k}: " + ", ".join(f"rank {r} = {cfg.get(k)!r}" for r, cfg in enumerate(every))
                             for k in differing)
        raise ValueError(f"meft.wrap under torch.distributed: the ranks' MeftConfigs differ in {differing} "
                         f"({per_rank}); every rank must wrap with the same config")
    return dist.new_group(backend="gloo")


def average_gradients(params) -> None:
    """grad <- mean over ranks of grad, for every parameter (a missing grad counts as zeros, so every rank
    issues the same collectives). No-op in one process."""
    world = world_size()
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)
