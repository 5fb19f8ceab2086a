"""PNG of a knowledge-experiment learning-rate sweep: exact match against AdamW lr, per method.

Owns one figure per results file: for each dataset, two panels (trained phrasings, held-out
phrasings); each AdamW-trained method is a line over the lrs it ran at (mean over its seeds, each
seed also drawn as a dot), and methods without an AdamW lr (full AdaLomo, the untrained model) are
horizontal dashed lines. The lr each method is compared at (`report.summarize`, under its selection rule) is ringed.
"""

from __future__ import annotations

from experiments.knowledge.report import method_label, order_key, summarize

__all__ = ["plot_sweep"]


def plot_sweep(results: list[dict], path: str) -> str:
    """Write the sweep figure of `results` (dicts from the JSONL) to `path`; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            ax.set_xscale("log")
            ax.set_xlabel("AdamW learning rate")
            ax.set_ylabel(f"exact match, {split.replace('_', '-')} % ")
            ax.set_title(f"{ds} facts: {split.replace('_', '-')} phrasings")
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9)
    fig.suptitle("knowledge lr sweep: line = mean over seeds, dots = seeds, ring = lr compared at")
    fig.tight_layout(rect=(0, 0.1 / len(datasets), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
