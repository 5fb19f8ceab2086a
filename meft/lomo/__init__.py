"""Lomo / AdaLomo: backbone optimizers fused into backward (update in place, no `.grad` kept), usable on
any model; `meft.Lomo` and `meft.AdaLomo` are the public faces. `lm_loss` / `head_loss`: a causal LM's
loss with the LM head in vocabulary chunks, through which Lomo updates the (tied) head without a [V, d]
gradient.
"""

from meft._faces import lazy_face

_WHERE = {
    "Lomo": "meft.lomo.optimizers",
    "AdaLomo": "meft.lomo.optimizers",
    "lm_loss": "meft.lomo.head",
    "lm_loss_supported": "meft.lomo.head",
    "head_loss": "meft.lomo.head",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
