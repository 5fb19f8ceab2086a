"""Checks of `meft train`'s own options (TrainArgs) that run before anything loads.

Owns the ranges of the numeric options and the `--device` check, so that a negative `--steps`, a zero
`--epochs` or `--device cuda` on a machine without CUDA is one line naming the option, its value and the
fix, instead of a run that trains nothing, one step, or a traceback from deep inside torch.
"""

from __future__ import annotations

import re

import torch

__all__ = ["check_train_args"]

# option -> (lowest allowed value, what it means)
_AT_LEAST = {
    "steps": (0, "0 = derive from --epochs"),
    "batch_size": (1, "examples per micro-batch"),
    "max_length": (1, "tokens"),
    "block_size": (1, "tokens"),
    "warmup_steps": (0, "steps"),
    "eval_limit": (0, "0 = all"),
    "eval_batch_size": (1, "prompts"),
    "max_new_tokens": (1, "tokens"),
    "save_every": (0, "0 = no periodic checkpoints"),
    "keep_checkpoints": (0, "0 = keep all"),
    "replay": (0, "0 = off"),
}


def _check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"--device {device!r}: choose 'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"--device {device!r}: {why}; fix: --device cpu (or auto), or install a CUDA build of "
                         "torch on a machine with an NVIDIA GPU")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible "
                         f"(0..{torch.cuda.device_count() - 1}); fix: a smaller index or --device cuda")


def check_train_args(args) -> None:
    """Raise one ValueError for the first out-of-range option (field, value, valid range)."""
    for name, (low, meaning) in _AT_LEAST.items():
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"--{name.replace('_', '-')} {value!r}: expected an integer >= {low} ({meaning})")
    epochs = args.epochs
    if args.steps == 0 and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0):
        raise ValueError(f"--epochs {epochs!r} with --steps 0: expected a number of passes > 0 (e.g. 2 or 0.5), "
                         "or give --steps N")
    _check_device(str(args.device))
