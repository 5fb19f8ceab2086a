"""Options from dataclasses: command line > config file > default, unknown keys rejected."""

import argparse
import dataclasses
import json

import pytest

from meft.cli.options import OptionsError, add_dataclass_options, resolve_options
from meft.train.run_log import MetricsLog
from offload.text import format_table


@dataclasses.dataclass
class Opts:
    steps: int = dataclasses.field(default=10, metadata={"help": "number of steps"})
    lr: float = dataclasses.field(default=1e-3, metadata={"help": "learning rate"})
    name: str | None = dataclasses.field(default=None, metadata={"help": "a name"})
    flag: bool = dataclasses.field(default=False, metadata={"help": "a switch"})


def _parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_dataclass_options(p, Opts, "opts")
    return p, p.parse_args(argv)


def test_precedence_cli_over_file_over_default(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"steps": 5, "lr": 0.5, "flag": True}))
    _, args = _parse(["--config", str(cfg), "--lr", "0.25"])
    (o,) = resolve_options(args, [Opts])
    assert (o.steps, o.lr, o.name, o.flag) == (5, 0.25, None, True)


def test_yaml_config_with_dashes(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 7\nname: run-a\n")
    _, args = _parse(["--config", str(cfg)])
    (o,) = resolve_options(args, [Opts])
    assert (o.steps, o.name) == (7, "run-a")


def test_unknown_key_in_file_is_named(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"stepz": 5}))
    _, args = _parse(["--config", str(cfg)])
    with pytest.raises(OptionsError, match="stepz"):
        resolve_options(args, [Opts])


def test_help_documents_every_option():
    p, _ = _parse([])
    text = p.format_help()
    for f in dataclasses.fields(Opts):
        assert "--" + f.name in text
    assert "learning rate" in text and "(default: 10)" in text


def test_metrics_log_resume_truncates_future(tmp_path):
    log = MetricsLog(tmp_path)
    for s in range(1, 6):
        log.write({"step": s, "loss": float(s)})
    log.close()
    log = MetricsLog(tmp_path, resume_step=3)
    log.write({"step": 4, "loss": 40.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in log.read()] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_format_table_aligns():
    t = format_table([["a", 1, 2.5], ["bbb", 1000, 0.125]], ["name", "n", "x"])
    lines = t.splitlines()
    assert len({len(x) for x in lines}) == 1 and "1,000" in t


def test_bool_flag_alone_means_true():
    _, args = _parse(["--flag"])
    (o,) = resolve_options(args, [Opts])
    assert o.flag is True
    _, args = _parse(["--flag", "false"])
    (o,) = resolve_options(args, [Opts])
    assert o.flag is False
