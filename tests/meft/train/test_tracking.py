"""--report-to: the real `meft train` CLI writes TensorBoard event files whose scalars equal metrics.jsonl;
wandb offline runs; MeftCallback(report_to=...) under HF Trainer; clear errors for bad values and
missing libraries."""

import json
import os
import subprocess
import sys

import pytest

from meft.train.tracking import SCALARS, TrackingError, open_tracker, parse_report_to
from tests.meft.cli.test_train import _cmd, _run


def _events(log_dir) -> dict[str, list[tuple[int, float]]]:
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea_mod.EventAccumulator(str(log_dir), size_guidance={ea_mod.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_cli_tensorboard_scalars_equal_metrics_jsonl(tiny, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (meft[tensorboard]) is not installed")
    out = tmp_path / "run"
    res = _run(_cmd(tiny, out, "--steps", "3", "--eval-before", "false", "--eval-after", "false",
                    "--report-to", "tensorboard", "--locality-weight", "0.1", "--locality-background", "2"))
    assert res.returncode == 0, res.stderr[-3000:]  # with the locality term on: every scalar of SCALARS is logged
    assert "Warning" not in res.stderr and "warn" not in res.stdout.lower(), res.stderr[-2000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = _events(out / "tensorboard")
    assert set(events) == set(SCALARS.values())
    for key, tag in SCALARS.items():
        assert [s for s, _ in events[tag]] == [1, 2, 3], tag
        want = [float(r[key]) for r in recs]
        got = [v for _, v in events[tag]]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6), tag  # event files hold float32
    assert all(r["distinct_experts"] > 0 and 0 <= r["dropped_share"] <= 1 for r in recs)
    assert all(r["rows_up"] > 0 and r["mb_up"] > 0 and r["cpu_update_ms"] >= 0 for r in recs)


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb (meft[wandb]) is not installed")
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no credentials, so offline
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    tracker = open_tracker("wandb", tmp_path / "run", {"meft": {"adapter_rows": 256}})
    tracker.log_record({"step": 1, "loss": 2.5, "mb_down": 1.25, "distinct_experts": 3.0, "tokens": 7})
    tracker.log_record({"step": 2, "loss": 2.0, "mb_down": 1.0, "distinct_experts": 4.0, "tokens": 7})
    tracker.close()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = next(runs[0].glob("*.wandb")).read_bytes()
    for name in ("train/loss", "meft/mb_down", "meft/distinct_experts"):
        assert name.encode() in data


def test_parse_report_to_and_errors():
    assert parse_report_to(None) == [] and parse_report_to("none") == []
    assert parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert parse_report_to(["wandb", "wandb"]) == ["wandb"]
    with pytest.raises(TrackingError, match=r"--report-to 'mlflow': unknown \['mlflow'\]; choose from"):
        parse_report_to("mlflow")
    with pytest.raises(TrackingError, match="'none' cannot be combined"):
        parse_report_to("none,wandb")


def test_missing_library_names_option_value_and_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(TrackingError, match=r"--report-to tensorboard: the 'tensorboard' package is not "
                                            r"installed .*fix: pip install 'meft\[tensorboard\]'"):
        open_tracker("tensorboard", tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TrackingError, match=r"pip install 'meft\[wandb\]'.*or use --report-to none"):
        open_tracker(["wandb"], tmp_path)


def test_train_cli_refuses_bad_report_to(tiny, tmp_path):
    res = _run(_cmd(tiny, tmp_path / "run", "--steps", "1", "--report-to", "mlflow"))
    assert res.returncode == 2
    assert "meft train: error: --report-to 'mlflow': unknown ['mlflow']" in res.stderr
    assert "--report-to" in subprocess.run([sys.executable, "-m", "meft.cli.main", "train", "--help"],
                                           capture_output=True, text=True, env={**os.environ}).stdout


def test_callback_writes_meft_scalars_beside_trainer(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (meft[tensorboard]) is not installed")
    pytest.importorskip("accelerate")
    import meft
    from meft.train.hf_callback import MeftCallback
    from tests.meft.adapter.test_wrap import small_config, tiny_model
    from tests.meft.train.test_hf_callback import _args, _trainer

    model = meft.wrap(tiny_model("llama"), small_config())
    tr = _trainer(model, _args(tmp_path, max_steps=3), callbacks=[MeftCallback(report_to="tensorboard")])
    tr.train()
    model.meft.close()
    events = _events(tmp_path / "tensorboard")
    want = {"train/loss", "train/lr", "meft/mb_down", "meft/mb_up", "meft/rows_down", "meft/rows_up",
            "meft/cpu_update_ms", "meft/distinct_experts", "meft/dropped_share"}
    assert set(events) == want
    hist = [h for h in tr.state.log_history if "loss" in h]
    assert [v for _, v in events["train/loss"]] == pytest.approx([h["loss"] for h in hist], rel=1e-6)
    assert [v for _, v in events["meft/mb_down"]] == pytest.approx([h["meft/mb_down"] for h in hist], rel=1e-6)
    assert all(v > 0 for _, v in events["meft/distinct_experts"])
