"""Dtype names every option accepts, and their parsing: one place for 'bfloat16' <-> torch.bfloat16.

The dtypes each field accepts: wire = what the copy engines move (`offload.dtypes`), state = what a
RowStore keeps its moments in; fp16 is left out of the wire on purpose (no loss scaling on row grads).
The backbone's weights (`meft train --dtype`, `meft plan --dtype`) are float32 or bfloat16.
"""

from __future__ import annotations

from typing import Any

import torch

from offload.dtypes import STATE_DTYPE_NAMES, WIRE_DTYPE_NAMES

__all__ = ["DTYPES", "WIRE_DTYPES", "STATE_DTYPES", "COMPUTE_DTYPES", "BACKBONE_DTYPES", "parse_dtype",
           "dtype_name", "parse_backbone_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WIRE_DTYPES = tuple(WIRE_DTYPE_NAMES)
STATE_DTYPES = tuple(STATE_DTYPE_NAMES)
COMPUTE_DTYPES = ("auto", "bfloat16", "float32", "float16")
BACKBONE_DTYPES = ("float32", "bfloat16")


def parse_dtype(value: Any) -> torch.dtype | None:
    """'bfloat16' | torch.bfloat16 | 'auto'/None -> dtype (None for auto); unknown -> ValueError."""
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"unknown dtype {value!r}; use one of {sorted(DTYPES)}")


def dtype_name(value: Any) -> str:
    """Canonical string form ('bfloat16', 'auto') of a dtype-like value."""
    dt = parse_dtype(value)
    return "auto" if dt is None else str(dt).removeprefix("torch.")


def parse_backbone_dtype(field_name: str, value: Any) -> torch.dtype:
    """A backbone weight dtype option (`meft train --dtype`, `meft plan --dtype`): float32 or bfloat16."""
    if value not in BACKBONE_DTYPES:
        raise ValueError(f"{field_name} = {value!r}: choose one of {', '.join(BACKBONE_DTYPES)}")
    return DTYPES[value]
