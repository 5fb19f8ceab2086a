"""The real `meft inspect` CLI on a tiny trained run: trained rows from step counts (run folder) equal the
ones inferred from nonzero values (bare adapter folder), routing of --data examples, the PNG, errors."""

import re
import shutil

import pytest
import torch

import meft
from meft.adapter.inspect import adapter_stats, route_examples, top_experts
from meft.data.records import collate
from tests.meft.adapter.test_wrap import small_config, tiny_model
from tests.meft.cli.test_train import MEFT, _cmd, _run


@pytest.fixture(scope="module")
def trained_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "run"
    res = _run(_cmd(tiny, out, "--steps", "3", "--eval-before", "false", "--eval-after", "false",
                    "--save-every", "3"))  # a completed run keeps a checkpoint only when asked
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _table_rows(stdout: str) -> dict[int, tuple[int, int]]:
    """layer -> (rows trained, experts trained) from the usage table."""
    got = {}
    for m in re.finditer(r"^\s+(\d+)\s+(\d+) / 256\s+(\d+) / 16\s", stdout, flags=re.M):
        got[int(m.group(1))] = (int(m.group(2)), int(m.group(3)))
    return got


def test_inspect_run_folder_with_data(tiny, trained_run):
    res = _run(MEFT + ["inspect", str(trained_run), "--data", str(tiny / "train.jsonl"), "--top", "3"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step counts from" in res.stdout and "(trained = step counts)" in res.stdout
    rows = _table_rows(res.stdout)
    assert set(rows) == {0, 1} and all(0 < r <= 256 and 0 < e <= 16 for r, e in rows.values())
    assert "top 3 experts by value norm" in res.stdout
    assert res.stdout.count("What is the capital of France") >= 3  # examples listed per top expert
    assert (trained_run / "inspect.png").stat().st_size > 1000
    assert "Warning" not in res.stderr


def test_bare_adapter_infers_the_same_trained_rows(trained_run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(trained_run / "adapter", bare)
    res = _run(MEFT + ["inspect", str(bare), "--png", str(tmp_path / "u.png")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(trained = nonzero values)" in res.stdout and (tmp_path / "u.png").is_file()
    with_steps = adapter_stats(str(trained_run / "adapter"), str(next((trained_run / "checkpoints").glob("step-*"))))
    inferred = adapter_stats(str(bare))
    assert [s.source for s in with_steps] == ["step counts"] * 2
    for a, b in zip(with_steps, inferred):
        # a row updated with an all-zero value gradient (its relu never fired) keeps values of exactly 0:
        # nonzero values find the rows that changed, a subset of the rows that were updated
        assert bool((b.trained_per_expert <= a.trained_per_expert).all()) and b.trained_rows > 0
        assert torch.equal(a.value_norm, b.value_norm)
    assert _table_rows(res.stdout) == {s.layer: (s.trained_rows, s.trained_experts) for s in inferred}


def test_untrained_adapter_and_errors(tmp_path):
    model = meft.wrap(tiny_model("llama"), small_config())
    meft.save_adapter(model, str(tmp_path / "fresh"), verbose=False)
    model.meft.close()
    stats = adapter_stats(str(tmp_path / "fresh"))
    assert all(s.trained_rows == 0 and float(s.value_norm.sum()) == 0 for s in stats)
    assert top_experts(stats, 5) == []
    res = _run(MEFT + ["inspect", str(tmp_path / "fresh"), "--png", "none"])
    assert res.returncode == 0 and "never trained" in res.stdout
    res = _run(MEFT + ["inspect", str(tmp_path)])
    assert res.returncode == 2 and "is neither an adapter folder" in res.stderr
    res = _run(MEFT + ["inspect", str(tmp_path / "fresh"), "--data", "world_facts:3"])
    assert res.returncode == 2 and "--data needs the base model: pass --model" in res.stderr


def test_route_examples_ignores_padding():
    """An example's routing is the same alone or padded in a batch with a longer one."""
    model = meft.wrap(tiny_model("llama"), small_config())
    short, long = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": list(range(3, 15)), "labels": [0] * 12}
    alone = route_examples(model, [collate([short], 0)])
    padded = route_examples(model, [collate([short, long], 0)])
    model.meft.close()
    for a, p in zip(alone, padded):
        assert a.shape[0] == 1 and p.shape[0] == 2
        torch.testing.assert_close(a[0], p[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.sum(dim=1), torch.ones(2))  # gate weights of a token sum to 1
