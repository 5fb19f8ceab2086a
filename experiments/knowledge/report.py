"""Tables of the knowledge experiment's results (one dict per run, from JSONL).

Owns the Markdown output (header with command, date, machine and versions; one table per dataset with
every run; a per-(method, lr) mean table; the methods compared under one stated lr selection rule
(`RULE`), with the number of tuning trials each had; the differences between MEFT and the baselines at
the compared lrs) and the JSON summary. Numbers only: whether a difference meets a target is
judged in BENCHMARKS.md's prose, not here. Also `format_capacity_report` (the capacity curve's tables,
from `capacity.summarize`) and `machine_header()`, reused by experiments/bench_step.py.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections import defaultdict

__all__ = ["RULE", "format_report", "format_capacity_report", "machine_header", "method_label", "order_key",
           "summarize"]

MiB, GiB = 2**20, 2**30
ADAMW_FREE = ("base", "full_adalomo")  # methods whose result does not depend on the AdamW lr
ORDER = ("base", "meft", "meft_adalomo", "lora8", "lora16", "lora64", "dense", "full_adalomo")
RULE = ("every AdamW-trained method (a MEFT variant with its own router lr counts as a method of its own) is "
        "compared at the lr, among the lrs of the grid it ran, with the best exact match on the *trained* "
        "split of its sweep seed (the smallest seed run at all of its lrs; held-out phrasings never choose), "
        "ties to the smaller lr; the grid is every AdamW lr any method ran in this file (K lrs), so each "
        "method's tuning trials are the grid lrs it ran: the same K for all unless a footnote says otherwise. "
        "Numbers are means over every seed run at the compared lr. Methods without an AdamW lr (base, "
        "full_adalomo) have no trials.")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_header(command: str) -> str:
    import numba
    import peft
    import psutil
    import torch
    import transformers

    load = os.getloadavg()
    return (f"Command: `{command}`  \n"
            f"Date: {time.strftime('%Y-%m-%dT%H:%M')}  \n"
            f"Machine: {_cpu_name()}, {os.cpu_count()} cores (shared with other jobs; load average "
            f"{load[0]:.1f} at report time), {psutil.virtual_memory().total / GiB:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}  \n"
            f"Versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, peft {peft.__version__}, numba {numba.__version__}")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def method_label(spec: dict) -> str:
    """The method's name in tables; a MEFT run with its own router lr is a method of its own, and so is a
    run asked for the padded step (`--packing off`) beside packed ones (a spec written before packing
    existed has no `packing`: it keeps its plain name)."""
    router = spec.get("router_lr")
    label = spec["method"] if router is None else f"{spec['method']} (router lr {router:g})"
    return f"{label} (padded)" if spec.get("packing") == "off" and spec["method"] != "base" else label


def _em(r: dict, split: str, metric: str = "exact_match"):
    return r.get("eval", {}).get(split, {}).get(metric)


def _run_row(r: dict) -> str:
    s, dm = r["spec"], r.get("device")
    if "error" in r:
        return f"| {method_label(s)} | {_lr(s)} | {s['seed']} | FAILED: {r['error'].strip().splitlines()[-1][:120]} |"
    if s["method"] == "base":
        return (f"| base (untrained) | - | - | 0 | 0 | - | - | {_pct(_em(r, 'trained'))} | {_pct(_em(r, 'held_out'))} "
                f"| {_pct(_em(r, 'trained', 'contains'))} | - | - | - | - | - | - | - | - | - |")
    return (f"| {method_label(s)} | {_lr(s)} | {s['seed']} | {s['steps']} | {r['labelled_tokens']:,} "
            f"| {r['epochs']:.1f} "
            f"| {r['first_loss']:.2f} -> {r['last_loss']:.3f} | {_pct(_em(r, 'trained'))} "
            f"| {_pct(_em(r, 'held_out'))} | {_pct(_em(r, 'trained', 'contains'))} "
            f"| {dm['weights'] / MiB:.0f} | {dm['grads'] / MiB:.1f} | {dm['optimizer'] / MiB:.1f} "
            f"| {dm['active_rows'] / MiB:.1f} | **{dm['total'] / MiB:.0f}** | {dm['trainable_params'] / 1e6:.1f}M "
            f"| {r['peak_rss_bytes'] / GiB:.2f} | {r['host_stores_bytes'] / GiB:.2f} | {r['step_s_median']:.2f} |")


def _lr(spec: dict) -> str:
    return "-" if spec["method"] in ADAMW_FREE else f"{spec['lr']:g}"


_HEAD = ("| method | AdamW lr | seed | steps | labelled tokens | epochs | loss first -> last 5 | EM trained % "
         "| EM held-out % | contains trained % | dev weights MiB | dev grads MiB | dev optim MiB "
         "| dev active rows MiB | **dev total MiB** | trainable params | host peak RSS GiB "
         "| MEFT host stores GiB | step s (median) |\n" + "|---" * 19 + "|")


def order_key(method: str, label: str) -> tuple:
    """Sort key of a table line: ORDER's place of its method, then its label (`method_label`)."""
    return (ORDER.index(method) if method in ORDER else 99, label)


def _order(r: dict) -> tuple:
    return (order_key(r["spec"]["method"], method_label(r["spec"])), r["spec"]["lr"], r["spec"]["seed"])


def _stats(rs: list[dict]) -> dict:
    """Means over the runs `rs` of one (method label, lr)."""
    m = rs[0]["spec"]["method"]

    def mean(f):
        return statistics.fmean([f(x) for x in rs])
    return {"method": m, "lr": None if m in ADAMW_FREE else rs[0]["spec"]["lr"],
            "seeds": sorted(x["spec"]["seed"] for x in rs),
            "em_trained": mean(lambda x: _em(x, "trained")),
            "em_trained_by_seed": {x["spec"]["seed"]: _em(x, "trained") for x in rs},
            "em_held_out": mean(lambda x: _em(x, "held_out")),
            "device_total": mean(lambda x: x["device"]["total"]) if m != "base" else None,
            "step_s": mean(lambda x: x["step_s_median"]) if m != "base" else None,
            "labelled_tokens": sorted({x.get("labelled_tokens", 0) for x in rs})}


def _sweep_seed(by_lr: dict) -> int | None:
    """The seed a method's lr is chosen on: the smallest seed run at every one of its lrs (None: no such seed)."""
    common = set.intersection(*(set(v["em_trained_by_seed"]) for v in by_lr.values()))
    return min(common) if common else None


def _best(by_lr: dict) -> float:
    """The lr a method is compared at (`RULE`): the best exact match on the *trained* split (the fit the
    method was asked to make; held-out phrasings never choose) on the sweep seed (`_sweep_seed`), then
    the smaller lr. The tables report the mean over all seeds run at that lr."""
    seed = _sweep_seed(by_lr)
    if seed is None:  # no seed ran at every lr: fall back to the mean (said in the table's footnote)
        return max(by_lr, key=lambda lr: (by_lr[lr]["em_trained"], -lr))
    return max(by_lr, key=lambda lr: (by_lr[lr]["em_trained_by_seed"][seed], -lr))


def summarize(results: list[dict]) -> dict:
    """dataset -> method label (`method_label`) -> stats at its chosen lr (`_best`), every lr under "by_lr".

    Stats are means over seeds: EM trained / held-out, device total, step s, labelled tokens; plus the
    method's tuning trials under `RULE`: "trials" (grid lrs it ran on its sweep seed; None for methods
    without an AdamW lr), "grid_size" (K: AdamW lrs any method of the dataset ran) and "sweep_seed".
    """
    acc = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        if "error" not in r:
            m = r["spec"]["method"]
            acc[r["spec"]["dataset"]][method_label(r["spec"])][0.0 if m in ADAMW_FREE else r["spec"]["lr"]].append(r)
    out = {}
    for ds, by in acc.items():
        out[ds] = {}
        grid = sorted({lr for runs in by.values() for lr, rs in runs.items()
                       if rs[0]["spec"]["method"] not in ADAMW_FREE})
        for label, by_lr_runs in by.items():
            by_lr = {lr: _stats(rs) for lr, rs in by_lr_runs.items()}
            free = by_lr_runs[next(iter(by_lr_runs))][0]["spec"]["method"] in ADAMW_FREE
            out[ds][label] = dict(by_lr[_best(by_lr)], by_lr=by_lr, trials=None if free else len(by_lr),
                                  grid_size=len(grid), sweep_seed=None if free else _sweep_seed(by_lr))
    return out


def _at(v: dict) -> str:
    return "" if v["lr"] is None else f" (lr {v['lr']:g}, seeds {v['seeds']})"


def _compared_table(by: dict) -> list[str]:
    """One line per method at its compared lr, with its tuning trials; footnotes where trials differ."""
    grid = sorted({lr for v in by.values() if v["trials"] is not None for lr in v["by_lr"]})
    k = len(grid)
    lines = [f"Selection rule: {RULE} Grid here: K = {k} ({', '.join(f'{lr:g}' for lr in grid) or '-'}).", "",
             "| method | compared at AdamW lr | tuning trials (grid lrs run) | sweep seed | seeds | EM trained % "
             "| EM held-out % | dev total MiB |", "|---|---|---|---|---|---|---|---|"]
    notes = []

    def note(text: str) -> str:
        notes.append(f"[{len(notes) + 1}] {text}")
        return f" [{len(notes)}]"
    for m in sorted(by, key=lambda key: order_key(by[key]["method"], key)):
        v = by[m]
        trials, lr_s, seed = "-", "-", "-"
        if v["trials"] is not None:
            trials, lr_s = f"{v['trials']} of {k}", f"{v['lr']:g}"
            seed = "-" if v["sweep_seed"] is None else str(v["sweep_seed"])
            if v["trials"] < k:
                missing = ", ".join(f"{lr:g}" for lr in grid if lr not in v["by_lr"])
                fixed = ("; its one lr was not tuned in this file (fixed beforehand, e.g. `--lr-for`, or not swept)"
                         if v["trials"] == 1 else "")
                trials += note(f"{m}: fewer tuning trials, {v['trials']} of the {k} grid lrs (not run at "
                               f"{missing}){fixed}.")
            if v["sweep_seed"] is None:
                seed += note(f"{m}: no seed ran at all of its lrs; its lr was chosen on the mean over seeds.")
        dev = "-" if v["device_total"] is None else f"{v['device_total'] / MiB:.0f}"
        lines.append(f"| {m} | {lr_s} | {trials} | {seed} | {v['seeds']} | {_pct(v['em_trained'])} "
                     f"| {_pct(v['em_held_out'])} | {dev} |")
    return lines + ([""] + notes if notes else [])


def _gap(a: dict, b: dict, split: str) -> float:
    return round(100 * (a[f"em_{split}"] - b[f"em_{split}"]), 1)  # the number shown is the number compared


def _differences(ds: str, s: dict) -> list[str]:
    """Each frozen-backbone MEFT variant against LoRA r=8 and the dense adapter (exact match, points) and
    its device-resident training state against LoRA r=64, every method at its compared lr. No verdicts."""
    l8, l64, dense = (s.get(k) for k in ("lora8", "lora64", "dense"))
    lines = []
    for label in sorted(k for k, v in s.items() if v["method"] == "meft"):
        a = s[label]
        for name, b in (("LoRA r=8", l8), ("dense adapter", dense)):
            if b:
                lines.append(f"- {ds}: {label}{_at(a)} - {name}{_at(b)} exact match: trained "
                             f"{_gap(a, b, 'trained'):+.1f}, held-out {_gap(a, b, 'held_out'):+.1f} points")
        if l64:
            lines.append(f"- {ds}: {label} device-resident training state {a['device_total'] / MiB:.0f} MiB, "
                         f"LoRA r=64 {l64['device_total'] / MiB:.0f} MiB")
    return lines


def _mean_table(by: dict) -> list[str]:
    """One line per (method, AdamW lr); the lr each method is compared at (`RULE`) is marked."""
    lines = ["| method | AdamW lr | seeds | EM trained % (mean) | EM held-out % (mean) | dev total MiB | step s "
             "| compared at |", "|---|---|---|---|---|---|---|---|"]
    for m in sorted(by, key=lambda k: order_key(by[k]["method"], k)):
        for lr, v in sorted(by[m]["by_lr"].items()):
            dev = "-" if v["device_total"] is None else f"{v['device_total'] / MiB:.0f}"
            st = "-" if v["step_s"] is None else f"{v['step_s']:.2f}"
            lr_s = "-" if v["lr"] is None else f"{lr:g}"
            chosen = "**yes**" if v["lr"] == by[m]["lr"] and len(by[m]["by_lr"]) > 1 else ""
            lines.append(f"| {m} | {lr_s} | {v['seeds']} | {_pct(v['em_trained'])} | {_pct(v['em_held_out'])} "
                         f"| {dev} | {st} | {chosen} |")
    return lines


def format_report(results: list[dict], *, command: str) -> tuple[str, dict]:
    """Markdown (header, per-dataset run tables, mean tables, the compared methods under `RULE`, the
    differences at the compared lrs) and the summary dict."""
    summary = summarize(results)
    parts = [machine_header(command), ""]
    for ds in sorted({r["spec"]["dataset"] for r in results}):
        rs = sorted((r for r in results if r["spec"]["dataset"] == ds), key=_order)
        ok = next((r for r in rs if "error" not in r and r["spec"]["method"] != "base"), rs[0])
        s = ok["spec"]
        parts += [f"**{ds} facts**: {ok.get('n_facts', '?')} facts, {ok.get('n_train_records', '?')} training "
                  f"records (3 phrasings per fact); held-out = each fact once with an unseen phrasing. "
                  f"batch {s['batch_size']}, {s['steps']} steps, adapter rows/layer {s['rows']}, "
                  f"max_active_rows {s['max_active_rows']}, expert_size {s['expert_size']}, AdamW lr per run (column), "
                  f"AdaLomo lr {s['backbone_lr']}, state_dtype {s['state_dtype']}, "
                  f"{'chat template' if s['chat'] else 'plain prompt + answer + eos'}, "
                  f"up to {s['eval_limit']} questions scored per split", "", _HEAD]
        parts += [_run_row(r) for r in rs] + [""]
        parts += _mean_table(summary.get(ds, {})) + [""]
        parts += _compared_table(summary.get(ds, {})) + [""]
        parts += _differences(ds, summary.get(ds, {})) + [""]
        toks = defaultdict(set)  # seed -> labelled tokens of every trained run (any method, any lr)
        for r in rs:
            if "error" not in r and r["spec"]["method"] != "base":
                toks[r["spec"]["seed"]].add(r["labelled_tokens"])
        same = all(len(v) == 1 for v in toks.values())
        parts.append(f"Same training tokens for every run of a seed: {'yes' if same else dict(toks)}")
        parts.append("")
    return "\n".join(parts), summary


def _pts(x) -> str:
    return "-" if x is None else f"{x:+.1f}"


def _rel(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _mib(x) -> str:
    return "-" if x is None else f"{x / MiB:.0f}"


def format_capacity_report(summary: dict, *, command: str) -> str:
    """Markdown of a capacity run (`capacity.summarize`): protocol and rule, the lr sweep, exact match
    against N, forgetting, memory and speed at each N, the differences MEFT - baselines, missing cells."""
    p, chosen, cells = summary["plan"], summary["chosen"], summary["cells"]
    ns = p["ns"]
    parts = [machine_header(command), "",
             f"**Capacity curve** (fictional facts, N = {', '.join(map(str, ns))}): 3 training phrasings and 1 "
             f"held-out phrasing per fact; training records "
             f"{', '.join(format(p['train_records'][n], ',') for n in ns)}; "
             f"batch {p['batch_size']}, {p['epochs']:g} epochs = {', '.join(str(p['steps'][n]) for n in ns)} steps; "
             f"the same batches for every method (seeds {p['seeds']}); adapter rows/layer {p['rows']}, "
             f"max_active_rows {p['max_active_rows']}, expert_size {p['expert_size']}, MEFT router lr "
             f"{'= AdamW lr' if p['router_lr'] is None else format(p['router_lr'], 'g')}, AdaLomo lr "
             f"{p['backbone_lr']:g}; up to {p['eval_limit']} questions scored per split. Forgetting: retention = "
             f"share of {p['retention_limit']} known world facts (the base model's correct answers, "
             f"`experiments/knowledge/forgetting.py`) still answered (contains match, chat template); ppl = "
             f"perplexity on {p['ppl_texts']} pydoc topics x <= {p['ppl_tokens']} tokens; drop / increase vs "
             f"the base model. Runs trained and scored on: {p.get('device', 'cpu')}"
             + (f" ({p['gpu_name']})" if p.get("gpu_name") else "") + ".", "",
             f"Selection rule: {summary['rule']}", "",
             f"**lr sweep at N = {min(ns)}** (seed {p['seeds'][0]})", "",
             "| method | AdamW lr | EM trained % | EM held-out % | retention drop (points) | ppl increase "
             "| loss last 5 | chosen |", "|---|---|---|---|---|---|---|---|"]
    for m in p["methods"]:
        for lr in p["lrs"][m]:
            c = summary["sweep"][m].get(lr)
            mark = ("**yes**" + (" (grid edge)" if chosen[m]["edge"] else "")) if chosen[m]["lr"] == lr else ""
            if c is None:
                parts.append(f"| {m} | {lr:g} | missing | | | | | |")
                continue
            parts.append(f"| {m} | {lr:g} | {_pct(c['em_trained'])} | {_pct(c['em_held_out'])} "
                         f"| {_pts(c['retention_drop'])} | {_rel(c['ppl_increase'])} | {c['last_loss']:.3f} | {mark} |")
    base = summary["base"]
    parts += ["", "**Exact match against N** (trained / held-out %, each method at its chosen lr)", "",
              "| method | lr | " + " | ".join(f"N={n}" for n in ns) + " |", "|---" * (len(ns) + 2) + "|",
              "| base (untrained) | - | " + " | ".join(
                  f"{_pct(base[n]['em_trained'])} / {_pct(base[n]['em_held_out'])}" if n in base else "-" for n in ns)
              + " |"]
    for m in p["methods"]:
        lr = "-" if chosen[m]["lr"] is None else f"{chosen[m]['lr']:g}"
        parts.append(f"| {m} | {lr} | " + " | ".join(
            f"{_pct(cells[m][n]['em_trained'])} / {_pct(cells[m][n]['em_held_out'])}" if n in cells[m] else "missing"
            for n in ns) + " |")
    b0 = next(iter(base.values()), None)
    base_line = "" if b0 is None or b0["ppl"] is None else (
        f" Base model: retention {_pct(b0['retention'])}% of the set, ppl {b0['ppl']:.2f}.")
    parts += ["", f"**Forgetting** (retention drop in points / perplexity increase, vs the base model).{base_line}", "",
              "| method | " + " | ".join(f"N={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    for m in p["methods"]:
        parts.append(f"| {m} | " + " | ".join(
            f"{_pts(cells[m][n]['retention_drop'])} / {_rel(cells[m][n]['ppl_increase'])}" if n in cells[m]
            else "missing"
            for n in ns) + " |")
    parts += ["", "**Memory and speed** (device-resident training state computed as in `methods.device_memory`; "
              "host peak RSS of the run's process; MEFT host row stores; median step time)", "",
              "| method | N | dev weights MiB | dev grads MiB | dev optim MiB | dev active rows MiB "
              "| **dev total MiB** | GPU peak MiB (measured) "
              "| host peak RSS GiB | MEFT host stores GiB | step s | loss last 5 |", "|---" * 12 + "|"]
    for m in p["methods"]:
        for n in ns:
            c = cells[m].get(n)
            if c is None:
                continue
            d = c["device"]
            parts.append(f"| {m} | {n} | {_mib(d['weights'])} | {d['grads'] / MiB:.1f} | {d['optimizer'] / MiB:.1f} "
                         f"| {d['active_rows'] / MiB:.1f} | **{_mib(d['total'])}** "
                         f"| {_mib(d['cuda_peak_allocated']) if 'cuda_peak_allocated' in d else '-'} "
                         f"| {c['peak_rss_bytes'] / GiB:.2f} "
                         f"| {c['host_stores_bytes'] / GiB:.2f} | {c['step_s']:.2f} | {c['last_loss']:.3f} |")
    parts += ["", "**Differences** (numbers only; verdicts against the targets are BENCHMARKS.md's prose)", ""]
    for n in ns:
        a = cells.get("meft", {}).get(n)
        if a is None:
            continue
        for name in ("lora8", "lora64", "dense", "meft_adalomo"):
            b = cells.get(name, {}).get(n)
            if b is not None:
                parts.append(f"- N={n}: meft - {name} exact match trained "
                             f"{100 * (a['em_trained'] - b['em_trained']):+.1f}, held-out "
                             f"{100 * (a['em_held_out'] - b['em_held_out']):+.1f} points; device state "
                             f"{_mib(a['device']['total'])} vs {_mib(b['device']['total'])} MiB")
    toks = {n: {m: tuple(cells[m][n]["labelled_tokens"]) for m in p["methods"] if n in cells[m]} for n in ns}
    same = {n: len(set(v.values())) <= 1 for n, v in toks.items()}
    parts += ["", "Same training tokens for every method at each N: "
              + ", ".join(f"N={n} {'yes' if same[n] else toks[n]}" for n in ns), "",
              f"**Missing cells** ({len(summary['missing'])}):" if summary["missing"] else "**Missing cells**: none"]
    parts += [f"- {line}" for line in summary["missing"]]
    return "\n".join(parts)
