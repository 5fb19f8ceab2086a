"""Byte counts and plain-text tables as every report of offload and meft prints them (defined once).

`format_bytes(n)` picks a binary unit (or takes a fixed one, for columns of comparable numbers);
`format_table(rows, header)` aligns columns, numbers right and text left unless told which columns
are right-aligned (pre-formatted numeric cells such as "1.50 MiB").
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = ["GiB", "format_bytes", "format_table"]

GiB = 1 << 30
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float, unit: str | None = None, width: int = 0) -> str:
    """'512 B', '1.50 MiB', '2.25 GiB' (largest unit below 1024, up to TiB), or in `unit` when given."""
    if unit is not None:
        return f"{n / 1024 ** _UNITS.index(unit):{width}.2f} {unit}"
    for i, u in enumerate(_UNITS):
        if abs(n) < 1024 or u == _UNITS[-1]:
            text = f"{n:.0f} {u}" if i == 0 else f"{n:.2f} {u}"
            return text.rjust(width)
        n /= 1024
    raise AssertionError("unreachable")


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _cell(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    if _is_num(x):
        return f"{x:,}"
    return str(x)


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str],
                 right: Collection[int] | None = None) -> str:
    """An aligned plain-text table with a rule under the header. Columns in `right` are right-aligned;
    by default those whose every cell is a number (ints get thousands separators, floats 4 digits)."""
    cells = [[str(h) for h in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    if right is None:
        right = {i for i in range(len(header)) if rows and all(_is_num(row[i]) for row in rows)}

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
