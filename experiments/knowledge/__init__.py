"""Knowledge capacity: does the big sparse adapter learn more than LoRA, and at what cost? (issue 8)

    python -m experiments.knowledge --quick        # run from the repository root; see cli.py

Files: `cli` (options, the list of runs, one subprocess per run, results JSONL), `runner` (one
(method, dataset, seed) run), `methods` (the trainers compared and their device-resident state),
`report` (Markdown tables under one lr selection rule, JSON summary), `plot` (lr-sweep figure).
Committed results: `experiments/knowledge/results/*.jsonl`. Nothing is imported here, so
`python -m experiments.knowledge --one ...` subprocesses stay cheap.
"""
