"""Atomic writes: a failure inside the write leaves the previous version intact."""

import pytest

from meft.train.atomic import atomic_folder, atomic_write_text, read_pointer, write_pointer


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
