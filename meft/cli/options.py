"""Command-line options built from dataclasses, with config files (YAML/JSON) as defaults.

Every option of a subcommand is a field of a dataclass with a `help` string in its metadata; this
module turns such dataclasses into argparse options (so `--help` documents each one) and merges,
in order of precedence: command line > config file (`--config run.yaml`) > dataclass default.
Unknown keys in a config file are an error that names the key and lists the valid ones. A run folder's own
`config.json` (`{"train": {...}, "meft": {...}}`, what `meft train` writes) is read as those options, so a
run can be repeated or continued with `--config runs/x/config.json` (its resume / overwrite choices are not
taken from it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

__all__ = ["add_command", "add_dataclass_options", "read_config_file", "resolve_options", "OptionsError"]


class OptionsError(ValueError):
    """A user-fixable problem with command-line options or a config file."""


def _base_type(tp: Any) -> Any:
    """`int | None` -> int, `Optional[str]` -> str; lists keep their origin."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return args[0]
    return tp


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(tp: Any):
    base = _base_type(tp)
    if base is bool:
        return _parse_bool
    if base in (int, float, str):
        return base
    # Lists, unions of int|list|str and the like: accept JSON, fall back to the raw string.
    def parse_json_or_str(text: str):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    return parse_json_or_str


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """Add one `--field-name` option per dataclass field; defaults are left as None (= not given)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        base = _base_type(hints[f.name])
        extra = {"nargs": "?", "const": True, "metavar": "BOOL"} if base is bool else {
            "metavar": base.__name__.upper() if base in (int, float, str) else "VALUE"}
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=_converter(hints[f.name]), default=None,
            help=f"{help_text} (default: {default!r})", **extra,
        )


def add_command(sub, name: str, *, help: str, description: str, epilog: str, run,
                groups: list[tuple[type, str]]) -> argparse.ArgumentParser:
    """A subcommand parser: `--config FILE`, one option group per (dataclass, title), and `run`."""
    p = sub.add_parser(name, help=help, description=description, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML/JSON file of options (command line wins)")
    for cls, title in groups:
        add_dataclass_options(p, cls, title)
    p.set_defaults(run=run)
    return p


def read_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON mapping of option names (dashes or underscores) to values."""
    path = Path(path)
    if not path.is_file():
        raise OptionsError(f"--config: file {str(path)!r} does not exist; pass a YAML or JSON file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - report any parse error as a user error
        raise OptionsError(f"--config: cannot parse {str(path)!r}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionsError(f"--config: {str(path)!r} must hold a mapping of option: value, got {type(data).__name__}")
    if _is_run_config(data):  # a run folder's own config.json: its options, in two parts
        data = {**data["train"], **data["meft"]}
        for name in RUN_SPECIFIC:  # this command says whether it resumes / overwrites, not the old run
            data.pop(name, None)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# written by `meft train` into a run's config.json, besides the options: not taken from it by --config
RUN_SPECIFIC = ("resume", "overwrite")


def _is_run_config(data: dict) -> bool:
    """`meft train` writes {"train": {...}, "meft": {...}, "world_size": N} into a run folder's config.json."""
    return isinstance(data.get("train"), dict) and isinstance(data.get("meft"), dict) and (
        set(data) <= {"train", "meft", "world_size"})


def resolve_options(args: argparse.Namespace, classes: list[type]) -> list[Any]:
    """Build one instance per dataclass from command line > config file > defaults."""
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(from_file) - known)
    if unknown:
        raise OptionsError(
            f"--config: unknown option(s) {unknown} in {args.config!r}; valid options are: {sorted(known)}"
        )
    instances = []
    for cls in classes:
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name, None)
            if value is None and f.name in from_file:
                value = from_file[f.name]
            if value is not None:
                kwargs[f.name] = value
        instances.append(cls(**kwargs))
    return instances
