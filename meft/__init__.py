"""meft: sparse FFN adapters far larger than the GPU, held in CPU memory, for HF causal LMs.

Public names are resolved lazily (PEP 562) so `import meft` stays cheap and never initializes CUDA.
"""

from importlib import import_module

__all__ = ["wrap", "unwrap", "MeftConfig", "Lomo", "AdaLomo", "save_adapter", "load_adapter", "MeftCallback"]

_WHERE = {
    "wrap": "meft.adapter.wrap",
    "unwrap": "meft.adapter.wrap",
    "MeftConfig": "meft.config",
    "Lomo": "meft.lomo.optimizers",
    "AdaLomo": "meft.lomo.optimizers",
    "save_adapter": "meft.adapter.saving",
    "load_adapter": "meft.adapter.saving",
    "MeftCallback": "meft.train.hf_callback",  # transformers.Trainer integration
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'meft' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
