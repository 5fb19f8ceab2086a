"""Quick-start training step and scoring on this CPU, by layout: padded vs packed micro-batches, dense
adapter products vs each token's own rows (`meft.adapter.token_rows`).

Same model (the default, SmolLM2-135M-Instruct, fp32), same MeftConfig and data as `meft train` on its
defaults (`world_facts:50`, batches of 16). One wrapped model trains through `meft.train.loop.train_step`
with the four variants interleaved step by step (order rotating), so the box's speed drifts hit all of
them alike; the median step time per variant is printed. Every variant trains the same model in turn, so
this measures time only, not learning (the equivalence of the variants is tested:
tests/meft/data/test_packed.py, tests/meft/adapter/test_token_rows.py). Then greedy scoring of 64
quick-start questions after those steps, with and without the per-token inference kernel, alternating.

    python experiments/bench_cpu_step.py [--rounds 6] [--json] [--model M --data D]   (default: the quick start's)

`--json` prints one JSON object as the last line: median seconds per variant and the scoring medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = {  # name: (pack, token_rows)
    "padded, dense products": (False, False),
    "packed, dense products": (True, False),
    "padded, token rows": (False, True),
    "packed, token rows (default)": (True, True),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="steps per variant (after one warm-up step each)")
    ap.add_argument("--eval-rounds", type=int, default=2, help="scorings of 64 questions per inference variant")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--model", default="default", help="as `meft train --model`")
    ap.add_argument("--data", default="world_facts:50", help="as `meft train --data`")
    ap.add_argument("--eval-data", default=None, help="as `meft train --eval-data` (scored: its first split)")
    args = ap.parse_args(argv)

    import torch

    from experiments.knowledge.report import machine_header
    from meft.config import MeftConfig
    from meft.evaluate import qa_accuracy
    from meft.train import TrainArgs, setup_run, train_step

    targs = TrainArgs(model=args.model, data=args.data, eval_data=args.eval_data, progress=False)
    cfg = MeftConfig()
    meft, model, tok, data = setup_run(targs, cfg)
    model.train()
    meft.wrap(model, cfg)
    rt = model.meft
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotating order
            pack, rt.token_rows = VARIANTS[name]
            batch = next(data.batches)
            t0 = time.perf_counter()
            train_step(model, rt, [batch], 1, pack=pack)
            if r:  # round 0 warms every variant up (kernel compilation, first touch)
                times[name].append(time.perf_counter() - t0)
    model.eval()
    records = next(iter(data.eval_splits.values()), [])[:64]
    scoring: dict[str, list[float]] = {"per-token rows (default)": [], "gathered rows, dense products": []}
    for r in range(args.eval_rounds + 1 if records else 0):
        for name in scoring:
            rt.token_rows = name.startswith("per-token")
            t0 = time.perf_counter()
            qa_accuracy(model, tok, records, batch_size=targs.eval_batch_size, max_new_tokens=targs.max_new_tokens,
                        progress=False)
            if r:
                scoring[name].append(time.perf_counter() - t0)
    rt.token_rows = True
    rt.close()

    given = argv if argv is not None else sys.argv[1:]
    print(machine_header("python experiments/bench_cpu_step.py " + " ".join(given)))
    print(f"step: quick-start defaults, {args.rounds} interleaved steps per variant, median seconds")
    base = statistics.median(times["padded, dense products"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:30s} {med:6.2f} s   ({med / base:.2f}x)   all: {' '.join(f'{t:.2f}' for t in ts)}")
    scored = {k: statistics.median(v) for k, v in scoring.items() if v}
    print(f"scoring {len(records)} questions after those steps ({args.eval_rounds} alternating rounds, median s)")
    for name, ts in scoring.items():
        if ts:
            print(f"  {name:30s} {statistics.median(ts):6.2f} s   all: {' '.join(f'{t:.2f}' for t in ts)}")
    if args.json:
        print(json.dumps({"step_median_s": {k: statistics.median(v) for k, v in times.items()},
                          "scoring_median_s": scored, "scored_questions": len(records),
                          "torch_threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
