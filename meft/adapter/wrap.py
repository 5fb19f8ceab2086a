"""meft.wrap / meft.unwrap: put sparse FFN adapters into a model, and take them out again.

Owns putting adapters into any HF causal LM (targets from `meft.adapter.targets`), building the per-layer
host stores + SparseAdamW optimizers, the scheduler (`offload.TransferScheduler`, or the resident
twin `offload.resident.ResidentScheduler` with `offload=False`), the runtime (`model.meft`), the
adapter-side optimizer and, for backbone="lomo"/"adalomo", the backbone optimizer; and undoing it.
Rows: row i of layer l is [k_i | v_i] (2d wide); keys ~ U(-1/sqrt(d), 1/sqrt(d)) seeded per layer,
values 0, so the wrapped model starts exactly equal to the base model. With generated keys
(`MeftConfig.key_source`, frozen keys) a store row is v_i only (d wide) and k_i comes from
`meft.adapter.keys` (the same distribution, from (seed, layer, row)) wherever it is used. Each router
gate starts aligned with its layer's keys (`router.init_gate`: gate row e = unit-norm mean of expert e's
keys), and the keys are frozen unless `MeftConfig.key_lr` is None (stable addressing, docs/design.md "The adapter").
Under torch.distributed (torchrun, several ranks) the ranks' configs are checked first, then the stores of a
node's ranks are built in the node's shared memory (`offload.node`, `offload.shared`): one host copy per
node, whose rows the node's ranks update by ownership (docs/design.md "Distributed").
With `sparse_update > 0` wrap also captures the background text's FFN inputs for the sparse update's idf
(`MeftRuntime.capture_background`): the tokenizer is the one given, else the one saved beside the model
(`model.config._name_or_path`); without either, training refuses to start until the background is captured.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from meft.adapter.distributed import data_parallel_group
from meft.adapter.keys import key_table
from meft.adapter.layer import SparseFFNAdapter
from meft.adapter.router import init_gate
from meft.adapter.runtime import MeftRuntime
from meft.adapter.targets import find_targets, hidden_size_of
from meft.config import MeftConfig
from meft.data.background import background_token_ids
from meft.lomo.optimizers import AdaLomo, Lomo
from offload.copies import node_host_bytes
from offload.meter import TrafficMeter
from offload.node import node_of
from offload.optim import SparseAdamW
from offload.resident import ResidentScheduler
from offload.scheduler import TransferScheduler
from offload.store import RowStore, check_host_ram

__all__ = ["wrap", "unwrap", "row_init"]


def row_init(d: int, seed: int, layer: int):
    """Callable filling a [N, 2d] store: keys U(-1/sqrt(d), 1/sqrt(d)) (seeded by seed, layer), values 0."""
    def fill(weights: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
        bound = d ** -0.5
        weights[:, :d].uniform_(-bound, bound, generator=gen)
        weights[:, d:].zero_()
    return fill


def _check_host_ram(config: MeftConfig, n_layers: int, width: int, node=None) -> None:
    """All layers' stores at once, before the first is allocated (offload's host-RAM rule). Under
    torch.distributed with several ranks on a node (`node`) the stores are the node's one shared copy:
    its local rank 0 counts them once plus every local rank's staging; the other ranks their staging."""
    def fixes(budget: int) -> str:
        per_row = n_layers * RowStore.bytes_needed(1, width, torch.bfloat16)
        return (f"Fix: lower MeftConfig.adapter_rows (at most ~{budget // per_row} per layer with "
                "state_dtype='bfloat16'), set state_dtype='bfloat16', or adapt fewer layers (layers=2 or a list)")

    local_world = 1 if node is None else node.local_world
    shared = local_world > 1
    stores = n_layers * RowStore.bytes_needed(config.adapter_rows, width, config.state)
    staging = mirrors = 0
    if config.offload:  # + the scheduler's staging (pinned at its exact size on CUDA)
        live = 2 * config.budget_rows if config.prefetch == "lookahead" else config.budget_rows
        mirror_rows = config.adapter_rows if config.fetch_mode == "zero_copy" else 0
        with_mirrors = TransferScheduler.staging_bytes(n_layers, config.budget_rows, width, config.wire,
                                                       max_live_rows=live, zero_copy_rows=mirror_rows,
                                                       update_mask=config.sparse_update > 0)
        mirrors = n_layers * mirror_rows * width * config.wire.itemsize  # shared per node like the stores
        staging = with_mirrors - mirrors
    if not shared:
        need = node_host_bytes(stores, mirrors, staging, 1)
    elif node.leader:  # the node's one copy is allocated here; its other ranks allocate their staging meanwhile
        need = node_host_bytes(stores, mirrors, staging, local_world)
    else:
        need = staging
    check_host_ram(need, f"adapter_rows = {config.adapter_rows} x {n_layers} layers x width {width}", fixes)


def _build_scheduler(config: MeftConfig, opts, device, group):
    kw = dict(device=device, wire_dtype=config.wire,
              max_rows=config.budget_rows, staleness=config.staleness,
              clip=config.clip, max_norm=config.max_norm)
    if config.sparse_update:  # push_grads carries the sparse update's row mask
        kw["update_mask"] = True
    if config.offload:
        meter = TrafficMeter()
        return TransferScheduler(opts, meter=meter, timing=config.copy_timing, process_group=group,
                                 zero_copy=config.fetch_mode == "zero_copy", **kw), meter
    return ResidentScheduler(opts, **kw), None


def _backbone_optimizer(config: MeftConfig, params):
    if config.backbone == "frozen":
        return None
    cls = Lomo if config.backbone == "lomo" else AdaLomo
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError(f"backbone = {config.backbone!r} but no backbone parameter requires grad; fix: "
                         f"unfreeze the parameters to train, or use backbone='frozen'")
    return cls(trainable, lr=config.backbone_lr)


def wrap(model: nn.Module, config: MeftConfig | None = None, *, tokenizer=None) -> nn.Module:
    """Attach a sparse FFN adapter to every selected decoder layer of `model`, in place.

    Returns `model`, with `model.meft` (MeftRuntime: .optimizer, .backbone_optimizer, .scheduler,
    .stores, .summary(), .summary_table()). The wrapped model starts equal to the base model.
    `tokenizer`: only read with `config.sparse_update > 0` (the background text's tokens; see the module
    docstring).
    """
    config = (config if config is not None else MeftConfig()).validate()
    if hasattr(model, "meft"):
        raise ValueError("model is already wrapped (model.meft exists); call meft.unwrap(model) first")
    targets = find_targets(model, config.target_module)
    chosen = [targets[i] for i in config.layer_indices(len(targets))]
    d = hidden_size_of(model)
    group = data_parallel_group(config)  # None in one process; every rank's config checked under torchrun
    node = None if group is None else node_of(group)  # the node's ranks share one host copy of the stores
    _check_host_ram(config, len(chosen), config.row_width(d), node)  # d with generated keys, else 2d
    device = next(model.parameters()).device
    undo = _Undo({n: p.requires_grad for n, p in model.named_parameters()})
    backbone = list(model.parameters())
    rt = scheduler = None
    try:
        if config.backbone == "frozen":
            for p in backbone:
                p.requires_grad_(False)
        adapters, opts = [], []
        for i, t in enumerate(chosen):
            ad, opt = _attach(t, i, d, config, device, undo, node)
            adapters.append(ad)
            opts.append(opt)
        backbone_optimizer = _backbone_optimizer(config, backbone)
        scheduler, meter = _build_scheduler(config, opts, device, group)
        rt = MeftRuntime(model, config, adapters, opts, scheduler, device=device, meter=meter, undo=undo,
                         backbone_params=backbone, backbone_optimizer=backbone_optimizer)
        if config.sparse_update:
            _capture_background(model, rt, config, tokenizer)
    except BaseException:
        if rt is not None:
            rt.detach()
        elif scheduler is not None:
            scheduler.close()
        undo(model)  # leave the model as it was given
        raise
    model.meft = rt
    return model


def _saved_tokenizer(model):
    """The tokenizer saved in the model's own folder (`config._name_or_path`), or None."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - no tokenizer there: training asks for one (SparseUpdate.idf)
        return None


def _capture_background(model, rt: MeftRuntime, config: MeftConfig, tokenizer) -> None:
    tok = tokenizer if tokenizer is not None else _saved_tokenizer(model)
    if tok is not None:
        rt.capture_background(model, background_token_ids(tok, config.sparse_background_tokens,
                                                          source=config.sparse_background))


class _Undo:
    """What wrap changed in the model: replaced modules, input taps, requires_grad flags."""
    def __init__(self, grad_flags: dict[str, bool]):
        self.grad_flags, self.modules, self.taps = grad_flags, [], []

    def __call__(self, model: nn.Module) -> None:
        for h in self.taps:
            h.remove()
        for parent, name, base in self.modules:
            setattr(parent, name, base)
        for n, p in model.named_parameters():
            if n in self.grad_flags:
                p.requires_grad_(self.grad_flags[n])


def _attach(t, i: int, d: int, config: MeftConfig, device, undo: _Undo, node=None):
    """Adapter `i` around target t (module replaced, input tapped if split) + its store (in the node's shared
    memory under torch.distributed with several ranks per node) and optimizer."""
    if config.generated_keys:  # values only, zeros; the keys are generated where they are used
        store = RowStore(config.adapter_rows, d, state_dtype=config.state, node=node)  # [N, d]
        keys = key_table(config.adapter_rows, seed=config.seed, layer=t.layer, d=d)  # [N, d] fp32, CPU
    else:
        store = RowStore(config.adapter_rows, 2 * d, init=row_init(d, config.seed, t.layer),
                         state_dtype=config.state, node=node)  # [N, 2d] = [K | V]
        keys = store.weights[:, :d]
    gate = init_gate(keys, config.expert_size).to(device)  # [E, d] from the keys
    base = getattr(t.parent, t.out_name)
    ad = SparseFFNAdapter(base, index=i, layer=t.layer, d=d, gate=gate, expert_size=config.expert_size,
                          scale=config.scale, active_per_token=config.active_per_token,
                          compute_dtype=config.compute, train_keys=config.key_lr is None)
    ad.train(base.training)  # a new module would otherwise be in training mode in an eval model
    setattr(t.parent, t.out_name, ad)
    undo.modules.append((t.parent, t.out_name, base))
    if t.split:
        undo.taps.append(getattr(t.parent, t.in_name).register_forward_pre_hook(ad.tap))
    return ad, SparseAdamW(store, lr=config.adapter_lr, weight_decay=config.weight_decay, rule=config.row_optimizer)


def unwrap(model: nn.Module) -> nn.Module:
    """Remove the adapters (restoring the original modules and requires_grad flags); returns model."""
    rt = getattr(model, "meft", None)
    if rt is None:
        raise ValueError("model is not wrapped (no model.meft); nothing to unwrap")
    rt.detach()
    rt.undo(model)
    del model.meft
    return model
