"""Dependency direction and import hygiene (docs/design.md "Layout": meft -> offload -> torch/numpy/numba).

The import graph is read from the source (every `import` statement, module-level or inside a function),
so a deferred import that would close a cycle is caught as well as a module-level one.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Function-local imports are allowed only for these: optional extras and heavy libraries loaded on use.
OPTIONAL = {"matplotlib", "yaml", "countryinfo", "peft", "psutil", "numba", "transformers", "accelerate",
            "gguf", "safetensors", "tokenizers", "tqdm", "torch", "tensorboard", "wandb", "pyarrow"}


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _modules() -> dict[str, Path]:
    """Every library module of meft/ and offload/ by dotted name."""
    out = {}
    for pkg in ("meft", "offload"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imports(path: Path, name: str, mods: dict) -> list[tuple[str, bool, int]]:
    """(imported library module, inside a function?, line) for every import statement of one file."""
    tree = ast.parse(path.read_text())
    found = []

    def resolve(target: str) -> str | None:
        while target and target not in mods:  # `from meft.x import y`: y may be a name, not a module
            target = target.rpartition(".")[0]
        return target or None

    def visit(node, in_func: bool):
        for child in ast.iter_child_nodes(node):
            func = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    found.append((a.name, in_func, child.lineno))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for a in child.names:
                    full = f"{child.module}.{a.name}"
                    found.append((full if full in mods else child.module, in_func, child.lineno))
            visit(child, func)

    visit(tree, False)
    out = []
    for target, in_func, line in found:
        top = target.split(".")[0]
        if top in ("meft", "offload"):
            mod = resolve(target)
            if mod and mod != name:
                out.append((mod, in_func, line))
        elif in_func and top not in OPTIONAL:
            out.append((target, in_func, line))  # a stdlib / other deferred import: reported below
    return out


def test_offload_imports_neither_transformers_nor_meft():
    code = (
        "import sys, pkgutil, importlib, offload\n"
        "for m in pkgutil.walk_packages(offload.__path__, 'offload.'): importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'meft')]\n"
        "print(','.join(bad))"
    )
    assert _run(code) == ""


@pytest.mark.parametrize("pkg", ["offload", "meft"])
def test_import_does_not_initialize_cuda(pkg):
    code = (f"import torch, pkgutil, importlib, {pkg}\n"
            f"for m in pkgutil.walk_packages({pkg}.__path__, '{pkg}.'): importlib.import_module(m.name)\n"
            "print(torch.cuda.is_initialized())")
    assert _run(code) == "False"


def test_public_api_names_resolve():
    code = (
        "import meft, offload\n"
        "for m in (meft, offload):\n"
        "    for n in m.__all__: getattr(m, n)\n"
        "print('ok')"
    )
    assert _run(code) == "ok"


def test_arrows_point_down():
    """Nothing outside meft/cli imports meft.cli; offload never imports meft; no cycle among library modules
    (deferred imports included); function-local imports only for optional or heavy dependencies."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    problems = []
    for name, path in mods.items():
        for target, in_func, line in _imports(path, name, mods):
            where = f"{path.relative_to(ROOT)}:{line}"
            if target not in mods:
                problems.append(f"{where}: function-local import of {target} (not an optional dependency)")
                continue
            if target.startswith("meft.cli") and not name.startswith("meft.cli"):
                problems.append(f"{where}: {name} imports the CLI ({target})")
            if name.startswith("offload") and target.startswith("meft"):
                problems.append(f"{where}: offload imports meft ({target})")
            if in_func and name not in ("meft", "offload", "meft.cli.main"):
                problems.append(f"{where}: function-local import of library module {target}")
            graph[name].add(target)
    # cycles: depth-first search over the module graph (package __init__ faces are lazy, so excluded)
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if t in ("meft", "offload"):
                continue
            if state.get(t) == 1:
                problems.append("cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not problems, "\n".join(problems)
