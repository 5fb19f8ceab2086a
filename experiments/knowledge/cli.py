"""Does the big sparse adapter learn more than LoRA, and at what cost? (issue 8)

Trains SmolLM2-135M-Instruct (the default model) on the built-in world facts and on synthetic
fictional facts with every method of `experiments/knowledge/methods.py` -- (a) meft: MEFT sparse
adapter, rows on the host, frozen backbone; (b) meft_adalomo: the same + AdaLomo backbone; (c) lora8 /
lora64 through `peft`; (d) dense: a resident parallel adapter of the same total size as (a); (e)
full_adalomo: full fine-tuning with AdaLomo -- on the same batches (same seed, steps and batch size,
so the same training tokens), and reports exact match on the trained phrasings and on held-out
phrasings, the device-resident training state (computed: see `methods`), host RAM (peak RSS of the
run's own process; MEFT's row stores), and the median step time. Each (method, dataset, seed) runs in
its own process (`runner.run_one`); results are appended to a JSONL file as they finish, so a long run
can be stopped and resumed (`--resume`) and the tables rebuilt (`--report`). Run from the repository
root:

    python -m experiments.knowledge --quick              # minutes: tiny sets, a few steps
    python -m experiments.knowledge --seeds 0 1          # the fuller run (see BENCHMARKS.md)
    python -m experiments.knowledge --seeds 0 --lrs 1e-3 3e-3 1e-2   # lr sweep (one seed)
    python -m experiments.knowledge --seeds 1 --lr-for meft=1e-2 lora8=1e-3 ...  # more seeds at chosen lrs
    python -m experiments.knowledge --report --out F     # tables from an existing results file
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.knowledge.report import ADAMW_FREE, format_report
from experiments.knowledge.runner import RunSpec

ROOT = Path(__file__).resolve().parents[2]  # the repository root: `-m experiments.knowledge` runs from there

__all__ = ["main", "parse_args", "specs_for"]

DEFAULT_METHODS = ("meft", "meft_adalomo", "lora8", "lora64", "dense", "full_adalomo")
QUICK = dict(n_fictional=20, n_countries=5, steps=4, batch_size=8, rows=512, max_active_rows=128,
             expert_size=16, eval_limit=16, seeds=[0, 1], datasets=["fictional"])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.knowledge", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run (minutes): " + json.dumps(QUICK))
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--datasets", nargs="+", default=["fictional", "world"], choices=["fictional", "world"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--n-fictional", type=int, default=2000, help="fictional facts")
    p.add_argument("--n-countries", type=int, default=None, help="world facts: countries (4 facts each); all")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rows", type=int, default=4096, help="adapter rows per layer (meft and dense)")
    p.add_argument("--max-active-rows", type=int, default=1024)
    p.add_argument("--expert-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr (meft rows/router, LoRA, dense)")
    p.add_argument("--lrs", type=float, nargs="+", metavar="LR",
                   help="sweep: run every AdamW-trained method at each of these lrs (replaces --lr); the "
                        "report compares each method at its lr with the best exact match on the trained split "
                        "of the sweep seed (the rule is printed with the table)")
    p.add_argument("--lr-for", nargs="+", default=[], metavar="METHOD=LR",
                   help="AdamW lr of one method, e.g. --lr-for meft=1e-2 lora8=1e-3 (wins over --lr/--lrs)")
    p.add_argument("--router-lr", type=float, default=None,
                   help="AdamW lr of MEFT's router gates (default: the method's AdamW lr); such runs are "
                        "reported as their own method, e.g. 'meft (router lr 0.001)'")
    p.add_argument("--backbone-lr", type=float, default=1e-3, help="AdaLomo lr (meft_adalomo, full_adalomo)")
    p.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chat", action="store_true", help="chat template with its long system prompt")
    p.add_argument("--eval-limit", type=int, default=200, help="questions scored per split")
    p.add_argument("--out", default="runs/knowledge/results.jsonl")
    p.add_argument("--resume", action="store_true", help="skip runs already in --out")
    p.add_argument("--report", action="store_true", help="only print the tables of --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    p.add_argument("--plot", metavar="PNG", help="also draw exact match against AdamW lr per method (a sweep)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON RunSpec, run in this process
    args = p.parse_args(argv)
    args.lr_for = _parse_lr_for(p, args.lr_for, args.methods)
    if args.quick:
        for k, v in QUICK.items():  # options given explicitly win over the quick preset
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
        if args.out == p.get_default("out"):
            args.out = "runs/knowledge/quick.jsonl"
    return args


def _parse_lr_for(p: argparse.ArgumentParser, items: list[str], methods: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        method, _, value = item.partition("=")
        try:
            out[method] = float(value)
        except ValueError:
            p.error(f"--lr-for {item!r}: write METHOD=LR, e.g. meft=1e-2")
        if method not in methods or method in ADAMW_FREE:
            p.error(f"--lr-for {item!r}: {method!r} is not an AdamW-trained method of this run "
                    f"(--methods {' '.join(methods)}; {', '.join(ADAMW_FREE)} have no AdamW lr)")
    return out


def _lrs_for(args, method: str) -> list[float]:
    """The AdamW lrs `method` runs at: --lr-for, else the --lrs grid, else --lr (one run for lr-free methods)."""
    if method in args.lr_for:
        return [args.lr_for[method]]
    if method in ADAMW_FREE or not args.lrs:
        return [args.lr]
    return list(args.lrs)


def specs_for(args) -> list[RunSpec]:
    """Every run, seed-major (all methods of seed 0 first, so a cut-short run still compares them)."""
    out = []
    for seed in args.seeds:
        for ds in args.datasets:
            n = args.n_fictional if ds == "fictional" else (args.n_countries or 10_000)
            for method in ["base"] * (seed == args.seeds[0]) + list(args.methods):
                # the untrained model has no lr: keep its spec (the --resume key) the same across sweeps
                router = {"router_lr": args.router_lr} if method.startswith("meft") and args.router_lr else {}
                lrs = [{}] if method == "base" else [dict(lr=lr, backbone_lr=args.backbone_lr, **router)
                                                     for lr in _lrs_for(args, method)]
                out += [RunSpec(method=method, dataset=ds, n_facts=n, seed=seed, steps=args.steps,
                                batch_size=args.batch_size, rows=args.rows, max_active_rows=args.max_active_rows,
                                expert_size=args.expert_size, state_dtype=args.state_dtype, chat=args.chat,
                                eval_limit=args.eval_limit, **kw) for kw in lrs]
    return out


def _key(spec: dict) -> tuple:
    return tuple(sorted((k, json.dumps(v)) for k, v in spec.items()))


def _run_in_subprocess(spec: RunSpec) -> dict:
    cmd = [sys.executable, "-m", "experiments.knowledge", "--one", json.dumps(dataclasses.asdict(spec))]
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"spec": dataclasses.asdict(spec), "error": res.stderr[-2000:]}
    return json.loads(lines[-1])


def _one(text: str) -> None:
    from experiments.knowledge.runner import eval_base, run_one

    spec = RunSpec(**json.loads(text))
    print(json.dumps(eval_base(spec) if spec.method == "base" else run_one(spec)), flush=True)


def _load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _command() -> str:
    """The command line as typed (`python -m experiments.knowledge ...` when run as a module)."""
    if sys.argv and sys.argv[0].endswith(("__main__.py", "cli.py")):
        return " ".join(["python -m experiments.knowledge", *sys.argv[1:]])
    return " ".join(sys.argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        _one(args.one)
        return 0
    out = Path(args.out)
    if not args.report:
        out.parent.mkdir(parents=True, exist_ok=True)
        done = {_key(r["spec"]) for r in _load_results(out) if "error" not in r} if args.resume else set()
        if not args.resume and out.exists():
            out.unlink()
        specs = [s for s in specs_for(args) if _key(dataclasses.asdict(s)) not in done]
        t0 = time.time()
        for i, spec in enumerate(specs, 1):
            print(f"[{i}/{len(specs)} {time.time() - t0:6.0f}s] {spec.dataset} {spec.method} seed={spec.seed}",
                  flush=True)
            res = _run_in_subprocess(spec)
            if "error" in res:
                print(f"  FAILED: {res['error']}", flush=True)
            with out.open("a") as fh:
                fh.write(json.dumps(res) + "\n")
    text, summary = format_report(_load_results(out), command=_command())
    print(text)
    if args.plot:
        from experiments.knowledge.plot import plot_sweep

        print(f"wrote {plot_sweep(_load_results(out), args.plot)}")
    if args.json:
        print(json.dumps(summary))
    return 0
