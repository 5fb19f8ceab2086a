"""One rank of the data-parallel `meft.wrap` test (tests/meft/adapter/test_distributed.py), under torchrun:

    torchrun --standalone --nproc_per_node=2 tests/meft/adapter/dp_worker.py OUT_DIR MODE

MODE "train": rank r trains a wrapped tiny Llama (frozen backbone, fp32 wire) on shard r of every batch
and saves its losses, rows and router gates, and the host copies of the stores (both ranks are one node:
one shared copy). MODE "mismatch": rank 1 wraps with another adapter_rows;
every rank saves the error meft.wrap raised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import meft  # noqa: E402
from tests.meft.adapter.test_wrap import small_config, tiny_model  # noqa: E402

STEPS, WORLD, SHARD = 6, 2, 2  # SHARD sequences per rank and step


def batches() -> list[torch.Tensor]:
    """[STEPS] batches [WORLD * SHARD, 10]: rank r trains rows [r * SHARD, (r + 1) * SHARD)."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 96, (WORLD * SHARD, 10), generator=g) for _ in range(STEPS)]


def config(**kw):
    return small_config(**kw)  # fp32 wire: the ranks' average equals the accumulated sum bit for bit


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode == "mismatch":
        try:
            meft.wrap(tiny_model("llama"), config(adapter_rows=256 if rank == 0 else 512))
            msg = "no error"
        except ValueError as e:
            msg = str(e)
        (out / f"mismatch{rank}.txt").write_text(msg)
        dist.destroy_process_group()
        return
    model = meft.wrap(tiny_model("llama"), config())
    model.train()
    losses = []
    for ids in batches():
        part = ids[rank * SHARD:(rank + 1) * SHARD]
        loss = model(input_ids=part, labels=part).loss
        loss.backward()
        model.meft.optimizer.step()
        model.meft.optimizer.zero_grad()
        losses.append(float(loss.detach()))
    rt = model.meft
    rt.sync_to_host()
    torch.save({"losses": losses, "rows": [s.weights.clone() for s in rt.stores],
                "gates": [ad.gate.detach().clone() for ad in rt.adapters],
                "collective": rt.scheduler.meter.report()["totals"].get("collective"),
                "shared": [s.shared for s in rt.stores], "copies": rt.host_copies()}, out / f"rank{rank}.pt")
    (out / f"ok{rank}.json").write_text(json.dumps({"steps": STEPS}))
    rt.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
