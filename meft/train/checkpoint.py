"""Resumable training state: written atomically, read back so a resumed run continues exactly.

A checkpoint is a folder `output_dir/checkpoints/step-NNNNNN/` holding
  stores.safetensors   every adapter layer's RowStore: rows, AdamW moments, per-row step counts
  state.pt             router gates, adapter-side optimizer (router AdamW + SparseAdamW hyper-parameters), backbone
                       optimizer and trained backbone weights (Lomo/AdaLomo), data position, RNG states,
                       step and the options the run was started with
The folder is filled under a temp name and renamed into place (`meft.train.atomic.atomic_folder`); only
then does `checkpoints/latest` name it. A process killed at any moment leaves `latest` naming the
previous complete checkpoint.

With staleness=1 the pending (delayed) row updates are applied before saving, so a resumed run
matches an uninterrupted one only with staleness=0 (the default).

Loading never runs pickled code: state.pt holds only tensors and plain Python data (numpy's RNG state is
stored as a tensor) and is read with `torch.load(..., weights_only=True)`; a state.pt carrying any other
object (a shared checkpoint folder someone tampered with) is refused with an error naming the file.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from meft.train.atomic import atomic_folder, read_pointer, write_pointer

__all__ = ["save_training_state", "load_training_state", "latest_checkpoint"]

_SLOW_SAVE_ENV = "MEFT_TEST_SLOW_SAVE_S"  # test hook: sleep inside the save, to kill it mid-write


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}  # plain data: loadable weights_only
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _store_tensors(rt) -> dict[str, torch.Tensor]:
    out = {}
    for i, store in enumerate(rt.stores):
        for name, t in store.state_dict().items():
            if isinstance(t, torch.Tensor):
                out[f"{i}.{name}"] = t.contiguous()
    return out


def _optimizer_without_stores(rt) -> dict:
    """The adapter optimizer's state_dict minus the RowStores it references (saved in safetensors)."""
    sd = rt.optimizer.state_dict()
    sd["adapter_rows"] = [{k: v for k, v in layer.items() if k != "store"} for layer in sd["adapter_rows"]]
    return sd


def _trained_backbone(model, rt) -> dict[str, torch.Tensor]:
    if rt.backbone_optimizer is None:
        return {}
    owned = {id(p) for g in rt.backbone_optimizer.param_groups for p in g["params"]}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in owned}


def save_training_state(output_dir: str | Path, step: int, model, *, data_state: dict, extra: dict,
                        keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; keep the newest `keep`."""
    rt = model.meft
    rt.scheduler.flush()  # delayed (staleness=1) updates land in the stores before we copy them
    root = Path(output_dir) / "checkpoints"
    name = f"step-{step:06d}"
    with atomic_folder(root / name) as tmp:
        save_file(_store_tensors(rt), str(tmp / "stores.safetensors"))
        if os.environ.get(_SLOW_SAVE_ENV):
            time.sleep(float(os.environ[_SLOW_SAVE_ENV]))
        torch.save({
            "step": step,
            "optimizer": _optimizer_without_stores(rt),
            "backbone_optimizer": rt.backbone_optimizer.state_dict() if rt.backbone_optimizer else None,
            "backbone": _trained_backbone(model, rt),
            "gates": [ad.gate.detach().clone() for ad in rt.adapters],
            "expert_bias": [ad.expert_bias.detach().clone() for ad in rt.adapters],  # balance="bias" routing
            "data": data_state,
            "rng": _rng_state(),
            "extra": extra,
        }, tmp / "state.pt")
    write_pointer(root, name)
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    return read_pointer(Path(output_dir) / "checkpoints")


def _load_plain(path: Path) -> dict:
    """state.pt with tensors and plain data only (weights_only): no pickled code runs, whatever the file holds."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"checkpoint file {str(path)!r} holds objects other than tensors and plain data, which "
                         "meft never writes; refusing to load it (it could run code). Fix: resume from a checkpoint "
                         f"written by meft, or start without --resume. Detail: {str(exc).splitlines()[0]}") from None


def load_training_state(folder: str | Path, model) -> dict:
    """Restore stores, optimizers, backbone and RNG from `folder`; returns {step, data, extra}."""
    rt = model.meft
    folder = Path(folder)
    tensors = load_file(str(folder / "stores.safetensors"))
    for i, store in enumerate(rt.stores):
        prefix = f"{i}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        store.load_state_dict({**store.state_dict(), **sd})
    state = _load_plain(folder / "state.pt")
    rt.optimizer.load_state_dict(state["optimizer"])
    if state["backbone_optimizer"] is not None:
        if rt.backbone_optimizer is None:
            raise ValueError(f"checkpoint {str(folder)!r} trained the backbone but this run freezes it; fix: "
                             "resume with the same --backbone")
        rt.backbone_optimizer.load_state_dict(state["backbone_optimizer"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state["backbone"].items():
            params[n].copy_(t)
        for ad, gate in zip(rt.adapters, state["gates"]):
            ad.gate.copy_(gate)
        for ad, bias in zip(rt.adapters, state.get("expert_bias", [])):
            ad.expert_bias.copy_(bias)
    _set_rng_state(state["rng"])
    return {"step": state["step"], "data": state["data"], "extra": state["extra"]}
