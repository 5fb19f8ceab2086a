"""Quick-start variants: `meft train` (the README's main job, default model cached) once per variant and seed.

Each finished run appends one JSON line to --out (resumable: variants already there are skipped):
trained / held-out exact match after training, known facts kept (the trade-off probe), training seconds,
last loss. The run folders' checkpoints and adapter (about 2 GB a run) are deleted after reading the
summary. Runs go one at a time: on a 2-core machine two at once would only share the cores.

    python experiments/quickstart_sweep.py --out experiments/results/quickstart_lr_seeds.jsonl
    python experiments/quickstart_sweep.py --report --out experiments/results/quickstart_lr_seeds.jsonl \
        --plot experiments/results/quickstart_tradeoff.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# name -> extra `meft train` arguments (every other option at its default)
VARIANTS = {
    "lr1e-2_seed0": ["--adapter-lr", "1e-2", "--seed", "0"],
    "lr2e-2_seed0": ["--adapter-lr", "2e-2", "--seed", "0"],
    "lr3e-2_seed0": ["--adapter-lr", "3e-2", "--seed", "0"],
    "lr3e-2_seed1": ["--adapter-lr", "3e-2", "--seed", "1"],
    "lr2e-2_seed1": ["--adapter-lr", "2e-2", "--seed", "1"],
    "lr3e-2_replay150_seed0": ["--adapter-lr", "3e-2", "--replay", "150", "--seed", "0"],
    "lr2e-2_replay150_seed0": ["--adapter-lr", "2e-2", "--replay", "150", "--seed", "0"],
    "lr1e-2_seed1": ["--adapter-lr", "1e-2", "--seed", "1"],
    "lr3e-2_seed2": ["--adapter-lr", "3e-2", "--seed", "2"],
    "lr2e-2_seed2": ["--adapter-lr", "2e-2", "--seed", "2"],
    "lr1e-2_seed2": ["--adapter-lr", "1e-2", "--seed", "2"],
    # replay at the quick start's step count: 750 records x 1.6 epochs / 16 = 75 steps (76 without replay)
    "lr2e-2_replay150_epochs1.6_seed0": ["--adapter-lr", "2e-2", "--replay", "150", "--epochs", "1.6", "--seed", "0"],
    "lr2e-2_replay150_epochs1.6_seed1": ["--adapter-lr", "2e-2", "--replay", "150", "--epochs", "1.6", "--seed", "1"],
    "lr2e-2_replay150_seed1": ["--adapter-lr", "2e-2", "--replay", "150", "--seed", "1"],
    "lr2e-2_replay150_seed2": ["--adapter-lr", "2e-2", "--replay", "150", "--seed", "2"],
    "lr3e-2_replay150_seed1": ["--adapter-lr", "3e-2", "--replay", "150", "--seed", "1"],
    "lr3e-2_replay150_seed2": ["--adapter-lr", "3e-2", "--replay", "150", "--seed", "2"],
    # sparse update at the default lr 3e-2: T of the 64-expert budget updated per layer
    "sparse8_seed0": ["--sparse-update", "8", "--seed", "0"],
    "sparse16_seed0": ["--sparse-update", "16", "--seed", "0"],
    # a frozen router (gates at their key-aligned init): training cannot move other text onto trained rows
    "router0_seed0": ["--router-lr", "0", "--seed", "0"],
    "router0_seed1": ["--router-lr", "0", "--seed", "1"],
    "router0_seed2": ["--router-lr", "0", "--seed", "2"],
    # replay in the training data's short-answer form (`--replay-form answer`): only facts the base model knew
    "replayanswer150_seed0": ["--replay", "150", "--replay-form", "answer", "--seed", "0"],
    "replayanswer64_seed0": ["--replay", "64", "--replay-form", "answer", "--seed", "0"],
    # adapters in the first layers only (experiments/forgetting_anatomy.py: layers 20-29 alone learn nothing and
    # cost known facts)
    "layers0-19_seed0": ["--layers", json.dumps(list(range(20))), "--seed", "0"],
    "layers0-14_seed0": ["--layers", json.dumps(list(range(15))), "--seed", "0"],
    # sparse update against a background of questions (`--sparse-background questions`): the question template's
    # experts count as general, so only what is specific to the batch is updated
    "sparseq8_seed0": ["--sparse-update", "8", "--sparse-background", "questions", "--seed", "0"],
    "sparseq16_seed0": ["--sparse-update", "16", "--sparse-background", "questions", "--seed", "0"],
    # more specific addressing: 4x the rows (1024 experts, the same row budget), or 2 experts per token
    "rows16384_seed0": ["--adapter-rows", "16384", "--seed", "0"],
    "ept2_seed0": ["--experts-per-token", "2", "--seed", "0"],
    "sparseq16_router0_seed0": ["--sparse-update", "16", "--sparse-background", "questions", "--router-lr", "0",
                                "--seed", "0"],
    # plain SGD on the rows (`--row-optimizer sgd`, sparse memory finetuning's rule): a row's step is lr x its
    # gradient (value gradients are tiny, so the lr is in the hundreds or thousands)
    "sgd300_seed0": ["--row-optimizer", "sgd", "--adapter-lr", "300", "--seed", "0"],
    "sgd1000_seed0": ["--row-optimizer", "sgd", "--adapter-lr", "1000", "--seed", "0"],
    "sgd3000_seed0": ["--row-optimizer", "sgd", "--adapter-lr", "3000", "--seed", "0"],
}


def run_one(name: str, args: list[str], workdir: Path) -> dict:
    folder = workdir / name
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "meft.cli.main", "train", "--output-dir", str(folder),
                        "--progress", "false", *args], capture_output=True, text=True)
    (workdir / f"{name}.log").write_text(p.stdout + p.stderr)
    rec = {"name": name, "args": args, "rc": p.returncode, "wall_s": round(time.time() - t0, 1)}
    try:
        s = json.loads((folder / "summary.json").read_text())
        rec.update(trained=s["after"]["trained"]["exact_match"], held_out=s["after"]["held_out"]["exact_match"],
                   kept=s["trade_off"]["retention"]["kept"], train_s=round(s["train_seconds_this_session"], 1),
                   steps=s["steps"], last_loss=round(s["last_loss"], 4))
        general = s["trade_off"].get("general")  # general-prompt agreement with the base model, where probed
        if general:
            rec["agreement"] = general.get("agreement")
    except (OSError, KeyError, ValueError) as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}; see {workdir / (name + '.log')}"
    for sub in ("checkpoints", "adapter"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    return rec


def report(records: list[dict]) -> str:
    """Markdown: every run, then the mean over seeds of each setting."""
    rows = ["| run | trained EM % | held-out EM % | known facts kept % | train s | last loss |", "|---" * 6 + "|"]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['name']} | failed: {r['error']} | | | | |")
            continue
        rows.append(f"| {r['name']} | {100 * r['trained']:.1f} | {100 * r['held_out']:.1f} | {100 * r['kept']:.1f} "
                    f"| {r['train_s']} | {r['last_loss']} |")
    rows += ["", "| setting | seeds | mean trained EM % | mean held-out EM % | mean kept % |", "|---" * 5 + "|"]
    for g, m in _setting_means(records).items():
        rows.append(f"| {g} | {m['n']} | {m['trained']:.1f} | {m['held_out']:.1f} | {m['kept']:.1f} |")
    return "\n".join(rows)


def _setting_means(records: list[dict]) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        if "error" not in r:
            groups.setdefault(r["name"].rsplit("_seed", 1)[0], []).append(r)
    keys = ("trained", "held_out", "kept")
    return {g: {"n": len(rs), **{k: 100 * statistics.mean(r[k] for r in rs) for k in keys}} for g, rs in groups.items()}


def plot(records: list[dict], path: Path) -> None:
    """Learned against kept: each run a small dot, each setting's mean over its seeds a labelled marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    ok = [r for r in records if "error" not in r]
    ax.scatter([100 * r["held_out"] for r in ok], [100 * r["kept"] for r in ok], s=10, c="0.7", label="one run")
    for g, m in _setting_means(ok).items():
        ax.scatter(m["held_out"], m["kept"], s=30 + 15 * m["n"], marker="o" if m["n"] > 1 else "x")
        ax.annotate(f"{g} ({m['n']})", (m["held_out"], m["kept"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(80, ls="--", c="r", lw=0.8, label="target: keep >= 80%")
    ax.axvline(71.9, ls=":", c="b", lw=0.8, label="target: held-out >= 71.9%")
    ax.set_xlabel("held-out exact match after training (%)")
    ax.set_ylabel("known facts kept (%)")
    ax.set_title("Quick start: learned vs kept (setting (seeds): mean; grey: single runs)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="results file (JSON lines), appended to and resumed from")
    ap.add_argument("--workdir", default="runs/quickstart_sweep", help="run folders and logs")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    ap.add_argument("--report", action="store_true", help="print the tables of --out and exit")
    ap.add_argument("--plot", default=None, metavar="PNG", help="with --report: also draw learned vs kept")
    a = ap.parse_args(argv)
    out = Path(a.out)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if a.report:
        print(report(records))
        if a.plot:
            plot(records, Path(a.plot))
        return 0
    unknown = sorted(set(a.only or []) - set(VARIANTS))
    if unknown:
        ap.error(f"--only: unknown variants {unknown}; known: {sorted(VARIANTS)}")
    done = {r["name"] for r in records if "error" not in r}
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in a.only or VARIANTS:
        if name in done:
            continue
        rec = run_one(name, VARIANTS[name], workdir)
        print(json.dumps(rec), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
