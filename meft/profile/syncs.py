"""SyncCounter: counts the aten ops that make the host wait for a GPU, and says which code issued them.

`.item()` (`_local_scalar_dense`), `nonzero`, `torch.equal`, `is_nonzero`, `masked_select` and
boolean-mask indexing each block the host until the device has caught up. On a CPU they cost nothing,
but every one in the adapter path would be a stall per layer on a GPU, so tests and benchmarks count
them here with a TorchDispatchMode (thread-local: the host worker's threads are not counted). Sites
are keyed 'meft/offload|file:line (op)' for the innermost meft or offload frame, else
'transformers|file:line (op)' for the innermost transformers frame, else 'other'.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCounter", "SYNC_OPS"]

SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "item", "masked_select"})
_ROOT = Path(__file__).resolve().parents[2]
_OURS = (_ROOT / "meft", _ROOT / "offload")


class SyncCounter(TorchDispatchMode):
    """`with SyncCounter() as c: ...` then `c.sites` (Counter by site) and `c.count(origin)`."""

    def __init__(self):
        super().__init__()
        self.sites: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for i in a)
        if name in SYNC_OPS or bool_index:
            self.sites[self._site(name)] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _site(name: str) -> str:
        tf = None
        for fr in reversed(traceback.extract_stack()[:-2]):
            p = Path(fr.filename).resolve()
            if any(p.is_relative_to(o) for o in _OURS) and p.name != "syncs.py":
                return f"meft/offload|{p.relative_to(_ROOT)}:{fr.lineno} ({name})"
            if tf is None and "transformers" in p.parts:
                parts = p.parts[p.parts.index("transformers"):]
                tf = f"transformers|{'/'.join(parts)}:{fr.lineno} ({name})"
        return tf or "other"

    def count(self, origin: str | None = None) -> int:
        """Ops counted, all of them or those whose site starts with `origin` ('meft/offload', ...)."""
        return sum(v for k, v in self.sites.items() if origin is None or k.startswith(origin))
