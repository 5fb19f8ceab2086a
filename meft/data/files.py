"""Record files: ``.jsonl``, ``.json`` and ``.parquet`` into canonical records, every bad record reported.

Owns the containers and where each record came from (``_source``, used by every later error):

* ``.jsonl``: one record per line (blank lines allowed)                        -> ``file:LINE``
* ``.json``: a list of records, or ``{"data": [records]}``                     -> ``file:LINE (record I)``,
  LINE being where the record starts
* ``.parquet``: one record per row, through ``pyarrow`` (optional extra ``meft[parquet]``); a null
  column is treated as absent                                                  -> ``file:row N``

Any other suffix is read as JSONL. The formats (Alpaca, ShareGPT, OpenAI messages, prompt/completion,
text) are `meft.data.formats`; a file holds one format, detected from its records (the most common
one; ties go to the first): every record in another format is an error naming its place and both formats.
Nothing is skipped: `load_records` raises one `DataError` listing every problem.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from meft.data.formats import DataError, detect_format, to_canonical

__all__ = ["load_records", "load_jsonl", "read_raw", "SUFFIXES"]

SUFFIXES = (".jsonl", ".json", ".parquet")
_ERROR = object()  # marks a raw entry that is a parse error message, not a record


def _jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, (_ERROR, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                     "fix: save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, (_ERROR, f"invalid JSON ({e.msg} at column {e.colno})")


def _utf8_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError([f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); fix: save the file as "
                         "UTF-8"], what=str(path)) from None


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _array_start(text: str, path: Path) -> int:
    """Index of the '[' holding the records: the document itself, or the value of its "data" key."""
    dec, pos = json.JSONDecoder(), _skip_ws(text, 0)
    if text.startswith("[", pos):
        return pos
    if text.startswith("{", pos):
        pos = _skip_ws(text, pos + 1)
        while pos < len(text) and text[pos] == '"':
            key, pos = dec.raw_decode(text, pos)
            pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past ':'
            if key == "data" and text.startswith("[", pos):
                return pos
            _, pos = dec.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            pos = _skip_ws(text, pos + 1) if text.startswith(",", pos) else pos
    raise DataError([f"{path}: a .json data file must hold a list of records or {{\"data\": [records]}}"],
                    what=str(path))


def _json(path: Path) -> Iterator[tuple[str, object]]:
    text = _utf8_text(path)
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError([f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})"], what=str(path)) from e
    dec, pos = json.JSONDecoder(), _array_start(text, path) + 1
    i = 0
    while True:
        pos = _skip_ws(text, pos)
        if text.startswith("]", pos):
            return
        rec, end = dec.raw_decode(text, pos)
        yield f"{path}:{text.count(chr(10), 0, pos) + 1} (record {i})", rec
        pos, i = _skip_ws(text, end), i + 1
        pos = pos + 1 if text.startswith(",", pos) else pos


def _parquet(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError([f"{path}: reading .parquet needs pyarrow; fix: pip install 'meft[parquet]' "
                         "(or pip install pyarrow), or convert the file to .jsonl"], what=str(path)) from e
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - any arrow error is a bad file, reported as such
        raise DataError([f"{path}: not a readable parquet file ({e})"], what=str(path)) from e
    for n, row in enumerate(rows, start=1):
        yield f"{path}:row {n}", {k: v for k, v in row.items() if v is not None}


def read_raw(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """``(where, raw record)`` for every record of a file; a line that is not JSON comes as
    ``(where, (_ERROR, reason))``. Raises `DataError` for a missing or unreadable file."""
    path = Path(path)
    if path.is_dir():
        raise DataError([f"{path}: is a folder, not a data file; fix: pass one .jsonl, .json or .parquet file "
                         "inside it"], what=str(path))
    if not path.is_file():
        raise DataError([f"{path}: no such file"], what=str(path))
    reader = {".json": _json, ".parquet": _parquet}.get(path.suffix.lower(), _jsonl)
    return reader(path)


def load_records(path: str | os.PathLike) -> list[dict]:
    """Read, detect the format of, validate and convert every record of a file (see module docstring).

    Each returned record is canonical (`meft.data.formats`) with ``"_source"`` (where it came from)
    and ``"_format"`` (the file's format). Raises `DataError` listing every bad record; never skips one.
    """
    raw, errors = [], []  # errors: (position in the file, message), sorted at the end
    for n, (where, rec) in enumerate(read_raw(path)):
        if isinstance(rec, tuple) and rec and rec[0] is _ERROR:
            errors.append((n, f"{where}: {rec[1]}"))
            continue
        fmt, reason = detect_format(rec)
        if reason:
            errors.append((n, f"{where}: {reason}"))
            continue
        raw.append((n, where, fmt, rec))
    counts = Counter(x[2] for x in raw)
    order = [x[2] for x in raw]
    file_fmt = max(counts, key=lambda f: (counts[f], -order.index(f))) if counts else None
    first = next((w for _, w, f, _ in raw if f == file_fmt), None)
    records = []
    for n, where, fmt, rec in raw:
        if fmt != file_fmt:
            errors.append((n, f"{where}: a {fmt} record, but this file holds {file_fmt} records "
                              f"({counts[file_fmt]} of them, first at {first}); put one format per file"))
            continue
        out, _kind, reason = to_canonical(rec, fmt)
        if reason:
            errors.append((n, f"{where}: {reason}"))
            continue
        records.append({**out, "_source": where, "_format": fmt})
    if not records and not errors:
        errors.append((0, f"{path}: no records (the file is empty)"))
    if errors:
        raise DataError([msg for _, msg in sorted(errors, key=lambda e: e[0])], what=str(path))
    return records


load_jsonl = load_records  # the name older callers use; every container is accepted
