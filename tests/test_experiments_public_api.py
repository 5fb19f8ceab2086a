"""Experiments use only the public API of meft and offload (docs/design.md "Layout").

Public: a package face (`meft`, `meft.adapter`, `meft.lomo`, `meft.data`, `meft.train`, `meft.plan`,
`meft.profile`, `offload`) or a public module (`meft.config`, `meft.evaluate`, `meft.pretrained`, any
`offload.<module>` without a leading underscore), and from it only the names in its `__all__` (or a
public submodule of it); never an underscore name. Every `experiments/**/*.py` is parsed with `ast`:
`import X`, `from X import y` and attribute chains on an imported meft/offload module (`meft.a.b`)
are checked against the `__all__` of the module they resolve to, read by importing it.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("meft", "offload")
FACES = {"meft", "meft.adapter", "meft.lomo", "meft.data", "meft.train", "meft.plan", "meft.profile", "offload"}


def _public_modules() -> set[str]:
    import offload

    mods = {f"offload.{m.name}" for m in pkgutil.iter_modules(offload.__path__) if not m.name.startswith("_")}
    return FACES | mods | {"meft.config", "meft.evaluate", "meft.pretrained"}


PUBLIC = _public_modules()


def _exported(module: str) -> set[str]:
    names = getattr(importlib.import_module(module), "__all__", None)
    assert names is not None, f"{module} is public but has no __all__"
    return set(names)


def _name_ok(module: str, name: str) -> bool:
    """`name` taken from public `module`: a public name of its `__all__`, or a public submodule."""
    if name.startswith("_"):
        return False
    return name in _exported(module) or f"{module}.{name}" in PUBLIC


def _ours(dotted: str) -> bool:
    return dotted.split(".")[0] in ROOTS


def _chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
    """`a.b.c` -> ("a", ["b", "c"]); None when the chain does not start at a plain name."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id, attrs[::-1]) if isinstance(node, ast.Name) else None


def violations(source: str, filename: str = "<string>") -> list[str]:
    """Every non-public use of meft / offload in `source`, as 'file:line: what'."""
    tree = ast.parse(source, filename)
    bound: dict[str, str] = {}  # local name -> meft/offload module it is bound to by `import`
    bad = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if not _ours(a.name):
                    continue
                if a.name not in PUBLIC:
                    bad.append(f"{where}: import {a.name} (not a package face or public module)")
                    continue
                bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _ours(node.module):
            if node.module not in PUBLIC:
                bad.append(f"{where}: from {node.module} import ... (not a package face or public module)")
                continue
            for a in node.names:
                if a.name == "*" or not _name_ok(node.module, a.name):
                    bad.append(f"{where}: from {node.module} import {a.name} (not in {node.module}.__all__)")
                elif f"{node.module}.{a.name}" in PUBLIC:
                    bound[a.asname or a.name] = f"{node.module}.{a.name}"
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # check whole chains only
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        chain = _chain(node)
        if chain is None or chain[0] not in bound:
            continue
        module, attrs = bound[chain[0]], chain[1]
        for attr in attrs:
            if f"{module}.{attr}" in PUBLIC:
                module = f"{module}.{attr}"
                continue
            if not _name_ok(module, attr):
                bad.append(f"{filename}:{node.lineno}: {chain[0]}.{'.'.join(attrs)} ({attr!r} not in {module}.__all__)")
            break
    return sorted(set(bad))


def _experiment_files() -> list[Path]:
    return sorted(p for p in (ROOT / "experiments").rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _experiment_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_experiment_imports_only_public_api(path):
    assert violations(path.read_text(), str(path.relative_to(ROOT))) == []


@pytest.mark.parametrize("source", [
    "from meft.plan.fake_step import attach_dense",
    "from meft.train.loop import train_step",
    "import meft.adapter.wrap",
    "from meft.adapter import _WHERE",
    "from meft.config import _check",
    "from meft.data import records",
    "from offload.scheduler import _private",
    "from offload import *",
    "import meft\nmeft.plan.planner.plan",
    "import meft.adapter as ad\nad.runtime.MeftRuntime",
])
def test_checker_refuses(source):
    assert violations(source), source


@pytest.mark.parametrize("source", [
    "import meft\nmeft.wrap\nmeft.adapter.row_init",
    "from meft.adapter import DenseParallelAdapter, attach_dense, hidden_size_of, row_init",
    "from meft.config import MeftConfig, parse_dtype",
    "from meft import config",
    "from offload import kernels\nkernels.get_num_threads",
    "from offload.engine import ThreadCopyEngine",
    "import offload.kernels as k",
    "import torch\ntorch.nn.functional.relu",
])
def test_checker_accepts(source):
    assert violations(source) == [], source
