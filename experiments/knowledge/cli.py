"""Does the big sparse adapter learn more than LoRA, and at what cost?

Trains SmolLM2-135M-Instruct (the default model) on the built-in world facts and on synthetic
fictional facts with every method of `experiments/knowledge/methods.py` -- (a) meft: MEFT sparse
adapter, rows on the host, frozen backbone; (b) meft_adalomo: the same + AdaLomo backbone; (c) lora8 /
lora64 through `peft`; (d) dense: a resident parallel adapter of the same total size as (a); (e)
full_adalomo: full fine-tuning with AdaLomo -- on the same batches (same seed, steps and batch size,
so the same training tokens), and reports exact match on the trained phrasings and on held-out
phrasings, the device-resident training state (computed: see `methods`), host RAM (peak RSS of the
run's own process; MEFT's row stores), and the median step time. Each (method, dataset, seed) runs in
its own process (`cells`, `runner.run_one`); results are appended to a JSONL file as they finish, so a long run
can be stopped and resumed (`--resume`; a run stopped mid-training continues from its last checkpoint,
`--save-every`) and the tables rebuilt (`--report`). Every method trains on packed micro-batches as `meft
train` does (`--packing`, `runner`). Run from the repository root:

    python -m experiments.knowledge --quick              # minutes: tiny sets, a few steps
    python -m experiments.knowledge --seeds 0 1          # the fuller run (see BENCHMARKS.md)
    python -m experiments.knowledge --seeds 0 --lrs 1e-3 3e-3 1e-2   # lr sweep (one seed)
    python -m experiments.knowledge --seeds 1 --lr-for meft=1e-2 lora8=1e-3 ...  # more seeds at chosen lrs
    python -m experiments.knowledge --report --out F     # tables from an existing results file

Capacity curve (`capacity.py` owns the protocol and its lr rule): fictional facts at N in
--ns, --epochs passes over the same batches for meft, lora8, lora64, dense and meft_adalomo; 3 lrs per
method on the smallest N first, then each method's chosen lr carried to the larger N; every run and
the base model also scored for forgetting (`forgetting.py`: retention of known facts, perplexity on
pydoc text). The report names the missing cells; `--json` ends with the summary line; the two
PNGs are written next to --out. `--quick` proves the pipeline in minutes (N 5 and 10, 1-2 steps, 2 lrs
per method, tiny adapter and probes: not a measurement). The full run is hours of CPU (on the 2-core
box about 14 h of training: 15 sweep runs of 228 steps, 5 of 752, 5 of 2252, at 1.5-4 s a step; plus
5-15 min of scoring per run, depending on the load) and resumable: rerun the same command after a stop
(a run stopped mid-training continues from its last checkpoint, at most --save-every steps back)

    mkdir -p runs/knowledge && nohup python -m experiments.knowledge --capacity --resume --json \\
        --out experiments/knowledge/results/capacity.jsonl >> runs/knowledge/capacity.log 2>&1 &
    python -m experiments.knowledge --capacity --report --json --out experiments/knowledge/results/capacity.jsonl
    python -m experiments.knowledge --capacity --quick --json       # minutes: the pipeline end to end
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from experiments.knowledge.capacity import CAPACITY_LRS, CAPACITY_METHODS, CAPACITY_NS, CapacityPlan, summarize
from experiments.knowledge.cells import ROOT, CellOptions, load_results, run_spec_here
from experiments.knowledge.cells import run_specs as _run
from experiments.knowledge.forgetting import RETENTION_FILE
from experiments.knowledge.report import ADAMW_FREE, format_capacity_report, format_report
from experiments.knowledge.runner import RunSpec

__all__ = ["main", "parse_args", "specs_for", "capacity_plan", "cell_options"]

DEFAULT_METHODS = ("meft", "meft_adalomo", "lora8", "lora64", "dense", "full_adalomo")
QUICK = dict(n_fictional=20, n_countries=5, steps=4, batch_size=8, rows=512, max_active_rows=128,
             expert_size=16, eval_limit=16, seeds=[0, 1], datasets=["fictional"])
# 400 questions per split: at N >= 1000 a 10-point gap is then ~3 standard errors of the difference
CAPACITY = dict(methods=list(CAPACITY_METHODS), seeds=[0], ns=list(CAPACITY_NS), eval_limit=400,
                out="runs/knowledge/capacity.jsonl")
# the pipeline, not a measurement: 2 lrs per method (sweep, choice, carry all exercised), tiny probes
QUICK_CAPACITY = dict(ns=[5, 10], epochs=1.0, lrs=[1e-3, 1e-2], rows=512, max_active_rows=128, expert_size=16,
                      eval_limit=8, retention_limit=8, ppl_texts=4, ppl_tokens=64,
                      out="runs/knowledge/capacity_quick.jsonl")


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
    p.add_argument("--lr-for", nargs="+", default=[], metavar="METHOD=LR[,LR...]",
                   help="AdamW lr(s) of one method, e.g. --lr-for meft=1e-2 lora8=1e-3,3e-3 (wins over --lr/--lrs; "
                        "with --capacity: that method's sweep grid)")
    p.add_argument("--router-lr", type=float, default=None,
                   help="AdamW lr of MEFT's router gates (default: the method's AdamW lr); such runs are "
                        "reported as their own method, e.g. 'meft (router lr 0.001)'")
    p.add_argument("--backbone-lr", type=float, default=1e-3, help="AdaLomo lr (meft_adalomo, full_adalomo)")
    p.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chat", action="store_true", help="chat template with its long system prompt")
    p.add_argument("--eval-limit", type=int, default=200, help="questions scored per split")
    p.add_argument("--model", default="default", help="model (see meft.pretrained); default SmolLM2-135M-Instruct")
    p.add_argument("--capacity", action="store_true",
                   help="capacity curve: lr sweep at the smallest --ns, chosen lrs carried to the larger; "
                        "defaults " + json.dumps({k: v for k, v in CAPACITY.items()}) + "; grids per method "
                        + json.dumps(CAPACITY_LRS) + " unless --lrs / --lr-for; --quick: " + json.dumps(QUICK_CAPACITY))
    p.add_argument("--ns", type=int, nargs="+", help="capacity: numbers of fictional facts")
    p.add_argument("--epochs", type=float, default=4.0, help="capacity: passes over the training records")
    p.add_argument("--forgetting", action="store_true",
                   help="also score retention and pydoc perplexity after every run (always on with --capacity)")
    p.add_argument("--retention-file", help="retention set (JSON); default: the committed one for the default "
                                            "model, else <out>.retention.json, built with the base model if missing")
    p.add_argument("--retention-limit", type=int, default=200, help="retention questions scored")
    p.add_argument("--ppl-texts", type=int, default=64, help="pydoc topics scored for perplexity")
    p.add_argument("--ppl-tokens", type=int, default=256, help="tokens per pydoc topic, at most")
    p.add_argument("--replay", type=int, default=0,
                   help="self-replay (meft train --replay): the base model's answers to this many world-fact "
                        "questions about countries outside the retention set join every method's training data")
    p.add_argument("--device", default="cpu",
                   help="where every run trains and is scored, e.g. cuda (MEFT's rows stay on the host); part of "
                        "each run's identity in --out, so CPU and GPU results never mix")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each its own process with its share of the cores (a GPU: launch-bound "
                        "small steps overlap well; a 2-core box: keep 1)")
    p.add_argument("--out", default="runs/knowledge/results.jsonl")
    p.add_argument("--resume", action="store_true",
                   help="skip runs already in --out, and continue a stopped run from its last checkpoint")
    p.add_argument("--save-every", type=int, default=50, metavar="K",
                   help="each run saves its training state every K steps (and after its last step) under "
                        "--checkpoint-dir, so --resume loses at most K steps of a stopped run; 0: no checkpoints")
    p.add_argument("--checkpoint-dir", help="where runs keep their checkpoints (default: next to --out, "
                                            "<out>.cells/); a run's folder is removed once its result is in --out")
    p.add_argument("--packing", default="auto", choices=["auto", "on", "off"],
                   help="train on packed micro-batches as `meft train --packing` does: auto (where the model takes "
                        "them), on (insist), off (the padded step; results files written before packing hold such "
                        "runs: pass off to report or resume them)")
    p.add_argument("--report", action="store_true", help="only print the tables of --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    p.add_argument("--plot", metavar="PNG", help="also draw exact match against AdamW lr per method (a sweep)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON RunSpec, run in this process
    p.add_argument("--cell-options", help=argparse.SUPPRESS)  # internal: JSON CellOptions of that run
    p.add_argument("--stop-after-steps", type=int, default=0, help=argparse.SUPPRESS)  # test hook: stop each run there
    p.add_argument("--build-retention", help=argparse.SUPPRESS)  # internal: JSON {model, path, limit}
    args = p.parse_args(argv)
    presets = [CAPACITY] + [QUICK_CAPACITY] * args.quick if args.capacity else [QUICK] * args.quick
    given = {k for k in vars(args) if getattr(args, k) != p.get_default(k)}  # explicit options win over presets
    for preset in presets:
        for k, v in preset.items():
            if k not in given:
                setattr(args, k, v)
    if args.quick and not args.capacity and "out" not in given:
        args.out = "runs/knowledge/quick.jsonl"
    args.lr_for = _parse_lr_for(p, args.lr_for, args.methods, args.capacity)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: give 1 or more runs at once")
    if args.save_every < 0:
        p.error(f"--save-every {args.save_every}: give a number of steps, or 0 for no checkpoints")
    if args.stop_after_steps < 0:
        p.error(f"--stop-after-steps {args.stop_after_steps}: give a step number, or 0 (off)")
    if args.device.startswith("cuda") and not args.report:
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    return args


def _parse_lr_for(p: argparse.ArgumentParser, items: list[str], methods: list[str],
                  grids: bool) -> dict[str, list[float]]:
    out = {}
    for item in items:
        method, _, value = item.partition("=")
        try:
            out[method] = [float(v) for v in value.split(",")]
        except ValueError:
            p.error(f"--lr-for {item!r}: write METHOD=LR or METHOD=LR,LR,..., e.g. meft=1e-2")
        if len(out[method]) > 1 and not grids:
            p.error(f"--lr-for {item!r}: one lr per method (a grid per method is for --capacity; use --lrs)")
        if method not in methods or method in ADAMW_FREE:
            p.error(f"--lr-for {item!r}: {method!r} is not an AdamW-trained method of this run "
                    f"(--methods {' '.join(methods)}; {', '.join(ADAMW_FREE)} have no AdamW lr)")
    return out


def _lrs_for(args, method: str) -> list[float]:
    """The AdamW lrs `method` runs at: --lr-for, else the --lrs grid, else --lr (one run for lr-free methods)."""
    if method in args.lr_for:
        return args.lr_for[method]
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
                router = ({"router_lr": args.router_lr}
                          if method.startswith("meft") and args.router_lr is not None else {})  # 0 = frozen
                lrs = [{}] if method == "base" else [dict(lr=lr, backbone_lr=args.backbone_lr, **router)
                                                     for lr in _lrs_for(args, method)]
                out += [RunSpec(method=method, dataset=ds, n_facts=n, seed=seed, steps=args.steps,
                                forgetting=args.forgetting, **_template(args, lr=False), **kw) for kw in lrs]
    return out


def _retention_file(args) -> str:
    if args.retention_file:
        return args.retention_file
    if args.model == "default":  # relative to the repository root (the runs' cwd): specs and resume keys stay portable
        return str(RETENTION_FILE.relative_to(ROOT))
    return str(Path(args.out).with_suffix(".retention.json"))


def _template(args, *, lr: bool = True) -> dict:
    """RunSpec fields every run of this invocation shares (the backbone lr too, unless `lr` is False)."""
    forgetting = args.capacity or args.forgetting
    out = dict(batch_size=args.batch_size, rows=args.rows, max_active_rows=args.max_active_rows,
               expert_size=args.expert_size, state_dtype=args.state_dtype, chat=args.chat,
               eval_limit=args.eval_limit, model=args.model, retention_file=_retention_file(args) if forgetting else "",
               retention_limit=args.retention_limit, ppl_texts=args.ppl_texts, ppl_tokens=args.ppl_tokens,
               device=args.device, packing=args.packing, **({"replay": args.replay} if args.replay else {}))
    return dict(out, backbone_lr=args.backbone_lr) if lr else out


def cell_options(args, out: Path) -> CellOptions:
    """How this invocation's runs checkpoint (absolute paths: the runs' cwd is the repository root)."""
    if not (args.save_every or args.stop_after_steps):
        return CellOptions(resume=args.resume)
    folder = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_suffix(".cells")
    return CellOptions(checkpoint_dir=str(folder.resolve()), save_every=args.save_every, resume=args.resume,
                       stop_after=args.stop_after_steps)


def capacity_plan(args) -> CapacityPlan:
    """The capacity cells of `args`; MEFT's router lr is `--router-lr`, else the library default (untuned)."""
    from meft.config import MeftConfig

    grid = {m: args.lr_for.get(m) or list(args.lrs or CAPACITY_LRS.get(m, [args.lr])) for m in args.methods}
    router = args.router_lr if args.router_lr is not None else MeftConfig().router_lr
    return CapacityPlan(ns=list(args.ns), methods=list(args.methods), lrs=grid, seeds=list(args.seeds),
                        epochs=args.epochs, template=_template(args), router_lr=router)


def _build_retention(text: str) -> None:
    import torch

    from experiments.knowledge.forgetting import build_retention_set
    from meft.pretrained import load_model

    job = json.loads(text)
    model, tok = load_model(job["model"], dtype=torch.float32, device="cpu")
    data = build_retention_set(model, tok, model_name=job["model"], limit=job["limit"])
    Path(job["path"]).write_text(json.dumps(data, indent=1) + "\n")


def _ensure_retention(args) -> None:
    """Build the retention set with the base model (its own process) unless the file exists."""
    path = ROOT / _retention_file(args)
    if path.exists():
        return
    print(f"building the retention set {path} with the base model (once)", flush=True)
    job = json.dumps({"model": args.model, "path": str(path.resolve()), "limit": max(200, args.retention_limit)})
    subprocess.run([sys.executable, "-m", "experiments.knowledge", "--build-retention", job], check=True, cwd=ROOT,
                   env=dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error"))


def _ensure_model(args) -> None:
    """Convert the default model once, here, before cells start: parallel cells would all convert it."""
    if args.model == "default":
        from meft.pretrained import resolve_model

        resolve_model(args.model)


def _command() -> str:
    """The command line as typed (`python -m experiments.knowledge ...` when run as a module)."""
    if sys.argv and sys.argv[0].endswith(("__main__.py", "cli.py")):
        return " ".join(["python -m experiments.knowledge", *sys.argv[1:]])
    return " ".join(sys.argv)


def _capacity(args, out: Path) -> None:
    """Sweep cells (and the base model) first, then the chosen lrs carried to the larger N; report, plots."""
    plan = capacity_plan(args)
    if not args.report:
        _ensure_retention(args)
        _ensure_model(args)
        # carried cells start as soon as their method's sweep is complete, not after every sweep
        _run(plan.base_specs() + plan.sweep_specs(), out, jobs=args.jobs, more=plan.carried_specs,
             cells=cell_options(args, out))
    results = load_results(out)
    summary = summarize(plan, results)
    print(format_capacity_report(summary, command=_command()))
    padded = sum(r["spec"]["method"] != "base" and "packing" not in r["spec"] for r in results)
    if padded and args.packing != "off":
        print(f"note: {padded} run(s) in {out} trained on padded batches, before packing existed; they count as "
              "cells of this report only with --packing off")
    if importlib.util.find_spec("matplotlib") is None:
        print("no plots: matplotlib is not installed")
    else:
        from experiments.knowledge.plot import plot_capacity, plot_forgetting

        stem = str(out.with_suffix(""))
        print(f"wrote {plot_capacity(summary, stem + '_curve.png')} and "
              f"{plot_forgetting(summary, stem + '_forgetting.png')}")
    if args.json:
        print(json.dumps(summary["json"]))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        return run_spec_here(args.one, args.cell_options)
    if args.build_retention:
        _build_retention(args.build_retention)
        return 0
    out = Path(args.out)
    if not args.report:
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.capacity and not (args.resume or args.quick) and load_results(out):  # hours of results
            print(f"{out} holds results: pass --resume to continue them, or remove the file to start over",
                  file=sys.stderr)
            return 2
        if not args.resume and out.exists():
            out.unlink()
    if args.capacity:
        _capacity(args, out)
        return 0
    if not args.report:
        if args.forgetting:
            _ensure_retention(args)
        _ensure_model(args)
        _run(specs_for(args), out, jobs=args.jobs, cells=cell_options(args, out))
    text, summary = format_report(load_results(out), command=_command())
    print(text)
    if args.plot:
        from experiments.knowledge.plot import plot_sweep

        print(f"wrote {plot_sweep(load_results(out), args.plot)}")
    if args.json:
        print(json.dumps(summary))
    return 0
