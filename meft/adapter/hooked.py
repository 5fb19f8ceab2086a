"""Where a runtime's micro-batch hooks attach, and how they find a forward's attention mask.

The runtime watches one module's forward to know when a training micro-batch begins and which positions
are real tokens: the model's decoder stack when it holds every adapter (`meft.lomo.lm_loss` calls the
decoder directly, past the top model's forward), else the model itself. The mask is read by keyword, or
by its position among the forward's parameters.
"""

from __future__ import annotations

import inspect

from torch import nn

__all__ = ["forward_params", "hooked_module", "mask_position"]


def mask_position(model) -> int | None:
    """Index of `attention_mask` among the positional parameters of model.forward (None: not one)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a forward without an introspectable signature: keyword only
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names.index("attention_mask") if "attention_mask" in names else None


def hooked_module(model, adapters):
    """The module whose forward the micro-batch hooks watch: the model's decoder stack when it has one
    holding every adapter (`meft.lomo.lm_loss` calls the decoder directly, past the top model's forward),
    else the model itself."""
    try:
        decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        decoder = None
    if not isinstance(decoder, nn.Module) or decoder is model:
        return model
    inside = {id(m) for m in decoder.modules()}
    return decoder if all(id(a) in inside for a in adapters) else model


def forward_params(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()
