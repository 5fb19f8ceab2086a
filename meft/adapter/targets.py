"""Which module is the FFN of each decoder layer, per HF `model_type`; find them or fail clearly.

Owns the target map (peft-style, per model type) and the structural fallback. A target is either
one module whose input is the FFN input and whose output is the FFN output (`...layers.*.mlp`), or,
for models whose FFN is inlined in the decoder layer (OPT: `fc1 -> act -> fc2`), a pair: the module
whose *input* is the FFN input (`fc1`) and the one whose *output* is the FFN output (`fc2`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

__all__ = ["FFNTarget", "TARGETS", "find_targets", "hidden_size_of", "check_layer_choice"]

# model_type -> (path of the decoder-layer list, FFN attribute in a layer[, output attribute])
TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("model.layers", "mlp"),
    "mistral": ("model.layers", "mlp"),
    "qwen2": ("model.layers", "mlp"),
    "qwen3": ("model.layers", "mlp"),
    "gemma": ("model.layers", "mlp"),
    "gemma2": ("model.layers", "mlp"),
    "gemma3_text": ("model.layers", "mlp"),
    "phi3": ("model.layers", "mlp"),
    "starcoder2": ("model.layers", "mlp"),
    "olmo": ("model.layers", "mlp"),
    "olmo2": ("model.layers", "mlp"),
    "granite": ("model.layers", "mlp"),
    "gpt2": ("transformer.h", "mlp"),
    "falcon": ("transformer.h", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "mlp"),
    "opt": ("model.decoder.layers", "fc1", "fc2"),
}
_FFN_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block", "feedforward")


@dataclass
class FFNTarget:
    """FFN of decoder layer `layer`: input seen by `parent.in_name`, output of `parent.out_name`."""

    layer: int
    parent: nn.Module    # the decoder layer
    in_name: str         # attribute whose input is the FFN input
    out_name: str        # attribute whose output is the FFN output (== in_name for a single module)
    path: str            # dotted path of the output module, for messages

    @property
    def split(self) -> bool:
        return self.in_name != self.out_name


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _n_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    return None


def check_layer_choice(layers, model: nn.Module) -> None:
    """`layers` (MeftConfig.layers) against the model's decoder layers: an int is a stride (every k-th layer
    from layer 0), so one as large as the layer count would adapt layer 0 only; an index list must be in
    range. Raises a ValueError naming the field, the value and the valid range."""
    n = _n_layers(model)
    if n is None or layers == "all":
        return
    if isinstance(layers, int) and not isinstance(layers, bool):
        if layers >= n > 1:
            raise ValueError(f"layers = {layers}: an int is a stride (an adapter on every {layers}th decoder "
                             f"layer from layer 0), and this model has {n} layers, so only layer 0 would get one; "
                             f"fix: a stride in 1..{n - 1}, a list of layer indices in 0..{n - 1} (e.g. [{n - 1}]), "
                             "or 'all'")
        return
    if isinstance(layers, (list, tuple)):
        bad = [i for i in layers if isinstance(i, int) and not 0 <= i < n]
        if bad:
            raise ValueError(f"layers = {list(layers)}: index {bad[0]} is out of range; this model has {n} decoder "
                             f"layers (0..{n - 1}); fix: indices in 0..{n - 1}")


def hidden_size_of(model: nn.Module) -> int:
    """Model width d (the FFN input size) from the HF config."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    raise ValueError(f"cannot read the hidden size of {type(model).__name__} from its config "
                     "(no hidden_size / n_embd / d_model)")


def _layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


def _from_pattern(model: nn.Module, pattern: str) -> list[FFNTarget]:
    head, _, tail = pattern.partition(".*.")
    layers = _get(model, head)
    if not isinstance(layers, nn.ModuleList) or not tail:
        raise ValueError(f"target_module = {pattern!r}: {head!r} is not a ModuleList of layers in "
                         f"{type(model).__name__}; {_found(model)}")
    in_name, _, out_name = tail.partition(">")  # out (if given) is a sibling of in: same parent
    parent_path, _, in_attr = in_name.rpartition(".")
    out_attr = out_name or in_attr
    out = []
    for i, layer in enumerate(layers):
        parent = _get(layer, parent_path) if parent_path else layer
        if parent is None or _get(parent, in_attr) is None or _get(parent, out_attr) is None:
            raise ValueError(f"target_module = {pattern!r}: layer {i} has no {tail!r}; "
                             f"its children: {[n for n, _ in layer.named_children()]}")
        prefix = f"{head}.{i}." + (parent_path + "." if parent_path else "")
        out.append(FFNTarget(i, parent, in_attr, out_attr, prefix + out_attr))
    return out


def _found(model: nn.Module) -> str:
    lists = [f"{n} (len {len(m)}, layer children: {[c for c, _ in m[0].named_children()]})"
             for n, m in _layer_lists(model)[:4]]
    return ("found layer lists: " + "; ".join(lists) if lists else "found no nn.ModuleList of layers") + (
        ". Name the FFN with MeftConfig(target_module='<layers path>.*.<ffn attr>'), e.g. "
        "'model.layers.*.mlp' (or '<layers>.*.<in>><out>' for an inlined FFN, <out> a sibling of <in>, e.g. "
        "'model.decoder.layers.*.fc1>fc2').")


def _structural(model: nn.Module) -> list[FFNTarget] | None:
    n = _n_layers(model)
    for path, layers in sorted(_layer_lists(model), key=lambda t: -len(t[1])):
        if n is not None and len(layers) != n:
            continue
        children = dict(layers[0].named_children())
        name = next((c for c in _FFN_NAMES if c in children), None)
        if name is None:
            name = next((c for c, m in children.items() if "mlp" in type(m).__name__.lower()), None)
        if name is not None and all(hasattr(layer, name) for layer in layers):
            return _from_pattern(model, f"{path}.*.{name}")
    return None


def find_targets(model: nn.Module, target_module: str | None = None) -> list[FFNTarget]:
    """FFN target of every decoder layer: explicit pattern, else the model-type map, else a search."""
    if target_module is not None:
        return _from_pattern(model, target_module)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in TARGETS:
        layers_path, *names = TARGETS[model_type]
        return _from_pattern(model, f"{layers_path}.*.{'>'.join(names)}")
    found = _structural(model)
    if found:
        return found
    raise ValueError(f"don't know the FFN of model_type={model_type!r} ({type(model).__name__}); "
                     f"known types: {sorted(TARGETS)}; {_found(model)}")
