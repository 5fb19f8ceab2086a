"""One rank of the shared-store tests (tests/offload/test_shared_store.py), under torchrun:

    torchrun --standalone --nproc_per_node=W tests/offload/shared_worker.py OUT_DIR MODE RANKS_PER_NODE [DEVICE]

Ranks r // RANKS_PER_NODE form one emulated node (MEFT_NODE_ID). MODE "train": the node's ranks share one
host copy of each RowStore and train a seeded script data parallel (each rank its own shard of rows,
gradients from the rows it received, fp32 wire), once with staged fetches and once zero-copy (shared
mirrors), on DEVICE (default cpu; every rank on the same GPU with cuda); local rank 1 of every node is
made a slow owner on some steps (it sleeps before its row updates), so a rank that read rows before the
node barrier would see stale ones. Saves per rank: the stores, the host-copy measurements (the shared
stores, and private control stores), and the segment paths.
MODE "die": local rank 0 kills itself (SIGKILL) right after creating its first segment, before unlinking.
MEFT_TEST_SKIP_NODE_BARRIER=1 removes the node barrier (to show the test catches its absence).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from offload import shared  # noqa: E402
from offload.copies import host_copies  # noqa: E402
from offload.node import NODE_ENV, node_of  # noqa: E402
from offload.scheduler import TransferScheduler  # noqa: E402
from tests.offload.dist_worker import MAX_ROWS, N_LAYERS, N_ROWS, WIDTH, make_opts, shard  # noqa: E402, F401 (test_shared_store reads them here)

STEPS = 8  # the stores, their rows and each rank's shard of ids are dist_worker's
SLOW_S = 0.25  # the slow owner's delay before its row updates, on steps with step % 3 == 1
KEYS = ("weights", "exp_avg", "exp_avg_sq", "steps")


def grads_of(rows: torch.Tensor, step: int, rank: int, layer: int) -> torch.Tensor:
    """Multiples of 2**-6 below 2**10 in magnitude: any order of summing up to 4 ranks' is exact in fp32, so
    the all-reduce (whatever gloo's order) equals the one-process accumulation bit for bit."""
    noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(7919 * step + 31 * rank + layer))
    noise = noise.to(rows.device)
    return torch.round((rows.float() * 0.7 + noise) * 64) / 64


def train(opts, group, rank: int, slow: bool, zero_copy: bool, device: str) -> dict:
    with TransferScheduler(opts, device=device, max_rows=MAX_ROWS, wire_dtype=torch.float32, host_threads=1,
                           process_group=group, zero_copy=zero_copy) as s:
        if os.environ.get("MEFT_TEST_SKIP_NODE_BARRIER") == "1":
            s._test_skip_waits.add("node")
        for step in range(STEPS):
            s.begin_step()
            handles = {la: s.fetch(la, shard(step, rank, la)) for la in range(N_LAYERS)}
            for la in reversed(range(N_LAYERS)):
                h = handles[la]
                s.push_grads(la, h.ids_dev, grads_of(h.wait().clone(), step, rank, la))
            s.updates.test_update_delay_s = SLOW_S if slow and step % 3 == 1 else 0.0
            s.finish_step()
        meter = s.meter.report()["totals"]
    return {"meter": meter}


def snapshot(opts) -> list[dict]:
    out = []
    for o in opts:
        d = {k: getattr(o.store, k).clone() for k in KEYS}
        if o.store.mirror is not None:
            d["mirror"] = o.store.mirror.clone()
        out.append(d)
    return out


def main() -> None:
    out, mode, per_node = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    rank = int(os.environ["RANK"])
    os.environ[NODE_ENV] = f"emu{rank // per_node}"  # emulated node of this rank
    dist.init_process_group("gloo")
    group = dist.new_group(backend="gloo")  # the schedulers' own group: only their worker thread uses it
    node = node_of(group)
    if mode == "die":
        if node.leader:
            def die(path: str) -> None:
                (out / f"segment{rank}.txt").write_text(path)
                os.kill(os.getpid(), signal.SIGKILL)
            shared._test_after_create = die
        make_opts(node)
        return
    staged = make_opts(node)
    n_segments = node._segments
    paths = [f"{shared.SHM_DIR}/{node.prefix}-{k}" for k in range(1, n_segments + 1)]
    dist.barrier()  # every rank has built its stores (the leader unlinks after the others' attach)
    left_after_build = [p for p in paths if os.path.exists(p)]  # unlinked at construction: nothing can leak
    slow = node.local_rank == 1
    meter = train(staged, group, rank, slow, zero_copy=False, device=device)["meter"]
    mapped = make_opts(node)
    train(mapped, group, rank, slow, zero_copy=True, device=device)
    control = make_opts(None)  # private stores: one copy per rank
    result = {
        "node": node.index, "local_rank": node.local_rank, "local_world": node.local_world,
        "staged": snapshot(staged), "zero_copy": snapshot(mapped), "collective": meter.get("collective"),
        "copies": host_copies([o.store for o in staged + mapped]),
        "copies_private": host_copies([o.store for o in control]),
        "paths": [f"{shared.SHM_DIR}/{node.prefix}-{k}" for k in range(1, node._segments + 1)],
        "left_after_build": left_after_build,
    }
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
