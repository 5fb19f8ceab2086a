"""Lomo / AdaLomo: backbone optimizers fused into backward (update in place, no `.grad` kept), usable on
any model; `meft.Lomo` and `meft.AdaLomo` are the public faces.
"""

from meft._faces import lazy_face

_WHERE = {
    "Lomo": "meft.lomo.optimizers",
    "AdaLomo": "meft.lomo.optimizers",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
