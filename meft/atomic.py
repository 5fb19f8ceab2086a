"""Atomic file and folder writes: a crash, a kill or Ctrl-C never leaves a half-written result.

Files: write to a temp file in the same folder, flush + fsync, `os.replace` onto the final name.
Folders: fill a temp folder beside the final one, fsync its files, rename it into place, and only then
point a small `latest` file at it (itself replaced atomically). A reader that follows `latest` sees
either the previous complete folder or the new complete one, never a partial one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DiskFullError", "atomic_write_text", "atomic_folder", "read_pointer", "read_pointer_name",
           "write_pointer", "is_disk_full"]


class DiskFullError(OSError):
    """A write ran out of disk space. The partial result was removed and the previous one is intact."""


def is_disk_full(exc: BaseException) -> bool:
    """`exc` says the disk is full (ENOSPC, whoever raised it)."""
    return _disk_full(exc)


def _disk_full(exc: BaseException) -> bool:
    # safetensors' writer reports ENOSPC as its own error type, "... (os error 28)"
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)


def _disk_full_error(final: Path) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(final.parent).free / 2**30:.2f} GiB free there now"
    except OSError:
        free = "free space unknown"
    return DiskFullError(errno.ENOSPC, f"writing {str(final)!r} ran out of disk space ({free}). Nothing was lost: "
                         "the partial write was removed and the previous version, if any, is intact. Fix: free "
                         "disk space or write to a larger disk (--output-dir); for training checkpoints also "
                         "--save-every (less often) or --keep-checkpoints 1, then continue with --resume.")


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not all platforms allow opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if _disk_full(exc):
            raise _disk_full_error(path) from exc
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Yield a temp folder; on normal exit it becomes `final` (replacing an old one), else it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            # Move the old one aside first: a rename cannot replace a non-empty folder.
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc):
            raise _disk_full_error(final) from exc
        raise


def write_pointer(folder: str | Path, target_name: str, pointer: str = "latest") -> None:
    """Atomically make `folder/pointer` name `target_name` (a sibling folder inside `folder`)."""
    atomic_write_text(Path(folder) / pointer, target_name + "\n")


def read_pointer_name(folder: str | Path, pointer: str = "latest") -> str | None:
    """The name `folder/pointer` holds (whether or not that folder exists), or None without a pointer."""
    ptr = Path(folder) / pointer
    try:
        return ptr.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def read_pointer(folder: str | Path, pointer: str = "latest") -> Path | None:
    """The folder that `folder/pointer` names, or None when there is no complete one yet."""
    name = read_pointer_name(folder, pointer)
    if name is None:
        return None
    target = Path(folder) / name
    return target if target.is_dir() else None
