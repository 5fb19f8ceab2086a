"""The adapter rows that forwards outside training read (eval, `generate()`, no_grad).

`InferencePath` is the runtime's inference side: how a forward outside training routes (each token its
own experts, no row budget, delayed staleness-1 updates landed first) and where its rows come from -- the
resident copy below with offloaded rows, the resident twin's device tensors otherwise, and on the CPU
without gradients each token's own rows straight from that copy (`meft.adapter.token_rows`).

With generated keys (`MeftConfig.key_source`) the rows are values [N, d]; the keys of a forward's ids are
generated on the device, and the CPU per-token path generates a layer's whole key table once and keeps it
(keys never change).

`InferenceRows`:

With rows offloaded (TransferScheduler) inference would otherwise read each layer's rows through the host
at every forward, which synchronises with the device per layer per token. Here every layer's rows are
kept resident on the compute device in the wire dtype when they fit (`MeftConfig.inference_rows`:
'resident', or 'auto' when they take at most a quarter of the free device memory; the default model's
30 x 4096 rows are 283 MB in bf16), so an inference forward gathers its rows with one device
`index_select` per layer and no host synchronisation. The copy is rebuilt lazily, once, after the rows
changed (a training step ended, or stores were loaded). Otherwise ('fetch') rows are read through the
scheduler per forward (`read_rows`, which takes any number of ids). Inference has no row budget: the ids
are the union of every token's own experts (up to all N rows of a layer), more than a training fetch's
`max_rows` holds, so they never go through `scheduler.fetch`. Unused routing slots (id -1) read row 0;
their gate weight is 0.
"""

from __future__ import annotations

import psutil
import torch
from torch import Tensor

from meft.adapter.keys import KeyedRows, generate_keys, key_table
from meft.adapter.router import Routing

__all__ = ["InferencePath", "InferenceRows"]
_AUTO_SHARE = 0.25  # 'auto': resident when the rows take at most this share of the free device memory


class InferenceRows:
    """See the module docstring. Owned by MeftRuntime; `invalidate()` whenever the stores change."""

    def __init__(self, mode: str, scheduler, stores, device: torch.device, wire: torch.dtype):
        self.mode, self.scheduler, self.stores = mode, scheduler, stores
        self.device, self.wire = device, wire
        self._rows: list[Tensor] | None = None  # [N, W] wire dtype on the device, per layer
        self.builds = 0  # how many times the resident copy was (re)built

    def nbytes(self) -> int:
        """Device bytes of the resident copy of every layer's rows."""
        return sum(s.n_rows * s.width for s in self.stores) * torch.empty((), dtype=self.wire).element_size()

    def resident(self) -> bool:
        if self.mode != "auto":
            return self.mode == "resident"
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = psutil.virtual_memory().available
        return self.nbytes() <= _AUTO_SHARE * free

    def invalidate(self) -> None:
        """The stores changed: the resident copy is rebuilt at the next inference forward."""
        self._rows = None

    @torch.no_grad()
    def rows(self, idx: int, ids: Tensor) -> Tensor:
        """Rows [R, W] in the wire dtype on the device for ids [R] (-1: an unused slot)."""
        if not self.resident():
            return self.scheduler.read_rows(idx, ids).to(self.wire)
        return self.table(idx).index_select(0, ids.clamp(min=0))  # [R, W]

    @torch.no_grad()
    def table(self, idx: int) -> Tensor:
        """Every row of layer `idx`, [N, W] in the wire dtype on the device (the resident copy; call only
        when `resident()`)."""
        if self._rows is None:  # the runtime has flushed delayed (staleness 1) updates before asking
            self._rows = [s.weights.to(self.wire).to(self.device) for s in self.stores]  # one bulk copy each
            self.builds += 1
        return self._rows[idx]


class InferencePath:
    """Rows and routing of forwards outside training, for one runtime (see module docstring).

    `route(adapter, x2)` is the runtime's inference routing (token mask applied, no budget)."""

    def __init__(self, config, scheduler, stores, device: torch.device, route):
        self.config, self.scheduler, self.device, self._route = config, scheduler, device, route
        self.wire = scheduler.wire_dtype
        self.copy = (InferenceRows(config.inference_rows, scheduler, stores, device, self.wire)
                     if config.offload else None)  # None: the resident twin holds every row on the device
        self._key_tables: dict[int, Tensor] = {}  # generated keys, CPU per-token path: [N, d] wire dtype

    def invalidate(self) -> None:
        if self.copy is not None:
            self.copy.invalidate()

    def routing(self, adapter, x2: Tensor, step_open: bool) -> Routing:
        """Each token its own experts, no budget; with offloaded rows, delayed (staleness 1) updates land
        first, so that inference reads current rows."""
        routing = self._route(adapter, x2)
        if self.copy is not None and self.config.staleness and not step_open:
            self.scheduler.flush()
        return routing

    def per_token_rows(self, adapter, x2: Tensor, *, token_rows: bool, step_open: bool,
                       in_training_pass: bool) -> tuple[Routing, Tensor] | None:
        """CPU inference without gradients: (routing, the layer's whole row table [N, 2d] wire dtype), from
        which each token reads its own rows; None: take the general path (its tested twin)."""
        copy = self.copy
        if (not token_rows or torch.is_grad_enabled() or self.device.type != "cpu" or copy is None
                or adapter.active_per_token is not None or not copy.resident()):
            return None
        if adapter.training and in_training_pass:
            return None  # a training micro-batch's layer run without grad (reentrant checkpointing) uses its fetch
        table = copy.table(adapter.index)  # [N, W] wire dtype
        if self.config.generated_keys:  # keys never change: generated once per layer, kept
            keys = self._key_tables.get(adapter.index)
            if keys is None:
                keys = key_table(table.shape[0], seed=self.config.seed, layer=adapter.layer, d=adapter.d,
                                 dtype=self.wire)
                self._key_tables[adapter.index] = keys
            table = KeyedRows(keys, table)
        return self.routing(adapter, x2, step_open), table

    def rows(self, adapter, x2: Tensor, compute: torch.dtype, step_open: bool) -> tuple[Routing, Tensor]:
        """(routing, rows [R, 2d] in `compute` dtype) of an inference forward through the general path."""
        routing = self.routing(adapter, x2, step_open)
        if self.copy is not None:  # offloaded rows: resident copy on the device (or read per forward)
            rows = self.copy.rows(adapter.index, routing.ids)  # [R, 2d] wire dtype
        else:  # the resident twin: every row is on the device already
            rows = self.scheduler.read_rows(adapter.index, routing.ids).to(self.wire)  # [R, 2d]
        if self.config.generated_keys:  # rows are values [R, d]; the keys of their ids made here
            keys = generate_keys(routing.ids, seed=self.config.seed, layer=adapter.layer, d=adapter.d,
                                 dtype=compute, wire=self.wire)  # [R, d]
            return routing, KeyedRows(keys, rows.to(compute))
        return routing, rows.to(compute)
