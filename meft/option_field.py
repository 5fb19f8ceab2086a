"""`opt`: a dataclass field that carries its `--help` text; `OptionFields`: the JSON round trip of such a dataclass.

Every options dataclass (MeftConfig, TrainArgs, PlanOptions, the CLI's own) declares its fields with this
one helper; `meft.cli.options` turns each such field into a command-line option with that help, and
config files are read against the same fields. `OptionFields` gives a dataclass `help()`, `from_dict` (an
unknown key is an error naming it and the known fields; a missing one takes its default, so files written
before a field existed still load) and `to_json` / `from_json` over its `to_dict()`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from typing import Any

__all__ = ["opt", "OptionFields"]


def opt(default, help: str):
    """A dataclass field carrying its `--help` text; a list default gets a fresh copy per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


class OptionFields:
    """Mixin of an options dataclass whose fields are declared with `opt`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str):
        s = text_or_path.lstrip()
        if not s.startswith("{"):
            with open(text_or_path) as f:
                s = f.read()
        return cls.from_dict(json.loads(s))

    @classmethod
    def help(cls) -> dict[str, str]:
        """field name -> help string."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}
