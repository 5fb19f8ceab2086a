"""`opt`: a dataclass field that carries its `--help` text.

Every options dataclass (MeftConfig, TrainArgs, PlanOptions, the CLI's own) declares its fields with this
one helper; `meft.cli.options` turns each such field into a command-line option with that help, and
config files are read against the same fields.
"""

from __future__ import annotations

from dataclasses import field

__all__ = ["opt"]


def opt(default, help: str):
    """A dataclass field carrying its `--help` text; a list default gets a fresh copy per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})
