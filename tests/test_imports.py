"""Dependency direction and import hygiene (DESIGN.md: meft -> offload -> torch/numpy/numba)."""

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_offload_imports_neither_transformers_nor_meft():
    code = (
        "import sys, offload\n"
        "import offload.store, offload.kernels, offload.optim, offload.engine, offload.scheduler, offload.meter\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'meft')]\n"
        "print(','.join(bad))"
    )
    assert _run(code) == ""


@pytest.mark.parametrize("pkg", ["offload", "meft"])
def test_import_does_not_initialize_cuda(pkg):
    mods = {
        "offload": "offload.store, offload.kernels, offload.optim, offload.engine, offload.scheduler, offload.meter",
        "meft": "meft.config, meft.model, meft.lomo, meft.checkpoint, meft.router, meft.functional",
    }[pkg]
    code = f"import torch, {pkg}\nimport {mods}\nprint(torch.cuda.is_initialized())"
    assert _run(code) == "False"


def test_public_api_names_resolve():
    code = (
        "import meft, offload\n"
        "for m in (meft, offload):\n"
        "    for n in m.__all__: getattr(m, n)\n"
        "print('ok')"
    )
    assert _run(code) == "ok"
