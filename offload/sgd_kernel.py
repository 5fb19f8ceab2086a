"""The fused row update of plain SGD (`SparseAdamW(rule="sgd")`), and its plain-PyTorch twin.

Sparse memory finetuning (arXiv 2510.15103) updates its memory values with SGD: a row's step is its gradient
times the learning rate, so a row that a batch barely uses (a tiny gradient) barely moves, where AdamW would
normalise that gradient into a full-size step. Same conventions as `offload.kernels.adamw_rows`: numba,
in place, fp32 math, the per-row update mask `keep`, the zero-copy mirror written in the same pass, each
touched row's step count incremented (it counts the updates a row received; SGD needs no bias correction).
"""

import numpy as np
from numba import njit, prange

from offload.bits import load_f32 as _ld
from offload.bits import store_f32 as _st
from offload.kernels import _run, row_update_extras

__all__ = ["sgd_rows", "reference_sgd_rows"]


def sgd_rows(w, steps, ids, grads, grad_scale, lr, weight_decay, mirror=None, keep=None) -> None:
    """Lazy SGD on rows ids[r] with gradient grads[r] * grad_scale (decoupled weight decay, as AdamW's).

    Plain PyTorch (per touched row i = ids[r], g = grads[r].float() * grad_scale):
        w[i] = w[i] * (1 - lr * weight_decay) - lr * g;  steps[i] += 1
    i.e. `torch.optim.SGD` (no momentum) per row with the decay applied like AdamW's; `reference_sgd_rows`
    is the twin. w: [N, W] f32; steps: [N] int64; ids: [R] int64 unique; grads: [>=R, W] f32 or uint16 (bf16);
    mirror / keep: as in `offload.kernels.adamw_rows`."""
    mirror, keep = row_update_extras(mirror, keep, ids)
    work = ids.shape[0] * w.shape[1] * (8 + grads.itemsize + mirror.itemsize)
    _run(_sgd_rows, work, w, steps, ids, grads, grad_scale, lr, weight_decay, mirror, keep)


@njit(parallel=True, cache=True, nogil=True)
def _sgd_rows(w, steps, ids, grads, grad_scale, lr, weight_decay, mirror, keep):
    width = w.shape[1]
    decay = np.float32(1.0 - lr * weight_decay)
    neg_lr = np.float32(-lr)
    scale = np.float32(grad_scale)
    masked = keep.shape[0] > 0
    for r in prange(ids.shape[0]):
        if masked and not keep[r]:
            continue  # a sparse update leaves this row exactly as it is
        i = ids[r]
        steps[i] = steps[i] + 1
        for j in range(width):
            w[i, j] = w[i, j] * decay + neg_lr * (_ld(grads, r, j) * scale)
        if mirror.shape[0] > 0:
            for j in range(width):
                _st(mirror, i, j, w[i, j])


def reference_sgd_rows(weights, steps, ids, grads, *, lr, weight_decay, keep=None) -> None:
    """Plain-PyTorch twin of `sgd_rows`, in place. weights [N, W] fp32; steps [N] int64; ids [R] int64 unique;
    grads [R, W] any float dtype (math in fp32); keep None or [R] bool. Boolean indexing: it may synchronise."""
    if keep is not None:
        ids, grads = ids[keep], grads[keep]
    steps[ids] += 1
    w = weights.index_select(0, ids) * (1.0 - lr * weight_decay)  # [R, W]
    w.add_(grads.float(), alpha=-lr)
    weights.index_copy_(0, ids, w)

