"""Writing one benchmark's section of BENCHMARKS.md: replace it in place, or append it when missing.

A section runs from its `## ` heading to the next `## ` heading; nothing outside it is touched, so
benchmarks can rewrite their own tables without disturbing the others.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["replace_section", "BENCHMARKS_MD"]

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def replace_section(heading: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Put `body` (which starts with `heading`) where the section `heading` is, or at the end."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    body = body.rstrip("\n") + "\n"
    start = old.find(heading)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + body
    else:
        nxt = old.find("\n## ", start + len(heading))
        new = old[:start] + body + (old[nxt:] if nxt >= 0 else "")
    path.write_text(new)
