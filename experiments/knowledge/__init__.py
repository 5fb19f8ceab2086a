"""Knowledge capacity: does the big sparse adapter learn more than LoRA, and at what cost?

    python -m experiments.knowledge --quick             # run from the repository root; see cli.py
    python -m experiments.knowledge --capacity --quick  # the capacity curve, end to end in minutes

Files: `cli` (options, the list of runs), `cells` (one subprocess per run, results JSONL), `runner` (one
(method, dataset, seed) run, with the general-prompt agreement against the base model's continuations),
`methods` (the trainers compared, each stepping on packed micro-batches, and their device-resident state),
`cell_state` (a run's mid-training checkpoint, what `--resume` continues a stopped run from),
`capacity` (the capacity-curve protocol: cells, lr rule carried from the smallest N, its summary),
`forgetting` (retention of known facts, perplexity on pydoc text; `retention_default.json` is the
default model's committed retention set), `report` (Markdown tables under one lr selection rule, JSON
summary), `plot` (lr-sweep, capacity-curve and learned-vs-forgotten figures).
Committed results: `experiments/knowledge/results/*.jsonl`. Nothing is imported here, so
`python -m experiments.knowledge --one ...` subprocesses stay cheap.
"""
