"""Experiment tracking: `--report-to none|tensorboard|wandb` for `meft train` and `meft.MeftCallback`.

Owns the names of the per-step scalars and the two real backends, each an optional extra:

* ``tensorboard`` (``pip install 'meft[tensorboard]'``): `torch.utils.tensorboard.SummaryWriter`
  writing event files into ``<run>/tensorboard`` (``tensorboard --logdir <run>/tensorboard``);
* ``wandb`` (``pip install 'meft[wandb]'``): a run in project ``$WANDB_PROJECT`` (default ``meft``)
  under ``<run>/wandb``; offline (``wandb sync <run>/wandb/offline-run-*`` uploads it later) unless
  ``WANDB_MODE`` says otherwise or credentials exist (``WANDB_API_KEY`` or a ``wandb login``).
  When a wandb run is already active (HF Trainer's own ``report_to="wandb"``), it is reused.

Scalars: metrics.jsonl key -> scalar name (`SCALARS`), logged at the optimizer step. A missing library
is a `TrackingError` (a ValueError: one clear line from the CLI) naming --report-to, the value and the fix.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["REPORT_TO", "SCALARS", "TrackingError", "Tracker", "parse_report_to", "open_tracker", "step_traffic"]

REPORT_TO = ("none", "tensorboard", "wandb")
SCALARS = {  # metrics.jsonl key -> tracked scalar name
    "loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
    "active_rows": "meft/rows_down", "rows_up": "meft/rows_up",
    "mb_down": "meft/mb_down", "mb_up": "meft/mb_up", "cpu_update_ms": "meft/cpu_update_ms",
    "distinct_experts": "meft/distinct_experts", "dropped_share": "meft/dropped_share",
    "locality": "train/locality",  # with MeftConfig.locality_weight > 0 (meft.adapter.locality)
}
_EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb"}


class TrackingError(ValueError):
    """A --report-to value that cannot be served (unknown name, library not installed)."""


def parse_report_to(value) -> list[str]:
    """None / "none" / "tensorboard" / "tensorboard,wandb" / ["wandb", ...] -> list of backends (no "none")."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [str(x).strip().lower() for x in items if str(x).strip()]
    bad = [n for n in names if n not in REPORT_TO]
    if bad:
        raise TrackingError(f"--report-to {value!r}: unknown {bad}; choose from {list(REPORT_TO)}, several "
                            "separated by commas (e.g. --report-to tensorboard,wandb)")
    out = [n for n in dict.fromkeys(names) if n != "none"]
    if "none" in names and out:
        raise TrackingError(f"--report-to {value!r}: 'none' cannot be combined with {out}; drop one")
    return out


def _missing(name: str, exc: Exception) -> TrackingError:
    return TrackingError(f"--report-to {name}: the {name!r} package is not installed ({exc}); fix: pip install "
                         f"'meft[{_EXTRA[name]}]' (or pip install {name}), or use --report-to none")


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _missing("tensorboard", e) from e
        self.log_dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, scalars: dict, step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class _Wandb:
    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError as e:
            raise _missing("wandb", e) from e
        self.wandb, self.owned = wandb, wandb.run is None
        if self.owned:
            run_dir.mkdir(parents=True, exist_ok=True)
            mode = _wandb_mode()
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "meft"), dir=str(run_dir), config=config,
                                  mode=mode, settings=wandb.Settings(silent=True))
            if mode == "offline":
                print(f"meft: wandb run saved offline in {self.run.dir.rsplit('/files', 1)[0]}; upload it with "
                      "`wandb sync` on that folder", flush=True)
        else:
            self.run = wandb.run  # Trainer's WandbCallback opened it: log into the same run

    def log(self, scalars: dict, step: int) -> None:
        if self.owned:
            self.run.log(scalars, step=step)
        else:  # the run's own step counter belongs to its owner
            self.run.log({**scalars, "train/global_step": step})

    def close(self) -> None:
        if self.owned:
            self.run.finish()


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb}


class Tracker:
    """The chosen backends behind one `log(scalars, step)`; a no-op with none."""
    def __init__(self, backends: Iterable):
        self.backends = list(backends)

    def log(self, scalars: dict, step: int) -> None:
        clean = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for b in self.backends:
            b.log(clean, step)

    def log_record(self, record: dict) -> None:
        """One metrics.jsonl record, under the names of `SCALARS`."""
        self.log({SCALARS[k]: v for k, v in record.items() if k in SCALARS}, int(record["step"]))

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []


def open_tracker(report_to, run_dir: str | Path, config: dict | None = None) -> Tracker:
    """A Tracker for `report_to` (see `parse_report_to`) writing under `run_dir`."""
    names = parse_report_to(report_to)
    return Tracker(_BACKENDS[n](Path(run_dir), config or {}) for n in names)


def step_traffic(rt) -> dict:
    """Cumulative traffic of runtime `rt`: bytes and rows each way, CPU update ms (zeros without a meter).
    Per-step values are differences of two calls."""
    if rt.meter is None:
        return {"bytes_down": 0, "bytes_up": 0, "rows_down": 0, "rows_up": 0, "cpu_ms": 0.0}
    rep = rt.meter.report()
    h2d, d2h = rep["totals"].get("h2d", {}), rep["totals"].get("d2h", {})
    return {"bytes_down": h2d.get("bytes", 0), "bytes_up": d2h.get("bytes", 0), "rows_down": h2d.get("rows", 0),
            "rows_up": d2h.get("rows", 0), "cpu_ms": rep["cpu"].get("update", {}).get("ms", 0.0)}
