"""Named shared host memory of one node: created by local rank 0, mapped by the node's other ranks.

Owns `alloc_shared(node, nbytes, fill)`, how a node holds one host copy of its row stores (and of their
zero-copy mirrors) whatever its number of ranks (docs/design.md "Distributed"). Standard library and torch
only: a file in /dev/shm (POSIX shared memory, as `multiprocessing.shared_memory` uses), mapped with
`torch.from_file(..., shared=True)` (MAP_SHARED; the tensor's storage owns the mapping and unmaps it
when its last view dies).

A segment's life (every rank of the node calls `alloc_shared` for the same segments in the same order):

  1. the leader (local rank 0) registers the name with Python's resource tracker (a separate process that
     unlinks it should the leader die before step 5), checks the free space of /dev/shm, creates the file
     (O_EXCL: never someone else's), sizes it, maps it and fills it (`fill`: zeros, the store's init);
  2. node barrier;
  3. the other ranks map it by name;
  4. node barrier;
  5. the leader unlinks the name (and unregisters it).

After step 5 no name exists: the memory lives while some rank maps it and the kernel frees it when the
last mapping goes (a normal close, or a rank killed by any signal), so nothing is left in /dev/shm
whatever happens after construction. A failure between 1 and 5 unlinks in a `finally`; a leader killed
there is covered by its resource tracker; a non-leader killed there makes the leader's barrier fail.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from multiprocessing import resource_tracker

import torch

from offload.text import GiB

__all__ = ["SHM_DIR", "alloc_shared", "shm_free_bytes"]

SHM_DIR = "/dev/shm"
_test_after_create: Callable[[str], None] | None = None  # test hook: runs on the leader after step 1 (kill it)


def shm_free_bytes() -> int:
    """Bytes free in /dev/shm (the tmpfs that holds the node's segments; containers often make it small)."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def alloc_shared(node, nbytes: int, fill: Callable[[torch.Tensor], None], what: str) -> torch.Tensor:
    """A [nbytes] uint8 CPU tensor over one shared segment of `node` (an `offload.node.NodeGroup`): the same
    physical memory on every rank of the node, filled by `fill(buf)` on the leader before any other rank
    sees it. Collective over the node's ranks. `what` names the allocation in errors."""
    if not os.path.isdir(SHM_DIR):
        raise RuntimeError(f"{what}: shared row stores need POSIX shared memory in {SHM_DIR}, which this system "
                           "lacks; run one rank per node (or on Linux)")
    name = node.next_segment_name()
    path = os.path.join(SHM_DIR, name)
    if node.leader:
        buf = _create(path, name, nbytes, fill, what, node)
    else:
        node.barrier()  # protects the attach below: the leader has created the segment and filled it
        buf = _attach(path, nbytes, what, node)
        node.barrier()  # protects the leader's unlink: every rank has mapped the segment
    return buf


def _create(path: str, name: str, nbytes: int, fill, what: str, node) -> torch.Tensor:
    free = shm_free_bytes()
    if nbytes > free:
        raise MemoryError(f"{what} needs {nbytes / GiB:.2f} GiB ({nbytes} bytes) of shared memory but {SHM_DIR} has "
                          f"{free / GiB:.2f} GiB free; enlarge it (docker run --shm-size=..., or mount -o "
                          f"remount,size=... {SHM_DIR}) or lower the adapter rows")
    resource_tracker.register("/" + name, "shared_memory")  # unlinks it if this process dies before the unlink
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        if _test_after_create is not None:
            _test_after_create(path)
        buf = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)  # [nbytes] MAP_SHARED
        fill(buf)
        node.barrier()  # protects the others' attach: the segment exists and holds its initial contents
        node.barrier()  # protects the unlink below: every rank of the node has mapped the segment
    finally:
        _unlink(path)
        resource_tracker.unregister("/" + name, "shared_memory")
    return buf


def _attach(path: str, nbytes: int, what: str, node) -> torch.Tensor:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise RuntimeError(f"{what}: local rank {node.local_rank} of node {node.key!r} cannot open {path}, which its "
                           f"local rank 0 (rank {node.ranks[0]}) created: these ranks are not on one host. Set "
                           f"MEFT_NODE_ID to a distinct value on each machine") from None
    if size != nbytes:
        raise RuntimeError(f"{what}: {path} holds {size} bytes, expected {nbytes}: the node's ranks allocate "
                           "different stores (every rank must build the same stores in the same order)")
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)  # [nbytes] MAP_SHARED


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
