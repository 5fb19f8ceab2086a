"""MeftRuntime: the per-model object behind `model.meft` -- step/micro-batch tracking and row traffic.

Owns, for one wrapped model: the adapters, the per-layer RowStores and SparseAdamW optimizers, the
scheduler (TransferScheduler or the resident twin), the adapter-side optimizer, and the bookkeeping
that makes a plain PyTorch loop correct:

* a forward pre-hook on the decoder stack (`model.get_decoder()`, else the top model) records which
  positions are real tokens (the 2-D `attention_mask` of that forward, by keyword or position; see
  `token_mask`) for every forward, and opens a micro-batch when training (training mode and grad
  enabled): `begin_step` on the first one after `optimizer.step()`, then `begin_micro_batch`. Padding
  never routes, never counts toward the row budget, and gets no adapter output;
* `request_rows(adapter, x)` routes and issues the fetch once per (step, micro-batch, layer) during that
  forward and returns a `wait` the adapter calls after its base FFN (the rows travel meanwhile); the
  (routing, rows leaf) pair is cached, and gradient-checkpoint recomputation (which runs outside the
  decoder's forward) reuses it -- no second fetch, no re-routing. A post-accumulate-grad hook on the
  rows leaf pushes the row gradient `[R, 2d]` to the scheduler and drops the cache entry. With generated
  keys (`MeftConfig.key_source`) the fetched rows are values [R, d], their gradient is dV [R, d], and the
  keys of the fetched ids are generated on the device (`meft.adapter.keys`): `KeyedRows(keys, values)`. Routing has
  fixed shapes (row ids [R] with -1 padding for unused slots): nothing here makes the host wait for
  the device; the ids reach the host through the scheduler's asynchronous copy;
* `balance="bias"`: each training routing adds its per-expert demand (`Routing.load`, device tensors)
  to the step's total per layer; `end_step` moves each adapter's `expert_bias` by it (no sync);
* `prefetch="lookahead"`: layer l also routes its input through gate l+1 and starts that fetch
  (`meft.adapter.lookahead`); the scheduler's layer row buffers are then sized for 2 * max_rows;
* outside training -- a forward in eval mode **or** without gradients (eval, `generate()`, no_grad;
  the same test that opens no micro-batch) -- there is no row budget: each token routes to its own top
  experts, so a sequence's output never depends on its batch, and KV-cache decoding equals a full
  forward. Nothing is cached or pushed; routing and rows come from `meft.adapter.inference`;
* `sparse_update=t`: each training micro-batch updates only the rows its `SparseUpdate`
  (`meft.adapter.sparse_update`: tf x idf against background text) keeps; the mask travels with the row
  gradients (`push_grads(keep=)`). `routing_stats()["updated_rows"]` is the rows kept per layer.
* `locality`: the locality term of each training forward (`meft.adapter.locality`; adapters add to it).
The runtime builds the adapter-side optimizer (`meft.adapter.optim.MeftOptimizer`) and, at each step's
first training forward, pushes the rows group's hyper-parameters into every layer's SparseAdamW.
Statistics live in `meft.adapter.stats`, summary tables in `meft.adapter.summary`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from meft.adapter.hooked import forward_params, hooked_module, mask_position
from meft.adapter.inference import InferencePath
from meft.adapter.keys import KeyedRows, generate_keys
from meft.adapter.locality import LocalityTerm
from meft.adapter.lookahead import Lookahead
from meft.adapter.optim import MeftOptimizer
from meft.adapter.router import Routing, route, update_balance_bias
from meft.adapter.sparse_update import SparseUpdate
from meft.adapter.stats import RoutingStats, traffic_totals
from meft.adapter.summary import summary, summary_table
from offload.copies import host_copies

__all__ = ["MeftRuntime", "in_backward"]


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (e.g. gradient-checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


@dataclass(eq=False)
class _Entry:
    key: tuple[int, int]   # (step, micro-batch)
    routing: Routing
    rows: Tensor | KeyedRows  # [R, 2d] compute-dtype leaf, requires grad (generated keys: .values is)
    n_tokens: int


class MeftRuntime:
    """See the module docstring. Built by `meft.wrap`; reach it as `model.meft`."""
    def __init__(self, model, config, adapters, optimizers, scheduler, *, device, meter=None, undo=None,
                 backbone_params=(), backbone_optimizer=None):
        self.config = config
        self.adapters = adapters                  # list[SparseFFNAdapter], position = scheduler layer
        self.stores = [o.store for o in optimizers]
        self.sparse_optimizers = optimizers       # list[SparseAdamW], one per adapter
        self.scheduler = scheduler
        self.meter = meter
        self.device = torch.device(device)
        self.undo = undo                          # what wrap changed in the model (meft.unwrap reverts it)
        self.backbone_params = list(backbone_params)
        self.backbone_optimizer = backbone_optimizer  # Lomo / AdaLomo when config.backbone trains it
        self.optimizer = MeftOptimizer(self, optimizers, [ad.gate for ad in adapters], router_lr=config.router_lr,
                                       adapter_lr=config.adapter_lr, weight_decay=config.weight_decay,
                                       clip=config.clip, max_norm=config.max_norm)
        self._step = 0                             # optimizer steps begun
        self._micro = 0                            # micro-batches of the current step
        self._step_open = False
        self._in_forward = False                   # inside a training forward of the hooked module
        self.fetches = 0                          # scheduler.fetch / fetch_more calls of the adapters
        self._lookahead = Lookahead(scheduler, meter, self._fetch)
        self._cache: dict[int, list[_Entry]] = {}  # entries live until their grads are pushed
        self._route_stats = RoutingStats()
        self._mask: Tensor | None = None  # [B, past + L] bool real positions of the running forward
        self._load: dict[int, Tensor] = {}  # layer -> [E] fp32 this step's demand per expert (balance)
        self.locality = LocalityTerm(config.locality_margin)  # background weight -> term (meft.adapter.locality)
        # sparse_update: the background and the update masks (inert with sparse_update=0: nothing captured)
        self.sparse = SparseUpdate(config.sparse_update,
                                   lambda adapter, x: self._route(adapter, x, None, budget=False))
        hooked = hooked_module(model, adapters)
        self._mask_arg = mask_position(hooked)
        self._infer = InferencePath(config, scheduler, self.stores, self.device,
                                    lambda ad, x: self._route(ad, x, self.token_mask(ad, x), budget=False))
        self._inference = self._infer.copy  # InferenceRows with offloaded rows, else None
        # CPU forwards read each token's own rows (`meft.adapter.token_rows`): in training from the gathered
        # rows, without gradients from the resident copy (`per_token_rows`); False: the dense products over
        # the gathered rows, the twin the tests compare with
        self.token_rows = True
        self._hooks = [
            hooked.register_forward_pre_hook(self._on_forward_pre, with_kwargs=True),
            hooked.register_forward_hook(self._on_forward_post, always_call=True),
        ]
        self._wire = scheduler.wire_dtype
        if config.prefetch == "lookahead":
            # a prefetch (<= max_rows) plus the rows it missed (<= max_rows) live in one layer buffer
            scheduler.reserve_live_rows(2 * scheduler.max_rows)
        for ad in adapters:
            ad.runtime = self

    @property
    def lookahead(self) -> dict:
        """Lookahead rows so far: needed, of them prefetched (hit), prefetched."""
        return self._lookahead.stats

    def _push_row_hyperparams(self) -> None:
        """Copy the optimizer's rows group (lr / betas / eps / weight_decay) into every layer's SparseAdamW.

        Done when a step opens (its first training forward), so a learning-rate scheduler stepped after
        `step()` drives the next step. Row updates start during backward, before `step()` runs, so setting
        them in `step()` would be one step late (and racy)."""
        g = self.optimizer.rows_group
        for opt in self.sparse_optimizers:
            opt.lr, opt.weight_decay = float(g["lr"]), float(g["weight_decay"])
            opt.betas, opt.eps = (float(g["betas"][0]), float(g["betas"][1])), float(g["eps"])

    # ---- micro-batch detection ----------------------------------------------------------------
    def _on_forward_pre(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_arg is not None and len(args) > self._mask_arg:
            mask = args[self._mask_arg]
        # 2-D [batch, past + current] masks only: a 4-D mask is additive (0 = attend), and says nothing
        # simple about padding, so with one every position counts as real
        self._mask = mask != 0 if isinstance(mask, Tensor) and mask.dim() == 2 else None  # device op, no sync
        if not (module.training and torch.is_grad_enabled()):
            return
        k = self.config.grad_accum_steps
        if not self._step_open:
            self._push_row_hyperparams()  # this step's lr, before any row update can start
            self.scheduler.begin_step(accum_steps=k)
            self._step += 1
            self._micro = 0
            self._step_open = True
        elif self._micro >= k:
            raise RuntimeError(
                f"micro-batch {self._micro + 1} of step {self._step} started, but grad_accum_steps={k}: "
                f"call model.meft.optimizer.step() every {k} micro-batch(es), or set "
                f"MeftConfig.grad_accum_steps to the number of forwards per optimizer step")
        self.scheduler.begin_micro_batch()
        self._micro += 1
        self._lookahead.clear()
        self.locality.open()
        self._in_forward = True

    def _on_forward_post(self, module, args, output) -> None:
        self._in_forward = False
        self._mask = None
        self.locality.close()

    def end_step(self) -> None:
        """Called by the optimizer's step(): the scheduler finishes the step's row updates."""
        if self._step_open:
            for idx, load in self._load.items():  # balance="bias": the step's demand moves the bias
                update_balance_bias(self.adapters[idx].expert_bias, load, self.config.balance_rate)
            self._load.clear()
            self.scheduler.finish_step()
            self._infer.invalidate()  # this step's row updates make the inference copy stale
        self._step_open = False
        for entries in self._cache.values():  # forwards without backward: free their rows now
            for e in entries:
                e.rows = None
        self._cache.clear()
        self._lookahead.clear()

    # ---- rows for one adapter call ------------------------------------------------------------
    def token_mask(self, adapter, x2: Tensor) -> Tensor | None:
        """[T] bool real tokens of x2 [T, d] (None: all real, no mask given). The mask covers past and
        current positions under a KV cache; x2 holds the current ones: the last T / B of each row."""
        mask = self._mask
        if mask is None:
            return None
        n_seq, width = mask.shape
        n_tok = x2.shape[0]
        if n_tok % n_seq or n_tok // n_seq > width:
            raise ValueError(
                f"adapter {adapter.index} (layer {adapter.layer}): its FFN input has {n_tok} tokens, which is not "
                f"{n_seq} sequences of at most {width} positions as the forward's attention_mask "
                f"[{n_seq}, {width}] says; pass a 2-D attention_mask [batch, past + current tokens] that "
                f"matches input_ids, or none (then every position counts as a real token)")
        return mask[:, width - n_tok // n_seq:].reshape(-1)  # [T], batch-major as x.reshape(-1, d)

    def route_training(self, adapter, x2: Tensor) -> Routing:
        """How the running training forward routes `x2` [T, d] through `adapter` (its padding excluded, the
        row budget applied), without fetching anything: what `meft profile` counts rows by."""
        return self._route(adapter, x2, self.token_mask(adapter, x2), budget=True)

    def _route(self, adapter, x2: Tensor, valid: Tensor | None, *, budget: bool) -> Routing:
        """budget=True: a training micro-batch (row budget, re-routing); False: inference, per token."""
        c = self.config
        return route(x2, adapter.gate, experts_per_token=c.experts_per_token, expert_size=c.expert_size,
                     max_active_rows=c.max_active_rows if budget else None, valid=valid,
                     bias=adapter.expert_bias if c.balance == "bias" else None, compiled=c.compile_router)

    def rows_for(self, adapter, x2: Tensor) -> tuple[Routing, Tensor]:
        """(routing, rows [R, 2d] in compute dtype) for this call: `request_rows`, then its wait."""
        routing, wait = self.request_rows(adapter, x2)
        return routing, wait()

    def request_rows(self, adapter, x2: Tensor) -> tuple[Routing, Callable[[], Tensor]]:
        """Route x2 [T, d] and issue the fetch of its rows now; returns (routing, wait) where wait() gives
        rows [R, 2d] in compute dtype, blocking only then. The adapter calls it before its base FFN so the
        rows travel while the FFN computes; see the module docstring for caching and recomputation."""
        idx = adapter.index
        if adapter.training and self._step_open and in_backward():
            return self._ready(*self._recompute_rows(idx, x2))  # inside backward: checkpoint recomputation
        if adapter.training and torch.is_grad_enabled() and not self._in_forward:
            raise RuntimeError(
                f"adapter {idx}: a training forward with gradients that did not go through the wrapped "
                f"model's forward (nor its decoder's: no micro-batch is open, so row gradients would be lost); "
                f"call the model given to meft.wrap, or run this forward under torch.no_grad() / model.eval()")
        if adapter.training and self._in_forward:
            key = (self._step, self._micro)
            for e in self._cache.get(idx, ()):
                if e.key == key and e.n_tokens == x2.shape[0]:
                    return self._ready(e.routing, e.rows)  # same layer called again within this micro-batch
            return self._train_rows(adapter, x2, key)
        return self._ready(*self._infer_rows(adapter, x2))

    @staticmethod
    def _ready(routing: Routing, rows: Tensor) -> tuple[Routing, Callable[[], Tensor]]:
        return routing, lambda: rows

    def _recompute_rows(self, idx: int, x2: Tensor) -> tuple[Routing, Tensor]:
        entries = self._cache.get(idx, [])
        if len(entries) != 1 or entries[0].n_tokens != x2.shape[0]:
            got = [(e.key, e.n_tokens) for e in entries]
            raise RuntimeError(
                f"adapter {idx}: gradient-checkpoint recomputation of {x2.shape[0]} tokens needs exactly "
                f"one cached micro-batch with that many tokens, found {got} (as (step, micro), tokens); "
                f"run backward after each forward when gradient checkpointing is on")
        return entries[0].routing, entries[0].rows  # no fetch, no re-route

    def _compute_dtype(self, adapter, x2: Tensor) -> torch.dtype:
        return adapter.compute_dtype or x2.dtype

    def _train_rows(self, adapter, x2: Tensor, key) -> tuple[Routing, Callable[[], Tensor]]:
        idx = adapter.index
        valid = self.token_mask(adapter, x2)
        routing = self._route(adapter, x2, valid, budget=True)
        # statistics of this layer's latest training routing, read by routing_stats() (no sync here)
        self._route_stats.record(idx, routing)
        if self.config.balance == "bias":
            self._load[idx] = routing.load + self._load[idx] if idx in self._load else routing.load
        lookahead = self.config.prefetch == "lookahead"
        # the fixed-shape ids [R] (-1 padding) cross to the host asynchronously; lookahead compares ids
        # on the host (its hit test), so it compacts them: the one training path that synchronises
        ids = routing.active_ids() if lookahead else routing.ids
        start = self._lookahead.start(idx, ids, key, self._step)
        if lookahead and idx + 1 < len(self.adapters):
            nxt = self._route(self.adapters[idx + 1], x2, valid, budget=True).active_ids()  # gate l+1, input l
            self._lookahead.prefetch(idx + 1, nxt, key)
        compute = self._compute_dtype(adapter, x2)
        keep = self.sparse.mask(adapter, routing, self._step) if self.config.sparse_update else None  # [R] bool
        push_kw = {} if keep is None else {"keep": keep[: ids.numel()]}  # compacted ids: the used prefix

        def wait() -> Tensor:
            rows_wire = start()  # [R, 2d] wire dtype ([n, 2d] when compacted); waits for the rows here
            if rows_wire.shape[0] < routing.ids.numel():  # compacted: zero rows for the unused slots
                rows_wire = torch.nn.functional.pad(rows_wire, (0, 0, 0, routing.ids.numel() - rows_wire.shape[0]))
            rows = rows_wire.to(compute).detach().requires_grad_(True)  # the leaf: [R, 2d], or values [R, d]
            entry = _Entry(key, routing, self._with_keys(adapter, routing.ids, rows), x2.shape[0])

            def push(leaf: Tensor) -> None:
                self.scheduler.push_grads(idx, ids, leaf.grad[: ids.numel()], **push_kw)
                leaf.grad = None
                self._cache[idx] = [e for e in self._cache.get(idx, []) if e is not entry]
                entry.rows = None  # break leaf -> hook -> entry -> leaf so the rows are freed at once

            rows.register_post_accumulate_grad_hook(push)
            self._cache.setdefault(idx, []).append(entry)
            return entry.rows

        return routing, wait

    def _with_keys(self, adapter, ids: Tensor, values: Tensor):
        """Generated keys (`MeftConfig.key_source`): `KeyedRows(keys [R, d], values)` for row ids [R] (-1: any
        finite keys, gate weight 0), generated on the values' device, rounded to the wire dtype as a stored key
        is, in the values' dtype. Stored keys: `values` are whole rows [R, 2d], returned as they are."""
        if not self.config.generated_keys:
            return values
        keys = generate_keys(ids, seed=self.config.seed, layer=adapter.layer, d=adapter.d, dtype=values.dtype,
                             wire=self._wire)  # [R, d]
        return KeyedRows(keys, values)

    # ---- sparse update (MeftConfig.sparse_update; meft.adapter.sparse_update) ------------------
    @property
    def capturing(self) -> bool:
        """capture_background is running: adapters hand their FFN input here and add nothing."""
        return self.sparse.capturing

    def capture(self, adapter, x2: Tensor) -> None:
        """During capture_background: keep adapter's FFN input x2 [T, d]."""
        self.sparse.capture(adapter, x2)

    def capture_background(self, model, rows: list[Tensor]) -> None:
        """Run `model` over the background token rows (each [1, L] int64) and keep every adapted layer's FFN
        inputs for sparse_update's idf (`SparseUpdate.capture_background`)."""
        kw = {"logits_to_keep": 1} if "logits_to_keep" in forward_params(model) else {}  # no LM head over B
        self.sparse.capture_background(model, rows, self.adapters, self.device, kw)

    def _fetch(self, idx: int, ids: Tensor, *, prefetch: bool = False, more: bool = False):
        self.fetches += 1
        if more:
            return self.scheduler.fetch_more(idx, ids)  # rows a lookahead prefetch missed
        return self.scheduler.fetch(idx, ids, extendable=prefetch)  # a prefetch may be completed by fetch_more

    def per_token_rows(self, adapter, x2: Tensor) -> tuple[Routing, Tensor] | None:
        """Inference on the CPU: (routing, the layer's whole row table [N, 2d] wire dtype), from which each
        token reads its own rows; None: take `request_rows` (`InferencePath.per_token_rows`)."""
        return self._infer.per_token_rows(adapter, x2, token_rows=self.token_rows, step_open=self._step_open,
                                          in_training_pass=self._in_forward or in_backward())

    def token_rows_apply(self, adapter, x2: Tensor, rows: Tensor) -> bool:
        """Whether a forward with gathered rows [R, 2d] computes through `meft.adapter.token_rows` (CPU, fp32,
        no active_per_token top-K) instead of dense products."""
        return (self.token_rows and x2.device.type == "cpu" and x2.dtype == rows.dtype == torch.float32
                and adapter.active_per_token is None)

    def _infer_rows(self, adapter, x2: Tensor) -> tuple[Routing, Tensor]:
        return self._infer.rows(adapter, x2, self._compute_dtype(adapter, x2), self._step_open)

    def stores_changed(self) -> None:
        """The RowStores were written outside training (an adapter or checkpoint was loaded): device
        copies (the resident twin's, the inference rows) are refreshed from them."""
        self.scheduler.load_from_host()
        self._infer.invalidate()

    def sync_to_host(self) -> None:
        """Make the RowStores current (resident twin on a GPU keeps device copies)."""
        if not self._step_open:
            self.scheduler.flush()
        self.scheduler.sync_to_host()

    # ---- lifetime -----------------------------------------------------------------------------
    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def close(self) -> None:
        self.remove_hooks()
        self.scheduler.close()

    def detach(self) -> None:
        """Close, and let go of the adapters (meft.unwrap, or a wrap that failed)."""
        self.close()
        for ad in self.adapters:
            ad.runtime = None

    def routing_stats(self) -> dict:
        """Routing of the latest training micro-batch, averaged over adapted layers (`RoutingStats.read`:
        `distinct_experts`, `dropped_share`; with sparse_update also `updated_rows`). Reading it
        synchronises with the device once; call it when logging, not per layer."""
        out = self._route_stats.read()
        if self.config.sparse_update:  # rows each layer's latest micro-batch updates (the rest stay as they are)
            out["updated_rows"] = self.sparse.updated_rows()
        return out

    def traffic_totals(self) -> tuple[int, int, int, float]:
        """(bytes down, bytes up, rows down, CPU update ms) so far, from the meter (zeros without one)."""
        return traffic_totals(self.meter)

    def host_copies(self) -> dict:
        """Host copies of the row stores per node, measured from the processes' memory mappings
        (`offload.copies.host_copies`): {"nodes", "ranks_per_node", "copies_per_node" (1: the node's ranks
        share one copy), "store_bytes_per_node"}. Under torch.distributed a collective: every rank calls it."""
        return host_copies(self.stores)

    def summary(self) -> dict:
        return summary(self)

    def summary_table(self) -> str:
        return summary_table(self)
