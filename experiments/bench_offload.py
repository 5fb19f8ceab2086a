"""Offload-core benchmark: host copy bandwidth vs numba gather(+bf16 cast) and SparseAdamW, and
SparseAdamW vs the best plain-PyTorch path on the same rows (index_select into preallocated buffers,
torch's fused / foreach AdamW on them, index_copy_ back).

    python experiments/bench_offload.py --write    # full run; prints the tables and writes BENCHMARKS.md
    python experiments/bench_offload.py --quick    # about a minute, prints only
    python experiments/bench_offload.py --json     # last stdout line: one JSON object

Stores: today's default model width (65,536 rows x 2 x 576) and the 7B row width (Llama-2-7B / Mistral-7B,
d = 4096): [K | V] rows (width 8,192) and values-only rows (width 4,096, the rows that cross when frozen keys
are generated on the device), 16,384 rows each (8,192 with --quick). The JSON's `gather_7b` gives, per 7B
width and active-row count, the bf16 gather's GB/s beside the contiguous copy's and their ratio.

Two tables. (1) SparseAdamW: bandwidth = bytes touched / time, reads + writes counted once each:
copy 8 B/elem (torch `copy_` of a large preallocated buffer: read 4 + write 4), accumulate 8
(read grad 4 + write pending 4; a fresh slot), SparseAdamW step 28 (read w, m, v, g + write w, m, v,
all fp32), step_rows 32 (the same plus one finiteness pass over g; it replaces accumulate + step for
a single micro-batch). The torch path is charged the same 28 B/elem so its GB/s is "useful" bandwidth. All
operations run interleaved, round by round (order rotating), so a noisy shared machine affects them alike.

(2) Gather (+ cast): R random rows of the store (cold: the store is 10-20x the 32 MiB L3, fresh random
sorted unique ids for every call) into a preallocated [R, W] buffer. One sample = K calls (K set so the
copy takes >= 50 ms per sample; ids generated before the clock starts); methods interleaved sample by
sample (order rotating). Ops: copy = torch `copy_` of R *consecutive* fp32 rows (random start row, cold)
into a preallocated fp32 [R, W] buffer, i.e. a plain contiguous copy of the same source bytes; numba bf16 /
fp32 = `RowStore.gather` (id check + kernel); numba bf16 sequential = the same call with ids
start..start+R-1 (access pattern without randomness); torch = `index_select(out=fp32 buffer)` +
`copy_` into the bf16 buffer (`.to(bfloat16)` without allocating). Bytes credited, identical for every op of
the bf16 comparison: 6 B per gathered element (4 B fp32 read + 2 B bf16 written; the copy really writes
4 B, so it is credited 2 B less than it moves); gather fp32 and the copy are both credited 8 B. So
"of copy" = copy time / op time on the same R x W rows, and gather_bandwidth_fraction = numba bf16 GB/s /
copy GB/s at 6 B/elem (medians; the best-sample value is reported beside it).
"""

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.bench_gather import (  # noqa: E402  # noqa: E402
    D_7B,
    MIN_SAMPLE_S,
    gather_7b,
    gather_table,
    lines_7b,
    measure_gather,
    roofline_lines,
    summarize_gather,
)
from experiments.benchmarks_md import replace_section  # noqa: E402
from offload import kernels  # noqa: E402
from offload.optim import SparseAdamW  # noqa: E402
from offload.store import RowStore  # noqa: E402

__all__ = ["main"]

HEADING = "## Offload core (experiments/bench_offload.py)"
BYTES = {"copy": 8, "accumulate": 8, "SparseAdamW step": 28,
         "SparseAdamW acc+step": 28, "SparseAdamW step_rows": 32, "torch fused": 28, "torch foreach": 28}


NOTES = """Reading this on a shared 2-core box: each process gets a fraction of a core, and an operation
that loses the CPU for one scheduler slice (several ms) looks several times slower, so short operations
(1-3 ms) have noisy medians; "best" is the fastest repeat. With 2 threads every numba/torch parallel
region waits for its descheduled helper thread (~20 ms per region here), which is why offload's default
thread count is all cores but one (1 here). Targets are judged on the medians at the default thread count."""


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Case:
    """One shape (rows x width) and one active-row count, with every buffer preallocated."""

    def __init__(self, store: RowStore, n_active: int, gen: torch.Generator):
        self.store, self.r, self.gen, w = store, n_active, gen, store.width
        self.grads = torch.randn(n_active, w, generator=gen) * 1e-3                     # [R, W] fp32
        self.opt = SparseAdamW(store, lr=1e-3, weight_decay=0.01)
        self.bufs = [torch.zeros(n_active, w) for _ in range(3)]                         # w, m, v rows
        self.torch_opts = {}
        for kind in ("fused", "foreach"):
            p = torch.nn.Parameter(self.bufs[0])  # shares storage with bufs[0]
            p.grad = self.grads
            opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, **{kind: True})
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": self.bufs[1], "exp_avg_sq": self.bufs[2]}
            self.torch_opts[kind] = opt

    def fresh_ids(self) -> torch.Tensor:
        """New random unique sorted ids [R] (each op gets its own, so no op reads rows another cached)."""
        return torch.randperm(self.store.n_rows, generator=self.gen)[: self.r].sort().values

    def torch_path(self, kind: str, ids: torch.Tensor) -> None:
        s, (wb, mb, vb) = self.store, self.bufs
        torch.index_select(s.weights, 0, ids, out=wb)
        torch.index_select(s.exp_avg, 0, ids, out=mb)
        torch.index_select(s.exp_avg_sq, 0, ids, out=vb)
        self.torch_opts[kind].step()
        s.weights.index_copy_(0, ids, wb)
        s.exp_avg.index_copy_(0, ids, mb)
        s.exp_avg_sq.index_copy_(0, ids, vb)

    def _acc_step(self, times: dict) -> None:
        ids = self.fresh_ids()
        t_acc = _timed(lambda: self.opt.accumulate(ids, self.grads))
        t_step = _timed(self.opt.step)
        times["accumulate"].append(t_acc)
        times["SparseAdamW step"].append(t_step)
        times["SparseAdamW acc+step"].append(t_acc + t_step)

    def _step_rows(self, times: dict) -> None:
        ids = self.fresh_ids()
        times["SparseAdamW step_rows"].append(_timed(lambda: self.opt.step_rows(ids, self.grads)))

    def _torch(self, times: dict, kind: str) -> None:
        ids = self.fresh_ids()
        times[f"torch {kind}"].append(_timed(lambda: self.torch_path(kind, ids)))

    def round(self, times: dict, turn: int = 0) -> None:
        """One timing of every operation (appended to times[op]). The order rotates with `turn` so no
        operation always runs first after the big copy (cold caches and page-table walks)."""
        ops = [lambda: self._acc_step(times), lambda: self._step_rows(times),
               lambda: self._torch(times, "fused"), lambda: self._torch(times, "foreach")]
        for k in range(len(ops)):
            ops[(k + turn) % len(ops)]()


def _set_threads(n: int) -> None:
    kernels.set_num_threads(n)
    torch.set_num_threads(n)


def measure(shapes, actives, threads, repeats: int, copy_mib: int, gather_samples: int,
            seed: int = 0) -> tuple[list, dict, list]:
    """Rows of the SparseAdamW table (one per thread count, shape, active rows, op), copy GB/s per thread
    count, and the rows of the gather table."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(copy_mib << 18, generator=gen)  # fp32, copy_mib MiB
    dst = torch.zeros_like(src)
    copy_times, rows, gather_rows = {t: [] for t in threads}, [], []
    for n_rows, width in shapes:
        store = RowStore(n_rows, width)
        cases = [Case(store, r, gen) for r in actives]
        times = {(t, i): {op: [] for op in BYTES if op != "copy"} for t in threads for i in range(len(cases))}
        for t in threads:  # warm-up: compile, first touch
            _set_threads(t)
            for case in cases:
                case.round({op: [] for op in BYTES})
        for rep in range(repeats):  # interleaved: every op and thread count sees the same machine weather
            for t in threads:
                _set_threads(t)
                for i, case in enumerate(cases):
                    copy_times[t].append(_timed(lambda: dst.copy_(src)))
                    case.round(times[(t, i)], turn=rep)
        for (t, i), per_op in times.items():
            for op, ts in per_op.items():
                rows.append({"threads": t, "shape": f"{n_rows}x{width}", "rows": cases[i].r, "op": op,
                             "ms": 1e3 * statistics.median(ts), "best_ms": 1e3 * min(ts),
                             "elems": cases[i].r * width})
        del cases
        for t in threads:
            _set_threads(t)
            gather_rows += measure_gather(store, actives, t, gather_samples, gen)
        del store
    gbs = lambda sec: BYTES["copy"] * src.numel() / sec / 1e9  # noqa: E731
    copy_gbs = {t: {"ms": gbs(statistics.median(ts)), "best_ms": gbs(min(ts))} for t, ts in copy_times.items()}
    return rows, copy_gbs, gather_rows


def summarize(rows: list, copy_gbs: float, key: str = "ms") -> dict:
    """Worst case over shapes and active-row counts, for one thread count's rows, from the median
    times (key="ms") or the best repeat (key="best_ms"). Adds GB/s and fraction of copy to the rows."""
    for row in rows:
        row[f"gbs_{key}"] = BYTES[row["op"]] * row["elems"] / (row[key] / 1e3) / 1e9
        row[f"frac_{key}"] = row[f"gbs_{key}"] / copy_gbs
    by = {(r["shape"], r["rows"], r["op"]): r for r in rows}
    keys = sorted({(r["shape"], r["rows"]) for r in rows})
    torch_best = {k: min(by[(*k, "torch fused")][key], by[(*k, "torch foreach")][key]) for k in keys}
    worst = lambda op, f: round(min(f(k, by[(*k, op)]) for k in keys), 3)  # noqa: E731
    speedup = lambda k, r: torch_best[k] / r[key]  # noqa: E731
    frac = lambda k, r: r[f"frac_{key}"]  # noqa: E731
    return {
        "copy_gbs": round(copy_gbs, 3),
        "adamw_speedup_vs_torch": worst("SparseAdamW step", speedup),
        "adamw_e2e_speedup_vs_torch": worst("SparseAdamW acc+step", speedup),
        "adamw_step_rows_speedup_vs_torch": worst("SparseAdamW step_rows", speedup),
        "adamw_bandwidth_fraction": worst("SparseAdamW step", frac),
    }


def table(rows: list, copy_gbs: dict) -> str:
    lines = ["copy bandwidth (torch `copy_` of a large preallocated buffer, read + write counted), median / best: "
             + ", ".join(f"{g['ms']:.2f} / {g['best_ms']:.2f} GB/s with {t} thread(s)" for t, g in copy_gbs.items()),
             "", "| threads | shape (rows x width) | active rows | op | median ms | best ms | rows/s (median) "
             "| B/elem | GB/s median | GB/s best | of copy (median) | of copy (best) |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['shape']} | {r['rows']} | {r['op']} | {r['ms']:.2f} | "
                     f"{r['best_ms']:.2f} | {r['rows'] / r['ms'] * 1e3:,.0f} | {BYTES[r['op']]} | "
                     f"{r['gbs_ms']:.2f} | {r['gbs_best_ms']:.2f} | {r['frac_ms']:.0%} | {r['frac_best_ms']:.0%} |")
    return "\n".join(lines)


def targets_line(t: int, sm: dict, best: dict) -> str:
    """The numbers the issue targets are about (their goals in brackets); whether they are met is judged in
    BENCHMARKS.md's prose, not here."""
    v = lambda k, fmt: f"{format(sm[k], fmt)} (best repeats: {format(best[k], fmt)})"  # noqa: E731
    return (f"{t} thread(s), worst case over shapes, medians: SparseAdamW step "
            f"{v('adamw_speedup_vs_torch', '.2f')}x the best torch path (target 3x), "
            f"{v('adamw_bandwidth_fraction', '.0%')} of copy bandwidth (target 70%); gather+bf16 cast "
            f"{v('gather_bandwidth_fraction', '.0%')} of the same rows' contiguous copy (target 70%; CPU-time "
            f"medians: {sm['gather_bandwidth_fraction_cpu_median']:.0%}), "
            f"{v('gather_speedup_vs_torch', '.2f')}x torch index_select + to(bf16); accumulate+step "
            f"{v('adamw_e2e_speedup_vs_torch', '.2f')}x and step_rows {v('adamw_step_rows_speedup_vs_torch', '.2f')}x "
            f"the torch path.")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, {platform.system()} {platform.release()}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows / repeats; finishes in < 1 minute")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md")
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts to compare, e.g. 1,2 (default: offload's default "
                         "thread count, plus all cores without --quick); the JSON summary is for the first "
                         "of them that equals offload's default")
    args = ap.parse_args(argv)
    default = kernels.get_num_threads()
    if args.threads:
        threads = [int(t) for t in args.threads.split(",")]
    else:  # --quick: offload's default only; full run: compare with all cores
        threads = [default] if args.quick else sorted({default, numba.config.NUMBA_NUM_THREADS})
    main_t = default if default in threads else threads[0]
    n7b = 8192 if args.quick else 16384
    shapes = [(65536, 2 * 576), (n7b, 2 * D_7B), (n7b, D_7B)]
    repeats, copy_mib, gather_samples = (5, 256, 5) if args.quick else (11, 512, 11)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    rows, copy_gbs, grows = measure(shapes, (1024, 4096), threads, repeats, copy_mib, gather_samples)
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    summaries, bests = {}, {}
    for t in threads:
        g = summarize_gather([r for r in grows if r["threads"] == t])
        summaries[t] = dict(summarize([r for r in rows if r["threads"] == t], copy_gbs[t]["ms"]), **g,
                            gather_bandwidth_fraction=g["gather_bandwidth_fraction_median"],
                            gather_fp32_bandwidth_fraction=g["gather_fp32_bandwidth_fraction_median"],
                            gather_speedup_vs_torch=g["gather_speedup_vs_torch_median"])
        bests[t] = dict(summarize([r for r in rows if r["threads"] == t], copy_gbs[t]["best_ms"], "best_ms"),
                        gather_bandwidth_fraction=g["gather_bandwidth_fraction_best"],
                        gather_fp32_bandwidth_fraction=g["gather_fp32_bandwidth_fraction_best"],
                        gather_speedup_vs_torch=g["gather_speedup_vs_torch_best"])
    out = (table(rows, copy_gbs) + "\n\nGather + cast (cold rows, " + f"{gather_samples} samples of >= "
           f"{MIN_SAMPLE_S * 1e3:.0f} ms per op, interleaved; load average {load0:.1f} at start, {load1:.1f} at end):"
           "\n\n" + gather_table(grows) + "\n\n" + "\n".join(f"- {line}" for line in roofline_lines(grows))
           + "\n\n" + "\n".join(f"- {targets_line(t, summaries[t], bests[t])}" for t in threads)
           + "\n\n" + "\n".join(f"- {t} thread(s), {line}" for t in threads
                                  for line in lines_7b(gather_7b([r for r in grows if r["threads"] == t]))))
    print(out)
    if args.write:
        cmd = "python experiments/bench_offload.py" + (" --quick" if args.quick else "")
        meta = (f"Command: `{cmd}` ({'quick' if args.quick else 'full'}: {repeats} interleaved repeats, "
                f"medians; {wall:.0f} s)  \nDate: {datetime.datetime.now().isoformat(timespec='minutes')}  \n"
                f"Machine: {machine()}; offload's default thread count {default}; load average at start "
                f"{load0:.1f}, at end {load1:.1f} (shared machine, other jobs running)  \n"
                f"Versions: python {platform.python_version()}, torch {torch.__version__}, "
                f"numba {numba.__version__} ({numba.threading_layer()} threading layer), numpy {np.__version__}")
        replace_section(HEADING, f"{HEADING}\n\n{meta}\n\n" + "\n\n".join(__doc__.split("\n\n")[2:5]) + "\n\n"
                        + out + "\n\n" + NOTES + "\n")
    summary = dict(summaries[main_t], threads=main_t, load_avg=[round(load0, 2), round(load1, 2)],
                   best_repeats=bests[main_t], gather_7b=gather_7b([r for r in grows if r["threads"] == main_t]),
                   by_threads={str(t): sm for t, sm in summaries.items()})
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
