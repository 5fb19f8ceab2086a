"""PNGs of the knowledge experiment: an lr sweep (`plot_sweep`), and a capacity run (`plot_capacity`:
exact match against N; `plot_forgetting`: learned against forgotten).

`plot_sweep` draws one figure per results file: for each dataset, two panels (trained phrasings, held-out
phrasings); each AdamW-trained method is a line over the lrs it ran at (mean over its seeds, each
seed also drawn as a dot), and methods without an AdamW lr (full AdaLomo, the untrained model) are
horizontal dashed lines. The lr each method is compared at (`report.summarize`, under its selection rule) is ringed.
"""

from __future__ import annotations

from experiments.knowledge.report import method_label, order_key, summarize

__all__ = ["plot_sweep", "plot_capacity", "plot_forgetting"]


def plot_sweep(results: list[dict], path: str) -> str:
    """Write the sweep figure of `results` (dicts from the JSONL) to `path`; returns `path`."""
    plt = _pyplot()
    summary = summarize(results)
    datasets = sorted(summary)
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 4.2 * len(datasets)), squeeze=False)
    for row, ds in zip(axes, datasets):
        by_method = summary[ds]
        methods = sorted(by_method, key=lambda k: order_key(by_method[k]["method"], k))
        for ax, split in zip(row, ("trained", "held_out")):
            for i, m in enumerate(methods):
                v, color = by_method[m], f"C{i}"
                if v["lr"] is None:  # no AdamW lr: a level, not a curve
                    ax.axhline(100 * v[f"em_{split}"], ls="--", color=color, lw=1, label=f"{m} (no AdamW lr)")
                    continue
                lrs = sorted(v["by_lr"])
                ax.plot(lrs, [100 * v["by_lr"][lr][f"em_{split}"] for lr in lrs], "-o", color=color, label=m)
                for lr in lrs:
                    for r in results:
                        s = r["spec"]
                        if "error" not in r and s["dataset"] == ds and method_label(s) == m and s["lr"] == lr:
                            ax.plot([lr], [100 * r["eval"][split]["exact_match"]], ".", color=color, alpha=0.4)
                ax.plot([v["lr"]], [100 * v[f"em_{split}"]], "o", ms=13, mfc="none", color=color)
            _exact_match_axes(ax, split, "AdamW learning rate", f"{ds} facts: ")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9)
    return _save(plt, fig, path, "knowledge lr sweep: line = mean over seeds, dots = seeds, ring = lr compared at",
                 rect=(0, 0.1 / len(datasets), 1, 1))


def _exact_match_axes(ax, split: str, xlabel: str, title_prefix: str = "") -> None:
    """A log-x panel of exact match (%) on one split."""
    name = split.replace("_", "-")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"exact match, {name} %")
    ax.set_title(f"{title_prefix}{name} phrasings")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)


def _save(plt, fig, path: str, title: str, rect=None) -> str:
    fig.suptitle(title)
    fig.tight_layout(**({"rect": rect} if rect else {}))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_capacity(summary: dict, path: str) -> str:
    """Exact match against N (log axis) per method at its chosen lr, trained and held-out panels, from
    `capacity.summarize`; the untrained model is the dashed line. Returns `path`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, split in zip(axes, ("trained", "held_out")):
        for i, m in enumerate(summary["plan"]["methods"]):
            by_n = summary["cells"][m]
            ns = sorted(by_n)
            lr = summary["chosen"][m]["lr"]
            ax.plot(ns, [100 * by_n[n][f"em_{split}"] for n in ns], "-o", color=f"C{i}",
                    label=m if lr is None else f"{m} (lr {lr:g})")
        base = summary["base"]
        if base:
            ns = sorted(base)
            ax.plot(ns, [100 * base[n][f"em_{split}"] for n in ns], "--", color="gray", label="base (untrained)")
        _exact_match_axes(ax, split, "fictional facts N")
    axes[1].legend(fontsize=8)
    return _save(plt, fig, path, f"capacity curve: {summary['plan']['epochs']:g} epochs, each method at its chosen lr")


def plot_forgetting(summary: dict, path: str) -> str:
    """Learned against forgotten per method, one point per N (labelled): x = retention drop (points) or
    perplexity increase (%), y = held-out exact match gain over the untrained model (points)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    base = summary["base"]
    for ax, (key, scale, xlabel) in zip(axes, (("retention_drop", 1, "retention drop, points"),
                                                 ("ppl_increase", 100, "perplexity increase, %"))):
        for i, m in enumerate(summary["plan"]["methods"]):
            pts = [(n, c[key], 100 * (c["em_held_out"] - base[n]["em_held_out"]))
                   for n, c in sorted(summary["cells"][m].items()) if c[key] is not None and n in base]
            if not pts:
                continue
            ax.plot([scale * x for _, x, _ in pts], [y for *_, y in pts], "-o", color=f"C{i}", label=m)
            for n, x, y in pts:
                ax.annotate(f"N={n}", (scale * x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(0, color="gray", lw=0.8)
        if key == "ppl_increase":  # a diverged run's +100000% must not flatten the others onto the axis
            ax.set_xscale("symlog", linthresh=10)
            ax.set_xlim(left=min([-1.0] + [scale * c[key] for m in summary["plan"]["methods"]
                                           for c in summary["cells"][m].values() if c[key] is not None]) * 1.5)
        ax.set_xlabel(xlabel + " (right = forgot more)")
        ax.set_ylabel("held-out exact match gain, points")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(plt, fig, path, "learned vs forgotten: up and to the left is better")
