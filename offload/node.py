"""Which ranks share a host: this rank's node, its local rank, and a gloo group of the node's ranks.

Owns `NodeGroup` and `node_of(group)`, the node layout that `offload.shared` (one host copy of the row
stores per node) and the row-ownership split of the updates (`offload.updates`) are built on.

How the node is decided: every rank of `group` contributes its node key, and one `all_gather_object`
gives every rank the same list; the ranks with equal keys form a node, local rank = position among them
by global rank, local rank 0 (the lowest global rank) is the node's leader. The key is the hostname, or
`MEFT_NODE_ID` (`NODE_ENV`) when set: tests emulate several nodes on one machine with it (4 ranks as 2
"nodes" x 2), and it separates machines whose hostnames collide. torchrun's LOCAL_RANK /
LOCAL_WORLD_SIZE are not used to group (they cannot express emulated nodes, and other launchers do not
set them); they only check the result: where LOCAL_WORLD_SIZE is set and MEFT_NODE_ID is not, the
number of ranks sharing this hostname must equal it, else two machines report the same hostname and
would try to share memory they cannot (an error says to set MEFT_NODE_ID per machine).

Each node gets a gloo group of its ranks (`dist.new_subgroups_by_enumeration`, which every rank of the
default group calls with the same list, so `group` must span the whole default group), used for the
node's barriers only, and a name prefix for its shared-memory segments chosen by the leader (random,
so a stale or concurrent run never collides).
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field

import torch.distributed as dist

__all__ = ["NODE_ENV", "NodeGroup", "node_key", "node_of", "shared_node"]

NODE_ENV = "MEFT_NODE_ID"  # overrides the node identity (emulated nodes; machines with equal hostnames)


def node_key() -> str:
    """This process's node identity: the hostname, or `$MEFT_NODE_ID` when set."""
    override = os.environ.get(NODE_ENV, "")
    return f"id:{override}" if override else f"host:{socket.gethostname()}"


@dataclass(eq=False)
class NodeGroup:
    """The ranks of one node, as seen from one of them (see module docstring)."""

    key: str  # node_key() of every rank of the node
    index: int  # this node's number, 0..n_nodes-1 (nodes ordered by their lowest global rank)
    n_nodes: int
    ranks: tuple[int, ...]  # global ranks of the node, ascending; ranks[0] is the leader (local rank 0)
    local_rank: int  # position of this rank in `ranks`
    group: object  # gloo process group of `ranks` (the node's barriers)
    prefix: str  # name prefix of the node's shared-memory segments (chosen by the leader)
    _segments: int = field(default=0, repr=False)  # segments allocated so far (the same count on every rank)

    @property
    def local_world(self) -> int:
        return len(self.ranks)

    @property
    def leader(self) -> bool:
        """Local rank 0: creates, initialises and unlinks the node's shared segments."""
        return self.local_rank == 0

    @property
    def owner(self) -> tuple[int, int]:
        """(local_rank, local_world): this rank updates the shared rows with id % local_world == local_rank."""
        return self.local_rank, self.local_world

    def barrier(self) -> None:
        """Wait for every rank of the node (the caller says what it protects)."""
        dist.barrier(group=self.group)

    def next_segment_name(self) -> str:
        """Name of the node's next shared segment: the same on every rank of the node, which allocate their
        segments in the same order."""
        self._segments += 1
        return f"{self.prefix}-{self._segments}"


def node_of(group=None) -> NodeGroup:
    """This rank's NodeGroup. Collective: every rank of the default group calls it, in the same order relative
    to other collectives; `group` (default: the default group) must span every rank of the default group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("node_of needs an initialised torch.distributed process group "
                           "(dist.init_process_group, e.g. under torchrun)")
    world = dist.get_world_size()
    if group is not None and dist.get_world_size(group) != world:
        raise ValueError(f"node_of: the group has {dist.get_world_size(group)} ranks but the default group has "
                         f"{world}; node groups are built over every rank: pass a group of all ranks")
    mine = (node_key(), secrets.token_hex(6))
    every: list = [None] * world
    dist.all_gather_object(every, mine, group=group)  # index = rank in `group`
    ranks_of_group = list(range(world)) if group is None else dist.get_process_group_ranks(group)
    info = dict(zip(ranks_of_group, every))  # global rank -> (node key, token)
    by_key: dict[str, list[int]] = {}
    for g_rank in sorted(info):
        by_key.setdefault(info[g_rank][0], []).append(g_rank)
    nodes = sorted(by_key.values(), key=lambda r: r[0])  # each ascending; nodes by their lowest rank
    _check_local_world(mine[0], len(by_key[mine[0]]))
    sub, _ = dist.new_subgroups_by_enumeration(nodes, backend="gloo")  # every rank, the same list
    me = dist.get_rank()
    index = next(i for i, r in enumerate(nodes) if me in r)
    ranks = tuple(nodes[index])
    leader_token = info[ranks[0]][1]
    return NodeGroup(key=mine[0], index=index, n_nodes=len(nodes), ranks=ranks, local_rank=ranks.index(me),
                     group=sub, prefix=f"meft-{leader_token}-n{index}")


def _check_local_world(key: str, n_same_key: int) -> None:
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    if os.environ.get(NODE_ENV) or local_world is None:
        return
    if int(local_world) != n_same_key:
        raise ValueError(f"{n_same_key} ranks report the node key {key!r} but torchrun says LOCAL_WORLD_SIZE = "
                         f"{local_world}: machines with the same hostname would be taken for one node and share "
                         f"host memory they cannot share; set {NODE_ENV} to a distinct value on each machine")


def shared_node(optimizers, *, data_parallel: bool) -> NodeGroup | None:
    """The NodeGroup whose shared memory holds the optimizers' stores, or None (private stores). Every store
    must be on the same node or none; shared stores need data parallel updates (`data_parallel`)."""
    nodes = {id(o.store.node): o.store.node for o in optimizers}
    if len(nodes) > 1:
        raise ValueError("the stores mix node-shared and private memory (or several NodeGroups); build every "
                         "RowStore of one scheduler with the same node=")
    node = next(iter(nodes.values()))
    if node is not None and not data_parallel:
        raise ValueError("stores shared by the ranks of a node (RowStore(..., node=...)) need a process_group of "
                         "several ranks (data parallel): each rank updates its share of the rows from the "
                         "all-reduced gradients; pass process_group=, or build the stores with node=None")
    return node
