"""What `meft profile` reports: measured traffic vs the analytic count and vs MEFT's original scheme,
the link prediction, the terminal table and the PNG.

* analytic count for the active sets: rows down = rows up = sum over (step, micro-batch, layer) of R,
  bytes = rows x 2d x wire bytes each way (ids stay on the host on a CPU device; on CUDA the ids
  D2H adds R x 8 bytes, reported as "ids").
* MEFT's original scheme (arXiv 2406.04984 released code) for the same active sets: fp32 hidden states
  [T, d] to the CPU, fp32 key and value rows [R, 2d] back, fp32 gradients of those rows [R, 2d] up.
* link prediction (labelled as such): each copy takes the link's fixed latency (issue, DMA setup and
  completion: `--link-latency-us`, 10 us assumed) plus its bytes / link GB/s (effective pinned bandwidths
  below), with the measured number of copies per layer and direction; per step, forward fetches are
  exposed (the rows are needed right after routing; with prefetch="lookahead" a fetch can hide behind
  the previous layer's forward), backward gradient copies queue on one copy stream behind the backward
  compute and only what runs past its end is exposed. Compute per layer: measured here
  (forward/backward hooks) or given.
"""

from __future__ import annotations

from collections import defaultdict

from offload.meter_export import TRACKS, summary_table

__all__ = ["build_report", "format_report", "plot_profile", "predict_link", "LINKS"]

LINKS = {"pcie3": 12.0, "pcie4": 25.0, "pcie5": 50.0}  # effective GB/s of pinned x16 copies (assumed)
LINK_LATENCY_US = 10.0  # fixed cost of one async copy (launch + DMA setup + completion), assumed


def _link_gbps(link: str) -> tuple[str, float]:
    if link in LINKS:
        return link, LINKS[link]
    try:
        v = float(link)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise ValueError(f"--link {link!r}: use pcie3, pcie4, pcie5 or a bandwidth in GB/s such as 20")
    return f"{v:g} GB/s", v


def _compute_per_layer(meter, steps_kept: int) -> dict[int, dict[str, float]]:
    """Mean forward / backward ms per layer per step over the retained steps."""
    acc: dict[int, dict[str, float]] = defaultdict(lambda: {"fwd_ms": 0.0, "bwd_ms": 0.0})
    for c in meter.events()["compute"]:
        kind, _, layer = c.name.partition(" L")
        acc[int(layer)][f"{kind}_ms"] += (c.end - c.start) * 1e3 / max(1, steps_kept)
    return dict(acc)


def predict_link(link: str, bytes_per_layer: dict, compute: dict, *, lookahead: bool,
                 copies_per_layer: dict | None = None, latency_us: float = LINK_LATENCY_US) -> dict:
    """Predicted exposed transfer ms per step on `link`; see the module docstring for the model.
    bytes_per_layer / copies_per_layer: {layer: {"h2d", "d2h", "ids": bytes / copies per step}} (copies
    default to one per direction that moves bytes); latency_us: the fixed cost of each copy."""
    name, gbps = _link_gbps(link)
    if not latency_us >= 0:
        raise ValueError(f"--link-latency-us {latency_us!r}: a number of microseconds >= 0, e.g. 10")
    layers = sorted(bytes_per_layer)
    copies = copies_per_layer or {la: {d: float(b > 0) for d, b in v.items()} for la, v in bytes_per_layer.items()}

    def ms(la, *dirs) -> float:  # copy time of one layer's `dirs` per step: latency per copy + bytes / bw
        b = sum(bytes_per_layer[la].get(d, 0) for d in dirs)
        n = sum(copies.get(la, {}).get(d, 0.0) for d in dirs)
        return n * latency_us * 1e-3 + b / (gbps * 1e9) * 1e3

    fwd_exposed = 0.0
    for k, la in enumerate(layers):
        hide = compute.get(layers[k - 1], {}).get("fwd_ms", 0.0) if lookahead and k else 0.0
        fwd_exposed += max(0.0, ms(la, "h2d") - hide)
    t = stream = 0.0
    for la in reversed(layers):  # backward: copies queue behind the compute that produced them
        t += compute.get(la, {}).get("bwd_ms", 0.0)
        stream = max(stream, t) + ms(la, "d2h", "ids")
    bwd_exposed = max(0.0, stream - t)
    comp = sum(v["fwd_ms"] + v["bwd_ms"] for v in compute.values())
    return {"label": "PREDICTION (not measured)", "link": name, "gbps": gbps, "latency_us": latency_us,
            "transfer_ms_per_step": sum(ms(la, *bytes_per_layer[la]) for la in layers),
            "compute_ms_per_step": comp, "forward_exposed_ms": fwd_exposed, "backward_exposed_ms": bwd_exposed,
            "exposed_ms_per_step": fwd_exposed + bwd_exposed}


def _meft_original(active: dict) -> dict:
    d = active.get("d", active["width"] // 2)
    w = 2 * d  # MEFT's scheme moves whole fp32 [key | value] rows
    rows, tokens = sum(active["rows"].values()), sum(active["tokens"].values())
    return {"hidden_d2h": tokens * d * 4, "rows_h2d": rows * w * 4, "grads_d2h": rows * w * 4,
            "total": tokens * d * 4 + 2 * rows * w * 4}


def build_report(meter, run: dict, active: dict, *, link=None, compute_ms_per_layer=None, config=None,
                 link_latency_us: float = LINK_LATENCY_US, threads: dict | None = None) -> dict:
    rep = meter.report()
    tot = rep["totals"]
    measured = {k: tot.get(k, {}).get("bytes", 0) for k in ("h2d", "d2h", "ids")}
    measured["total"] = sum(measured.values())
    rows = sum(active["rows"].values())
    per_row = active["width"] * active["wire_bytes"]
    analytic = {"rows": rows, "h2d": rows * per_row, "d2h": rows * per_row}
    original = _meft_original(active)
    steps = run["steps"]
    kept = min(steps, meter.keep_steps)
    compute = _compute_per_layer(meter, kept)
    if compute_ms_per_layer is not None:  # given: split 1/3 forward, 2/3 backward
        compute = {la: {"fwd_ms": compute_ms_per_layer / 3, "bwd_ms": 2 * compute_ms_per_layer / 3}
                   for la in active["rows"]}
    per_layer = {}
    for la, dirs in rep["per_layer"].items():
        per_layer[la] = {d: {"rows": a["rows"], "bytes": a["bytes"], "ms": a["ms"], "gbps": a["gbps"]}
                         for d, a in dirs.items()}
        per_layer[la]["analytic_rows"] = active["rows"].get(la, 0)
        per_layer[la].update(compute.get(la, {"fwd_ms": 0.0, "bwd_ms": 0.0}))
    ov = rep["overlap"]
    out = {"run": run, "measured_bytes": measured, "analytic_bytes": analytic,
           "measured_equals_analytic": measured["h2d"] == analytic["h2d"] and measured["d2h"] == analytic["d2h"],
           "meft_original_bytes": original,
           "meft_original_over_measured": original["total"] / measured["total"] if measured["total"] else None,
           "transfer": {"total_ms": ov["transfer_ms"], "overlapped_ms": ov["overlapped_ms"],
                        "exposed_ms": ov["transfer_ms"] - ov["overlapped_ms"], "overlap_share": ov["share"],
                        "host_blocked_ms": ov["blocked_ms"]},
           "host": {"threads": threads or {}, "worker_waits": ov.get("worker_waits", 0),
                    "worker_blocked_ms": ov.get("worker_blocked_ms", 0.0),
                    "update_ms": ov.get("update_ms", 0.0),
                    "update_with_compute_ms": ov.get("update_with_compute_ms", 0.0),
                    "update_overlap_share": ov.get("update_overlap_share", 0.0)},
           "cpu": rep["cpu"], "pageable_copies": rep["pageable_copies"], "per_layer": per_layer,
           "per_step": rep["per_step"], "totals": tot, "lookahead": rep["lookahead"], "config": config or {}}
    if link:
        bpl = {la: {d: v.get(d, {}).get("bytes", 0) / steps for d in ("h2d", "d2h", "ids")}
               for la, v in per_layer.items()}
        cpl = {la: {d: rep["per_layer"][la].get(d, {}).get("count", 0) / steps for d in ("h2d", "d2h", "ids")}
               for la in per_layer}
        lookahead = (config or {}).get("meft", {}).get("prefetch") == "lookahead"
        out["link_prediction"] = predict_link(link, bpl, compute, lookahead=lookahead, copies_per_layer=cpl,
                                              latency_us=link_latency_us)
    return out


def format_report(rep: dict) -> str:
    r, m, a, o = rep["run"], rep["measured_bytes"], rep["analytic_bytes"], rep["meft_original_bytes"]
    tr, upd = rep["transfer"], rep["cpu"].get("update", {"ms": 0.0, "gbps": 0.0})
    lines = [summary_table({k: rep[k] for k in ("totals", "cpu", "per_layer", "per_step", "pageable_copies",
                                                 "lookahead")} | {"keep_steps": len(rep["per_step"]),
                                                                  "compute_ms": 0.0, "overlap": {
                                                                      "share": tr["overlap_share"],
                                                                      "overlapped_ms": tr["overlapped_ms"],
                                                                      "transfer_ms": tr["total_ms"]}}), "",
             f"steps {r['steps']}: {r['tokens_per_s']:.0f} labelled tokens/s, {r['input_tokens_per_s']:.0f} "
             f"input tokens/s",
             f"transfer time {tr['total_ms']:.2f} ms: overlapped {tr['overlapped_ms']:.2f} ms, exposed "
             f"{tr['exposed_ms']:.2f} ms",
             f"CPU updates: {upd['ms']:.2f} ms, {upd['gbps']:.2f} GB/s touched; pageable copies: "
             f"{rep['pageable_copies']}",
             f"bytes: measured h2d {m['h2d']:,} d2h {m['d2h']:,} ids {m['ids']:,}; analytic for the active sets "
             f"h2d {a['h2d']:,} d2h {a['d2h']:,} ({'equal' if rep['measured_equals_analytic'] else 'DIFFERENT'})",
             f"MEFT's original scheme for the same active sets (fp32 hidden [T, d] up, fp32 rows [R, 2d] down, "
             f"fp32 row grads up): {o['total']:,} bytes = {rep['meft_original_over_measured']:.2f}x measured"]
    h = rep.get("host")
    if h:
        t = h["threads"]
        plan = (f"{t['cores']} cores: main thread 1 + host worker {t['host_threads']} kernel thread(s) = "
                f"{t['busy']} busy ({'fits' if t['fits'] else 'OVERSUBSCRIBED'}), {t['engine_threads']} copy-engine "
                "threads" if t else "thread plan not recorded")
        lines.append(f"host: {plan}; the compute thread waited for the host worker {h['worker_waits']} times "
                     f"({h['worker_blocked_ms']:.2f} ms); row updates {h['update_ms']:.2f} ms, "
                     f"{100 * h['update_overlap_share']:.0f}% of it while compute ran")
    p = rep.get("link_prediction")
    if p:
        lines.append(f"{p['label']}: on {p['link']} ({p['gbps']:g} GB/s, {p['latency_us']:g} us per copy) "
                     f"transfers take "
                     f"{p['transfer_ms_per_step']:.2f} ms/step, exposed {p['exposed_ms_per_step']:.2f} ms/step "
                     f"(forward {p['forward_exposed_ms']:.2f}, backward {p['backward_exposed_ms']:.2f}) against "
                     f"{p['compute_ms_per_step']:.2f} ms/step of compute per layer sum")
    return "\n".join(lines)


def plot_profile(meter, rep: dict, path) -> None:
    """Bytes per layer each way (with MEFT's original scheme) and the timeline of the last step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7))
    layers = sorted(rep["per_layer"])
    for j, d in enumerate(("h2d", "d2h")):
        vals = [rep["per_layer"][la].get(d, {}).get("bytes", 0) / 2**20 for la in layers]
        ax1.bar([la + (j - 0.5) * 0.4 for la in layers], vals, width=0.4, label=f"{d} (measured)")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("MiB (all steps)")
    ax1.set_title(f"bytes per layer; MEFT's original scheme moves {rep['meft_original_over_measured']:.2f}x")
    ax1.legend()
    ev = meter.events()
    last = max((t.step for t in ev["transfers"]), default=0)
    spans = {k: [] for k in TRACKS}
    for t in ev["transfers"]:
        if t.step == last:
            spans[t.direction].append((t.start, t.end - t.start))
    for c in ev["cpu"]:
        if c.step == last:
            spans["cpu"].append((c.start, c.end - c.start))
    for c in ev["compute"]:
        if c.step == last:
            spans["compute"].append((c.start, c.end - c.start))
    t0 = min((s for v in spans.values() for s, _ in v), default=0.0)
    for i, k in enumerate(TRACKS):
        ax2.broken_barh([((s - t0) * 1e3, w * 1e3) for s, w in spans[k]], (i - 0.4, 0.8))
    ax2.set_yticks(range(len(TRACKS)), [TRACKS[k][1] for k in TRACKS])
    ax2.set_xlabel(f"ms (step {last})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
