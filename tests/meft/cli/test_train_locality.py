"""`meft train --locality-weight` on the tiny local model: the term in metrics.jsonl, summary and config, an exact
resume (the background questions are drawn by step), bad values refused in one line, and torchrun."""

import json
import os
import sys

from tests.meft.cli.test_train import MEFT, _cmd, _losses, _run

LOCALITY = ["--locality-weight", "0.5", "--locality-background", "2"]
QUIET = ["--eval-before", "false", "--eval-after", "false", "--retention", "false", "--generations", "false",
         "--general", "false"]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_with_the_locality_term_reports_it_and_resumes_exactly(tiny, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    res = _run(_cmd(tiny, straight, "--steps", "4", *LOCALITY, *QUIET))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "meft: locality: 2 of" in res.stdout and "locality term (first -> last step)" in res.stdout
    recs = _records(straight)
    assert len(recs) == 4 and recs[0]["locality"] == 0.0 and recs[-1]["locality"] > 0  # values start at zero
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["last_locality"] == recs[-1]["locality"]
    cfg = json.loads((straight / "config.json").read_text())["meft"]
    assert cfg["locality_weight"] == 0.5 and cfg["locality_background"] == 2 and cfg["locality_margin"] == 0.0
    assert json.loads((straight / "adapter" / "adapter_config.json").read_text())["config"]["locality_weight"] == 0.5
    common = [*LOCALITY, *QUIET, "--save-every", "2"]
    assert _run(_cmd(tiny, split, "--steps", "2", *common)).returncode == 0
    res = _run(_cmd(tiny, split, "--steps", "4", "--resume", *common))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["locality"] for r in _records(split)] == [r["locality"] for r in recs]
    assert _losses(split) == _losses(straight)


def test_bad_locality_values_are_one_clear_line(tiny, tmp_path):
    res = _run(_cmd(tiny, tmp_path / "run", "--steps", "1", "--locality-weight", "-1"))
    assert res.returncode != 0
    assert "locality_weight = -1.0: a number >= 0 (0 = off)" in res.stderr
    assert "Traceback" not in res.stderr


def test_train_with_the_locality_term_under_torchrun(tiny, tmp_path):
    """2 ranks, each with its own background questions per micro-batch: the logged term is the ranks' mean."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "meft.cli.main"]
    cmd = torchrun + _cmd(tiny, out, "--steps", "3", *LOCALITY, *QUIET)[len(MEFT):]
    res = _run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = _records(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[-1]["locality"] > 0
