"""save_adapter / load_adapter: a wrapped model's adapter as a PEFT-like folder.

Owns the adapter folder format (full training-state checkpoints are a separate module's job):

    <dir>/adapter_config.json          {"format": "meft-adapter", "version": 1, "config": MeftConfig dict,
                                         "layers": [decoder layer per adapter], "hidden_size", "row_width",
                                         "model_type", "targets": [module paths], "sizes": {...},
                                         "training": {...} what the trainer chose to record, e.g.
                                         {"system_prompt": ""} (`meft generate` / `meft eval` reuse it),
                                         "base_model": the base model's identity (`meft.adapter.base_identity`)}
    <dir>/adapter_model.safetensors    "layers.<l>.values" [N, d] fp32 with generated keys (adapter_config's
                                         "keys": {"source": "generated", "generator", "seed"}: the keys are
                                         made again from the seed, `meft.adapter.keys`), or
                                       "layers.<l>.rows" [N, 2d] fp32 (keys | values of layer l; "keys":
                                         {"source": "stored"}, and every folder saved before generated keys)
                                       "layers.<l>.router" [E, d] fp32 router gate of layer l
                                       "layers.<l>.expert_bias" [E] fp32 routing balance bias (balance="bias")

A [K | V] folder loads into the stored-keys path whatever `key_source` says (its keys are in the file);
a values-only folder loads into either path (a stored-keys run gets the generated keys in its rows).
Optimizer moments are not part of an adapter (as in PEFT). Loading into a fresh copy of the base model
reproduces the wrapped model's logits exactly (fp32 rows and gates are stored bit for bit). Loading onto
another base model (a different identity) is refused unless `force=True`.

The folder is written atomically (a temp folder renamed into place): a kill or a full disk leaves the
previous adapter, never a half-written one; a full disk is a `DiskFullError` naming the folder. A missing,
malformed or truncated file is a ValueError naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from meft.adapter.base_identity import base_identity, identity_mismatch
from meft.adapter.keys import GENERATOR, key_table
from meft.adapter.wrap import (
    unwrap,
    wrap,  # late: meft.adapter.wrap imports this package's siblings
)
from meft.atomic import atomic_folder
from meft.config import MeftConfig

__all__ = ["save_adapter", "load_adapter", "adapter_training_info", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_SHAPE_FIELDS = ("adapter_rows", "expert_size", "layers", "target_module")
log = logging.getLogger(__name__)


def _runtime(model):
    rt = getattr(model, "meft", None)
    if rt is None:
        raise ValueError("model is not wrapped (no model.meft): call meft.wrap(model, config) first")
    return rt


def save_adapter(model, path: str, *, verbose: bool = True, training: dict | None = None) -> dict:
    """Write the adapter folder (see module docstring). Returns {"path", "params", "bytes", "layers"}.
    `training`: JSON-able facts about how it was trained, kept as ``"training"`` in adapter_config.json."""
    rt = _runtime(model)
    rt.sync_to_host()  # staleness 1 pending updates applied; resident rows copied back to the stores
    tensors = {}
    generated = rt.config.generated_keys
    for ad, store in zip(rt.adapters, rt.stores):
        # [N, d] values (keys generated from the seed) or [N, 2d] [K | V] rows; fp32, contiguous host tensor
        tensors[f"layers.{ad.layer}.{'values' if generated else 'rows'}"] = store.weights
        tensors[f"layers.{ad.layer}.router"] = ad.gate.detach().float().cpu().contiguous()  # [E, d]
        if rt.config.balance == "bias":  # the bias chooses experts: routing without it would differ
            tensors[f"layers.{ad.layer}.expert_bias"] = ad.expert_bias.detach().float().cpu().contiguous()  # [E]
    params = sum(t.numel() for t in tensors.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    meta = {
        "format": "meft-adapter", "version": 1, "config": rt.config.to_dict(),
        "layers": [ad.layer for ad in rt.adapters], "hidden_size": rt.adapters[0].d,
        "row_width": rt.stores[0].width,
        "keys": ({"source": "generated", "generator": GENERATOR, "seed": rt.config.seed} if generated
                 else {"source": "stored"}),
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "sizes": {"params": params, "bytes": nbytes},
        "base_model": base_identity(model),
    }
    if training:
        meta["training"] = training
    with atomic_folder(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
    weights_path = os.path.join(path, WEIGHTS_NAME)
    msg = (f"saved meft adapter: {len(rt.adapters)} layers x {rt.config.adapter_rows} rows x "
           f"{rt.stores[0].width} + router gates = {params:,} params, "
           f"{os.path.getsize(weights_path) / 2**20:.1f} MiB -> {path}")
    log.info(msg)
    if verbose:
        print(msg)
    return {"path": path, "params": params, "bytes": nbytes, "layers": meta["layers"]}


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path!r} is not a meft adapter folder: {CONFIG_NAME} is missing "
                         f"(write one with meft.save_adapter(model, dir))")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path}: not valid JSON ({exc}); the adapter folder is damaged: fix: save the "
                         "adapter again (a run folder's adapter/ is rewritten by meft train --resume)") from None
    if not isinstance(meta, dict) or meta.get("format") != "meft-adapter":
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{cfg_path}: format is {got!r}, expected 'meft-adapter'")
    missing = [k for k in ("config", "layers", "row_width", "sizes") if k not in meta]
    if missing:
        raise ValueError(f"{cfg_path}: missing {missing}; the adapter folder is damaged or not meft's: fix: "
                         "save the adapter again with meft.save_adapter")
    return meta


def adapter_training_info(path: str) -> dict:
    """The ``"training"`` entry of an adapter folder (empty for adapters saved without one)."""
    return dict(_read_config(path).get("training") or {})


def _folder_keys(meta: dict, path: str) -> bool:
    """True: the folder holds values and generated keys' seed; False: [K | V] rows (every folder before
    generated keys)."""
    keys = meta.get("keys") or {"source": "stored"}
    if keys.get("source") == "stored":
        return False
    if keys.get("source") != "generated" or keys.get("generator") != GENERATOR:
        raise ValueError(f"{path!r}: keys {keys} are not ones this meft can make (it generates {GENERATOR!r}); "
                         "fix: load it with the meft version that saved it")
    return True


def _saved_rows(f, ad, store, cfg: MeftConfig, folder_generated: bool) -> torch.Tensor:
    """Layer `ad`'s rows for `store`: as saved, or a values-only folder made [K | V] for a stored-keys run."""
    if not folder_generated:
        return f.get_tensor(f"layers.{ad.layer}.rows")  # [N, 2d]
    values = f.get_tensor(f"layers.{ad.layer}.values")  # [N, d]
    if store.width == values.shape[1]:
        return values
    keys = key_table(values.shape[0], seed=cfg.seed, layer=ad.layer, d=values.shape[1])  # [N, d]
    return torch.cat([keys, values], dim=1)  # [N, 2d]


def _merge_config(saved: MeftConfig, config: MeftConfig | None, *, seed_fixed: bool = False) -> MeftConfig:
    if config is None:
        return saved
    fields = _SHAPE_FIELDS + (("seed",) if seed_fixed else ())  # generated keys come from the saved seed
    diff = [f"{n}: saved {getattr(saved, n)!r}, given {getattr(config, n)!r}"
            for n in fields if getattr(saved, n) != getattr(config, n)]
    if diff:
        raise ValueError("config does not match the saved adapter's shape (" + "; ".join(diff) +
                         "); leave these fields as saved, or pass config=None")
    return config


def load_adapter(model, path: str, config: MeftConfig | None = None, *, verbose: bool = True,
                 force: bool = False):
    """Wrap a fresh base `model` with the adapter saved in `path`; returns the wrapped model.

    `config` may change runtime fields (offload, wire_dtype, lrs, ...) but not the adapter's shape.
    `force`: load even when `model` is not the base model the adapter was trained on.
    """

    meta = _read_config(path)
    identity = base_identity(model)
    folder_generated = _folder_keys(meta, path)
    cfg = _merge_config(MeftConfig.from_dict(meta["config"]), config, seed_fixed=folder_generated)
    if not folder_generated and cfg.generated_keys:  # the folder's keys are stored rows: keep them exactly
        cfg = dataclasses.replace(cfg, key_source="stored")
    wrap(model, cfg)
    rt = model.meft
    got = [ad.layer for ad in rt.adapters]
    d = rt.adapters[0].d
    saved_width = d if folder_generated else 2 * d
    if got != meta["layers"] or meta["row_width"] != saved_width:
        unwrap(model)
        raise ValueError(f"adapter in {path!r} has layers {meta['layers']} and row width {meta['row_width']}; "
                         f"this model gives layers {got} and row width {saved_width}: "
                         f"load it into the base model it was trained on")
    differs = identity_mismatch(meta.get("base_model"), identity)
    if differs and not force:
        unwrap(model)
        raise ValueError(f"adapter {path!r} was trained on another base model ({differs}); its rows would "
                         "add to the wrong features. Fix: load it onto the base model it was trained on, or pass "
                         "force=True (meft eval / generate: --force-base) to load it anyway")
    weights = Path(path) / WEIGHTS_NAME
    try:
        with safe_open(str(weights), framework="pt") as f, torch.no_grad():
            for ad, store in zip(rt.adapters, rt.stores):
                store.set_weights(_saved_rows(f, ad, store, cfg, folder_generated))  # the zero-copy mirror too
                ad.gate.copy_(f.get_tensor(f"layers.{ad.layer}.router"))
                if f"layers.{ad.layer}.expert_bias" in f.keys():
                    ad.expert_bias.copy_(f.get_tensor(f"layers.{ad.layer}.expert_bias"))
    except Exception as exc:  # noqa: BLE001 - safetensors' error type, a missing key, a shape mismatch
        unwrap(model)
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ValueError(f"{weights}: cannot be read ({type(exc).__name__}: {first}); the file is missing, "
                         "truncated or damaged: fix: save the adapter again") from None
    rt.stores_changed()  # device copies of the stores (resident twin, inference rows) follow
    msg = (f"loaded meft adapter from {path}: {len(got)} layers, {meta['sizes']['params']:,} params, "
           f"{meta['sizes']['bytes'] / 2**20:.1f} MiB")
    log.info(msg)
    if verbose:
        print(msg)
    return model
