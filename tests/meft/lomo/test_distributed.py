"""Lomo / AdaLomo with torch.distributed: 2 processes under torchrun (gloo), one data shard per rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.meft.lomo.ddp_worker import full_batches, make_opt, tiny_model, train

REPO = Path(__file__).resolve().parents[3]
KINDS = ("lomo", "adalomo")


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("lomo_dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "meft" / "lomo" / "ddp_worker.py"), str(out), *KINDS, "ddp"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_stay_identical_and_equal_one_process_on_the_whole_batch(torchrun_out, kind):
    r0 = torch.load(torchrun_out / f"{kind}_rank0.pt")
    r1 = torch.load(torchrun_out / f"{kind}_rank1.pt")
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, make_opt(kind, model), full_batches())  # one process, the concatenated batch
    for name, ref in model.state_dict().items():
        assert torch.equal(r0[name], r1[name]), f"ranks differ on {name}"
        torch.testing.assert_close(r0[name], ref, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(ref, before[name]), f"{name} did not train"


def test_ddp_wrapped_model_is_refused_and_ddp_grads_are_caught(torchrun_out):
    for rank in (0, 1):
        lines = (torchrun_out / f"ddp_rank{rank}.txt").read_text().splitlines()
        assert lines[0].startswith("model: ValueError") and "DistributedDataParallel" in lines[0]
        assert lines[1].startswith("grads after backward: 11")  # DDP re-creates every .grad after our hook
        assert lines[2].startswith("step: RuntimeError") and "holds .grad" in lines[2]
