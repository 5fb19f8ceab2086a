"""`meft plan`: GPU peak of a wrapped training step measured on fake tensors (`fake_step`, `track`), host
RAM of the stores, the known model configs (`configs`), the search for a fitting config (`search`), and
the planner that ties them together (`planner`).
"""

from meft._faces import lazy_face

_WHERE = {
    "plan": "meft.plan.planner",
    "PlanOptions": "meft.plan.planner",
    "host_ram_bytes": "meft.plan.planner",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
