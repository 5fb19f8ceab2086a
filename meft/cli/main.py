"""`meft` console entry point: one subcommand per file in this folder, dispatched here.

User mistakes (bad options, a missing model folder, malformed data, not enough host RAM) are raised
as `ValueError`/`FileNotFoundError`/`MemoryError` subclasses and printed as one clear line with
exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from meft.atomic import DiskFullError
from meft.train.distributed import RankFailedError

__all__ = ["main", "build_parser"]

# name -> module under meft.cli; each module has `add_parser(subparsers)` and `run(args) -> int`.
SUBCOMMANDS = {
    "train": "meft.cli.train",
    "eval": "meft.cli.eval",
    "generate": "meft.cli.generate",
    "profile": "meft.cli.profile",
    "plan": "meft.cli.plan",
    "inspect": "meft.cli.inspect",
}

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, MemoryError, KeyError, DiskFullError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meft",
        description="Fine-tune HF causal LMs with sparse FFN adapters held in CPU memory.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("\nmeft: interrupted", file=sys.stderr)
        return 130
    except RankFailedError as exc:  # another rank of a torchrun run died: one message, no traceback
        print(f"meft {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        if getattr(args, "debug", False):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"meft {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
