"""What a training run leaves behind for a human: metrics.jsonl, a loss-curve PNG, a summary table.

`MetricsLog` appends one JSON object per step (flushed each time, so a killed run keeps its history
up to the last step). On resume it truncates records past the resumed step, so the file always
describes one consistent run. Tables are `offload.text.format_table`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MetricsLog", "plot_loss_curve"]


class MetricsLog:
    """Append-only per-step metrics in `run_dir/metrics.jsonl`."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in self.read() if r.get("step", 0) <= resume_step] if resume_step else []
        with open(self.path, "w") as fh:
            for rec in kept:
                fh.write(json.dumps(rec) + "\n")
        self._fh = open(self.path, "a")  # noqa: SIM115 - kept open for the run, closed in close()

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed run: everything before it is complete
        return out

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def plot_loss_curve(records: Sequence[dict], path: str | Path, title: str = "training loss") -> Path | None:
    """Write a PNG of loss against step; returns None (and says why) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("meft: matplotlib is not installed, so no loss plot; `pip install meft[plots]` adds it")
        return None
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, lw=1.2, label="loss")
    if len(losses) >= 10:
        k = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, label=f"mean of last {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
