"""Who owns a run folder: one run per `--output-dir`, one live process writing it at a time.

Owns `claim_run_folder`, called by `meft train` before anything loads:
  * an `--output-dir` that is a file is refused;
  * an OS file lock (`fcntl.flock` on `output_dir/.lock`) is taken for the whole run; the OS releases it when
    the process ends, however it ends (kill -9 included), so a second live run into the same folder is a
    clear error instead of two runs interleaving their metrics;
  * a folder that holds another run (metrics, summary, adapter, checkpoints) is refused unless the run
    continues it (`--resume`) or replaces it (`--overwrite`: the old run's files are removed first, whole;
    files that are not part of a run are left alone);
  * temp files and folders a killed save left behind (`checkpoints/.step-*.tmp`, `checkpoints/.latest.*.tmp`,
    `.adapter.*.tmp`, ...) are removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

__all__ = ["RunFolderError", "RunLock", "claim_run_folder", "RUN_ENTRIES", "holds_run", "remove_orphans"]

LOCK_NAME = ".lock"
# everything `meft train` writes into a run folder; --overwrite removes these and nothing else
RUN_ENTRIES = ("metrics.jsonl", "summary.json", "config.json", "loss.png", "adapter", "checkpoints",
               "tensorboard", "wandb", "inspect.png")
_EVIDENCE = ("metrics.jsonl", "summary.json", "adapter", "checkpoints")  # a run was here


class RunFolderError(ValueError):
    """The run folder cannot be used as asked; the message says why and the ways on."""


def holds_run(out: Path) -> list[str]:
    """The names in `out` that show a run was written there (empty: a fresh folder)."""
    return [n for n in _EVIDENCE if (out / n).exists()]


class RunLock:
    """An exclusive `flock` on `output_dir/.lock`, held until `release()` or the process ends."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(self._fd)
            os.close(self._fd)
            self._fd = None
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunFolderError(
                f"--output-dir {str(out)!r} is in use by another live meft train ({holder}); two runs into one "
                "folder would mix their metrics and checkpoints. Fix: wait for it to finish (or stop it: Ctrl-C / "
                "kill saves a checkpoint), or pass another --output-dir") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 100, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


def remove_orphans(out: Path) -> list[Path]:
    """Remove the temp files and folders of writes that a killed process never finished (checkpoint and adapter
    folders, the `latest` pointer, summary and config files: every `meft.atomic` temp is `.<name>.*.tmp`);
    returns what was removed."""
    ckpts = out / "checkpoints"
    found = list(ckpts.glob(".*.tmp")) + list(ckpts.glob(".step-*.old")) if ckpts.is_dir() else []
    found += list(out.glob(".*.tmp")) + list(out.glob("summary.json.tmp"))
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def _remove_run(out: Path) -> None:
    for name in RUN_ENTRIES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def claim_run_folder(output_dir: str | Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Make `output_dir` this run's: refuse a file or a folder holding another run, take the lock, remove
    orphan temp folders (and with `overwrite`, the old run). Returns the held lock."""
    out = Path(output_dir)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite together: --resume continues the run in --output-dir, "
                             "--overwrite deletes it; fix: pass one of them")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--output-dir {str(out)!r} is a file, not a folder; fix: pass a folder path "
                             "(it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"--output-dir {str(out)!r} cannot be created ({exc.strerror}); fix: pass a folder "
                             "you can write to") from None
    lock = RunLock(out)
    try:
        found = holds_run(out)
        if found and not resume and not overwrite:
            raise RunFolderError(
                f"--output-dir {str(out)!r} already holds a run ({', '.join(found)}); refusing to overwrite it. "
                "Fix: continue it with --resume, write the new run elsewhere with another --output-dir, or "
                "replace it with --overwrite (deletes the old run)")
        if overwrite and found:
            _remove_run(out)
            print(f"meft: --overwrite: removed the previous run in {out} ({', '.join(found)})", flush=True)
        for p in remove_orphans(out):
            print(f"meft: removed {p}, left by a write that never finished", flush=True)
    except BaseException:
        lock.release()
        raise
    return lock
