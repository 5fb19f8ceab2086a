"""Chunks: one parameter's update walked in row chunks, so that no fp32 temporary of the whole tensor exists.

A fused optimizer (`meft.lomo.fused`) updates each parameter inside backward, where memory is tightest: a
bf16 model's 49152 x 576 tied embedding would need 108 MiB per fp32 temporary. `Chunks` reads the clipped
gradient as fp32 in chunks of at most `chunk_bytes` and writes bf16 results back (optionally with
stochastic rounding, `meft.lomo.rounding`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from meft.lomo.rounding import bf16_noise, stochastic_round_bf16

__all__ = ["Chunks", "math_dtype"]


def math_dtype(t: Tensor) -> torch.dtype:
    """The dtype updates are computed in: fp32, or fp64 for fp64 tensors."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32



class Chunks:
    """One parameter's update walked in row chunks, so that no fp32 temporary of the whole tensor exists.

    Rows are slices of dim -2 (dim 0 of a vector; a 0-d tensor is one chunk); a chunk holds as many rows
    as fit in `chunk_bytes` of the math dtype (fp32, or fp64 for fp64 parameters), at least one. Iterating
    yields each chunk's rows as (start, length) for `view` / `Tensor.narrow`. Elementwise math on chunks
    is bitwise the whole-tensor math, chunk by chunk; reductions across rows are the caller's to combine.

      norm(t)           L2 norm of a parameter-shaped tensor in the math dtype, without a whole cast copy
      grad(rows)        the gradient rows in the math dtype, clipped (`clip`: "value" clamps to
                        +-max_norm, "tensor" scales the gradient to norm <= max_norm, "global" scales by
                        `coef`); read-only (for an fp32 gradient without clipping they are the gradient
                        itself), so they can be read several times
      param(rows)       the parameter rows in the math dtype: a copy for bf16, else the rows themselves
      store(rows, p32)  writes `param(rows)`'s result back into a bf16 parameter, rounded to nearest, or
                        stochastically with 16-bit noise drawn chunk by chunk from `rounding`, in row
                        order (on CPU the same draws as one whole-tensor draw); a no-op for fp32 / fp64
    """

    def __init__(self, p: Tensor, grad: Tensor, chunk_bytes: int, *, clip: str = "none", max_norm: float = 1.0,
                 coef: Tensor | None = None, rounding: torch.Generator | None = None):
        self.p, self.dtype = p, math_dtype(p)
        self.dim = -2 if p.dim() >= 2 else 0
        n_rows = p.shape[self.dim] if p.dim() else 1
        row_bytes = (p.numel() // n_rows if n_rows else 0) * self.dtype.itemsize
        per_chunk = max(1, chunk_bytes // max(row_bytes, 1))
        self._spans = [(r, min(per_chunk, n_rows - r)) for r in range(0, n_rows, per_chunk)]
        self._grad, self._rounding = grad, rounding
        self._clamp = max_norm if clip == "value" else None
        if clip == "tensor":  # clip_grad_norm_ on this one tensor
            coef = torch.clamp(max_norm / (self.norm(grad) + 1e-6), max=1.0)
        self._coef = coef

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)

    def view(self, t: Tensor, rows: tuple[int, int]) -> Tensor:
        """The rows of `t`, a tensor shaped like the parameter (a view)."""
        return t.narrow(self.dim, *rows) if t.dim() else t

    def norm(self, t: Tensor) -> Tensor:
        if t.dtype == self.dtype or len(self._spans) <= 1:  # reads in place, or a copy of one chunk at most
            return torch.linalg.vector_norm(t, dtype=self.dtype)
        # vector_norm(t, dtype=fp32) casts a whole copy first on CPU: norm of the chunks' norms instead
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(self.view(t, rows), dtype=self.dtype)
                                                     for rows in self]))

    def grad(self, rows: tuple[int, int]) -> Tensor:
        g = self.view(self._grad, rows).to(self.dtype)
        if self._clamp is not None:  # out of place: an fp32 gradient is read again by later passes
            return g.clamp(-self._clamp, self._clamp)
        if self._coef is not None:
            return g.mul(self._coef)
        return g

    def param(self, rows: tuple[int, int]) -> Tensor:
        return self.view(self.p, rows).to(self.dtype)

    def store(self, rows: tuple[int, int], p32: Tensor) -> None:
        if self.p.dtype == self.dtype:  # param() handed out the parameter itself, updated in place
            return
        dst = self.view(self.p, rows)
        if self._rounding is not None:
            dst.copy_(stochastic_round_bf16(p32, bf16_noise(p32.shape, self._rounding, p32.device)))
        else:
            dst.copy_(p32)
