"""`meft train` under torchrun: the process group, each rank's shard of a batch, and who writes outputs.

Owns `Ranks`: opened from the environment torchrun sets (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`); one process
without it. With several ranks it initialises torch.distributed (gloo for CPU tensors, NCCL for CUDA ones,
with a timeout, so a rank that dies makes the others fail with an error instead of waiting forever),
pins each rank to its GPU, splits every global batch (`--batch-size` examples) into one contiguous shard
per rank, and reduces the numbers the loop logs (loss, tokens, a stop request) across ranks each step so
every rank takes the same decisions. Only rank 0 writes the run folder (metrics, checkpoints, adapter,
summary) and evaluates; `meft.wrap` and the scheduler do the data-parallel training itself
(`meft.adapter.distributed`, `offload.collective`).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Ranks"]

TIMEOUT = timedelta(minutes=30)  # longest a rank waits in a collective (rank 0 evaluates while others wait)


class Ranks:
    """The ranks of this run (see module docstring). `world == 1`: a plain single process."""

    def __init__(self, batch_size: int, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owned = False  # this object initialised the process group (and destroys it)
        if self.world == 1:
            return
        if batch_size % self.world:
            raise ValueError(f"--batch-size {batch_size} under torchrun with {self.world} ranks: the global batch "
                             f"is split into one shard per rank; fix: a multiple of {self.world}")
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
            self.owned = True

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run folder, prints and evaluates."""
        return self.rank == 0

    def shard(self, batch: dict) -> dict:
        """This rank's contiguous slice of a global batch (every tensor along dim 0)."""
        if self.world == 1:
            return batch
        n = next(iter(batch.values())).shape[0] // self.world
        return {k: v[self.rank * n:(self.rank + 1) * n] for k, v in batch.items()}

    def reduce(self, loss: float, tokens: int, stop: bool) -> tuple[float, int, bool]:
        """(mean loss over ranks, total input tokens, any rank asked to stop): the same on every rank."""
        if self.world == 1:
            return loss, tokens, stop
        t = torch.tensor([loss, float(tokens), float(stop)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t[0]) / self.world, int(t[1]), bool(t[2] > 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False
