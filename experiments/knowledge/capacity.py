"""The capacity-curve protocol: which runs, which lr each method is compared at,
and the numbers the report, the plots and the JSON line are made of.

Owns `CapacityPlan` (fictional facts at each N of `ns`, 3 training phrasings + 1 held-out phrasing per
fact as `meft.data.fictional_facts` makes them, the same batches for every method: same seed, batch size
and steps = epochs x batches per epoch), its cells in run order (base model at every N, then the lr
sweep at the smallest N, then the chosen lr carried to every larger N), the lr selection rule (`RULE`,
`chosen_lrs`), and `summarize` (per method and N: exact match, forgetting against the base model,
device-resident state, host RAM, step time; which cells are missing and why; the JSON summary).
Nothing here trains or prints: `cli` runs the cells, `report` and `plot` present the summary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field

from experiments.knowledge.runner import RunSpec, spec_key

__all__ = ["CAPACITY_METHODS", "CAPACITY_NS", "CAPACITY_LRS", "RULE", "CapacityPlan", "summarize"]

CAPACITY_METHODS = ("meft", "lora8", "lora64", "dense", "meft_adalomo")  # meft and lora8 first: the headline
CAPACITY_NS = (300, 1000, 3000)
# 3 log-spaced AdamW lrs per method (factor ~3) around its best lr in the fixed-size sweeps (BENCHMARKS.md,
# "Knowledge capacity", settings A and B): meft 1e-2, lora8 3e-3, lora64 3e-4, dense 1e-3 (B) / 3e-3 (A);
# meft_adalomo only ever ran at 1e-3 and frozen MEFT's rows want 1e-2, so its grid spans both.
CAPACITY_LRS = {"meft": (3e-3, 1e-2, 3e-2), "lora8": (1e-3, 3e-3, 1e-2), "lora64": (1e-4, 3e-4, 1e-3),
                "dense": (3e-4, 1e-3, 3e-3), "meft_adalomo": (1e-3, 3e-3, 1e-2)}
RULE = ("Every method gets the same tuning budget: the AdamW lrs of its grid (the same number for every "
        "method), each run once on the smallest N at the first seed. It is compared at the lr with the best "
        "*held-out* exact match there (ties: the better trained exact match, then the smaller lr), and that "
        "lr is carried unchanged to every larger N and every other seed; the larger N never choose. "
        "Held-out phrasings choose because the targets are about them; that makes the smallest N's "
        "held-out numbers optimistic for every method alike (chosen on the questions they are scored on), "
        "not the carried ones. Not tuned: MEFT's router lr (the library default), the AdaLomo backbone lr, "
        "adapter sizes. A chosen lr at the edge of its grid is flagged: a wider grid might do better.")
_BASE_LR = RunSpec.__dataclass_fields__["lr"].default  # the untrained model has no lr: one fixed spec


@functools.cache
def train_records(n: int) -> int:
    """Training records of `n` fictional facts (one per training phrasing)."""
    from meft.data import fictional_facts

    return len(fictional_facts(n, seed=0).train)


@dataclass
class CapacityPlan:
    """The cells of one capacity run; `template` holds the RunSpec fields shared by every cell."""
    ns: list[int]
    methods: list[str]
    lrs: dict[str, list[float]]        # method -> its grid (its tuning trials)
    seeds: list[int]
    epochs: float
    template: dict = field(default_factory=dict)
    router_lr: float | None = None     # MEFT variants' router gates (not tuned)

    @property
    def n_sweep(self) -> int:
        return min(self.ns)

    def steps(self, n: int) -> int:
        """`epochs` passes over the `n` facts' training records and the replayed ones (`RunSpec.replay`; the
        last batch of an epoch may be short)."""
        records = train_records(n) + self.template.get("replay", 0)
        return math.ceil(self.epochs * math.ceil(records / self.template["batch_size"]))

    def spec(self, method: str, n: int, seed: int, lr: float) -> RunSpec:
        router = {"router_lr": self.router_lr} if method.startswith("meft") else {}
        return RunSpec(method=method, dataset="fictional", n_facts=n, seed=seed, steps=self.steps(n), lr=lr,
                       forgetting=True, **router, **self.template)

    def base_specs(self) -> list[RunSpec]:
        return [self.spec("base", n, self.seeds[0], _BASE_LR) for n in sorted(self.ns)]

    def sweep_specs(self) -> list[RunSpec]:
        return [self.spec(m, self.n_sweep, self.seeds[0], lr) for m in self.methods for lr in self.lrs[m]]

    def chosen_lrs(self, results: list[dict]) -> dict[str, dict]:
        """method -> {"lr": chosen lr or None, "why": None or why there is none yet, "edge": bool} (`RULE`).

        The choice waits until every lr of the grid has a result; failed lrs are not candidates (a
        successful retry can change the choice, and the report then lists the new carried cells)."""
        by_key = _index(results)
        out = {}
        for m in self.methods:
            grid = self.lrs[m]
            runs = {lr: by_key.get(spec_key(dataclasses.asdict(self.spec(m, self.n_sweep, self.seeds[0], lr))))
                    for lr in grid}
            ok = {lr: r for lr, r in runs.items() if r is not None and "error" not in r}
            pending = [lr for lr, r in runs.items() if r is None]
            if pending or not ok:
                why = (f"lr sweep at N={self.n_sweep} not finished ({len(grid) - len(pending)} of {len(grid)} lrs run)"
                       if pending else f"every lr of the sweep at N={self.n_sweep} failed")
                out[m] = {"lr": None, "why": why, "edge": False}
                continue
            lr = max(ok, key=lambda x: (_em(ok[x], "held_out"), _em(ok[x], "trained"), -x))
            out[m] = {"lr": lr, "why": None, "edge": len(grid) > 1 and lr in (min(grid), max(grid))}
        return out

    def carried_specs(self, results: list[dict]) -> list[RunSpec]:
        """Every cell at a chosen lr not in the sweep: larger N (ascending), and the other seeds."""
        chosen = self.chosen_lrs(results)
        out = []
        for n in sorted(self.ns):
            for seed in self.seeds:
                if n == self.n_sweep and seed == self.seeds[0]:
                    continue  # the sweep cell itself
                out += [self.spec(m, n, seed, chosen[m]["lr"]) for m in self.methods if chosen[m]["lr"] is not None]
        return out


def _index(results: list[dict]) -> dict[tuple, dict]:
    """spec key -> its latest result (a retried cell's success replaces its failure)."""
    out = {}
    for r in results:
        k = spec_key(r["spec"])
        if k not in out or "error" in out[k]:
            out[k] = r
    return out


def _em(r: dict, split: str) -> float:
    return r["eval"][split]["exact_match"]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _forgetting(r: dict, base: dict | None) -> dict:
    """Retention (contains %, points dropped vs the base model) and perplexity (relative increase) of `r`,
    each only against a base measurement of the same questions / texts."""
    f, b = r.get("forgetting") or {}, (base or {}).get("forgetting") or {}
    ret, bret = f.get("retention"), b.get("retention")
    ppl, bppl = f.get("ppl"), b.get("ppl")
    same_set = ret and bret and ret["set_sha"] == bret["set_sha"]
    same_texts = ppl and bppl and ppl["texts_sha"] == bppl["texts_sha"]
    return {"retention": ret["contains"] if ret else None,
            "retention_drop": 100 * (bret["contains"] - ret["contains"]) if same_set else None,
            "ppl": ppl["perplexity"] if ppl else None,
            "ppl_increase": ppl["perplexity"] / bppl["perplexity"] - 1 if same_texts else None,
            "locality": (f.get("general") or {}).get("agreement")}  # general-prompt agreement (1.0 = untouched)


def _cell(runs: list[dict], base: dict | None) -> dict:
    """Means over the seeds `runs` of one (method, N, lr)."""
    forg = [_forgetting(r, base) for r in runs]
    pick = lambda key: _mean(f[key] for f in forg)  # noqa: E731
    return {"lr": runs[0]["spec"]["lr"], "seeds": sorted(r["spec"]["seed"] for r in runs),
            "em_trained": _mean(_em(r, "trained") for r in runs),
            "em_held_out": _mean(_em(r, "held_out") for r in runs),
            "retention": pick("retention"), "retention_drop": pick("retention_drop"), "ppl": pick("ppl"),
            "ppl_increase": pick("ppl_increase"), "locality": pick("locality"),
            "device": {k: _mean(r["device"][k] for r in runs) for k in runs[0]["device"]},
            "peak_rss_bytes": _mean(r["peak_rss_bytes"] for r in runs),
            "host_stores_bytes": _mean(r["host_stores_bytes"] for r in runs),
            "step_s": _mean(r["step_s_median"] for r in runs), "steps": runs[0]["spec"]["steps"],
            "epochs": runs[0]["epochs"], "last_loss": _mean(r["last_loss"] for r in runs),
            "labelled_tokens": sorted({r["labelled_tokens"] for r in runs})}


def _missing(spec: RunSpec, r: dict | None) -> str | None:
    if r is None:
        return "not run yet"
    if "error" in r:
        lines = r["error"].strip().splitlines() or ["(no message)"]
        return "FAILED: " + lines[-1][:160]
    return None


def summarize(plan: CapacityPlan, results: list[dict]) -> dict:
    """Everything the capacity report shows; its "json" entry is the `--report --json` line."""
    by_key = _index(results)
    got = lambda s: by_key.get(spec_key(dataclasses.asdict(s)))  # noqa: E731
    missing = []

    def note(s: RunSpec, why: str) -> None:
        lr = "" if s.method == "base" else f" lr={s.lr:g}"
        missing.append(f"{s.method} N={s.n_facts}{lr} seed={s.seed}: {why}")
    base = {}
    for s in plan.base_specs():
        r = got(s)
        if _missing(s, r):
            note(s, _missing(s, r))
            continue
        base[s.n_facts] = r
    any_base = next(iter(base.values()), None)  # forgetting probes do not depend on N
    chosen = plan.chosen_lrs(results)
    sweep = {m: {} for m in plan.methods}
    for s in plan.sweep_specs():
        r = got(s)
        why = _missing(s, r)
        sweep[s.method][s.lr] = None if why else _cell([r], any_base)
        if why:
            note(s, why)
    cells = {m: {} for m in plan.methods}
    for m in plan.methods:
        for n in sorted(plan.ns):
            if chosen[m]["lr"] is None:
                if n != plan.n_sweep or len(plan.seeds) > 1:
                    missing.append(f"{m} N={n}: waiting for its lr ({chosen[m]['why']})")
                continue
            runs = []
            for seed in plan.seeds:
                s = plan.spec(m, n, seed, chosen[m]["lr"])
                r = got(s)
                if _missing(s, r):
                    if (n, seed) != (plan.n_sweep, plan.seeds[0]):  # sweep cells are listed above
                        note(s, _missing(s, r))
                    continue
                runs.append(r)
            if runs:
                cells[m][n] = _cell(runs, base.get(n, any_base))
    base_cells = {n: {"em_trained": _em(r, "trained"), "em_held_out": _em(r, "held_out"),
                      **_forgetting(r, r)} for n, r in base.items()}
    shared = dataclasses.asdict(plan.spec(plan.methods[0], plan.n_sweep, plan.seeds[0], _BASE_LR))
    for k in ("method", "n_facts", "seed", "steps", "lr"):  # what differs between cells
        del shared[k]
    return {"plan": {**shared, "ns": sorted(plan.ns), "methods": list(plan.methods), "lrs": plan.lrs,
                     "seeds": plan.seeds, "epochs": plan.epochs, "steps": {n: plan.steps(n) for n in sorted(plan.ns)},
                     "train_records": {n: train_records(n) for n in sorted(plan.ns)}, "router_lr": plan.router_lr,
                     "gpu_name": _gpu_names(results)},
            "rule": RULE, "chosen": chosen, "sweep": sweep, "cells": cells, "base": base_cells,
            "missing": missing, "json": _json(cells, chosen, missing)}


def _gpu_names(results: list[dict]) -> str | None:
    """The GPUs the runs trained on, in order of first use, with run counts where there are several
    ("NVIDIA H200: 20 runs, NVIDIA H100 80GB HBM3: 6 runs"): a file resumed on another lent machine says so."""
    counts = Counter(r["gpu"] for r in results if r.get("gpu"))
    if len(counts) <= 1:
        return next(iter(counts), None)
    return ", ".join(f"{name}: {k} runs" for name, k in counts.items())


def _json(cells: dict, chosen: dict, missing: list[str]) -> dict:
    """The JSON summary at `capacity_n`, the largest N with both meft and lora8 results."""
    both = sorted(set(cells.get("meft", {})) & set(cells.get("lora8", {})))
    n = both[-1] if both else None
    at = lambda m, key: None if n is None or n not in cells.get(m, {}) else cells[m][n][key]  # noqa: E731
    r1 = lambda x, k=1: None if x is None else round(x, k)  # noqa: E731
    gap = None if n is None else 100 * (cells["meft"][n]["em_held_out"] - cells["lora8"][n]["em_held_out"])
    dev = lambda m: None if at(m, "device") is None else round(at(m, "device")["total"] / 2**20)  # noqa: E731
    return {"capacity_n": n, "meft_minus_lora8_heldout": r1(gap),
            "meft_retention_drop": r1(at("meft", "retention_drop")),
            "lora8_retention_drop": r1(at("lora8", "retention_drop")),
            "meft_ppl_increase": r1(at("meft", "ppl_increase"), 4),
            "lora8_ppl_increase": r1(at("lora8", "ppl_increase"), 4),
            "meft_locality": r1(at("meft", "locality"), 4), "lora8_locality": r1(at("lora8", "locality"), 4),
            "meft_heldout": r1(None if at("meft", "em_held_out") is None else 100 * at("meft", "em_held_out")),
            "lora8_heldout": r1(None if at("lora8", "em_held_out") is None else 100 * at("lora8", "em_held_out")),
            "meft_device_mib": dev("meft"), "lora64_device_mib": dev("lora64"),
            "units": {"heldout": "exact match points", "retention_drop": "points of retained known facts "
                      "(contains match) vs the base model", "ppl_increase": "relative (0.1 = +10%) vs the base model",
                      "locality": "general-prompt agreement with the base model (1.0 = untouched)"},
            "chosen_lr": {m: c["lr"] for m, c in chosen.items()},
            "heldout_by_n": {m: {str(k): r1(100 * v["em_held_out"]) for k, v in by.items()} for m, by in cells.items()},
            "missing": missing}
