"""How many host copies of the row stores each node holds, measured from the processes' memory mappings.

Owns `host_copies(stores, group)`, the measurement behind "one host copy of the stores per node"
(docs/design.md "Distributed"): it does not trust a flag, it asks the kernel. For every tensor of every store
(fp32 rows, both moments, step counts, and the zero-copy mirror when attached) each rank finds the
mapping that holds the tensor's first byte in /proc/self/maps: memory of a shared segment is identified
by (device, inode, offset in the file), which is the same on every rank that maps it; private memory by
(host, pid, address), distinct per process. Ranks are grouped by node key (`offload.node.node_key`), and
per node the number of distinct identities of one tensor is its number of copies, and the bytes of the
distinct identities are the host bytes the node holds for the stores.

Plain alternative: sum the PSS of the node's processes (shared pages count once in total); the identities
say the same without depending on which pages have been touched yet, and name the culprit tensor.
"""

from __future__ import annotations

import bisect
import os
import socket

import torch
import torch.distributed as dist

from offload.node import node_key

__all__ = ["host_copies", "memory_identity", "node_host_bytes", "store_tensors"]

_TENSORS = ("weights", "exp_avg", "exp_avg_sq", "steps")


def store_tensors(store) -> dict[str, torch.Tensor]:
    """The host tensors of a RowStore, by name (the mirror only when attached)."""
    out = {k: getattr(store, k) for k in _TENSORS}
    if getattr(store, "mirror", None) is not None:
        out["mirror"] = store.mirror
    return out


def _mappings() -> tuple[list[int], list[tuple]]:
    starts, rows = [], []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                starts.append(lo)
                rows.append((lo, hi, int(parts[2], 16), parts[3], int(parts[4])))
    except OSError:  # not Linux: every tensor counts as private memory
        pass
    return starts, rows


def memory_identity(t: torch.Tensor, maps=None) -> tuple:
    """("shared", device, inode, file offset) for a tensor in a file mapping (a /dev/shm segment), else
    ("private", host, pid, address). Equal identities on two ranks = the same physical bytes."""
    starts, rows = _mappings() if maps is None else maps
    addr = t.data_ptr()
    i = bisect.bisect_right(starts, addr) - 1
    if i >= 0:
        lo, hi, offset, device, inode = rows[i]
        if lo <= addr < hi and inode != 0:
            return ("shared", device, inode, offset + addr - lo)
    return ("private", socket.gethostname(), os.getpid(), addr)


def host_copies(stores, group=None) -> dict:
    """Host copies of `stores` (RowStores, the same layers on every rank) per node. Collective over `group`
    (default: the default group) when torch.distributed is initialised; one process otherwise. Returns
    {"nodes": n, "ranks_per_node": [..], "copies_per_node": the most copies of any store tensor on any node
    (1 = shared; ranks per node = one private copy per rank), "store_bytes_per_node": [host bytes of the
    stores' distinct memory on each node]}."""
    maps = _mappings()
    mine = (node_key(), [{name: (memory_identity(t, maps), t.nbytes) for name, t in store_tensors(s).items()}
                         for s in stores])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine, group=group)
    else:
        every = [mine]
    per_node: dict[str, list] = {}
    for key, layers in every:
        per_node.setdefault(key, []).append(layers)
    copies, node_bytes = 1, []
    for ranks in per_node.values():
        distinct: dict[tuple, int] = {}
        for layer in range(len(ranks[0])):
            for name in ranks[0][layer]:
                ids = {rank_layers[layer][name][0] for rank_layers in ranks}
                copies = max(copies, len(ids))
                for rank_layers in ranks:
                    ident, nbytes = rank_layers[layer][name]
                    distinct[ident] = nbytes
        node_bytes.append(sum(distinct.values()))
    return {"nodes": len(per_node), "ranks_per_node": [len(r) for r in per_node.values()],
            "copies_per_node": copies, "store_bytes_per_node": node_bytes}


def node_host_bytes(store_bytes: int, mirror_bytes: int, staging_bytes: int, ranks_per_node: int) -> int:
    """Host bytes one node holds for the adapter: the stores and the zero-copy mirrors once (shared by the
    node's ranks), each rank's own staging (`TransferScheduler.staging_bytes` less the mirrors) once per rank.
    The analytic twin of `host_copies(...)["store_bytes_per_node"]` plus staging; wrap's RAM check and
    `meft plan --gpus N --nodes M` (ranks_per_node = N) count this."""
    return store_bytes + mirror_bytes + ranks_per_node * staging_bytes
