"""The dense baseline: a parallel FFN adapter of N rows, all resident and trained on the device.

MEFT's baseline and the "dense adapter" of the knowledge experiments: y = FFN(x) + relu(x @ K.T) @ V with
K, V [N, d] ordinary parameters (no router, no offload). `meft plan --method dense` sizes it; the
experiments train it with torch AdamW.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from meft.adapter.targets import find_targets, hidden_size_of
from meft.config import MeftConfig

__all__ = ["DenseParallelAdapter", "attach_dense", "freeze"]


def freeze(model: nn.Module) -> None:
    """requires_grad = False on every parameter of `model`."""
    for p in model.parameters():
        p.requires_grad_(False)


class DenseParallelAdapter(nn.Module):
    """base(x) + relu(x @ K.T) @ V with all N rows resident and trained on the device ([T, N] hidden)."""
    def __init__(self, base: nn.Module, n_rows: int, d: int, dtype: torch.dtype):
        super().__init__()
        self.base = base
        self.keys = nn.Parameter(torch.zeros(n_rows, d, dtype=dtype))    # [N, d]
        self.values = nn.Parameter(torch.zeros(n_rows, d, dtype=dtype))  # [N, d]

    def forward(self, x, *args, **kwargs):
        return self.base(x, *args, **kwargs) + torch.relu(x @ self.keys.t()) @ self.values


def attach_dense(model: nn.Module, config: MeftConfig, dtype: torch.dtype) -> list[nn.Parameter]:
    """Frozen backbone + a dense parallel adapter of config.adapter_rows rows per selected layer."""
    targets = find_targets(model, config.target_module)
    chosen = [targets[i] for i in config.layer_indices(len(targets))]
    d = hidden_size_of(model)
    freeze(model)
    params = []
    for t in chosen:
        if t.split:
            raise ValueError(f"method='dense' needs a single-module FFN; {t.path} is split (in/out modules)")
        ad = DenseParallelAdapter(getattr(t.parent, t.out_name), config.adapter_rows, d, dtype)
        setattr(t.parent, t.out_name, ad)
        params += [ad.keys, ad.values]
    return params
