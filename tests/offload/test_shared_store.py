"""One host copy of the row stores per node: the node's ranks share it and split the row updates by ownership.

Run under torchrun with gloo (tests/offload/shared_worker.py): 2 ranks on one node, and 4 ranks as 2
emulated nodes x 2 ranks (MEFT_NODE_ID). Every rank must end with rows, moments and step counts equal,
bitwise, to one process that takes every rank's shard as a micro-batch of one step (gradients / W; the
script's gradients are multiples of 2**-6, so the all-reduce's sum is exact in any order), with staged and
zero-copy fetches; the two nodes' stores must be identical replicas; the host memory must hold one copy
per node (measured from the mappings: the test of the measurement itself is the private control stores,
which must count one copy per rank); no /dev/shm segment may remain (names are unlinked at construction),
also when local rank 0 is killed while its segment still has a name.

The node barrier: local rank 1 of every node sleeps before its row updates on some steps, so a rank that
did not wait at the barrier would gather stale rows in the next step and the stores would differ from the
reference. `MEFT_TEST_SKIP_NODE_BARRIER=1 pytest tests/offload/test_shared_store.py -k one_node` removes
the barrier and must fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offload.copies import host_copies
from offload.node import node_of
from offload.optim import SparseAdamW
from offload.scheduler import TransferScheduler
from offload.store import RowStore
from tests.offload import shared_worker as w

REPO = Path(__file__).resolve().parents[2]


def _torchrun(out: Path, mode: str, world: int, per_node: int, device: str = "cpu") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(REPO / "tests" / "offload" / "shared_worker.py"), str(out), mode, str(per_node), device]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _train(tmp_path_factory, world: int, per_node: int, device: str = "cpu") -> list[dict]:
    out = tmp_path_factory.mktemp(f"shared_{world}x{per_node}")
    proc = _torchrun(out, "train", world, per_node, device)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    return _train(tmp_path_factory, world=2, per_node=2)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    return _train(tmp_path_factory, world=4, per_node=2)


def one_process(world: int, zero_copy: bool, device: str = "cpu") -> list:
    opts = w.make_opts()
    with TransferScheduler(opts, device=device, max_rows=w.MAX_ROWS, wire_dtype=torch.float32, host_threads=1,
                           zero_copy=zero_copy) as s:
        for step in range(w.STEPS):
            s.begin_step(world)  # one micro-batch per rank's shard
            for rank in range(world):
                s.begin_micro_batch()
                handles = {la: s.fetch(la, w.shard(step, rank, la)) for la in range(w.N_LAYERS)}
                for la in reversed(range(w.N_LAYERS)):
                    h = handles[la]
                    s.push_grads(la, h.ids_dev, w.grads_of(h.wait().clone(), step, rank, la) / world)
            s.finish_step()
    return opts


def _assert_equal_to_one_process(ranks: list[dict], world: int, device: str = "cpu") -> None:
    for fetch in ("staged", "zero_copy"):
        ref = one_process(world, zero_copy=fetch == "zero_copy", device=device)
        for r, got in enumerate(ranks):
            for la, o in enumerate(ref):
                assert int(o.store.steps.sum()) > 0
                for name in w.KEYS:
                    where = f"{fetch} rank {r} layer {la} {name}"
                    torch.testing.assert_close(got[fetch][la][name], getattr(o.store, name), rtol=0, atol=0,
                                               msg=lambda m, where=where: f"{where}: {m}")
                if fetch == "zero_copy":  # the shared mirror holds the master rows in the wire dtype
                    assert torch.equal(got[fetch][la]["mirror"], got[fetch][la]["weights"])


def _assert_no_segments_left(ranks: list[dict]) -> None:
    paths = {p for r in ranks for p in r["paths"]}
    assert paths and all(not r["left_after_build"] for r in ranks)  # unlinked once every rank had mapped it
    assert not [p for p in paths if os.path.exists(p)]


def test_two_ranks_on_one_node_share_one_copy_equal_to_one_process(one_node):
    assert [(r["node"], r["local_rank"], r["local_world"]) for r in one_node] == [(0, 0, 2), (0, 1, 2)]
    _assert_equal_to_one_process(one_node, world=2)


def test_one_node_holds_one_host_copy_and_the_measure_sees_private_copies(one_node):
    for r in one_node:
        c = r["copies"]
        assert c["nodes"] == 1 and c["ranks_per_node"] == [2] and c["copies_per_node"] == 1, c
        one_copy = sum(RowStore.bytes_needed(w.N_ROWS, w.WIDTH) for _ in range(2 * w.N_LAYERS))
        mirrors = w.N_LAYERS * w.N_ROWS * w.WIDTH * 4
        assert c["store_bytes_per_node"] == [one_copy + mirrors], c
        control = r["copies_private"]  # every rank its own store: the measurement must count 2
        assert control["copies_per_node"] == 2, control
        assert control["store_bytes_per_node"] == [2 * w.N_LAYERS * RowStore.bytes_needed(w.N_ROWS, w.WIDTH)]


def test_no_segment_left_after_a_normal_close(one_node):
    _assert_no_segments_left(one_node)


def test_the_exchange_is_still_metered(one_node):
    for r in one_node:
        assert r["collective"]["count"] == w.STEPS * w.N_LAYERS


@pytest.mark.slow
def test_two_emulated_nodes_of_two_ranks_are_identical_replicas_equal_to_one_process(two_nodes):
    assert [(r["node"], r["local_rank"]) for r in two_nodes] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    _assert_equal_to_one_process(two_nodes, world=4)
    for fetch in ("staged", "zero_copy"):  # node 1's store is node 0's, bit for bit
        for la in range(w.N_LAYERS):
            for name in w.KEYS:
                assert torch.equal(two_nodes[0][fetch][la][name], two_nodes[2][fetch][la][name])
    for r in two_nodes:
        c = r["copies"]
        assert c["nodes"] == 2 and c["ranks_per_node"] == [2, 2] and c["copies_per_node"] == 1, c
        assert r["copies_private"]["copies_per_node"] == 2
    _assert_no_segments_left(two_nodes)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_two_ranks_register_one_shared_mirror_and_equal_one_process(tmp_path_factory):
    """Both ranks on one GPU: CudaCopyEngine pins and maps the node's one mirror (cudaHostRegister of the
    shared pages in each rank) and the staged path's rows come from the shared store."""
    ranks = _train(tmp_path_factory, world=2, per_node=2, device="cuda")
    _assert_equal_to_one_process(ranks, world=2, device="cuda")
    assert all(r["copies"]["copies_per_node"] == 1 for r in ranks)
    _assert_no_segments_left(ranks)


def test_a_killed_leader_leaves_no_segment(tmp_path):
    proc = _torchrun(tmp_path, "die", world=2, per_node=2)
    assert proc.returncode != 0  # local rank 0 died
    path = Path((tmp_path / "segment0.txt").read_text())
    deadline = time.monotonic() + 10  # its resource tracker unlinks the name once it sees the process gone
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not path.exists(), f"{path} leaked"


def test_one_process_stays_private():
    store = RowStore(4, 2)
    assert not store.shared and store.node is None
    c = host_copies([store])
    assert c == {"nodes": 1, "ranks_per_node": [1], "copies_per_node": 1,
                 "store_bytes_per_node": [RowStore.bytes_needed(4, 2)]}


def test_node_of_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        node_of()


def test_a_one_rank_node_keeps_private_stores():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        node = node_of()
        assert node.local_world == 1 and node.leader and node.owner == (0, 1)
        assert not RowStore(4, 2, node=node).shared  # one rank on the node: nothing to share
    finally:
        dist.destroy_process_group()


def test_updates_split_by_owner_equal_one_update_bitwise():
    """The node's ranks each update their share (id % 2) of one store from the same gradients: the result
    is the whole update's, row for row, and the inf/NaN decision covers every row on every owner."""
    g = torch.Generator().manual_seed(3)
    init = torch.randn(32, 8, generator=g)
    ids, grads = torch.tensor([1, 4, 5, 10, 17, 30]), torch.randn(6, 8, generator=g)
    whole = SparseAdamW(RowStore(32, 8, init=init), lr=1e-2, weight_decay=0.1)
    whole.accumulate(ids, grads)
    whole.step()
    split_store = RowStore(32, 8, init=init)
    for index in range(2):  # two owners over one store, as two ranks over a shared one
        opt = SparseAdamW(split_store, lr=1e-2, weight_decay=0.1)
        opt.accumulate(ids, grads)
        assert opt.owned((index, 2)).tolist() == [int(i) % 2 == index for i in ids]
        opt.step(owner=(index, 2))
    for name in w.KEYS:
        assert torch.equal(getattr(split_store, name), getattr(whole.store, name)), name
    bad = SparseAdamW(RowStore(32, 8, init=init))
    bad.accumulate(torch.tensor([0, 1]), torch.tensor([[float("inf")] * 8, [0.0] * 8]))
    with pytest.warns(UserWarning, match="non-finite"):
        assert not bad.step(owner=(1, 2))  # row 1 is finite, but the step is skipped whole, as on rank 0
    with pytest.raises(ValueError, match="owner"):
        bad.accumulate(torch.tensor([0]), torch.zeros(1, 8))
        bad.step(owner=(2, 2))


def test_hostnames_that_collide_across_machines_are_refused(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv("MEFT_NODE_ID", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun says 2 ranks here, but 1 rank has this hostname
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="MEFT_NODE_ID"):
            node_of()
    finally:
        dist.destroy_process_group()
