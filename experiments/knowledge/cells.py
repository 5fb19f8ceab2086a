"""The runs of `python -m experiments.knowledge`, each a cell in its own process (a clean peak RSS), up to
`jobs` at once, every result appended to the results JSONL by this one parent as it finishes, so a stopped
run resumes where it was; and the child side (`run_spec_here`: one spec run in this process, its result as
the last stdout line).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.knowledge.runner import RunSpec, spec_key

ROOT = Path(__file__).resolve().parents[2]  # the repository root: `-m experiments.knowledge` runs from there

__all__ = ["ROOT", "load_results", "run_spec_here", "run_specs"]


def _env(jobs: int) -> dict:
    """A cell's environment: quiet, and with `jobs` cells at once each gets its share of the cores
    (torch's and numba's thread pools would otherwise each take every core and fight)."""
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    if jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, NUMBA_NUM_THREADS=threads)
    return env


class _Cell:
    """One spec running in its own process (a clean peak RSS); stdout and stderr go to temporary files,
    so a chatty cell can never block on a full pipe while the parent waits for another."""

    def __init__(self, spec: RunSpec, jobs: int):
        self.spec = spec
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        cmd = [sys.executable, "-m", "experiments.knowledge", "--one", json.dumps(dataclasses.asdict(spec))]
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=self.err, text=True, env=_env(jobs), cwd=ROOT)

    def result(self) -> dict:
        """The cell's result line, or {"spec", "error"} with the end of its stderr; call once it exited."""
        self.out.seek(0)
        self.err.seek(0)
        lines = [ln for ln in self.out.read().splitlines() if ln.startswith("{")]
        err = self.err.read()
        self.out.close()
        self.err.close()
        if self.proc.returncode != 0 or not lines:
            return {"spec": dataclasses.asdict(self.spec), "error": err[-2000:]}
        return json.loads(lines[-1])


def run_spec_here(text: str) -> None:
    """The child side of a cell (`--one`): the spec given as JSON, run here; its result is the last stdout line."""
    from experiments.knowledge.runner import eval_base, run_one

    spec = RunSpec(**json.loads(text))
    print(json.dumps(eval_base(spec) if spec.method == "base" else run_one(spec)), flush=True)


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _label(spec: RunSpec) -> str:
    lr = "" if spec.method == "base" else f" lr={spec.lr:g}"
    return f"{spec.dataset} N={spec.n_facts} {spec.method}{lr} seed={spec.seed} steps={spec.steps}"


def run_specs(specs: list[RunSpec], out: Path, *, jobs: int = 1, more=None) -> None:
    """Run every spec without a successful result in `out` yet, `jobs` at a time, appending each result
    as it finishes (only this process writes `out`). `more(results)`, if given, is asked after every
    result for specs that have become runnable (the capacity plan's carried cells once a method's lr
    sweep is complete); they join the queue ahead of the rest, since they are the longer runs."""
    done = {spec_key(r["spec"]) for r in load_results(out) if "error" not in r}
    queued = set(done)
    todo: list[RunSpec] = []

    def add(new: list[RunSpec], front: bool = False) -> None:
        fresh = [s for s in new if spec_key(dataclasses.asdict(s)) not in queued]
        queued.update(spec_key(dataclasses.asdict(s)) for s in fresh)
        todo[:0 if front else len(todo)] = fresh

    add(specs)
    if more is not None:
        add(more(load_results(out)), front=True)
    running: list[_Cell] = []
    t0, started, finished = time.time(), 0, 0
    while todo or running:
        while todo and len(running) < jobs:
            spec = todo.pop(0)
            started += 1
            print(f"[start {started} {time.time() - t0:6.0f}s] {_label(spec)}", flush=True)
            running.append(_Cell(spec, jobs))
        time.sleep(0.5 if jobs > 1 else 0.05)
        for cell in [c for c in running if c.proc.poll() is not None]:
            running.remove(cell)
            res = cell.result()
            finished += 1
            status = f"FAILED: {res['error']}" if "error" in res else "done"
            print(f"[end {finished} {time.time() - t0:6.0f}s] {_label(cell.spec)}: {status}", flush=True)
            with out.open("a") as fh:
                fh.write(json.dumps(res) + "\n")
            if more is not None:
                add(more(load_results(out)), front=True)
