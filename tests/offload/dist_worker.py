"""One rank of the data-parallel TransferScheduler test (run by tests/offload/test_distributed.py under torchrun).

    torchrun --standalone --nproc_per_node=2 tests/offload/dist_worker.py OUT_DIR

Each rank trains the same replica stores on its own shard of a seeded script (rank r fetches and pushes its
own rows each step, gradients computed from the rows it received) with fp32 rows on the wire, then writes
its stores and its meter's collective totals to OUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from offload.optim import SparseAdamW  # noqa: E402
from offload.scheduler import TransferScheduler  # noqa: E402
from offload.store import RowStore  # noqa: E402

N_ROWS, WIDTH, N_LAYERS, MAX_ROWS, STEPS, WORLD = 64, 8, 3, 16, 12, 2


def make_opts(node=None, seed: int = 0) -> list[SparseAdamW]:
    """One SparseAdamW per layer over seeded stores; `node` (an `offload.node` group) shares them per node."""
    g = torch.Generator().manual_seed(seed)
    return [SparseAdamW(RowStore(N_ROWS, WIDTH, init=torch.randn(N_ROWS, WIDTH, generator=g), node=node), lr=3e-2,
                        weight_decay=0.01) for _ in range(N_LAYERS)]


def shard(step: int, rank: int, layer: int) -> torch.Tensor:
    """Rank `rank`'s sorted row ids for `layer` in `step` (shards overlap; some are empty)."""
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + layer)
    n = int(torch.randint(0, MAX_ROWS + 1, (1,), generator=g))
    return torch.randperm(N_ROWS, generator=g)[:n].sort().values


def grads_of(rows: torch.Tensor, step: int, rank: int, layer: int) -> torch.Tensor:
    noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(7919 * step + 31 * rank + layer))
    return rows.float() * 0.7 + noise


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.new_group(backend="gloo")  # the scheduler's own group: only its worker thread uses it
    opts = make_opts()
    with TransferScheduler(opts, max_rows=MAX_ROWS, wire_dtype=torch.float32, host_threads=1,
                           process_group=group) as s:
        for step in range(STEPS):
            s.begin_step()
            handles = {la: s.fetch(la, shard(step, rank, la)) for la in range(N_LAYERS)}
            for la in reversed(range(N_LAYERS)):
                h = handles[la]
                s.push_grads(la, h.ids_dev, grads_of(h.wait().clone(), step, rank, la))
            s.finish_step()
        totals = s.meter.report()["totals"]
    torch.save({"stores": [{k: getattr(o.store, k).clone() for k in ("weights", "exp_avg", "exp_avg_sq", "steps")}
                           for o in opts], "collective": totals.get("collective")}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
