"""MeftConfig: every knob of the sparse FFN adapter, with a help string per field and full validation.

Owns the dataclass, its validation (every bad field reported at once, each with field, value and fix,
in one ValueError), the sizes derived from it (experts, the row budget) and its JSON round trip (dtypes
are stored as strings such as "bfloat16"). Fields are declared with `meft.option_field.opt` (a help
string per field in `metadata`, as peft's tuner configs do), which is also what the CLI reads;
dtype names are parsed by `meft.dtypes`.

Defaults are sized for SmolLM2-135M (d=576, 30 layers, FFN width 1536):
* adapter_rows=4096 per layer: 2.7x the FFN's own 1536 neurons; with frozen, generated keys a host row is its
  value (width d=576), so one layer is 9.4 MB of fp32 weights (+2x moments) and the whole adapter (71M stored
  params, 142M with its keys) lives in host RAM (~0.8 GiB with fp32 moments), never on the GPU.
* expert_size=16 -> E=256 experts, MEFT's best "about 4*sqrt(N)" (4*sqrt(4096) = 256).
* experts_per_token=4: each token sees 4*16 = 64 candidate rows, softmax-weighted.
* max_active_rows=1024 (a quarter of the rows, 64 experts): the adapter then costs fewer FLOPs than the
  base FFN (T*1024*2d vs T*1536*3d per layer), and moves 1024*576*2 B = 1.2 MB per layer each way in
  bf16 (~35 MB per micro-batch for 30 layers: a few ms over PCIe 4).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from meft.dtypes import (
    BACKBONE_DTYPES,
    COMPUTE_DTYPES,
    DTYPES,
    STATE_DTYPES,
    WIRE_DTYPES,
    dtype_name,
    parse_backbone_dtype,
    parse_dtype,
)
from meft.option_field import OptionFields, opt
from offload.updates import CLIP_MODES

__all__ = ["MeftConfig", "DTYPES", "WIRE_DTYPES", "STATE_DTYPES", "COMPUTE_DTYPES", "BACKBONE_DTYPES", "parse_dtype",
           "dtype_name", "parse_backbone_dtype", "budget_experts", "opt"]

_BACKBONES = ("frozen", "lomo", "adalomo")
INFERENCE_ROWS = ("auto", "resident", "fetch")  # the modes of meft.adapter.inference.InferenceRows
_PREFETCH = ("none", "lookahead")
_BALANCE = ("none", "bias")  # router load balancing (meft.adapter.router)
BACKGROUND_SOURCES = ("pydoc", "questions")  # sparse_update's background (meft.data.background)
FETCH_MODES = ("staged", "zero_copy")  # how offloaded rows reach the device (offload.TransferScheduler)
KEY_SOURCES = ("auto", "generated", "stored")  # where frozen keys come from (meft.adapter.keys)
_AUTO_GENERATES = True  # key_source="auto" with frozen keys: generated (True) or stored (False)


def budget_experts(max_active_rows: int, expert_size: int, n_experts: int) -> int:
    """The row budget in whole experts: max_active_rows // expert_size, at least 1, at most n_experts.
    The one definition of the budget (the router and every size computed from a config use it)."""
    return min(n_experts, max(1, max_active_rows // expert_size))


@dataclass
class MeftConfig(OptionFields):
    # sizes: see the module docstring
    adapter_rows: int = opt(
        4096, "Rows (neurons) of the sparse adapter per layer; the host keeps each row's value (d wide; "
        "[key | value], 2d wide, with key_source 'stored').")
    expert_size: int = opt(
        16, "Contiguous rows per expert; E = adapter_rows / expert_size (MEFT: E ~ 4*sqrt(N)).")
    experts_per_token: int = opt(
        4, "Experts each token routes to (top scores of x @ G.T); gate = softmax over them.")
    max_active_rows: int = opt(
        1024, "Row budget per layer per micro-batch; experts kept by total routing weight.")
    active_per_token: int | None = opt(
        None, "Optional exact per-token top-K among its candidate rows (None = all).")
    scale: float = opt(1.0, "Multiplier of the adapter output added to the FFN output.")
    layers: Any = opt("all", "Decoder layers that get an adapter: 'all', a list of indices, or an int stride.")
    target_module: str | None = opt(
        None, "Dotted path of the FFN with '*' for the layer index, e.g. 'model.layers.*.mlp' (or "
        "'<layers>.*.<in>><out>' for an inlined FFN); None = built-in map for the model type, then a search.")
    wire_dtype: str = opt("bfloat16", "Dtype of rows sent to the device and of row gradients sent back.")
    compute_dtype: str = opt(
        "auto", "Dtype of the adapter math on the device; 'auto' = dtype of the FFN input.")
    state_dtype: str = opt("float32", "Dtype of the host AdamW moments (bfloat16 halves their host RAM).")
    backbone: str = opt(
        "frozen", "Backbone treatment: 'frozen', or trained in backward by 'lomo' / 'adalomo'.")
    backbone_lr: float = opt(1e-5, "Learning rate of the backbone when backbone is 'lomo' or 'adalomo'.")
    # A row is updated only in the steps that route to it, so rows want ~10-30x LoRA's lr (the quick start's lr
    # sweep in BENCHMARKS.md), while a router as fast as the rows keeps moving facts to rows that have not
    # learned them: hence router_lr well below adapter_lr.
    adapter_lr: float = opt(3e-2, "AdamW learning rate of the adapter rows (values start at zero).")
    router_lr: float = opt(1e-3, "AdamW learning rate of the router gates (on the device); keep it below "
                                "adapter_lr so routing stays stable while rows learn.")
    weight_decay: float = opt(0.0, "Decoupled AdamW weight decay of the adapter rows (touched rows only).")
    row_optimizer: str = opt(
        "adamw", "Update rule of the adapter rows on the host: 'adamw' (lazy AdamW over the touched rows) or "
        "'sgd' (plain SGD, as sparse memory finetuning: a row's step is adapter_lr x its gradient, so rows a "
        "batch barely uses barely move; no moments are read or written; needs a much larger adapter_lr).")
    staleness: int = opt(
        0, "0: row updates finish inside the step; 1: they overlap the next step (delayed update).")
    clip: str = opt(
        "none", "Adapter gradient clipping: 'none', per 'layer', or by the 'global' norm of the step.")
    max_norm: float = opt(1.0, "Clipping threshold for clip='layer'/'global' (also clips the router gates).")
    prefetch: str = opt(
        "none", "'none' (exact, default) or 'lookahead': route layer l+1 from layer l's input and start "
        "its fetch early; rows it then misses are fetched when needed.")
    grad_accum_steps: int = opt(1, "Micro-batches per optimizer step (tells the scheduler which one is last).")
    offload: bool = opt(
        True, "Rows on the host, moved by the TransferScheduler; False keeps all rows resident on the "
        "compute device (same update rule; the reference twin).")
    inference_rows: str = opt(
        "auto", "Rows for eval / generate() with offload: 'resident' (every row on the compute device in "
        "the wire dtype, refreshed after training: no host sync per token), 'fetch' (read through the host "
        "per forward), or 'auto' (resident when they take at most a quarter of the free device memory).")
    fetch_mode: str = opt(
        "staged", "How offloaded rows reach the device: 'staged' (the host gathers the rows into pinned "
        "staging, one H2D copy per layer) or 'zero_copy' (the device reads them straight from a pinned, "
        "device-mapped wire-dtype mirror of every store: no ids round trip or CPU gather before the "
        "adapter, at the cost of the mirror's pinned host RAM: adapter_rows x W x wire bytes per layer, W = d "
        "(2d with stored keys)).")
    copy_timing: bool = opt(
        False, "Time every row copy with CUDA events (exact copy durations for the traffic meter; "
        "`meft profile` turns it on). Off: copies carry host-side time stamps only.")
    compile_router: bool = opt(
        False, "Run the fixed-shape routing through torch.compile (equal results; fewer, fused kernels). The "
        "first step of a process compiles it (tens of seconds on a CPU).")
    seed: int = opt(0, "Seed of the key and router-gate initialisation.")
    # Stable addressing: trained at the rows' lr, keys move a large share of their init scale per step, so which
    # rows fire for a token is redrawn every few steps. MEFT's CPU path freezes them.
    # float or None, typed Any so that the command line reads JSON: `--key-lr null` gives None
    key_lr: Any = opt(
        0.0, "Learning rate of the rows' keys (the first d columns of each row): 0.0 freezes them (MEFT; "
        "the rows a token fires stay put while the values learn), None (null) trains them with the values "
        "at adapter_lr. Other values need a per-column lr in the host SparseAdamW, which it does not have yet.")
    key_source: str = opt(
        "auto", "Where the rows' keys come from: 'generated' (frozen keys computed on the device from (seed, "
        "layer, row); the host stores, moves and updates values only: half the bytes), 'stored' (rows are "
        "[key | value], 2d wide; needed to train keys), or 'auto' (generated when key_lr is 0, else stored).")
    balance: str = opt(
        "none", "Router load balancing against collapse: 'none', or 'bias' (DeepSeek-V3's auxiliary-loss-free "
        "balancing: a per-expert bias added to the scores only for choosing experts, moved after every "
        "optimizer step towards equal demand). Off until measured.")
    balance_rate: float = opt(
        1e-2, "Step of the per-expert routing bias per optimizer step with balance='bias'; scores are x . G "
        "with unit-norm gate rows at init (about one unit of spread), so 1e-2 moves an expert by that in ~100 steps.")
    # Sparse memory finetuning (Lin et al. 2025, arXiv 2510.15103): every token of general text routes into
    # freshly trained rows, so MEFT forgets; updating only the experts the training data uses much more than
    # general text keeps general text on rows that training did not move.
    sparse_update: int = opt(
        0, "0: off (every active row is updated). t > 0: each micro-batch updates only the rows of the t "
        "active experts per layer most specific to it: tf (the batch's real tokens routed to the expert) x "
        "idf (log((B + 1) / (bg + 1)), bg = background tokens routed to it with the current gate); the other "
        "active rows get no update at all (weights, moments, step counts unchanged).")
    sparse_background_tokens: int = opt(
        2048, "Background tokens for sparse_update's idf, tokenized at wrap; their FFN inputs stay on the "
        "compute device ([tokens, d] per adapted layer) and are re-routed by the current gates every step.")
    sparse_background: str = opt(
        "pydoc", "What sparse_update's background is (meft.data.background): 'pydoc' = general English prose "
        "(pydoc_data topics, offline; not the ones the knowledge harness scores perplexity on), 'questions' = "
        "built-in world-fact questions through the chat template (none about the trade-off probe's countries), "
        "so the experts every question uses count as general, not as specific to the training data.")
    # Locality loss (in the spirit of WISE, arXiv 2405.14768; meft.adapter.locality): questions the run does not
    # teach ride along in every micro-batch, and their adapter output is pushed towards zero
    locality_weight: float = opt(
        0.0, "Weight lambda of the locality term added to the loss: each micro-batch also carries "
        "locality_background built-in questions the run does not teach (no labels), and the loss gains lambda x the "
        "mean over their tokens of relu(||delta h|| - locality_margin)^2, averaged over adapted layers (delta h: "
        "the adapter's output added to the FFN output). 0 = off.")
    locality_margin: float = opt(
        0.0, "Margin alpha of the locality term: a background token's adapter output is pushed below this norm "
        "(0: towards zero, the term is then the mean ||delta h||^2).")
    locality_background: int = opt(
        4, "Background questions per micro-batch when locality_weight > 0 (packed as extra segments, no labels).")

    # ---- validation -------------------------------------------------------------------------------
    def _problems(self) -> list[tuple[str, Any, str]]:
        return (self._size_problems() + self._layer_problems() + self._dtype_problems()
                + self._choice_problems() + self._number_problems() + self._routing_problems())

    def _routing_problems(self) -> list[tuple[str, Any, str]]:
        bad = []
        if self.balance not in _BALANCE:
            bad.append(("balance", self.balance, "one of " + ", ".join(repr(b) for b in _BALANCE)))
        r = self.balance_rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
            bad.append(("balance_rate", r, "a number >= 0, e.g. 1e-2"))
        return bad + self._key_lr_problems() + self._sparse_problems()

    def _sparse_problems(self) -> list[tuple[str, Any, str]]:
        bad = []
        if self._bad_int("sparse_update", 0):
            bad.append(("sparse_update", self.sparse_update, "0 (off) or a positive int: experts updated per layer "
                                                             "per micro-batch, e.g. 8"))
        elif self.sparse_update and not self._bad_int("adapter_rows", 1) and not self._bad_int("expert_size", 1) \
                and not self._bad_int("max_active_rows", 1) and self.adapter_rows % self.expert_size == 0 \
                and self.sparse_update >= self.budget_experts:
            bad.append(("sparse_update", self.sparse_update,
                        f"fewer than the row budget in experts ({self.budget_experts} = max_active_rows // "
                        f"expert_size), else every active row is updated anyway; or 0 (off)"))
        if self.sparse_background not in BACKGROUND_SOURCES:
            bad.append(("sparse_background", self.sparse_background,
                        "one of " + ", ".join(repr(b) for b in BACKGROUND_SOURCES)))
        if self._bad_int("sparse_background_tokens", 1):
            bad.append(("sparse_background_tokens", self.sparse_background_tokens,
                        "a positive int (background tokens for sparse_update's idf), e.g. 2048"))
        return bad

    def _key_lr_problems(self) -> list[tuple[str, Any, str]]:
        v = self.key_lr
        if v is None:
            return [("key_source", "generated", "'stored' or 'auto' with key_lr=None: generated keys are frozen; "
                                               "or key_lr=0.0")] if self.key_source == "generated" else []
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != 0:
            return [("key_lr", v, "0.0 (frozen keys) or None (keys train at adapter_lr); a separate key lr "
                                  "needs a per-column lr in offload.SparseAdamW, which it does not have yet")]
        wd = self.weight_decay
        if isinstance(wd, (int, float)) and not isinstance(wd, bool) and wd > 0:
            return [("key_lr", v, f"frozen keys need weight_decay = 0 (got {wd}): the host AdamW decays "
                                  "whole rows, keys included; set weight_decay=0, or key_lr=None to train "
                                  "the keys (and decay them) with the values")]
        return []

    def _bad_int(self, name: str, lo: int) -> bool:
        v = getattr(self, name)
        return isinstance(v, bool) or not isinstance(v, int) or v < lo

    def _size_problems(self) -> list[tuple[str, Any, str]]:
        bad = []
        ok_rows, ok_es = not self._bad_int("adapter_rows", 1), not self._bad_int("expert_size", 1)
        if not ok_rows:
            bad.append(("adapter_rows", self.adapter_rows, "a positive int, e.g. 16384"))
        if not ok_es:
            bad.append(("expert_size", self.expert_size, "a positive int dividing adapter_rows, e.g. 32"))
        elif ok_rows and self.adapter_rows % self.expert_size:
            bad.append(("expert_size", self.expert_size, f"must divide adapter_rows={self.adapter_rows}"))
        n_exp = self.adapter_rows // self.expert_size if ok_rows and ok_es else None
        if self._bad_int("experts_per_token", 1):
            bad.append(("experts_per_token", self.experts_per_token, "a positive int, e.g. 4"))
        elif n_exp and self.experts_per_token > n_exp:
            bad.append(("experts_per_token", self.experts_per_token,
                        f"at most the number of experts ({n_exp})"))
        if self._bad_int("max_active_rows", 1):
            bad.append(("max_active_rows", self.max_active_rows,
                        "a positive multiple of expert_size, e.g. 1024"))
        elif ok_es and self.max_active_rows < self.expert_size:
            bad.append(("max_active_rows", self.max_active_rows,
                        f"at least expert_size={self.expert_size} (room for one expert)"))
        apt = self.active_per_token
        if apt is not None and self._bad_int("active_per_token", 1):
            bad.append(("active_per_token", apt, "None (off) or a positive int"))
        if self._bad_int("grad_accum_steps", 1):
            bad.append(("grad_accum_steps", self.grad_accum_steps, "a positive int (micro-batches per step)"))
        if self._bad_int("locality_background", 1):
            bad.append(("locality_background", self.locality_background, "a positive int (questions per "
                        "micro-batch for the locality term), e.g. 4"))
        if self._bad_int("seed", 0):
            bad.append(("seed", self.seed, "an int >= 0"))
        tm = self.target_module
        if tm is not None and (not isinstance(tm, str) or tm.count("*") != 1):
            bad.append(("target_module", tm, "None or a dotted path with one '*', e.g. 'model.layers.*.mlp'"))
        return bad

    def _dtype_problems(self) -> list[tuple[str, Any, str]]:
        bad = []
        for name, allowed in (("wire_dtype", WIRE_DTYPES), ("compute_dtype", COMPUTE_DTYPES),
                              ("state_dtype", STATE_DTYPES)):
            v = getattr(self, name)
            try:
                ok = dtype_name(v) in allowed
            except (ValueError, TypeError):
                ok = False
            if not ok:
                bad.append((name, v, "one of " + ", ".join(repr(a) for a in allowed)))
        return bad

    def _choice_problems(self) -> list[tuple[str, Any, str]]:
        bad = []
        for name, choices in (("backbone", _BACKBONES), ("inference_rows", INFERENCE_ROWS), ("clip", CLIP_MODES),
                              ("prefetch", _PREFETCH), ("fetch_mode", FETCH_MODES), ("key_source", KEY_SOURCES),
                              ("staleness", (0, 1)), ("offload", (True, False)),
                              ("copy_timing", (True, False)), ("compile_router", (False, True)),
                              ("row_optimizer", ("adamw", "sgd"))):
            v = getattr(self, name)
            if v not in choices or type(v) is not type(choices[0]):
                bad.append((name, v, "one of " + ", ".join(repr(c) for c in choices)))
        return bad

    def _number_problems(self) -> list[tuple[str, Any, str]]:
        bad = []
        need = {"scale": "a finite number, e.g. 1.0", "max_norm": "a number > 0",
                "locality_weight": "a number >= 0 (0 = off), e.g. 0.1", "locality_margin": "a norm >= 0, e.g. 0.0"}
        for name in ("scale", "backbone_lr", "adapter_lr", "router_lr", "weight_decay", "max_norm", "locality_weight",
                     "locality_margin"):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if ok and name == "max_norm":
                ok = v > 0
            elif ok and name != "scale":
                ok = v >= 0
            if not ok:
                bad.append((name, v, need.get(name, "a number >= 0")))
        return bad

    def _layer_problems(self) -> list[tuple[str, Any, str]]:
        v = self.layers
        fix = "'all', a list of distinct layer indices >= 0, or a positive int stride"
        if v == "all":
            return []
        if isinstance(v, int) and not isinstance(v, bool):
            return [] if v >= 1 else [("layers", v, fix)]
        if isinstance(v, (list, tuple)) and v and all(isinstance(i, int) and not isinstance(i, bool)
                                                      and i >= 0 for i in v) and len(set(v)) == len(v):
            return []
        return [("layers", v, fix)]

    def validate(self) -> MeftConfig:
        """Raise one ValueError listing every bad field (field, value, fix); return self when valid."""
        bad = self._problems()
        if bad:
            lines = "\n".join(f"  {n} = {v!r}: {fix}" for n, v, fix in bad)
            raise ValueError(f"invalid MeftConfig ({len(bad)} field(s)):\n{lines}")
        return self

    # ---- derived ----------------------------------------------------------------------------------
    @property
    def n_experts(self) -> int:
        return self.adapter_rows // self.expert_size

    @property
    def budget_experts(self) -> int:
        """Experts that fit the row budget (max_active_rows // expert_size, at most n_experts)."""
        return budget_experts(self.max_active_rows, self.expert_size, self.n_experts)

    @property
    def budget_rows(self) -> int:
        """Rows one layer's fetch holds at most per micro-batch: the schedulers' `max_rows`."""
        return self.budget_experts * self.expert_size

    @property
    def generated_keys(self) -> bool:
        """Rows are values only and keys come from `meft.adapter.keys` (key_source, 'auto' resolved)."""
        if self.key_source == "auto":
            return _AUTO_GENERATES and self.key_lr is not None and self.key_lr == 0
        return self.key_source == "generated"

    def row_width(self, d: int) -> int:
        """Host row width for model width d: d (values) with generated keys, else 2d ([key | value])."""
        return d if self.generated_keys else 2 * d

    @property
    def wire(self) -> torch.dtype:
        """`wire_dtype` as a torch dtype (rows down, row gradients back)."""
        return parse_dtype(self.wire_dtype)

    @property
    def state(self) -> torch.dtype:
        """`state_dtype` as a torch dtype (host AdamW moments)."""
        return parse_dtype(self.state_dtype)

    @property
    def compute(self) -> torch.dtype | None:
        """`compute_dtype` as a torch dtype; None = the dtype of the adapter's input."""
        return parse_dtype(self.compute_dtype)

    def layer_indices(self, n_layers: int) -> list[int]:
        """Decoder-layer indices that get an adapter, for a model with n_layers layers."""
        if self.layers == "all":
            return list(range(n_layers))
        if isinstance(self.layers, int):
            return list(range(0, n_layers, self.layers))
        out = sorted(self.layers)
        if out[-1] >= n_layers:
            raise ValueError(f"layers = {self.layers!r}: index {out[-1]} out of range; the model has "
                             f"{n_layers} layers (0..{n_layers - 1})")
        return out

    # ---- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("wire_dtype", "compute_dtype", "state_dtype"):
            try:
                d[name] = dtype_name(d[name])
            except ValueError:
                pass  # left as is; validate() reports it
        if isinstance(d["layers"], tuple):
            d["layers"] = list(d["layers"])
        return d

    def __post_init__(self):
        for name in ("wire_dtype", "compute_dtype", "state_dtype"):
            v = getattr(self, name)
            if isinstance(v, torch.dtype):
                setattr(self, name, dtype_name(v))
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
