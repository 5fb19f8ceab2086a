"""Data-parallel TransferScheduler: 2 processes under torchrun (gloo), each on its own shard of rows.

The two ranks must end with identical stores (replicas) equal, bitwise, to one process that pushes both
shards' gradients scaled by 1/2 as two micro-batches of one step (fp32 wire: (g0 + g1) / 2 and g0/2 + g1/2
are the same fp32 numbers), and the meter must count the row-gradient exchange as its own traffic kind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload.scheduler import TransferScheduler
from offload.updates import check_update_args
from tests.offload import dist_worker as w

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("offload_dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w.WORLD}",
           str(REPO / "tests" / "offload" / "dist_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(w.WORLD)]


def one_process_on_both_shards() -> list:
    opts = w.make_opts()
    with TransferScheduler(opts, max_rows=w.MAX_ROWS, wire_dtype=torch.float32, host_threads=1) as s:
        for step in range(w.STEPS):
            s.begin_step(w.WORLD)  # one micro-batch per rank's shard
            for rank in range(w.WORLD):
                s.begin_micro_batch()
                handles = {la: s.fetch(la, w.shard(step, rank, la)) for la in range(w.N_LAYERS)}
                for la in reversed(range(w.N_LAYERS)):
                    h = handles[la]
                    g = w.grads_of(h.wait().clone(), step, rank, la) / w.WORLD  # the ranks' average
                    s.push_grads(la, h.ids_dev, g)
            s.finish_step()
    return opts


def test_two_ranks_are_replicas_equal_to_one_process_on_the_whole_batch(ranks):
    ref = one_process_on_both_shards()
    for la, o in enumerate(ref):
        assert int(o.store.steps.sum()) > 0
        for name in ("weights", "exp_avg", "exp_avg_sq", "steps"):
            a, b = ranks[0]["stores"][la][name], ranks[1]["stores"][la][name]
            assert torch.equal(a, b), f"layer {la} {name}: the ranks' replicas differ"
            torch.testing.assert_close(a, getattr(o.store, name), rtol=0, atol=0,
                                       msg=lambda m, la=la, name=name: f"layer {la} {name}: {m}")


def test_the_exchange_is_metered_as_its_own_kind(ranks):
    for r in ranks:
        c = r["collective"]
        assert c is not None and c["count"] == w.STEPS * w.N_LAYERS  # one exchange per layer and step
        assert c["bytes"] >= 4 * w.WIDTH * c["rows"]  # the union's fp32 gradients (plus the ids)


def test_data_parallel_refuses_staleness1():
    with pytest.raises(ValueError, match="staleness=1 with a process group"):
        check_update_args(1, "none", 1.0, data_parallel=True)


def test_a_one_rank_group_exchanges_nothing():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with TransferScheduler(w.make_opts(), max_rows=w.MAX_ROWS, staleness=1, process_group=dist.group.WORLD) as s:
            assert s.updates.reducer is None  # one rank: nothing to combine, every mode allowed
    finally:
        dist.destroy_process_group()
