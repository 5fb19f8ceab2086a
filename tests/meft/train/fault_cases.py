"""Fault cases of `meft train`, run as real processes: kill -9 at seeded random points of training and of each
save, SIGTERM, a truncated or missing file in each checkpoint part, two concurrent runs, a second run into an
occupied folder, a full disk. Each case returns a `Verdict`; every one checks that the newest complete
checkpoint resumes with losses identical to an uninterrupted run and that nothing was lost or mixed.

Processes start from a forkserver that imported torch, transformers and meft once (a child is a fresh
process running `meft.cli.main.main(argv)`: kill -9 kills it as it would kill `meft train`), so a trial costs
the tiny model's load and a few steps, not the imports. Used by tests/meft/train/test_faults.py and
experiments/fault_matrix.py.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STEPS = 8
SMALL = ["--adapter-rows", "256", "--expert-size", "16", "--max-active-rows", "64", "--batch-size", "4",
         "--progress", "false", "--wire-dtype", "float32", "--eval-before", "false", "--eval-after", "false",
         "--retention", "false", "--generations", "false", "--general", "false"]
_CTX = None


@dataclass
class Verdict:
    case: str
    ok: bool
    detail: str


def _ctx():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "transformers", "meft.cli.main", "meft.cli.train", "meft.train.loop",
                                     "tests.meft.train.fault_cases"])
    return _CTX


def _child(argv: list[str], log: str, env: dict) -> None:
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from meft.cli.main import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Run:
    """One `meft train` process (forked from the preloaded server)."""

    def __init__(self, tiny: Path, out: Path, *extra: str, env: dict | None = None, steps: int = STEPS):
        self.out, self.log = out, out.parent / f"{out.name}.{time.monotonic_ns()}.log"
        argv = ["train", "--model", str(tiny / "model"), "--data", str(tiny / "train.jsonl"), "--output-dir",
                str(out), "--steps", str(steps), *SMALL, *extra]
        self.proc = _ctx().Process(target=_child, args=(argv, str(self.log), dict(env or {})))
        self.proc.start()

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 300) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
            raise TimeoutError(f"meft train did not end in {timeout} s; log: {self.text()[-2000:]}")
        return self.proc.exitcode

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def run(tiny: Path, out: Path, *extra: str, **kw) -> tuple[int, str]:
    r = Run(tiny, out, *extra, **kw)
    return r.wait(), r.text()


def losses(out: Path) -> list[float]:
    path = out / "metrics.jsonl"
    return [json.loads(x)["loss"] for x in path.read_text().splitlines()] if path.exists() else []


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []


def wait_for(pred, timeout: float = 120) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.02)
    return False


def reference(tiny: Path, root: Path) -> list[float]:
    """Losses of the uninterrupted run every case is compared with."""
    code, text = run(tiny, root / "reference")
    assert code == 0, text[-3000:]
    return losses(root / "reference")


def _complete(out: Path, ref: list[float], code: int, text: str, how: str) -> Verdict:
    """The run in `out` ended (`code`): it must have finished cleanly with the reference's losses, its steps
    logged once each, and no temp folder left."""
    orphans = list(out.rglob("*.tmp"))
    if code != 0:
        return Verdict(how, False, f"exit {code}: {text.strip().splitlines()[-1:]}")
    if "Traceback" in text:
        return Verdict(how, False, "a traceback was printed")
    if steps_logged(out) != list(range(1, STEPS + 1)):
        return Verdict(how, False, f"steps logged {steps_logged(out)} (lost or mixed)")
    if losses(out) != ref:
        return Verdict(how, False, f"losses {losses(out)} != uninterrupted {ref}")
    if orphans:
        return Verdict(how, False, f"temp folders left: {orphans}")
    return Verdict(how, True, "resumed; losses identical to the uninterrupted run")


def _continue(tiny: Path, out: Path, *extra: str) -> tuple[int, str]:
    """Continue a run after a fault: --resume, or start over when no checkpoint was written yet (nothing, when
    the kill came after the run had completed)."""
    from meft.train.resume import completed_run

    if completed_run(out) is not None:
        return 0, "(completed before the kill)"
    has = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*"))
    return run(tiny, out, "--resume" if has else "--overwrite", *extra)


def kill_in_training(tiny: Path, root: Path, ref: list[float], seed: int) -> Verdict:
    rnd, out = random.Random(seed), root / f"kill-train-{seed}"
    after = rnd.randint(1, STEPS - 2)
    r = Run(tiny, out, "--save-every", "2")
    wait_for(lambda: len(steps_logged(out)) >= after or r.proc.exitcode is not None)
    time.sleep(rnd.uniform(0, 0.3))
    r.signal(signal.SIGKILL)
    r.wait()
    code, text = _continue(tiny, out, "--save-every", "2")
    return _complete(out, ref, code, text, f"kill -9 after step {after} (seed {seed})")


def kill_in_save(tiny: Path, root: Path, ref: list[float], seed: int) -> Verdict:
    rnd, out = random.Random(seed), root / f"kill-save-{seed}"
    step, slow = rnd.randint(1, STEPS - 2), 0.6
    r = Run(tiny, out, "--save-every", "1", env={"MEFT_TEST_SLOW_SAVE_S": str(slow)})
    ckpts = out / "checkpoints"
    wait_for(lambda: r.proc.exitcode is not None or (ckpts.is_dir() and any(
        p.name.startswith(f".step-{step:06d}") for p in ckpts.iterdir())))
    at = rnd.uniform(0, slow * 1.1)
    time.sleep(at)
    r.signal(signal.SIGKILL)
    r.wait()
    code, text = _continue(tiny, out, "--save-every", "1")
    return _complete(out, ref, code, text, f"kill -9 {at:.2f} s into the save of step {step} (seed {seed})")


def sigterm(tiny: Path, root: Path, ref: list[float]) -> Verdict:
    out = root / "sigterm"
    r = Run(tiny, out, "--save-every", "0", env={"MEFT_TEST_SLOW_SAVE_S": "0"})
    wait_for(lambda: len(steps_logged(out)) >= 2)
    r.signal(signal.SIGTERM)
    code, text = r.wait(), r.text()
    how = "SIGTERM mid-training"
    if code != 128 + signal.SIGTERM:
        return Verdict(how, False, f"exit {code}, expected 143: {text[-500:]}")
    from meft.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out)
    if ckpt is None or int(ckpt.name.split("-")[1]) != len(steps_logged(out)):
        return Verdict(how, False, f"no checkpoint at the last logged step ({ckpt})")
    code, text = run(tiny, out, "--resume", "--save-every", "0")
    return _complete(out, ref, code, text, how)


def damaged_part(tiny: Path, root: Path, ref: list[float], part: str) -> Verdict:
    """Checkpoints at steps 2 and 4; the newest one's `part` truncated (or the folder deleted, for
    'folder'): --resume skips it, says why, and continues from step 2."""
    out = root / f"damaged-{part}"
    how = f"damaged checkpoint: {part}"
    code, text = run(tiny, out, "--save-every", "2", "--keep-checkpoints", "3", steps=4)
    if code != 0:
        return Verdict(how, False, f"first run exit {code}")
    newest = out / "checkpoints" / "step-000004"
    if part == "folder":
        shutil.rmtree(newest)  # `latest` names a missing folder
    else:
        f = newest / part
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, text = run(tiny, out, "--resume", "--save-every", "2")
    if "skipping checkpoint step-000004" not in text or "resumed from" not in text:
        return Verdict(how, False, f"no fallback message: {text[-800:]}")
    return _complete(out, ref, code, text, how)


def occupied_folder(tiny: Path, root: Path, ref: list[float]) -> Verdict:
    out = root / "occupied"
    how = "second run into an occupied folder"
    code, text = run(tiny, out, steps=STEPS)
    before = (out / "metrics.jsonl").read_bytes(), (out / "adapter" / "adapter_model.safetensors").read_bytes()
    code2, text2 = run(tiny, out, steps=2)
    after = (out / "metrics.jsonl").read_bytes(), (out / "adapter" / "adapter_model.safetensors").read_bytes()
    if code2 != 2 or not all(w in text2 for w in ("already holds a run", "--resume", "--output-dir", "--overwrite")):
        return Verdict(how, False, f"exit {code2}: {text2[-500:]}")
    if before != after:
        return Verdict(how, False, "the refused run changed the old run's files")
    code3, text3 = run(tiny, out, "--overwrite")
    return _complete(out, ref, code3, text3, how + " (refused; --overwrite replaces it)")


def concurrent_runs(tiny: Path, root: Path, ref: list[float]) -> Verdict:
    out = root / "concurrent"
    how = "two live runs into one folder"
    first = Run(tiny, out, "--save-every", "1", env={"MEFT_TEST_SLOW_SAVE_S": "0.3"})
    wait_for(lambda: len(steps_logged(out)) >= 1)
    code2, text2 = run(tiny, out, "--resume")
    if code2 != 2 or "in use by another live meft train" not in text2:
        first.wait()
        return Verdict(how, False, f"second run exit {code2}: {text2[-500:]}")
    return _complete(out, ref, first.wait(), first.text(), how + " (second refused)")


_FULL_DISK = r"""
set -u
mount -t tmpfs -o size=600k tmpfs "$D1" && mount -t tmpfs -o size=50k tmpfs "$D2" || exit 77
"$PY" -m meft.cli.main train $ARGS --output-dir "$D1/run" --save-every 1 --keep-checkpoints 3 > "$OUT/a.log" 2>&1
echo $? > "$OUT/a.rc"
ls "$D1/run/checkpoints" > "$OUT/a.ls"
"$PY" -m meft.cli.main train $ARGS --output-dir "$D1/run" --save-every 1 --keep-checkpoints 1 --resume \
  > "$OUT/b.log" 2>&1
echo $? > "$OUT/b.rc"
cp "$D1/run/metrics.jsonl" "$OUT/metrics.jsonl"
"$PY" -m meft.cli.main train $ARGS --output-dir "$D2/run" > "$OUT/c.log" 2>&1
echo $? > "$OUT/c.rc"
ls -a "$D2/run" > "$OUT/c.ls"
"""


def full_disk(tiny: Path, root: Path, ref: list[float]) -> Verdict:
    """A 600 kB tmpfs holds two checkpoints (~238 kB each: values-only stores), not three: --keep-checkpoints 3
    fails with the disk-full error, the suggested --keep-checkpoints 1 then finishes; a 50 kB one cannot hold the
    adapter (~75 kB): a clear error and no half adapter folder. Mounted in a private mount namespace
    (`unshare -rm`); skipped where that fails."""
    how = "full disk during checkpoint and adapter saves"
    res = root / "full-disk"
    for d in ("m1", "m2", "res"):
        (res / d).mkdir(parents=True, exist_ok=True)
    args = " ".join(["--model", str(tiny / "model"), "--data", str(tiny / "train.jsonl"), "--steps", str(STEPS),
                     *SMALL])
    env = {**os.environ, "D1": str(res / "m1"), "D2": str(res / "m2"), "OUT": str(res / "res"),
           "PY": sys.executable, "ARGS": args, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    p = subprocess.run(["unshare", "-rm", "sh", "-c", _FULL_DISK], env=env, capture_output=True, text=True,
                       timeout=600)
    if p.returncode == 77 or not (res / "res" / "a.rc").exists():
        return Verdict(how, True, f"SKIPPED: cannot mount a tmpfs here ({p.stderr.strip()[-200:]})")
    o = res / "res"
    a_rc, a = int((o / "a.rc").read_text()), (o / "a.log").read_text()
    if a_rc != 2 or "ran out of disk space" not in a or "--keep-checkpoints 1" not in a or "Traceback" in a:
        return Verdict(how, False, f"first run: exit {a_rc}: {a[-600:]}")
    c_rc, c = int((o / "c.rc").read_text()), (o / "c.log").read_text()
    if c_rc != 2 or "ran out of disk space" not in c or "Traceback" in c or "adapter" in (o / "c.ls").read_text():
        return Verdict(how, False, f"adapter save: exit {c_rc}, left {(o / 'c.ls').read_text().split()}: {c[-600:]}")
    out = root / "full-disk-run"
    out.mkdir(exist_ok=True)
    shutil.copy(o / "metrics.jsonl", out / "metrics.jsonl")
    b_rc, b = int((o / "b.rc").read_text()), (o / "b.log").read_text()
    return _complete(out, ref, b_rc, b, how + " (--keep-checkpoints 1 then resumes)")
