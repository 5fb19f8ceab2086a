"""The runs of `python -m experiments.knowledge`, each a cell in its own process (a clean peak RSS), up to
`jobs` at once, every result appended to the results JSONL by this one parent as it finishes, so a stopped
run resumes where it was; and the child side (`run_spec_here`: one spec run in this process, its result as
the last stdout line).

Mid-cell checkpoints (`CellOptions`, written by `cell_state`): each cell saves its training state every
`save_every` steps into its own folder under `checkpoint_dir` (named by the cell's spec, `cell_folder`);
with `resume` a cell continues from there, so a stop loses at most `save_every` steps of one cell. The
parent removes a cell's folder once its result is appended, and `checkpoint_dir` once it is empty.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.knowledge.cell_state import CellCheckpoint
from experiments.knowledge.runner import CellStopped, RunSpec, eval_base, run_one, spec_key

ROOT = Path(__file__).resolve().parents[2]  # the repository root: `-m experiments.knowledge` runs from there

__all__ = ["ROOT", "CellOptions", "cell_folder", "load_results", "run_spec_here", "run_specs"]

CELL_STOPPED = 3  # a cell's exit status when the `stop_after` test hook stopped it (its checkpoint is saved)


@dataclasses.dataclass
class CellOptions:
    """How cells checkpoint: `save_every` steps (0: never), into `checkpoint_dir` (None: nowhere, no
    checkpoints); `resume`: continue a cell from its checkpoint; `stop_after`: test hook, stop every cell
    after that step, its checkpoint saved (0: off)."""
    checkpoint_dir: str | None = None
    save_every: int = 0
    resume: bool = False
    stop_after: int = 0

    def for_spec(self, spec: RunSpec) -> CellCheckpoint | None:
        if self.checkpoint_dir is None or spec.method == "base":
            return None
        return CellCheckpoint(str(cell_folder(self.checkpoint_dir, spec)), save_every=self.save_every,
                              resume=self.resume, stop_after=self.stop_after)


def cell_folder(checkpoint_dir: str | Path, spec: RunSpec) -> Path:
    """The checkpoint folder of one cell: readable, and unique by the cell's identity (`spec_key`)."""
    digest = hashlib.sha256(json.dumps(spec_key(dataclasses.asdict(spec))).encode()).hexdigest()[:12]
    return Path(checkpoint_dir) / f"{spec.dataset}{spec.n_facts}_{spec.method}_seed{spec.seed}_{digest}"


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

    def __init__(self, spec: RunSpec, jobs: int, opts: CellOptions):
        self.spec = spec
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        cmd = [sys.executable, "-m", "experiments.knowledge", "--one", json.dumps(dataclasses.asdict(spec)),
               "--cell-options", json.dumps(dataclasses.asdict(opts))]
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=self.err, text=True, env=_env(jobs), cwd=ROOT)

    def result(self) -> dict:
        """The cell's result line, or {"spec", "error"} with the end of its stderr; call once it exited."""
        self.out.seek(0)
        self.err.seek(0)
        lines = [ln for ln in self.out.read().splitlines() if ln.startswith("{")]
        err = self.err.read()
        self.out.close()
        self.err.close()
        if self.proc.returncode == CELL_STOPPED:
            why = (err.strip().splitlines() or [""])[-1]
            return {"spec": dataclasses.asdict(self.spec), "error": f"stopped: {why}"}
        if self.proc.returncode != 0 or not lines:
            return {"spec": dataclasses.asdict(self.spec), "error": err[-2000:]}
        return json.loads(lines[-1])


def run_spec_here(text: str, options: str | None = None) -> int:
    """The child side of a cell (`--one`): the spec given as JSON, run here; its result is the last stdout line.
    `options`: the parent's `CellOptions` as JSON. Returns the exit status (`CELL_STOPPED` for the test hook)."""
    spec = RunSpec(**json.loads(text))
    ck = CellOptions(**json.loads(options)).for_spec(spec) if options else None
    try:
        res = eval_base(spec) if spec.method == "base" else run_one(spec, ck)
    except CellStopped as exc:
        print(exc, file=sys.stderr, flush=True)
        return CELL_STOPPED
    print(json.dumps(res), flush=True)
    return 0


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _label(spec: RunSpec) -> str:
    lr = "" if spec.method == "base" else f" lr={spec.lr:g}"
    return f"{spec.dataset} N={spec.n_facts} {spec.method}{lr} seed={spec.seed} steps={spec.steps}"


def run_specs(specs: list[RunSpec], out: Path, *, jobs: int = 1, more=None, cells: CellOptions | None = None) -> None:
    """Run every spec without a successful result in `out` yet, `jobs` at a time, appending each result
    as it finishes (only this process writes `out`). `more(results)`, if given, is asked after every
    result for specs that have become runnable (the capacity plan's carried cells once a method's lr
    sweep is complete); they join the queue ahead of the rest, since they are the longer runs.
    `cells`: how cells checkpoint and resume (default: no checkpoints)."""
    cells = cells or CellOptions()
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
            running.append(_Cell(spec, jobs, cells))
        time.sleep(0.5 if jobs > 1 else 0.05)
        for cell in [c for c in running if c.proc.poll() is not None]:
            running.remove(cell)
            res = cell.result()
            finished += 1
            status = f"FAILED: {res['error']}" if "error" in res else "done"
            print(f"[end {finished} {time.time() - t0:6.0f}s] {_label(cell.spec)}: {status}", flush=True)
            with out.open("a") as fh:
                fh.write(json.dumps(res) + "\n")
            if "error" not in res and (ck := cells.for_spec(cell.spec)) is not None:
                shutil.rmtree(ck.folder, ignore_errors=True)  # the result is kept: its checkpoint is not needed
            if more is not None:
                add(more(load_results(out)), front=True)
    if cells.checkpoint_dir is not None and Path(cells.checkpoint_dir).is_dir() \
            and not any(Path(cells.checkpoint_dir).iterdir()):
        Path(cells.checkpoint_dir).rmdir()  # every cell's result is in: no checkpoint is left
