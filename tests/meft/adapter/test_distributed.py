"""`meft.wrap` under torchrun (2 processes, gloo): data-parallel training of the adapter, and refusal of
ranks that wrap with different configs.

Two ranks on two shards of each batch must train the same adapter as one process that takes the two
shards as two micro-batches of one step (`grad_accum_steps=2`, loss / 2): same losses per shard, rows and
router gates bitwise (fp32 wire: the ranks' average (g0 + g1) / 2 and the accumulated g0/2 + g1/2 are the
same fp32 numbers), and both ranks hold identical replicas. Both ranks are one node: they hold one host
copy of the stores, in shared memory (`offload.shared`), measured from their memory mappings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import meft
from tests.meft.adapter import dp_worker as w
from tests.meft.adapter.test_wrap import tiny_model

REPO = Path(__file__).resolve().parents[3]


def _torchrun(out: Path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w.WORLD}",
           str(REPO / "tests" / "meft" / "adapter" / "dp_worker.py"), str(out), mode]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("meft_dp")
    proc = _torchrun(out, "train")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(w.WORLD)]


def test_two_ranks_train_like_one_process_accumulating_their_shards(ranks):
    model = meft.wrap(tiny_model("llama"), w.config(grad_accum_steps=w.WORLD))
    model.train()
    losses = [[] for _ in range(w.WORLD)]
    for ids in w.batches():
        for r in range(w.WORLD):
            part = ids[r * w.SHARD:(r + 1) * w.SHARD]
            loss = model(input_ids=part, labels=part).loss
            (loss / w.WORLD).backward()
            losses[r].append(float(loss.detach()))
        model.meft.optimizer.step()
        model.meft.optimizer.zero_grad()
    rt = model.meft
    rt.sync_to_host()
    for r in range(w.WORLD):
        assert ranks[r]["losses"] == losses[r], f"rank {r}'s losses"
    for name in ("rows", "gates"):
        ref = [s.weights for s in rt.stores] if name == "rows" else [ad.gate.detach() for ad in rt.adapters]
        for la, t in enumerate(ref):
            assert torch.equal(ranks[0][name][la], ranks[1][name][la]), f"{name} of layer {la}: replicas differ"
            torch.testing.assert_close(ranks[0][name][la], t, rtol=0, atol=0)
    assert losses[0][-1] < losses[0][0]  # it trained
    c = ranks[0]["collective"]
    assert c["count"] == w.STEPS * len(rt.stores) and c["bytes"] > 0  # one exchange per layer and step
    rt.close()


def test_the_two_ranks_of_one_node_hold_one_shared_copy_of_the_stores(ranks):
    for r in ranks:
        assert all(r["shared"]), "wrap under torchrun builds the stores in the node's shared memory"
        c = r["copies"]
        assert c["nodes"] == 1 and c["ranks_per_node"] == [w.WORLD] and c["copies_per_node"] == 1, c


def test_ranks_with_different_configs_are_refused_naming_the_field(tmp_path):
    proc = _torchrun(tmp_path, "mismatch")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(w.WORLD):
        msg = (tmp_path / f"mismatch{r}.txt").read_text()
        assert "adapter_rows" in msg and "rank 0 = 256" in msg and "rank 1 = 512" in msg, msg
