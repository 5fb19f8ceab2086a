"""The trainers compared by experiments/knowledge and experiments/bench_step.py, and what each one
would keep resident on the GPU.

Owns one small `Trainer` per method, all driving the same HF causal LM with one `step(batch)`:

* "meft"          MEFT sparse adapter, rows on the host (`meft.wrap`, backbone frozen); the step is
                  `meft.train.train_step`, exactly what `meft train` runs.
* "meft_sparse"   "meft" with sparse memory finetuning (`MeftConfig.sparse_update` = SPARSE_UPDATE_EXPERTS
                  experts per layer per step, a quarter of the default 32-expert budget).
* "meft_adalomo"  the same plus an AdaLomo backbone fused into backward (`MeftConfig.backbone`).
* "lora8/16/64"   LoRA r=8/16/64 on every linear layer of the decoder through the real `peft`
                  (`target_modules="all-linear"`, alpha = 2r, no dropout), torch AdamW.
* "dense"         MEFT's "PA" baseline: a dense parallel adapter of `rows` rows per layer, every row
                  resident and trained (`meft.adapter.DenseParallelAdapter`, keys initialised like
                  MEFT's generated keys, `meft.adapter.key_table`, values 0), torch AdamW.
* "full_adalomo"  full fine-tuning with `meft.AdaLomo` (update fused into backward).

Every trainer steps on packed micro-batches where its `pack` is set (`build_trainer(pack=True)`, as the
knowledge runs do): the layout `meft train` computes (`meft.train.lay_out`: the right-padded batch as one
sequence, no padding, a shared prompt prefix once, a block-diagonal attention mask and per-example
position ids, so every token sees and is placed as in the padded batch), for MEFT through
`meft.train.train_step(pack=True)` itself and for the others (plain HF / peft models) through the same
`lay_out` of the underlying HF model; where a model or batch does not pack, the padded batch is used.

`device_memory()` computes the device-resident *training state* of a method from the live objects
(no activations: they are the same backbone activations for every method at a given batch, and a CPU
run cannot measure GPU memory): weights of every parameter that sits on the device, gradients
(AdamW-trained parameters: one fp32 gradient each; fused Lomo / AdaLomo: see `_fused_bytes`),
optimizer state (AdamW: two fp32 moments; AdaLomo: the bytes of its actual state tensors), and for
MEFT the active rows: per layer the device row buffer
[max_active_rows, 2d] in the wire dtype, plus its compute-dtype copy when the dtypes differ (cached
from forward until backward pushes its gradient), plus one row gradient [max_active_rows, 2d]; the
same rule as `meft plan`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from meft.train import causal_lm_loss, lay_out, train_step

__all__ = ["METHODS", "build_trainer", "device_memory", "Trainer"]

METHODS = ("meft", "meft_sparse", "meft_adalomo", "lora8", "lora16", "lora64", "dense", "full_adalomo")
# meft_sparse: experts updated per layer per step, of the row budget's max_active_rows // expert_size (32 by
# default): a quarter, so a step still trains a fact's most specific experts (a batch of 16 questions routes
# about 4 tokens x 4 experts each to the budget) while most active rows, the ones general text shares, stay put
SPARSE_UPDATE_EXPERTS = 8


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


class Trainer:
    """One method around one model: `step(batch) -> (loss, labelled tokens)`, `close()`."""
    def __init__(self, method: str, model: nn.Module, *, adam=None, fused=None, rt=None, trained=(),
                 pack: bool = False):
        self.method, self.model = method, model
        self.adam, self.fused, self.rt = adam, fused, rt   # torch AdamW | AdaLomo | MeftRuntime
        self.trained = list(trained)                      # device params updated by `adam`
        self.pack = pack                                  # step on the packed layout where a batch packs

    @property
    def inner(self) -> nn.Module:
        """The HF causal LM itself (peft's wrapper hides `logits_to_keep`; its base model carries the LoRA layers)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def step(self, batch: dict) -> tuple[float, int]:
        """One optimizer step on `batch` (right-padded input_ids / attention_mask / labels; on the CPU when
        packing); every method uses the same loss (`meft.train.causal_lm_loss`: LM head only at labelled
        positions, as `meft train` does). Returns (loss, labelled tokens)."""
        labelled = int((batch["labels"] != -100).sum())
        if self.rt is not None:
            return train_step(self.model, self.rt, [batch], 1, pack=self.pack)[0], labelled
        inner = self.inner
        device = next(inner.parameters()).device
        batch = {k: v.to(device) for k, v in lay_out(inner, batch, self.pack).items()}
        loss = causal_lm_loss(inner, batch)
        if self.fused is not None:
            self.fused.backward(loss)
            self.fused.step()
        else:
            loss.backward()
            self.adam.step()
            self.adam.zero_grad(set_to_none=True)
        return float(loss.detach()), labelled

    def close(self) -> None:
        if self.rt is not None:
            self.rt.close()


def _meft(model, *, seed, rows, max_active_rows, expert_size, adapter_lr, router_lr, backbone,
          backbone_lr, state_dtype, sparse_update=0):
    import meft

    cfg = meft.MeftConfig(adapter_rows=rows, expert_size=expert_size, max_active_rows=max_active_rows,
                          adapter_lr=adapter_lr, router_lr=router_lr, backbone=backbone,
                          backbone_lr=backbone_lr, state_dtype=state_dtype, seed=seed,
                          sparse_update=min(sparse_update, max_active_rows // expert_size - 1))
    meft.wrap(model, cfg)
    return model, {"rt": model.meft}


def _lora(model, *, r, lr):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, {"adam": torch.optim.AdamW(trained, lr=lr), "trained": trained}


def _dense(model, *, seed, rows, lr):
    from meft.adapter import DenseParallelAdapter, attach_dense, hidden_size_of, key_table
    from meft.config import MeftConfig

    d = hidden_size_of(model)
    dtype = next(model.parameters()).dtype
    trained = attach_dense(model, MeftConfig(adapter_rows=rows, expert_size=1, max_active_rows=1), dtype)
    adapters = [m for m in model.modules() if isinstance(m, DenseParallelAdapter)]
    device = next(model.parameters()).device
    for ad in adapters:  # attach_dense builds the adapter rows on the CPU; `.to` moves them in place (same Parameters)
        ad.to(device)
    with torch.no_grad():
        for i, ad in enumerate(adapters):  # keys exactly as MEFT's generated keys start, values 0
            ad.keys.copy_(key_table(rows, seed=seed, layer=i, d=d))
            ad.values.zero_()
            ad.keys.requires_grad_(True)
            ad.values.requires_grad_(True)
    return model, {"adam": torch.optim.AdamW(trained, lr=lr, weight_decay=0.0), "trained": trained}


def _full_adalomo(model, *, lr):
    from meft.lomo import AdaLomo

    for p in model.parameters():
        p.requires_grad_(True)
    return model, {"fused": AdaLomo(model, lr=lr)}


def build_trainer(method: str, model: nn.Module, *, seed: int = 0, rows: int = 4096,
                  max_active_rows: int = 1024, expert_size: int = 32, lr: float = 1e-3,
                  backbone_lr: float = 1e-3, state_dtype: str = "float32",
                  router_lr: float | None = None, pack: bool = False) -> Trainer:
    """Turn a freshly loaded `model` (training mode) into `method`'s trainer; see the module docstring.

    `lr` is the AdamW lr of every AdamW-trained tensor; MEFT's router gates use `router_lr` if given.
    `pack`: step on packed micro-batches (see the module docstring; decide with `meft.data.resolve_packing`)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {METHODS}")
    torch.manual_seed(seed)
    model.train()
    if method in ("meft", "meft_sparse", "meft_adalomo"):
        model, kw = _meft(model, seed=seed, rows=rows, max_active_rows=max_active_rows,
                          expert_size=expert_size, adapter_lr=lr, state_dtype=state_dtype,
                          router_lr=lr if router_lr is None else router_lr,
                          backbone="adalomo" if method == "meft_adalomo" else "frozen", backbone_lr=backbone_lr,
                          sparse_update=SPARSE_UPDATE_EXPERTS if method == "meft_sparse" else 0)
    elif method.startswith("lora"):
        model, kw = _lora(model, r=int(method[4:]), lr=lr)
    elif method == "dense":
        model, kw = _dense(model, seed=seed, rows=rows, lr=lr)
    else:
        model, kw = _full_adalomo(model, lr=backbone_lr)
    return Trainer(method, model, pack=pack, **kw)


def _update_bytes(opt, p: torch.Tensor) -> int:
    """Bytes alive while the fused hook updates `p`: its gradient (in `p`'s dtype; freed when the hook
    returns) plus the update's fp32 temporaries. `meft.lomo` walks the update in row chunks of at most
    `opt.chunk_bytes` of fp32, so a temporary is one chunk, never a whole-tensor copy: the cast gradient
    chunk (bf16 gradient, or clipping), the cast parameter chunk (bf16 parameter), and for AdaLomo the
    chunk it computes in (squared gradient, then the update) plus its factored second-moment vectors
    (this step's row / column means and the row / column factors, fp32)."""
    from meft.lomo import AdaLomo

    chunk = min(opt.chunk_bytes, p.numel() * 4)
    fp32 = p.dtype == torch.float32
    temps = chunk * ((not fp32 or opt.clip != "none") + (not fp32))
    if isinstance(opt, AdaLomo):
        temps += chunk
        if p.dim() >= 2:
            temps += 2 * 4 * (p.numel() // p.shape[-2] + p.numel() // p.shape[-1])
    return p.numel() * p.element_size() + temps


def _fused_bytes(opt, model: nn.Module) -> tuple[int, int]:
    """(gradient bytes alive at the peak, optimizer-state bytes) of a fused-backward optimizer.

    One parameter is updated at a time (`_update_bytes`), except that a tied input/output embedding
    accumulates its gradient from the LM head's backward until the embedding's, so that gradient stays
    alive while every other parameter is updated."""
    params = [p for g in opt.param_groups for p in g["params"]]
    alive = {id(p): _update_bytes(opt, p) for p in params}
    peak = max(alive.values(), default=0)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = emb.weight if head is not None and head.weight is emb.weight and id(emb.weight) in alive else None
    if tied is not None:
        others = [b for i, b in alive.items() if i != id(tied)]
        peak = max(peak, tied.numel() * tied.element_size() + max(others, default=0))
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return peak, state


def _active_rows_bytes(rt) -> int:
    from meft.config import parse_dtype

    c = rt.config
    r = c.budget_experts * c.expert_size
    width = rt.stores[0].width
    wire = parse_dtype(c.wire_dtype)
    compute = parse_dtype(c.compute_dtype) or next(rt.adapters[0].parameters()).dtype
    one_wire, one_compute = r * width * wire.itemsize, r * width * compute.itemsize
    n = len(rt.adapters)
    return n * one_wire + (n * one_compute if compute != wire else 0) + one_compute


def device_memory(tr: Trainer) -> dict:
    """Device-resident training state of `tr` in bytes: weights, grads, optimizer, active_rows, total."""
    weights = _nbytes(tr.model.parameters())
    grads = opt = rows = 0
    adam_params = list(tr.trained)
    if tr.rt is not None:
        adam_params = [ad.gate for ad in tr.rt.adapters]  # router gates: AdamW on the device
        rows = _active_rows_bytes(tr.rt)
        if tr.rt.backbone_optimizer is not None:
            grads, opt = _fused_bytes(tr.rt.backbone_optimizer, tr.model)
    if tr.fused is not None:
        grads, opt = _fused_bytes(tr.fused, tr.model)
    grads += sum(p.numel() * 4 for p in adam_params)
    opt += sum(2 * p.numel() * 4 for p in adam_params)
    return {"weights": weights, "grads": grads, "optimizer": opt, "active_rows": rows,
            "total": weights + grads + opt + rows,
            "trainable_params": _trainable_params(tr)}


def _trainable_params(tr: Trainer) -> int:
    n = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
    if tr.rt is not None:
        n += sum(s.n_rows * s.width for s in tr.rt.stores)
    return n
