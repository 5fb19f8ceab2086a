"""Resumable training state: written atomically, read back so a resumed run continues exactly.

A checkpoint is a folder `output_dir/checkpoints/step-NNNNNN/` holding
  stores.safetensors   every adapter layer's RowStore: rows ([K | V], or values only with generated keys),
                       AdamW moments, per-row step counts
  state.pt             router gates, adapter-side optimizer (router AdamW + SparseAdamW hyper-parameters), backbone
                       optimizer and trained backbone weights (Lomo/AdaLomo), data position, RNG states,
                       step and the options the run was started with
  options.json         the options that define the run (`meft.train.resume`: --resume compares them)
  manifest.json        size + sha256 of each file above, written last (`meft.train.manifest`)
The folder is filled under a temp name and renamed into place (`meft.atomic.atomic_folder`); only
then does `checkpoints/latest` name it. A process killed at any moment leaves `latest` naming the
previous complete checkpoint. When the disk has less free space than the previous checkpoint took, the
checkpoints that this save would prune anyway (beyond `keep`) are removed before it writes, so
`--keep-checkpoints 1` fits a disk that holds one checkpoint.

With staleness=1 the pending (delayed) row updates are applied before saving, so a resumed run
matches an uninterrupted one only with staleness=0 (the default).

Loading never runs pickled code: state.pt holds only tensors and plain Python data (numpy's RNG state is
stored as a tensor) and is read with `torch.load(..., weights_only=True)`; a state.pt carrying any other
object (a shared checkpoint folder someone tampered with) is refused with an error naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from meft.atomic import atomic_folder, read_pointer, write_pointer
from meft.train.manifest import MANIFEST_NAME, write_manifest

__all__ = ["save_training_state", "load_training_state", "latest_checkpoint", "CheckpointError",
           "OPTIONS_NAME"]

OPTIONS_NAME = "options.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model (damaged, or written by another configuration)."""

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


def _slow_save_hook(parts: int = 3) -> None:
    if os.environ.get(_SLOW_SAVE_ENV):
        time.sleep(float(os.environ[_SLOW_SAVE_ENV]) / parts)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _done(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if p.is_dir())


def _make_room(root: Path, keep: int) -> list[Path]:
    """Before a save: when the free space is below the previous checkpoint's size, remove the checkpoints
    this save prunes anyway (all but the newest keep-1); returns the removed folders."""
    done = _done(root)
    if keep <= 0 or not done:
        return []
    need = int(_folder_bytes(done[-1]) * 1.05) + (1 << 20)
    if shutil.disk_usage(root).free >= need:
        return []
    removed = done[:len(done) - (keep - 1)]
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    print(f"meft: the disk has less free space than a checkpoint takes: removed {', '.join(p.name for p in removed)} "
          f"(beyond --keep-checkpoints {keep}) before writing the next one", flush=True)
    return removed


def save_training_state(output_dir: str | Path, step: int, model, *, data_state: dict, extra: dict,
                        keep: int = 2, options: dict | None = None) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; keep the newest `keep` (0 = all).
    `options`: the options that define the run (`meft.train.resume.defining_options`), for --resume."""
    rt = model.meft
    rt.scheduler.flush()  # delayed (staleness=1) updates land in the stores before we copy them
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    _make_room(root, keep)
    with atomic_folder(root / name) as tmp:
        save_file(_store_tensors(rt), str(tmp / "stores.safetensors"))
        _slow_save_hook()
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
        _slow_save_hook()
        (tmp / OPTIONS_NAME).write_text(json.dumps(options or {}, indent=1, default=str) + "\n")
        _slow_save_hook()
        write_manifest(tmp)  # last: a folder with a valid manifest is complete
    write_pointer(root, name)
    done = _done(root)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, else (it names a removed folder) the newest one with a manifest, or None.
    `--resume` verifies checksums as well (`meft.train.resume.resume_candidates`)."""
    root = Path(output_dir) / "checkpoints"
    named = read_pointer(root)
    if named is not None or not root.is_dir():
        return named
    done = [p for p in _done(root) if (p / MANIFEST_NAME).is_file()]
    return done[-1] if done else None


def _load_plain(path: Path) -> dict:
    """state.pt with tensors and plain data only (weights_only): no pickled code runs, whatever the file holds."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"checkpoint file {str(path)!r} holds objects other than tensors and plain data, which "
                         "meft never writes; refusing to load it (it could run code). Fix: resume from a checkpoint "
                         f"written by meft, or start without --resume. Detail: {str(exc).splitlines()[0]}") from None


def load_training_state(folder: str | Path, model) -> dict:
    """Restore stores, optimizers, backbone and RNG from `folder`; returns {step, data, extra}.
    A file that cannot be read or does not fit this model raises `CheckpointError` naming the folder."""
    folder = Path(folder)
    try:
        return _load_training_state(folder, model)
    except CheckpointError:
        raise
    except ValueError as exc:
        if "refusing to load" in str(exc):
            raise
        raise _unloadable(folder, exc) from None
    except (RuntimeError, KeyError, IndexError, TypeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise _unloadable(folder, exc) from None
    except Exception as exc:  # safetensors' own error type (a truncated file) is not an OSError
        if type(exc).__name__ != "SafetensorError":
            raise
        raise _unloadable(folder, exc) from None


def _unloadable(folder: Path, exc: BaseException) -> CheckpointError:
    first = (str(exc).splitlines() or [""])[0][:300]
    return CheckpointError(f"checkpoint {str(folder)!r} cannot be loaded into this model ({type(exc).__name__}: "
                           f"{first}); fix: resume from an older checkpoint (delete this folder), or with the "
                           "options the run was started with")


def _load_training_state(folder: Path, model) -> dict:
    rt = model.meft
    tensors = load_file(str(folder / "stores.safetensors"))
    for i, store in enumerate(rt.stores):
        prefix = f"{i}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        saved_width = sd["weights"].shape[1] if "weights" in sd else store.width
        if saved_width != store.width:  # [K | V] rows vs values only: MeftConfig.key_source differs
            src = "stored" if saved_width == 2 * store.width else "generated"
            raise ValueError(f"layer {i}: the checkpoint's rows are {saved_width} wide, this run's {store.width}: "
                             f"it was saved with key_source={src!r}; fix: resume with key_source={src!r}")
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
