"""A cell's mid-training checkpoint: what a stopped (method, dataset, seed) run needs to continue to the
result an uninterrupted run gets.

Owns `CellCheckpoint` (where one cell's checkpoint lives, how often it saves, the `stop_after` test hook)
and saving / restoring a trainer's state with the cell's progress:

* MEFT methods (a `MeftRuntime`): `meft.train.save_training_state`, the checkpoint `meft train --resume`
  reads (row stores with their AdamW moments and step counts, router gates, the adapter and backbone
  optimizers, trained backbone weights, RNG), in `<cell dir>/checkpoints/step-NNNNNN/`, written under a temp
  name and renamed into place, `latest` naming the newest complete one; the cell's progress rides in its
  `extra`.
* every other method: `<cell dir>/state.pt` with the trained parameters by name (LoRA's adapter weights,
  the dense adapter, or the whole model under full AdaLomo), the optimizer's state_dict, the RNG states,
  the data position and the progress; written to a temp file in the same folder, fsynced, then
  `os.replace`d onto the name, so a kill at any moment leaves the previous complete file.

Progress is the run so far: steps done, per-step losses and times, labelled and input tokens, training
seconds. Both formats are read with `torch.load(weights_only=True)` (tensors and plain data only) and
carry the cell's spec; a checkpoint of another spec is refused. Resuming restores everything a step
reads, so the resumed cell's losses and scores equal an uninterrupted run's (tests/test_knowledge_cells.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meft.train import latest_checkpoint, load_training_state, save_training_state

__all__ = ["CellCheckpoint", "CellStopped", "save_cell", "load_cell"]

STATE_NAME = "state.pt"


class CellStopped(Exception):
    """Raised by the `stop_after` test hook once the cell saved its checkpoint at that step."""


@dataclass
class CellCheckpoint:
    """Where one cell keeps its checkpoint and when it writes it.

    `folder`: this cell's own folder; `save_every`: steps between checkpoints (0: none, and a stopped cell
    starts over); `resume`: continue from the checkpoint in `folder` if there is one (else it is removed
    first); `stop_after`: test hook, save at that step and raise `CellStopped` (0: off)."""
    folder: str
    save_every: int = 0
    resume: bool = False
    stop_after: int = 0

    def __post_init__(self):
        if self.save_every < 0 or self.stop_after < 0:
            raise ValueError(f"save_every={self.save_every}, stop_after={self.stop_after}: give 0 (off) or a "
                             "positive number of steps")

    def due(self, step: int, total: int) -> bool:
        """Save after `step` (1-based) of `total`: every `save_every` steps, at the stop hook's step, and after
        the last step when saving at all (a cell stopped while it is scored resumes at scoring)."""
        if self.stop_after and step == self.stop_after:
            return True
        return bool(self.save_every) and (step % self.save_every == 0 or step == total)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trained(tr) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in tr.model.named_parameters() if p.requires_grad}


def _optimizer(tr):
    return tr.adam if tr.adam is not None else tr.fused


def _atomic_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_cell(ck: CellCheckpoint, tr, batches, spec: dict, progress: dict) -> Path:
    """Write the cell's checkpoint after `progress["step"]` steps; returns what was written."""
    folder = Path(ck.folder)
    folder.mkdir(parents=True, exist_ok=True)
    extra = {"spec": json.dumps(spec, sort_keys=True), "progress": progress}
    if tr.rt is not None:
        return save_training_state(folder, progress["step"], tr.model, data_state=batches.state_dict(),
                                   extra=extra, keep=1)
    path = folder / STATE_NAME
    _atomic_save({**extra, "params": _trained(tr), "optimizer": _optimizer(tr).state_dict(),
                  "data": batches.state_dict(), "rng": _rng_state()}, path)
    return path


def _check_spec(saved: str, spec: dict, where: Path) -> None:
    if saved != json.dumps(spec, sort_keys=True):
        raise ValueError(f"cell checkpoint {str(where)!r} was written by another run ({saved}); fix: remove "
                         "that folder, or resume without changing the run's options")


def load_cell(ck: CellCheckpoint, tr, batches, spec: dict) -> dict | None:
    """Restore the trainer, data position and RNG from the cell's checkpoint; returns its progress, or None
    when there is nothing to resume (then any old checkpoint folder is removed: the cell starts over)."""
    folder = Path(ck.folder)
    if not ck.resume:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    if tr.rt is not None:
        found = latest_checkpoint(folder)
        if found is None:
            return None
        state = load_training_state(found, tr.model)  # stores, optimizers, gates, backbone, RNG
        _check_spec(state["extra"]["spec"], spec, found)
        batches.load_state_dict(state["data"])
        return state["extra"]["progress"]
    path = folder / STATE_NAME
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    _check_spec(state["spec"], spec, path)
    params = dict(tr.model.named_parameters())
    with torch.no_grad():
        for name, t in state["params"].items():
            params[name].copy_(t)
    _optimizer(tr).load_state_dict(state["optimizer"])
    batches.load_state_dict(state["data"])
    _set_rng_state(state["rng"])
    return state["progress"]
