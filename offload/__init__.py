"""offload: CPU-resident rows, sparse optimizer updates and metered asynchronous transfers.

This package knows nothing of models: it depends on torch, numpy and numba only, and never imports
`meft` or `transformers` (a test checks it). Public names are resolved lazily (PEP 562) so that
`import offload` stays cheap and does not compile numba kernels or touch CUDA.
"""

from importlib import import_module

__all__ = ["RowStore", "SparseAdamW", "RowScheduler", "TransferScheduler", "ResidentScheduler", "TrafficMeter",
           "WIRE_DTYPES", "node_of", "host_copies", "node_host_bytes"]

_WHERE = {
    "RowStore": "offload.store",
    "SparseAdamW": "offload.optim",
    "RowScheduler": "offload.protocol",
    "TransferScheduler": "offload.scheduler",
    "ResidentScheduler": "offload.resident",
    "TrafficMeter": "offload.meter",
    "WIRE_DTYPES": "offload.dtypes",
    "node_of": "offload.node",
    "host_copies": "offload.copies",
    "node_host_bytes": "offload.copies",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'offload' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
