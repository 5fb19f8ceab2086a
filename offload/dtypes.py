"""Wire dtypes: the dtypes rows and row gradients may take across the copy engines (defined once here).

Master weights and moments stay fp32 (bf16 moments optional) on the host; only the wire dtype is a
choice of the schedulers. `WIRE_DTYPES` is the one list of what the engines and both schedulers
support; configuration layers import it (and `WIRE_DTYPE_NAMES` to parse a name) instead of
repeating it.
"""

from __future__ import annotations

import torch

__all__ = ["WIRE_DTYPES", "WIRE_DTYPE_NAMES", "check_wire_dtype"]

WIRE_DTYPES = (torch.bfloat16, torch.float32)
WIRE_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in WIRE_DTYPES}  # "bfloat16" -> torch.bfloat16


def check_wire_dtype(wire_dtype) -> None:
    """Refuse a wire dtype the engines do not support."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype={wire_dtype!r} must be torch.bfloat16 or torch.float32")
