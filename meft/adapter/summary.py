"""What a wrapped model trains and where it lives: device-resident vs host-resident parameters and bytes.

Owns `summary(rt)` (a dict) and `summary_table(rt)` (the table `model.meft.summary_table()` prints).
"""

from __future__ import annotations

from offload.text import format_bytes

__all__ = ["summary", "summary_table"]


def summary(rt) -> dict:
    """Trainable parameters split into device-resident and host-resident, with bytes."""
    c = rt.config
    gates = sum(ad.gate.numel() for ad in rt.adapters)
    backbone_trained = rt.backbone_optimizer is not None
    bb = rt.backbone_params
    bb_params = sum(p.numel() for p in bb)
    bb_bytes = sum(p.numel() * p.element_size() for p in bb)
    rows_params = sum(s.n_rows * s.width for s in rt.stores)
    host_bytes = sum(s.nbytes for s in rt.stores)
    width = rt.stores[0].width if rt.stores else 0
    wire = c.wire.itemsize
    return {
        "layers": [ad.layer for ad in rt.adapters],
        "device_resident": {
            "router_gates": {"params": gates, "bytes": gates * 4 * 3},  # fp32 + AdamW moments
            "backbone": {"params": bb_params, "bytes": bb_bytes, "trained": backbone_trained},
            "active_rows_per_layer": {"rows": c.budget_rows, "bytes": c.budget_rows * width * wire},
        },
        "host_resident": {
            "adapter_rows": {"params": rows_params, "bytes": host_bytes,
                             "rows_per_layer": c.adapter_rows, "row_width": width,
                             "state_dtype": c.state_dtype},
        },
        "trainable_params": gates + (bb_params if backbone_trained else 0) + rows_params,
        "scheduler": type(rt.scheduler).__name__,
    }


def summary_table(rt) -> str:
    s = summary(rt)
    dev, host = s["device_resident"], s["host_resident"]["adapter_rows"]
    rows = [
        ("device", "router gates", dev["router_gates"]["params"], dev["router_gates"]["bytes"]),
        ("device", "backbone" + ("" if dev["backbone"]["trained"] else " (frozen)"),
         dev["backbone"]["params"], dev["backbone"]["bytes"]),
        ("host", f"adapter rows ({len(s['layers'])} x {host['rows_per_layer']} x {host['row_width']})",
         host["params"], host["bytes"]),
    ]
    lines = [f"{'where':<7}{'what':<44}{'params':>14}{'bytes':>12}"]
    lines += [f"{w:<7}{n:<44}{p:>14,}{format_bytes(b):>12}" for w, n, p, b in rows]
    a = dev["active_rows_per_layer"]
    lines.append(f"trainable: {s['trainable_params']:,} params; on device per layer per micro-batch: "
                 f"<= {a['rows']} rows ({format_bytes(a['bytes'])} on the wire); scheduler: {s['scheduler']}")
    return "\n".join(lines)
