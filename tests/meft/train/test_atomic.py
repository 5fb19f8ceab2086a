"""Atomic writes: a failure inside the write leaves the previous version intact."""

import os

import pytest
from safetensors import SafetensorError

from meft.atomic import DiskFullError, atomic_folder, atomic_write_text, read_pointer, write_pointer
from meft.cli.main import USER_ERRORS

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_folder_failure_keeps_previous(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_folder(final) as d:
        (d / "x").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(final) as d:
        (d / "x").write_text("half")
        raise RuntimeError("crash mid-save")
    assert (final / "x").read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_folder_replaces_existing(tmp_path):
    final = tmp_path / "ckpt"
    for text in ("a", "b"):
        with atomic_folder(final) as d:
            (d / "x").write_text(text)
    assert (final / "x").read_text() == "b"


def test_pointer_names_only_complete_folders(tmp_path):
    assert read_pointer(tmp_path) is None
    (tmp_path / "step-1").mkdir()
    write_pointer(tmp_path, "step-1")
    assert read_pointer(tmp_path) == tmp_path / "step-1"
    write_pointer(tmp_path, "step-2")  # named but never completed
    assert read_pointer(tmp_path) is None


@needs_dev_full
@pytest.mark.parametrize("writer", ["open", "safetensors"])
def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_folder(tmp_path, writer):
    """A full disk inside a checkpoint write: DiskFullError naming the folder and the fix, the partial folder
    removed, the previous one intact; the CLI prints it as one line (USER_ERRORS). 'open': a real ENOSPC
    (/dev/full). 'safetensors': its writer replaces any symlink atomically, so /dev/full cannot reach it; its
    error type is raised with the message it gave on this machine's full disk."""
    final = tmp_path / "ckpt"
    with atomic_folder(final) as d:
        (d / "x").write_text("old")
    with pytest.raises(DiskFullError) as info, atomic_folder(final) as d:
        (d / "stores.safetensors").write_bytes(b"half")
        if writer == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        with open("/dev/full", "wb") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
    msg = str(info.value)
    assert "ran out of disk space" in msg and str(final) in msg and "--output-dir" in msg
    assert (final / "x").read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]
    assert isinstance(info.value, USER_ERRORS)
