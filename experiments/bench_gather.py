"""Gather (+ bf16 cast) half of experiments/bench_offload.py: RowStore.gather vs a contiguous copy of the
same bytes and vs torch index_select, on cold random rows.

Owns the gather table, its summary (worst case over stores and active-row counts), the 7B-width figures
(`gather_7b`) and the roofline lines; how samples are taken and bytes credited is described in
bench_offload.py's docstring, "(2) Gather".
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from offload.store import RowStore

__all__ = ["D_7B", "GATHER_OPS", "MIN_SAMPLE_S", "GatherCase", "measure_gather", "summarize_gather", "gather_7b",
           "lines_7b", "gather_table", "roofline_lines"]

D_7B = 4096  # hidden size of Llama-2-7B and Mistral-7B
GATHER_OPS = ("copy", "numba bf16", "numba bf16 sequential ids", "torch index_select + to(bf16)", "numba fp32")
GATHER_BYTES = {"numba fp32": 8}  # credited bytes per element; every other gather op: 6 (see the docstring)
MIN_SAMPLE_S = 0.05  # each sample runs K calls, K sized so the copy alone takes at least this long


class GatherCase:
    """One store and one active-row count: every gather method with its buffers preallocated."""

    def __init__(self, store: RowStore, n_active: int, gen: torch.Generator):
        self.store, self.r, self.gen, w = store, n_active, gen, store.width
        self.out_bf16 = torch.zeros(n_active, w, dtype=torch.bfloat16)  # [R, W] wire buffer
        self.out_f32 = torch.zeros(n_active, w)                          # [R, W] fp32 (numba fp32, torch)
        self.copy_dst = torch.zeros(n_active, w)                         # [R, W] copy destination
        self.k = 1

    def ids(self, op: str) -> torch.Tensor:
        """Fresh ids for one call: random unique sorted rows, or (copy / sequential) a random start row."""
        n, r = self.store.n_rows, self.r
        if op in ("copy", "numba bf16 sequential ids"):
            start = int(torch.randint(0, n - r + 1, (1,), generator=self.gen))
            return torch.arange(start, start + r)
        return torch.randperm(n, generator=self.gen)[:r].sort().values

    def call(self, op: str, ids: torch.Tensor) -> None:
        s = self.store
        if op == "copy":
            self.copy_dst.copy_(s.weights[int(ids[0]): int(ids[0]) + self.r])
        elif op == "numba fp32":
            s.gather(ids, self.out_f32)
        elif op.startswith("numba bf16"):
            s.gather(ids, self.out_bf16)
        else:
            torch.index_select(s.weights, 0, ids, out=self.out_f32)
            self.out_bf16.copy_(self.out_f32)

    def sample(self, op: str) -> tuple[float, float]:
        """(wall, process CPU) seconds per call, over K calls with ids made before the clock starts."""
        idss = [self.ids(op) for _ in range(self.k)]
        c0, t0 = time.process_time(), time.perf_counter()
        for ids in idss:
            self.call(op, ids)
        t1, c1 = time.perf_counter(), time.process_time()
        return (t1 - t0) / self.k, (c1 - c0) / self.k

    def calibrate(self) -> None:
        for op in GATHER_OPS:  # compile, first touch of the buffers
            self.call(op, self.ids(op))
        self.k = 1
        self.k = max(1, math.ceil(MIN_SAMPLE_S / min(self.sample("copy")[0] for _ in range(3))))


def measure_gather(store: RowStore, actives, t: int, samples: int, gen: torch.Generator) -> list:
    """Rows of the gather table for one store and thread count: all ops interleaved sample by sample."""
    cases = [GatherCase(store, r, gen) for r in actives]
    for case in cases:
        case.calibrate()
    times = {(i, op): [] for i in range(len(cases)) for op in GATHER_OPS}
    for rep in range(samples):
        for i, case in enumerate(cases):
            for k in range(len(GATHER_OPS)):
                op = GATHER_OPS[(k + rep) % len(GATHER_OPS)]
                times[(i, op)].append(case.sample(op))
    rows = []
    for (i, op), ts in times.items():
        wall, cpu = [w for w, _ in ts], [c for _, c in ts]
        rows.append({"threads": t, "shape": f"{store.n_rows}x{store.width}", "rows": cases[i].r, "op": op,
                     "calls": cases[i].k, "ms": 1e3 * statistics.median(wall), "best_ms": 1e3 * min(wall),
                     "cpu_ms": 1e3 * statistics.median(cpu), "elems": cases[i].r * store.width})
    by = {(r["rows"], r["op"]): r for r in rows}
    for row in rows:
        credit = GATHER_BYTES.get(row["op"], 6)
        copy = by[(row["rows"], "copy")]
        for key in ("ms", "best_ms", "cpu_ms"):
            row[f"gbs_{key}"] = credit * row["elems"] / (row[key] / 1e3) / 1e9
            row[f"frac_{key}"] = copy[key] / row[key]  # = GB/s / copy GB/s at the same credited bytes
    return rows


def summarize_gather(rows: list) -> dict:
    """Worst case over shapes and active-row counts (one thread count), medians and best samples."""
    by = {(r["shape"], r["rows"], r["op"]): r for r in rows}
    keys = sorted({(r["shape"], r["rows"]) for r in rows})
    torch_op = "torch index_select + to(bf16)"
    out = {}
    for key, tag in (("ms", "median"), ("best_ms", "best"), ("cpu_ms", "cpu_median")):
        frac = {op: round(min(by[(*k, op)][f"frac_{key}"] for k in keys), 3)
                for op in ("numba bf16", "numba fp32", "numba bf16 sequential ids")}
        out[f"gather_bandwidth_fraction_{tag}"] = frac["numba bf16"]
        out[f"gather_fp32_bandwidth_fraction_{tag}"] = frac["numba fp32"]
        out[f"gather_sequential_ids_fraction_{tag}"] = frac["numba bf16 sequential ids"]
        out[f"gather_speedup_vs_torch_{tag}"] = round(min(by[(*k, torch_op)][key] / by[(*k, "numba bf16")][key]
                                                          for k in keys), 3)
    out["gather_copy_gbs_median"] = round(min(by[(*k, "copy")]["gbs_ms"] for k in keys), 3)
    return out


def gather_7b(rows: list) -> dict:
    """bf16 gather vs contiguous copy at the 7B row widths, per width and active-row count (one thread count)."""
    by = {(int(r["shape"].split("x")[1]), r["rows"], r["op"]): r for r in rows}
    out = {}
    for width, label in ((2 * D_7B, "kv_rows_8192"), (D_7B, "values_only_4096")):
        for n in sorted({r for w, r, _ in by if w == width}):
            g, c = by[(width, n, "numba bf16")], by[(width, n, "copy")]
            out[f"{label}_{n}_rows"] = {
                "gather_gbs": round(g["gbs_ms"], 3), "copy_gbs": round(c["gbs_ms"], 3),
                "fraction_of_copy": round(g["frac_ms"], 3), "fraction_of_copy_best": round(g["frac_best_ms"], 3),
                # the copy really moves 8 B/elem (fp32 write): the gather's GB/s against the copy's raw bytes
                "copy_raw_gbs": round(c["gbs_ms"] * 8 / 6, 3), "fraction_of_raw_copy": round(g["frac_ms"] * 6 / 8, 3)}
    return out


def lines_7b(g7: dict) -> list:
    """One line per `gather_7b` entry: bf16 gather GB/s beside the contiguous copy's (target 70% of it)."""
    return [f"7B row width, {k.replace('_', ' ')}: gather+bf16 {v['gather_gbs']:.2f} GB/s, copy {v['copy_gbs']:.2f} "
            f"GB/s (6 B/elem credited to both): {v['fraction_of_copy']:.0%} of copy (best samples "
            f"{v['fraction_of_copy_best']:.0%}; target 70%); against the bytes the copy really moves (8 B/elem, "
            f"{v['copy_raw_gbs']:.2f} GB/s) {v['fraction_of_raw_copy']:.0%}" for k, v in g7.items()]


def gather_table(rows: list) -> str:
    lines = ["| threads | store (rows x width) | active rows | op | calls/sample | median ms | best ms | "
             "CPU ms (median) | B/elem credited | GB/s median | GB/s best | of copy (median) | of copy (best) |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['shape']} | {r['rows']} | {r['op']} | {r['calls']} | {r['ms']:.2f} | "
                     f"{r['best_ms']:.2f} | {r['cpu_ms']:.2f} | {GATHER_BYTES.get(r['op'], 6)} | "
                     f"{r['gbs_ms']:.2f} | {r['gbs_best_ms']:.2f} | {r['frac_ms']:.0%} | {r['frac_best_ms']:.0%} |")
    return "\n".join(lines)


def roofline_lines(rows: list) -> list:
    """Per store and active-row count: where the gather's time goes (random rows vs the same call on
    consecutive ids vs the contiguous copy), from the median times."""
    by = {(r["threads"], r["shape"], r["rows"], r["op"]): r for r in rows}
    out = []
    for t, shape, n, _ in sorted({k for k in by if k[3] == "copy"}):
        rnd, seq, cp = (by[(t, shape, n, op)]["ms"] for op in ("numba bf16", "numba bf16 sequential ids", "copy"))
        width = int(shape.split("x")[1])
        out.append(f"{t} thread(s), {shape}, {n} rows ({4 * width} B per fp32 row, "
                   f"{math.ceil(4 * width / 4096) + 1} 4-KiB pages touched per random row at most): copy {cp:.2f} ms, "
                   f"bf16 gather on consecutive ids {seq:.2f} ms ({cp / seq:.0%} of copy: the cast pass itself), "
                   f"on random ids {rnd:.2f} ms ({cp / rnd:.0%}); random-row cost {1e6 * (rnd - seq) / 1e3 / n:.3f} us "
                   f"per row above sequential")
    return out
