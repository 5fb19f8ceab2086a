"""`meft train`'s trade-off probe: the summary (console and summary.json) holds retention before/after, the
general-prompt agreement and the free prompts answered by the base and the fine-tuned model side by side;
`--retention false --generations false --general false` turns it off. Tiny local model (the mechanics; the
sets are chosen for the default model)."""

import json

from meft.data.retention import FREE_PROMPTS
from tests.meft.cli.test_train import _cmd, _run


def test_summary_shows_retention_and_side_by_side_generations(tiny, tmp_path):
    out = tmp_path / "run"
    res = _run(_cmd(tiny, out, "--steps", "2", "--eval-data", str(tiny / "train.jsonl"), "--eval-limit", "4"))
    assert res.returncode == 0, res.stderr[-3000:]
    t = json.loads((out / "summary.json").read_text())["trade_off"]
    r = t["retention"]
    assert r["n"] == 30 and len(r["items"]) == 30 and 0 <= r["before"] <= 1 and 0 <= r["after"] <= 1
    assert {"exact_match_before", "exact_match_after", "kept", "lost"} <= set(r)
    assert all({"before", "after"} <= set(i) for i in r["items"])
    assert [g["prompt"] for g in t["generations"]] == list(FREE_PROMPTS)
    assert all(isinstance(g["base"], str) and isinstance(g["tuned"], str) for g in t["generations"])
    assert "retention contains" in res.stdout and "base model" in res.stdout and "fine-tuned" in res.stdout
    assert FREE_PROMPTS[0] in res.stdout
    g = t["general"]
    assert 0.0 <= g["agreement"] <= 1.0 and g["n_prompts"] == len(g["per_prompt"]) > 0 and g["n_tokens"] > 0
    assert "general prompts" in res.stdout
    # the in-place probe (trained model in memory, adapters off for the base) == its plain twin, which loads
    # the base model and the saved adapter afresh from the run folder
    from meft.cli.train import trade_off
    from meft.config import MeftConfig
    from meft.train.args import TrainArgs

    config = json.loads((out / "config.json").read_text())
    targs, cfg = TrainArgs(**config["train"]), MeftConfig.from_dict(config["meft"])
    fresh = trade_off(targs, cfg)
    for key in ("exact_match_before", "exact_match_after", "before", "after"):
        assert fresh["retention"][key] == r[key], key
    assert [(i["before"], i["after"]) for i in fresh["retention"]["items"]] == [(i["before"], i["after"])
                                                                                for i in r["items"]]
    assert fresh["generations"] == t["generations"]
    assert fresh["general"] == t["general"]


def test_trade_off_probe_can_be_turned_off(tiny, tmp_path):
    out = tmp_path / "run"
    res = _run(_cmd(tiny, out, "--steps", "1", "--eval-before", "false", "--eval-after", "false",
                    "--retention", "false", "--generations", "false", "--general", "false"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trade_off" not in json.loads((out / "summary.json").read_text())
    assert "retention" not in res.stdout
