"""The dtypes of offloaded rows, defined once here: wire dtypes (rows and row gradients across the copy
engines) and state dtypes (a RowStore's AdamW moments).

Master weights stay fp32 on the host; the moments are fp32 or bf16 (`STATE_DTYPES`, with their sizes);
the wire dtype is a choice of the schedulers. `WIRE_DTYPES` is the one list of what the engines and both schedulers
support; configuration layers import it (and `WIRE_DTYPE_NAMES` to parse a name) instead of
repeating it.
"""

from __future__ import annotations

import torch

__all__ = ["WIRE_DTYPES", "WIRE_DTYPE_NAMES", "STATE_DTYPES", "STATE_DTYPE_NAMES", "check_wire_dtype"]

WIRE_DTYPES = (torch.bfloat16, torch.float32)
WIRE_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in WIRE_DTYPES}  # "bfloat16" -> torch.bfloat16
STATE_DTYPES = {torch.float32: 4, torch.bfloat16: 2}  # moment dtype -> bytes per element
STATE_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in STATE_DTYPES}  # "float32" -> torch.float32


def check_wire_dtype(wire_dtype) -> None:
    """Refuse a wire dtype the engines do not support."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype={wire_dtype!r} must be torch.bfloat16 or torch.float32")
