"""Look inside a saved adapter: which rows and experts were trained, how large their values grew, and
which training examples route to the most-trained experts. Behind `meft inspect`.

Owns three reads of an adapter folder (`meft.adapter.saving`'s format):

* `adapter_stats`: per layer, rows and experts ever trained and each expert's value norm. A row was
  trained if its per-row AdamW step count is > 0; an adapter folder holds no step counts, so they come
  from a training checkpoint's ``stores.safetensors`` when one is given and its rows equal the adapter's,
  else trained rows are inferred from nonzero value halves (values start at exactly 0, `row_init`).
  The inference finds the rows that *changed*: a row that was updated but whose relu never fired for
  any token got an all-zero value gradient and keeps values of exactly 0, so it is not counted (the
  step counts count it). `LayerStats.source` says which rule was used.
* `route_examples`: run tokenized examples through the wrapped model (eval, no grad); a forward pre-hook
  on each adapter module (`model.meft.adapters[i]`) routes its FFN input with `meft.adapter.route` and
  the adapter's gate (no row budget, as in inference) and accumulates each example's mean gate weight
  per expert, ``[n_examples, E]`` per layer.
* `report_tables` / `plot_usage`: terminal tables (`offload.text.format_table`) and a PNG (matplotlib).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from meft.adapter.router import gate_weights, route
from meft.adapter.saving import CONFIG_NAME, WEIGHTS_NAME
from offload.text import format_table

__all__ = ["LayerStats", "adapter_stats", "route_examples", "top_experts", "report_tables", "plot_usage"]

_HIST_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class LayerStats:
    layer: int                   # decoder-layer index in the model
    index: int                   # position among the adapters (= model.meft.adapters[index])
    expert_size: int
    trained_per_expert: torch.Tensor  # [E] int64 rows of each expert ever trained
    value_norm: torch.Tensor          # [E] fp32 Frobenius norm of each expert's value rows
    source: str                  # "step counts" (from a checkpoint) or "nonzero values" (inferred)

    @property
    def n_experts(self) -> int:
        return int(self.value_norm.numel())

    @property
    def n_rows(self) -> int:
        return self.n_experts * self.expert_size

    @property
    def trained_rows(self) -> int:
        return int(self.trained_per_expert.sum())

    @property
    def trained_experts(self) -> int:
        return int((self.trained_per_expert > 0).sum())


def _meta(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{adapter_dir!r} is not a meft adapter folder ({CONFIG_NAME} is missing); "
                                "pass the adapter folder (run_dir/adapter) or the run folder of `meft train`")
    with open(path) as f:
        return json.load(f)


def _checkpoint_steps(ckpt, i: int, rows: torch.Tensor) -> torch.Tensor | None:
    """Layer i's per-row step counts [N] from an open checkpoint, if its rows are the adapter's."""
    if ckpt is None or f"{i}.steps" not in ckpt.keys():
        return None
    if not torch.equal(ckpt.get_tensor(f"{i}.weights"), rows):
        return None
    return ckpt.get_tensor(f"{i}.steps")


def adapter_stats(adapter_dir: str, checkpoint_dir: str | None = None) -> list[LayerStats]:
    """Per-layer usage of the adapter in `adapter_dir` (see module docstring); `checkpoint_dir` is a
    `meft train` checkpoint folder (``checkpoints/step-N``) whose step counts are used when they match."""
    meta = _meta(adapter_dir)
    d, es = meta["hidden_size"], meta["config"]["expert_size"]
    stores = os.path.join(checkpoint_dir, "stores.safetensors") if checkpoint_dir else None
    out = []
    with safe_open(os.path.join(adapter_dir, WEIGHTS_NAME), framework="pt") as f, \
            (safe_open(stores, framework="pt") if stores and os.path.isfile(stores) else _Null()) as ckpt:
        for i, layer in enumerate(meta["layers"]):
            if f"layers.{layer}.values" in f.keys():  # generated keys: the folder holds values only
                rows = values = f.get_tensor(f"layers.{layer}.values")  # [N, d] fp32
            else:
                rows = f.get_tensor(f"layers.{layer}.rows")  # [N, 2d] fp32: keys | values
                values = rows[:, d:]  # [N, d]
            steps = _checkpoint_steps(ckpt, i, rows)
            trained = steps > 0 if steps is not None else values.abs().amax(dim=1) > 0  # [N] bool
            n_exp = rows.shape[0] // es
            out.append(LayerStats(
                layer=layer, index=i, expert_size=es,
                trained_per_expert=trained.view(n_exp, es).sum(dim=1),
                value_norm=values.pow(2).sum(dim=1).view(n_exp, es).sum(dim=1).sqrt(),
                source="step counts" if steps is not None else "nonzero values"))
    return out


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def route_examples(model, batches, experts_per_token: int | None = None) -> list[torch.Tensor]:
    """Mean gate weight of every example on every expert, per adapter: ``[n_examples, E]`` fp32 each.

    `batches` yields ``{"input_ids", "attention_mask"}`` ``[B, T]`` (right-padded); padding never counts.
    """
    rt = model.meft
    k = experts_per_token or rt.config.experts_per_token
    sums: list[list[torch.Tensor]] = [[] for _ in rt.adapters]
    current: dict = {}

    def hook(idx: int):
        def pre(module, args):
            x = module._tapped if module._tapped is not None else args[0]
            mask = current["mask"]  # [B, T]
            x2 = x.reshape(-1, module.d)  # [B*T, d]
            if x2.shape[0] != mask.numel():
                raise ValueError(f"adapter {idx}: FFN input has {x2.shape[0]} tokens, the batch {mask.numel()}")
            n_exp = module.gate.shape[0]
            r = route(x2, module.gate, experts_per_token=k, expert_size=module.expert_size,
                      max_active_rows=n_exp * module.expert_size)  # no budget: every token's own top experts
            w = torch.zeros(x2.shape[0], n_exp, device=x2.device)  # [B*T, E]
            valid = r.kept >= 0  # the kept set has a fixed size; unused slots are -1
            w[:, r.kept[valid]] = gate_weights(x2, module.gate, r)[:, valid]
            w = w.view(*mask.shape, n_exp) * mask[..., None]  # [B, T, E]
            sums[idx].append((w.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)).float().cpu())
        return pre

    handles = [ad.register_forward_pre_hook(hook(i)) for i, ad in enumerate(rt.adapters)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids, mask = batch["input_ids"].to(rt.device), batch["attention_mask"].to(rt.device)
            current["mask"] = mask
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [torch.cat(s) if s else torch.zeros(0) for s in sums]


def top_experts(stats: list[LayerStats], n: int) -> list[tuple[int, int]]:
    """(adapter index, expert) of the `n` experts with the largest value norm, over all layers."""
    flat = [(float(s.value_norm[e]), s.index, e) for s in stats for e in range(s.n_experts)]
    flat.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(i, e) for norm, i, e in flat[:n] if norm > 0]


def _histogram(s: LayerStats) -> str:
    """Experts by share of their rows trained: 0 | <=25% | <=50% | <=75% | <=100%."""
    share = s.trained_per_expert.float() / s.expert_size
    counts = [int((share == 0).sum())] + [int(((share > lo) & (share <= hi)).sum())
                                         for lo, hi in zip(_HIST_BINS, _HIST_BINS[1:])]
    return " | ".join(str(c) for c in counts)


def report_tables(stats: list[LayerStats], routing: list[torch.Tensor] | None = None,
                  labels: list[str] | None = None, top: int = 5, per_expert: int = 3) -> str:
    """Per-layer usage table, the top experts by value norm, and (with `routing`) their top examples."""
    rows = [[s.layer, f"{s.trained_rows:,} / {s.n_rows:,}", f"{s.trained_experts} / {s.n_experts}",
             _histogram(s), round(float(s.value_norm.norm()), 4), round(float(s.value_norm.max()), 4)]
            for s in stats]
    text = format_table(rows, ["layer", "rows trained", "experts trained",
                               "experts by rows trained (0 | <=25 | <=50 | <=75 | <=100%)",
                               "value norm", "max expert norm"], right={0, 1, 2, 4, 5})
    text += f"\n(trained = {stats[0].source})" if stats else ""
    best = top_experts(stats, top)
    if not best:
        return text + "\n\nno expert has nonzero values: the adapter was never trained"
    head = ["layer", "expert", "rows trained", "value norm"]
    trows = []
    for i, e in best:
        s = stats[i]
        row = [s.layer, e, f"{int(s.trained_per_expert[e])} / {s.expert_size}", round(float(s.value_norm[e]), 4)]
        if routing is not None and labels:
            w = routing[i][:, e]  # [n_examples]
            order = torch.argsort(w, descending=True, stable=True)[:per_expert]
            row.append("; ".join(f"{labels[j][:40]} ({float(w[j]):.2f})" for j in order.tolist()))
        trows.append(row)
    if routing is not None and labels:
        head.append("examples routed most here (mean gate weight per token)")
    return text + f"\n\ntop {len(best)} experts by value norm:\n" + format_table(trows, head, right={0, 1, 2, 3})


def plot_usage(stats: list[LayerStats], path: str) -> str | None:
    """PNG: value norm and share of rows trained per (layer, expert); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("meft: matplotlib is not installed, so no PNG; `pip install meft[plots]` adds it")
        return None
    norms = torch.stack([s.value_norm for s in stats]).numpy()  # [L, E]
    share = torch.stack([s.trained_per_expert.float() / s.expert_size for s in stats]).numpy()  # [L, E]
    fig, axes = plt.subplots(2, 1, figsize=(10, 2 + 0.5 * len(stats) * 2), dpi=110, squeeze=False)
    for ax, data, title in ((axes[0, 0], norms, "value norm per expert"),
                            (axes[1, 0], share, "share of the expert's rows trained")):
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(stats)), [str(s.layer) for s in stats])
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
