"""Data parallel is exact: 2 gloo ranks on 2 shards of every batch train what one process trains on the
whole batch -- rows, AdamW moments, per-row step counts, router gates, a Lomo / AdaLomo backbone and the
losses -- with a frozen backbone at grad_accum_steps 2 and a trained backbone (which cannot accumulate) at 1.

Tolerance, stated: not bitwise, because one backward over the whole batch sums its 4 sequences' gradient
contributions in another order than two backwards over 2 each plus the all-reduce (fp32; the ranks'
average (g0 + g1) / 2 itself is exact). Measured after 4 steps (max abs): rows 1.4e-7..3.0e-7, gates
1.2e-7..3.9e-7, first moments 2e-9, second 2e-12, Lomo backbone 4e-9, AdaLomo backbone 6e-8, mean losses
1e-7..2e-7 relative. AdamW's g / (sqrt(v) + eps) magnifies last-bit differences where |g| ~ eps, so the
check is: losses to 1e-5 relative, every tensor to 1e-5 relative + 1e-6 absolute except the AdamW-updated
rows and gates, 1e-5 absolute (0.1% of one lr step of 1e-2), and per-row step counts exactly. Replicas
(rank 0 vs rank 1) must be bitwise identical. Every row may be active (with a binding row budget N ranks
have N budgets, and route differently from one process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.meft.train import dp_exact_worker as w

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp_exact")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w.WORLD}",
           str(REPO / "tests" / "meft" / "train" / "dp_exact_worker.py"), str(out), *w.CASES]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _close(a, b, what, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(w.CASES))
def test_two_ranks_equal_one_process_on_the_whole_batch(torchrun_out, case):
    ranks = [torch.load(torchrun_out / f"{case}_rank{r}.pt") for r in range(w.WORLD)]
    ref = w.run_case(case, rank=None)
    a, b = ranks
    for la in range(len(ref["stores"])):  # replicas: bitwise
        for k in ref["stores"][la]:
            assert torch.equal(a["stores"][la][k], b["stores"][la][k]), f"layer {la} {k}: replicas differ"
        assert torch.equal(a["gates"][la], b["gates"][la])
    assert a["backbone"].keys() == b["backbone"].keys() == ref["backbone"].keys()
    assert (len(ref["backbone"]) > 0) == (case != "frozen")
    for n in ref["backbone"]:
        assert torch.equal(a["backbone"][n], b["backbone"][n]), f"{n}: replicas differ"
        _close(a["backbone"][n], ref["backbone"][n], n)
    mean_loss = [(x + y) / 2 for x, y in zip(a["losses"], b["losses"])]  # what `meft train` logs
    assert mean_loss == pytest.approx(ref["losses"], rel=1e-5)
    for la, store in enumerate(ref["stores"]):
        assert torch.equal(a["stores"][la]["steps"], store["steps"]), f"layer {la}: per-row steps"
        assert int(store["steps"].max()) == w.STEPS
        for k in ("exp_avg", "exp_avg_sq"):
            _close(a["stores"][la][k], store[k], f"layer {la} {k}")
        _close(a["stores"][la]["weights"], store["weights"], f"layer {la} rows", atol=1e-5)
        _close(a["gates"][la], ref["gates"][la], f"layer {la} gates", atol=1e-5)


def test_a_trained_backbone_with_accumulation_is_refused_before_training(tiny, tmp_path):
    """`meft train --backbone lomo --grad-accum-steps 2`: one clear line naming both options, exit 2."""
    res = subprocess.run([sys.executable, "-m", "meft.cli.main", "train", "--model", str(tiny / "model"),
                          "--data", str(tiny / "train.jsonl"), "--output-dir", str(tmp_path / "r"),
                          "--backbone", "lomo", "--grad-accum-steps", "2", "--progress", "false"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--backbone lomo with --grad-accum-steps 2" in res.stderr and "fix:" in res.stderr
