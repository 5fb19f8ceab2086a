"""Checkpoint manifests: the size and sha256 of every file in a checkpoint folder, written last.

A checkpoint is trusted only when its `manifest.json` exists and every file it lists has that size and
checksum: a truncated or overwritten file, a file a disk error damaged, or a folder someone emptied is found
before anything is loaded, and `--resume` falls back to an older checkpoint (`meft.train.resume`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["MANIFEST_NAME", "write_manifest", "verify_manifest"]

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 22


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | Path) -> dict:
    """Record every file in `folder` (size + sha256) in `folder/manifest.json`; call it after the last write."""
    folder = Path(folder)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    manifest = {"format": "meft-checkpoint-manifest", "version": 1, "files": files}
    with open(folder / MANIFEST_NAME, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
    return manifest


def verify_manifest(folder: str | Path) -> str | None:
    """None when `folder` is complete and intact, else why not (one phrase, for a message)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "the folder is missing"
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return f"no {MANIFEST_NAME} (the save never finished, or an older meft wrote it)"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"{MANIFEST_NAME} is unreadable ({type(exc).__name__})"
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, the manifest says {want['bytes']} (truncated or overwritten)"
        if _sha256(p) != want["sha256"]:
            return f"{name} does not match its checksum (damaged)"
    return None
