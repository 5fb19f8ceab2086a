"""What `meft.wrap` puts into a model: targets, router, the adapter math (fast path + dense twin), the
adapter layer module, wrap/unwrap, the runtime behind `model.meft`, the adapter-side optimizer, the
summary of what is trained where, adapter save/load, generated frozen keys (`keys`), the dense
device-resident baseline, and inspection of a saved adapter (`inspect`).

`wrap` / `unwrap` are public as `meft.wrap` / `meft.unwrap` (here `meft.adapter.wrap` is their module).
"""

from meft._faces import lazy_face

_WHERE = {
    "row_init": "meft.adapter.wrap",
    "key_table": "meft.adapter.keys",
    "generate_keys": "meft.adapter.keys",
    "init_gate": "meft.adapter.router",
    "MeftRuntime": "meft.adapter.runtime",
    "save_adapter": "meft.adapter.saving",
    "load_adapter": "meft.adapter.saving",
    "route": "meft.adapter.router",
    "Routing": "meft.adapter.router",
    "find_targets": "meft.adapter.targets",
    "hidden_size_of": "meft.adapter.targets",
    "DenseParallelAdapter": "meft.adapter.dense",
    "attach_dense": "meft.adapter.dense",
    "freeze": "meft.adapter.dense",
    "adapter_stats": "meft.adapter.inspect",
    "route_examples": "meft.adapter.inspect",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
