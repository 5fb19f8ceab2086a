"""Exports of a TrafficMeter: JSON, Chrome trace-event JSON (Perfetto), PNG plot, terminal table.

matplotlib is imported lazily, only by `plot_png` (optional extra `meft[plots]`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from offload.text import format_bytes, format_table

__all__ = ["to_json", "chrome_trace", "plot_png", "summary_table", "TRACKS"]

# Chrome trace tracks (one thread id each): copies, CPU work and compute on separate rows
TRACKS = {"h2d": (1, "H2D copies (rows)"), "d2h": (2, "D2H copies (grads)"), "ids": (3, "ids copies"),
          "collective": (6, "row grads across ranks"), "cpu": (4, "CPU row work"), "compute": (5, "compute")}


def _write_json(obj, path) -> None:
    if path is None:
        return
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def to_json(meter, path=None, *, events: bool = True) -> dict:
    """The report (and the retained raw events if `events`) as a JSON-serialisable dict."""
    out = {"report": meter.report()}
    if events:
        ev = meter.events()
        out["events"] = {k: [asdict(r) for r in v] for k, v in ev.items()}
    _write_json(out, path)
    return out


def chrome_trace(meter, path=None) -> dict:
    """Trace-event JSON ({"traceEvents": [...]}, times in µs) that Perfetto / chrome://tracing open."""
    ev = meter.events()
    t0 = min([r.start for k in ev for r in ev[k]], default=0.0)
    us = lambda t: (t - t0) * 1e6
    trace = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "meft offload"}}]
    trace += [{"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": name}}
              for tid, name in TRACKS.values()]
    for t in ev["transfers"]:
        trace.append({"ph": "X", "pid": 1, "tid": TRACKS[t.direction][0], "ts": us(t.start),
                      "dur": us(t.end) - us(t.start), "name": f"{t.direction} L{t.layer}", "cat": "copy",
                      "args": {"step": t.step, "micro_batch": t.micro_batch, "bytes": t.nbytes,
                               "rows": t.rows, "engine": t.engine, "pageable": t.pageable}})
    for c in ev["cpu"]:
        trace.append({"ph": "X", "pid": 1, "tid": TRACKS["cpu"][0], "ts": us(c.start),
                      "dur": us(c.end) - us(c.start), "name": f"{c.op} L{c.layer}", "cat": "cpu",
                      "args": {"step": c.step, "rows": c.rows, "bytes": c.nbytes}})
    for c in ev["compute"]:
        trace.append({"ph": "X", "pid": 1, "tid": TRACKS["compute"][0], "ts": us(c.start),
                      "dur": us(c.end) - us(c.start), "name": c.name, "cat": "compute",
                      "args": {"step": c.step}})
    out = {"traceEvents": trace, "displayTimeUnit": "ms"}
    _write_json(out, path)
    return out


def plot_png(meter, path) -> None:
    """Timeline of the retained steps (one row per track) and bytes per layer each way."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("TrafficMeter.export_png needs matplotlib: pip install 'meft[plots]' (or pip "
                          "install matplotlib); JSON and Chrome-trace exports work without it") from exc
    ev, rep = meter.events(), meter.report()
    t0 = min([r.start for k in ev for r in ev[k]], default=0.0)
    rows = {"h2d": [], "d2h": [], "ids": [], "collective": [], "cpu": [], "compute": []}
    for t in ev["transfers"]:
        rows[t.direction].append(((t.start - t0) * 1e3, (t.end - t.start) * 1e3))
    for c in ev["cpu"]:
        rows["cpu"].append(((c.start - t0) * 1e3, (c.end - c.start) * 1e3))
    for c in ev["compute"]:
        rows["compute"].append(((c.start - t0) * 1e3, (c.end - c.start) * 1e3))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6.5))
    for i, spans in enumerate(rows.values()):
        ax1.broken_barh(spans, (i - 0.4, 0.8))
    ax1.set_yticks(range(len(rows)), [TRACKS[k][1] for k in rows])
    ax1.set_xlabel("ms (retained steps)")
    ax1.set_title(f"overlap share of transfer time: {rep['overlap']['share']:.2f}")
    layers = sorted(rep["per_layer"])
    for j, d in enumerate(("h2d", "d2h")):
        vals = [rep["per_layer"][la].get(d, {}).get("bytes", 0) / 2**20 for la in layers]
        ax2.bar([la + (j - 0.5) * 0.4 for la in layers], vals, width=0.4, label=d)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("MiB (all steps)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(header, rows) -> list[str]:
    """Left-aligned first column, the rest right-aligned (pre-formatted numbers)."""
    return format_table(rows, header, right=range(1, len(header))).split("\n")


def summary_table(rep: dict) -> str:
    """Plain-text summary of a `TrafficMeter.report()`."""
    out = ["transfers (all steps)"]
    out += _table(["direction", "count", "rows", "bytes", "ms", "GB/s"],
                  [[d, a["count"], a["rows"], format_bytes(a["bytes"]), f"{a['ms']:.2f}", f"{a['gbps']:.2f}"]
                   for d, a in rep["totals"].items()])
    out += ["", "CPU row work (all steps)"]
    out += _table(["op", "count", "rows", "bytes touched", "ms", "GB/s"],
                  [[op, a["count"], a["rows"], format_bytes(a["bytes"]), f"{a['ms']:.2f}", f"{a['gbps']:.2f}"]
                   for op, a in rep["cpu"].items()])
    out += ["", "per layer (all steps)"]
    zero = {"bytes": 0, "rows": 0, "gbps": 0.0}
    out += _table(["layer", "h2d bytes", "d2h bytes", "h2d rows", "h2d GB/s", "d2h GB/s"],
                  [[la, format_bytes(v.get("h2d", zero)["bytes"]), format_bytes(v.get("d2h", zero)["bytes"]),
                    v.get("h2d", zero)["rows"], f"{v.get('h2d', zero)['gbps']:.2f}",
                    f"{v.get('d2h', zero)['gbps']:.2f}"] for la, v in rep["per_layer"].items()])
    out += ["", f"per step (last {rep['keep_steps']} kept)"]
    out += _table(["step", "h2d bytes", "d2h bytes", "rows down", "xfer ms", "overlap", "cpu ms",
                   "compute ms"],
                  [[s, format_bytes(v["h2d"]["bytes"]), format_bytes(v["d2h"]["bytes"]), v["h2d"]["rows"],
                    f"{v['transfer_ms']:.2f}", f"{v['overlap_share']:.2f}", f"{v['cpu_ms']:.2f}",
                    f"{v['compute_ms']:.2f}"] for s, v in rep["per_step"].items()])
    ov, la = rep["overlap"], rep["lookahead"]
    out += ["", f"transfer time overlapped with other work: {ov['share']:.1%} "
                f"({ov['overlapped_ms']:.2f} of {ov['transfer_ms']:.2f} ms)",
            f"pageable copies: {rep['pageable_copies']}    compute: {rep['compute_ms']:.2f} ms"]
    if la["needed"]:
        out.append(f"lookahead hit rate: {la['hit_rate']:.1%} "
                   f"({la['hit']} of {la['needed']} rows prefetched)")
    return "\n".join(out)
