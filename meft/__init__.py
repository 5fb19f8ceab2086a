"""meft: sparse FFN adapters far larger than the GPU, held in CPU memory, for HF causal LMs.

Public names are resolved lazily (PEP 562) so `import meft` stays cheap and never initializes CUDA.
"""

from importlib import import_module

__all__ = ["wrap", "unwrap", "MeftConfig", "Lomo", "AdaLomo", "save_adapter", "load_adapter", "MeftCallback"]

_WHERE = {
    "wrap": "meft.model",
    "unwrap": "meft.model",
    "MeftConfig": "meft.config",
    "Lomo": "meft.lomo",
    "AdaLomo": "meft.lomo",
    "save_adapter": "meft.checkpoint",
    "load_adapter": "meft.checkpoint",
    "MeftCallback": "meft.hf_trainer",  # transformers.Trainer integration
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'meft' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
