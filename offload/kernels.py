"""numba kernels for the CPU side of offload: row gather (+cast to bf16), row-gradient accumulation
and the fused lazy AdamW update over touched rows.

This module owns only the arithmetic; argument checking lives in `offload.store` / `offload.optim`.
All kernels take numpy arrays (zero-copy views of torch tensors). bf16 is handled as its 16-bit
pattern (`uint16`): a bf16 value is the high half of an fp32, and fp32 -> bf16 rounds to nearest
even with NaN mapped to 0x7FC0, bit-identical to `torch.Tensor.to(torch.bfloat16)`.

Every row kernel is `parallel=True` over rows and `cache=True` (the O(R) id bookkeeping is serial);
none allocates a temporary larger than a few scalars per row (fresh memory is slow to touch).
Each docstring gives the plain-PyTorch code that it equals; `offload.optim.reference_adamw_rows`
is the tested twin of `adamw_rows`. The bf16 bit handling shared by the kernels is `offload.bits`.
Idea of documenting the equivalent plain op: xformers `ops/indexing.py`.

Threading: kernels release the GIL (`nogil=True`) so a scheduler's worker thread can update rows while
Python runs elsewhere. With numba's OpenMP layer, libgomp's default wait policy makes every parallel
region cost ~10 ms on an oversubscribed 2-core machine (measured: 16 ms median for an empty prange vs
9 us with OMP_WAIT_POLICY=PASSIVE), so we default that variable for numba's libgomp (loaded at the
first parallel launch, after this import; torch's own bundled libgomp was initialised before).
A user-set OMP_WAIT_POLICY wins. Thread count: all cores but one by default (the caller's main thread
keeps one), 1 for calls under PARALLEL_MIN_BYTES; `set_num_threads` / OFFLOAD_NUM_THREADS change it for
the process, `set_thread_budget` for the calling thread (a scheduler's `host_threads`, on its worker).
"""

import os
import threading

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from numba import njit, prange  # noqa: E402

from offload.bits import ABS_MASK as _ABS_MASK  # noqa: E402
from offload.bits import f32_as_u32 as _f32_as_u32  # noqa: E402
from offload.bits import load_f32 as _ld  # noqa: E402
from offload.bits import prefetch as _prefetch  # noqa: E402
from offload.bits import put_bits as _put  # noqa: E402
from offload.bits import store_f32 as _st  # noqa: E402

__all__ = [
    "PARALLEL_MIN_BYTES",
    "set_num_threads",
    "set_thread_budget",
    "get_num_threads",
    "threads_for",
    "as_numpy",
    "gather_rows",
    "reference_gather_rows",
    "accumulate_rows",
    "adamw_rows",
    "sum_sq_rows",
    "max_abs_bits",
    "first_bad_id",
    "plan_slots",
    "release_slots",
    "load_f32",
]

load_f32 = _ld  # for kernels elsewhere (njit): a[i, j] as float32, a float32 or bf16 bits (uint16)

PARALLEL_MIN_BYTES = 1 << 20  # calls touching less than this run on the calling thread only
# Default: all cores but one, which is left to the Python / GPU-driving main thread that runs beside the
# host worker calling these kernels (on a 2-core machine: 1 thread). Env OFFLOAD_NUM_THREADS overrides.
_DEFAULT_THREADS = max(1, numba.config.NUMBA_NUM_THREADS - 1)
_threads = min(max(int(os.environ.get("OFFLOAD_NUM_THREADS", "0") or 0), 0), numba.config.NUMBA_NUM_THREADS)


def set_num_threads(n: int | None) -> None:
    """Threads used by the parallel kernels, from any calling thread (None: all cores but one).

    On an oversubscribed shared machine 1 thread is often faster: a fork-join region waits for its
    slowest thread, and a descheduled helper costs a whole scheduler slice. Env: OFFLOAD_NUM_THREADS.
    """
    global _threads
    top = numba.config.NUMBA_NUM_THREADS
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= top):
        raise ValueError(f"n must be None or an int in [1, {top}] (NUMBA_NUM_THREADS), got {n!r}")
    _threads = n or 0


_local = threading.local()  # per calling thread: `set_thread_budget` (a scheduler's host_threads)


def set_thread_budget(n: int | None) -> None:
    """Threads the parallel kernels use when called from *this* thread (None: the process-wide setting).
    A scheduler's host worker sets its `host_threads` here, so the option holds for every kernel it runs."""
    top = numba.config.NUMBA_NUM_THREADS
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= top):
        raise ValueError(f"host_threads={n!r} must be None or an int in [1, {top}] (NUMBA_NUM_THREADS)")
    _local.threads = n


def get_num_threads() -> int:
    """Threads the parallel kernels use for work of at least PARALLEL_MIN_BYTES, from the calling thread."""
    return getattr(_local, "threads", None) or _threads or _DEFAULT_THREADS


def threads_for(work_bytes: int) -> int:
    """Threads a kernel call touching `work_bytes` runs on, from the calling thread."""
    return 1 if work_bytes < PARALLEL_MIN_BYTES else get_num_threads()


def _run(kernel, work_bytes: int, *args):
    """Launch `kernel(*args)` with the configured thread count (1 for small work), then restore it."""
    want = threads_for(work_bytes)
    prev = numba.get_num_threads()
    if want == prev:
        return kernel(*args)
    numba.set_num_threads(want)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(prev)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor; bf16 becomes its uint16 bit pattern."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


# ---------------------------------------------------------------- gather


# Row gather, measured on cold rows (experiments/bench_offload.py): the cost is memory-level parallelism,
# not the cast. Rows go two at a time (two independent miss streams), each pair in blocks of
# _GATHER_BLOCK elements (two short loops that LLVM vectorizes, the cast fused in the store), and while
# copying block b of a pair the kernel prefetches block b of the pair ~_PREFETCH_AHEAD_BYTES of rows on
# (at least the next pair; rows < _PREFETCH_MAX_ROW_BYTES only): rows are random, so the hardware prefetcher
# (which stops at 4 KiB page boundaries and needs a few misses to start) cannot know the next row.
# With R odd the last pair is: the same value written twice. Row pairs are split into tasks
# of _GATHER_TASK pairs for prange (static schedule: each thread a contiguous range of rows).
_GATHER_BLOCK = 128  # elements per block: 512 B of fp32 = 8 cache lines per row and block
_GATHER_TASK = 16  # row pairs per prange task
_PREFETCH_MAX_ROW_BYTES = 16384  # wider rows: the hardware prefetcher follows them well enough
_PREFETCH_AHEAD_BYTES = 32768  # prefetch distance, in bytes of source rows (>= the next pair)


@njit(parallel=True, cache=True, nogil=True)
def _gather(src_bits, ids, out):
    n, width = ids.shape[0], src_bits.shape[1]
    base = np.int64(src_bits.ctypes.data)
    row_bytes = np.int64(width) * 4
    n_pairs = (n + 1) // 2
    prefetch = row_bytes < _PREFETCH_MAX_ROW_BYTES
    ahead = 2 * max(1, _PREFETCH_AHEAD_BYTES // (2 * row_bytes))  # rows, even
    for task in prange((n_pairs + _GATHER_TASK - 1) // _GATHER_TASK):
        for h in range(task * _GATHER_TASK, min((task + 1) * _GATHER_TASK, n_pairs)):
            r0 = 2 * h
            r1 = min(r0 + 1, n - 1)
            s0, s1 = src_bits[ids[r0]], src_bits[ids[r1]]
            o0, o1 = out[r0], out[r1]
            a0 = base + ids[min(r0 + ahead, n - 1)] * row_bytes  # a pair `ahead` rows on, block by block
            a1 = base + ids[min(r0 + ahead + 1, n - 1)] * row_bytes
            for j0 in range(0, width, _GATHER_BLOCK):
                j1 = min(j0 + _GATHER_BLOCK, width)
                if prefetch:
                    for p in range(4 * j0, 4 * j1, 64):
                        _prefetch(a0 + p)
                        _prefetch(a1 + p)
                b0, b1, c0, c1 = s0[j0:j1], s1[j0:j1], o0[j0:j1], o1[j0:j1]  # views: loops from 0 vectorize
                for j in range(b0.shape[0]):
                    _put(c0, j, b0[j])
                for j in range(b1.shape[0]):
                    _put(c1, j, b1[j])


def gather_rows(src: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """out[:R] = src[ids] (cast to bf16 bits, round-to-nearest-even, when out is uint16).

    Plain PyTorch (the tested twin is `reference_gather_rows`): `torch.index_select(src, 0, ids, out=out[:R])`
    for fp32 out, or `out[:R].copy_(src.index_select(0, ids).to(torch.bfloat16))` for bf16 out.
    src: [N, W] float32 C-contiguous; ids: [R] int64 in range (checked by the caller);
    out: [>=R, W] float32 or uint16 (bf16 bits), C-contiguous. Allocates nothing.
    """
    work = ids.shape[0] * src.shape[1] * (4 + out.itemsize)
    _run(_gather, work, src.view(np.uint32), ids, out if out.dtype == np.uint16 else out.view(np.uint32))


def reference_gather_rows(src: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch twin of `gather_rows` on tensors: out[:R] = src[ids].to(out.dtype); returns out[:R]."""
    n = ids.shape[0]
    out[:n].copy_(torch.index_select(src, 0, ids).to(out.dtype))
    return out[:n]


# ---------------------------------------------------------------- gradient accumulation


def accumulate_rows(pending, slots, fresh, grads, slot_maxbits) -> None:
    """pending[slots[r]] (+)= grads[r] in fp32; slot_maxbits[s] = max |bits| of pending row s.

    Plain PyTorch: for fresh slots `pending[slots] = grads.float()`, for the others
    `pending.index_add_(0, slots, grads.float())`; `slot_maxbits[s]` is the bit pattern of
    `pending[s].abs().max()` (>= 0x7F800000 means the row holds inf/NaN).
    pending: [C, W] f32; slots: [R] int64 unique; fresh: [R] bool; grads: [R, W] f32 or uint16 (bf16);
    slot_maxbits: [C] uint32.
    """
    work = slots.shape[0] * pending.shape[1] * (8 + grads.itemsize)
    _run(_accumulate_rows, work, pending, slots, fresh, grads, slot_maxbits)


@njit(parallel=True, cache=True, nogil=True)
def _accumulate_rows(pending, slots, fresh, grads, slot_maxbits):
    width = pending.shape[1]
    for r in prange(slots.shape[0]):
        s = slots[r]
        mx = np.uint32(0)
        if fresh[r]:
            for j in range(width):
                x = _ld(grads, r, j)
                pending[s, j] = x
                mx = max(mx, _f32_as_u32(x) & _ABS_MASK)
        else:
            for j in range(width):
                x = pending[s, j] + _ld(grads, r, j)
                pending[s, j] = x
                mx = max(mx, _f32_as_u32(x) & _ABS_MASK)
        slot_maxbits[s] = mx


def max_abs_bits(grads, n, out) -> int:
    """out[r] = bit pattern of |grads[r]|.max() (fp32 bits) for r < n; returns the max over rows.

    Plain PyTorch: `grads[:n].float().abs().amax(1).view(torch.int32)`; a result >= 0x7F800000 means
    inf/NaN is present. grads: [>=n, W] f32 or uint16 (bf16); out: [>=n] uint32.
    """
    if n == 0:
        return 0
    _run(_max_abs_bits, n * grads.shape[1] * grads.itemsize, grads, n, out)
    return int(out[:n].max())


@njit(parallel=True, cache=True, nogil=True)
def _max_abs_bits(grads, n, out):
    width = grads.shape[1]
    for r in prange(n):
        mx = np.uint32(0)
        for j in range(width):
            mx = max(mx, _f32_as_u32(_ld(grads, r, j)) & _ABS_MASK)
        out[r] = mx


def sum_sq_rows(pending, n) -> float:
    """sum of squares of pending[:n] accumulated in float64.

    Plain PyTorch: `pending[:n].double().square().sum().item()`.
    """
    return _run(_sum_sq_rows, n * pending.shape[1] * 4, pending, n)


@njit(parallel=True, cache=True, nogil=True)
def _sum_sq_rows(pending, n):
    width = pending.shape[1]
    total = 0.0
    for r in prange(n):
        acc = 0.0
        for j in range(width):
            x = np.float64(pending[r, j])
            acc += x * x
        total += acc
    return total


# ---------------------------------------------------------------- fused lazy AdamW


def adamw_rows(w, m, v, steps, ids, grads, grad_scale, lr, beta1, beta2, eps, weight_decay, mirror=None,
               keep=None) -> None:
    """Lazy AdamW on rows ids[r] with gradient grads[r] * grad_scale, each row with its own step.

    Plain PyTorch (per touched row i = ids[r], g = grads[r].float() * grad_scale, t = ++steps[i]):
        w[i] *= 1 - lr * weight_decay
        m[i] = m[i].lerp(g, 1 - beta1)
        v[i] = v[i] * beta2 + (1 - beta2) * g * g
        w[i] += -(lr / (1 - beta1**t)) * m[i] / (v[i].sqrt() / sqrt(1 - beta2**t) + eps)
    i.e. exactly `torch.optim.AdamW` (single-tensor path) per row; `reference_adamw_rows` is the twin.
    Math is fp32; bias corrections are computed in float64 and rounded once, like torch's scalars.
    w: [N, W] f32; m, v: [N, W] f32 or uint16 (bf16, written back round-to-nearest-even);
    steps: [N] int64; ids: [R] int64 unique; grads: [>=R, W] f32 or uint16 (bf16).
    mirror: None, or the store's wire-dtype copy [N, W] f32 or uint16 (bf16) that a device reads directly
    (zero-copy): each updated row is written there too, `mirror[i] = w[i].to(mirror.dtype)`, while the
    row is still in L1 (DeepSpeed's CPU Adam writes its half-precision copy the same way).
    keep: None, or [R] bool: the per-row update mask of a sparse update (MeftConfig.sparse_update). A row
    with keep[r] False is skipped whole: its weights, moments, mirror row and step count stay as they are
    (a zero-gradient AdamW step would still move it by its momentum). Plain PyTorch: `ids = ids[keep]`.
    """
    mirror, keep = row_update_extras(mirror, keep, ids)
    work = ids.shape[0] * w.shape[1] * (8 + 4 * m.itemsize + grads.itemsize + mirror.itemsize)
    _run(_adamw_rows, work, w, m, v, steps, ids, grads, grad_scale, lr, beta1, beta2, eps, weight_decay, mirror,
         keep)


_NO_MIRROR = np.zeros((0, 0), dtype=np.uint16)  # "no mirror": the kernel skips the mirror loop
_NO_KEEP = np.zeros(0, dtype=np.bool_)  # "no update mask": every row is updated


def row_update_extras(mirror, keep, ids):
    """A row update's optional mirror and mask as the kernels take them (empty arrays for None); keep is
    checked against ids. Shared by `adamw_rows` and `offload.sgd_kernel.sgd_rows`."""
    if keep is not None and keep.shape[0] != ids.shape[0]:
        raise ValueError(f"keep has {keep.shape[0]} entries for {ids.shape[0]} ids")
    return (_NO_MIRROR if mirror is None else mirror), (_NO_KEEP if keep is None else keep)


@njit(parallel=True, cache=True, nogil=True)
def _adamw_rows(w, m, v, steps, ids, grads, grad_scale, lr, beta1, beta2, eps, weight_decay, mirror, keep):
    width = w.shape[1]
    decay = np.float32(1.0 - lr * weight_decay)
    one_minus_b1 = np.float32(1.0 - beta1)
    b2 = np.float32(beta2)
    one_minus_b2 = np.float32(1.0 - beta2)
    eps32 = np.float32(eps)
    scale = np.float32(grad_scale)
    masked = keep.shape[0] > 0
    for r in prange(ids.shape[0]):
        if masked and not keep[r]:
            continue  # a sparse update leaves this row exactly as it is (no momentum step either)
        i = ids[r]
        t = steps[i] + 1
        steps[i] = t
        neg_step = np.float32(-(lr / (1.0 - beta1 ** np.float64(t))))
        bc2_sqrt = np.float32(np.sqrt(1.0 - beta2 ** np.float64(t)))
        for j in range(width):
            g = _ld(grads, r, j) * scale
            mj = _ld(m, i, j)
            mj = mj + one_minus_b1 * (g - mj)
            vj = _ld(v, i, j) * b2 + one_minus_b2 * g * g
            denom = np.sqrt(vj) / bc2_sqrt + eps32
            w[i, j] = w[i, j] * decay + neg_step * (mj / denom)
            _st(m, i, j, mj)
            _st(v, i, j, vj)
        if mirror.shape[0] > 0:  # a second short loop over the row just written (in L1): vectorizes
            for j in range(width):
                _st(mirror, i, j, w[i, j])


# ---------------------------------------------------------------- id bookkeeping (serial, O(R))


@njit(cache=True, nogil=True)
def first_bad_id(ids, n_rows):
    """Index of the first id outside [0, n_rows), or -1. Plain: `((ids < 0) | (ids >= n)).nonzero()`."""
    for r in range(ids.shape[0]):
        if ids[r] < 0 or ids[r] >= n_rows:
            return r
    return -1


@njit(cache=True, nogil=True)
def plan_slots(ids, slot_of, stamp, call_no, pending_ids, n_pending, slots, fresh):
    """Map ids to pending-buffer slots, allocating new slots in order of first appearance.

    First pass checks for an id repeated inside this call (via `stamp[id] == call_no`) and returns
    `-(r + 1)` for the first repeat at position r with nothing changed. Otherwise fills `slots[r]`,
    `fresh[r]` (slot newly allocated), appends new ids to `pending_ids` and returns the new count.
    """
    n = ids.shape[0]
    for r in range(n):
        i = ids[r]
        if stamp[i] == call_no:
            for q in range(r):  # undo the stamps of this call so a retry is clean
                stamp[ids[q]] = call_no - 1
            return -(r + 1)
        stamp[i] = call_no
    for r in range(n):
        i = ids[r]
        s = slot_of[i]
        if s < 0:
            s = n_pending
            slot_of[i] = s
            pending_ids[s] = i
            n_pending += 1
            fresh[r] = True
        else:
            fresh[r] = False
        slots[r] = s
    return n_pending


@njit(cache=True, nogil=True)
def release_slots(pending_ids, n_pending, slot_of):
    """slot_of[pending_ids[:n]] = -1 (drop all pending slots)."""
    for s in range(n_pending):
        slot_of[pending_ids[s]] = -1
