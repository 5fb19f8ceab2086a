"""What a training run leaves behind for a human: metrics.jsonl, a loss-curve PNG, a summary table.

`MetricsLog` appends one JSON object per step (flushed each time, so a killed run keeps its history
up to the last step). On resume it truncates records past the resumed step, so the file always
describes one consistent run. `format_table` renders rows as an aligned terminal table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MetricsLog", "format_table", "plot_loss_curve"]


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


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """An aligned plain-text table (numbers right-aligned, text left-aligned)."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_num(row[i]) for row in rows) if rows else False for i in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return str(x)


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
