"""TrafficMeter: aggregation, bounded memory, overlap (vs a plain grid twin), exports."""

import json
import sys

import pytest
import torch

from offload.meter import TrafficMeter, interval_overlap, interval_subtract


def _xfer(m, step, layer, d="h2d", nbytes=1000, rows=10, start=0.0, end=1.0, mb=0, pageable=False):
    m.record_transfer(step=step, micro_batch=mb, layer=layer, direction=d, nbytes=nbytes, rows=rows,
                      start=start, end=end, engine="thread", pageable=pageable)


def plain_overlap(a, b, res=2e-3):
    """Twin of interval_overlap on a time grid: (covered by a, covered by a and b)."""
    hi = max([e for _, e in a + b], default=0.0)
    t = torch.arange(0, hi, res, dtype=torch.float64) + res / 2
    cover = lambda iv: torch.stack([(t >= s) & (t < e) for s, e in iv]).any(0)
    ca, cb = cover(a), cover(b)
    return float(ca.sum()) * res, float((ca & cb).sum()) * res


def _random_intervals(n: int, g: torch.Generator) -> list[tuple[float, float]]:
    """`n` intervals starting in [0, 9) s, 0.01-2 s long, on a 10 ms grid (they may overlap)."""
    starts = torch.randint(0, 900, (n,), generator=g) / 100
    lengths = torch.randint(1, 200, (n,), generator=g) / 100
    return [(float(s), float(s) + float(d)) for s, d in zip(starts, lengths)]


def test_interval_overlap_matches_plain_twin():
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        a, b = _random_intervals(6, g), _random_intervals(5, g)
        fast, plain = interval_overlap(a, b), plain_overlap(a, b)
        torch.testing.assert_close(torch.tensor(fast, dtype=torch.float64),
                                   torch.tensor(plain, dtype=torch.float64), atol=2e-2, rtol=0)


def test_interval_subtract_matches_plain_twin():
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        a, b = _random_intervals(6, g), _random_intervals(5, g)
        left = interval_subtract(a, b)
        assert all(s < e for s, e in left) and all(left[i][1] <= left[i + 1][0] for i in range(len(left) - 1))
        covered_a, _ = plain_overlap(a, a)
        _, a_and_b = plain_overlap(a, b)
        total, inter = interval_overlap(left, b)  # nothing of a - b lies in b, and a - b = a less a & b
        assert inter == pytest.approx(0.0, abs=1e-12)
        assert total == pytest.approx(covered_a - a_and_b, abs=2e-2)


def test_host_blocked_time_inside_compute_is_not_overlap():
    """A compute interval is host-timed: while the driving thread waits for the copy itself, that copy is
    exposed, not overlapped. Blocked intervals are cut out of compute before overlap is counted."""
    m = TrafficMeter()
    m.set_step(1)
    _xfer(m, 1, 0, start=0.0, end=1.0)
    m.record_compute("fwd L0", 0.0, 2.0)  # the layer's forward spans the whole copy...
    m.record_blocked(1, 0.25, 1.0)  # ...but waited for it from 0.25 on
    r = m.report()
    assert r["overlap"]["share"] == pytest.approx(0.25)
    assert r["overlap"]["blocked_ms"] == pytest.approx(750.0)


def test_totals_per_layer_per_step_and_gbps():
    m = TrafficMeter()
    for step in (1, 2):
        for layer in range(3):
            _xfer(m, step, layer, "h2d", nbytes=2_000_000, rows=100, start=0, end=0.001)
            _xfer(m, step, layer, "d2h", nbytes=1_000_000, rows=100, start=0.001, end=0.002)
    m.record_update(step=1, layer=0, rows=100, nbytes=5_000_000, start=0, end=0.01)
    r = m.report()
    assert r["totals"]["h2d"]["bytes"] == 12_000_000 and r["totals"]["d2h"]["rows"] == 600
    assert r["totals"]["h2d"]["gbps"] == pytest.approx(2.0)
    assert r["per_layer"][1]["d2h"]["bytes"] == 2_000_000
    assert r["per_step"][2]["h2d"]["bytes"] == 6_000_000 and r["per_step"][2]["h2d"]["count"] == 3
    assert r["cpu"]["update"]["gbps"] == pytest.approx(0.5) and r["cpu"]["update"]["ms"] == pytest.approx(10)


def test_overlap_share_counts_compute_and_cpu_work():
    m = TrafficMeter()
    m.set_step(1)
    _xfer(m, 1, 0, start=0.0, end=1.0)
    _xfer(m, 1, 1, d="d2h", start=2.0, end=3.0)
    m.record_compute("fwd L0", 0.5, 1.5)  # covers half of the first copy
    m.record_cpu(step=1, layer=1, op="accumulate", rows=1, nbytes=1, start=2.0, end=2.25)
    r = m.report()
    assert r["overlap"]["share"] == pytest.approx(0.75 / 2.0)
    assert r["per_step"][1]["overlap_share"] == pytest.approx(0.375)


def test_bounded_memory_keeps_totals_for_all_steps():
    m = TrafficMeter(keep_steps=3)
    for step in range(1, 101):
        _xfer(m, step, 0, start=step, end=step + 1.0)
        m.record_compute("c", step, step + 0.5, step=step)
    r = m.report()
    assert len(m._raw) == 3 and sorted(r["per_step"]) == [98, 99, 100]
    assert r["totals"]["h2d"]["count"] == 100 and r["totals"]["h2d"]["bytes"] == 100_000
    assert r["overlap"]["transfer_ms"] == pytest.approx(100_000) and r["overlap"]["share"] == pytest.approx(0.5)
    _xfer(m, 5, 0)  # a late record of an evicted step: counted, not retained, nothing evicted
    assert sorted(m.report()["per_step"]) == [98, 99, 100] and m.report()["totals"]["h2d"]["count"] == 101
    with pytest.raises(ValueError, match="keep_steps"):
        TrafficMeter(keep_steps=0)


def test_lookahead_and_pageable_counters():
    m = TrafficMeter()
    m.record_lookahead(1, 0, needed=10, hit=7)
    m.record_lookahead(2, 0, needed=10, hit=3)
    m.record_lookahead(2, 1, needed=5, hit=5)
    _xfer(m, 1, 0, pageable=True)
    r = m.report()
    assert r["lookahead"]["hit_rate"] == pytest.approx(15 / 25)
    assert r["lookahead"]["per_layer"][0]["hit_rate"] == pytest.approx(0.5)
    assert r["pageable_copies"] == 1
    with pytest.raises(ValueError, match="hit"):
        m.record_lookahead(1, 0, needed=3, hit=4)
    with pytest.raises(ValueError, match="direction"):
        _xfer(m, 1, 0, d="sideways")


def _filled():
    m = TrafficMeter()
    m.set_step(1)
    for layer in range(2):
        _xfer(m, 1, layer, start=layer * 0.01, end=layer * 0.01 + 0.004)
        _xfer(m, 1, layer, d="d2h", start=0.03 + layer * 0.01, end=0.034 + layer * 0.01)
        m.record_cpu(step=1, layer=layer, op="update", rows=10, nbytes=10_000, start=0.05, end=0.06)
    m.record_compute("fwd", 0.0, 0.02)
    m.record_lookahead(1, 0, 4, 2)
    return m


def test_json_and_chrome_trace_exports(tmp_path):
    m = _filled()
    d = m.to_json(tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["report"]["totals"]["h2d"]["count"] == 2
    assert len(d["events"]["transfers"]) == 4
    m.export_chrome_trace(tmp_path / "t.json")
    tr = json.loads((tmp_path / "t.json").read_text())
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    names = {e["args"]["name"] for e in tr["traceEvents"] if e["name"] == "thread_name"}
    assert {"H2D copies (rows)", "D2H copies (grads)", "CPU row work", "compute"} <= names
    tids = {e["cat"]: set() for e in xs}
    for e in xs:
        tids[e["cat"]].add(e["tid"])
        assert e["dur"] >= 0 and e["ts"] >= 0
    assert tids["cpu"].isdisjoint(tids["compute"]) and tids["copy"].isdisjoint(tids["cpu"] | tids["compute"])


def test_png_export(tmp_path):
    pytest.importorskip("matplotlib")
    _filled().export_png(tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_png_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"meft\[plots\]"):
        _filled().export_png(tmp_path / "m.png")


def test_summary_table_prints():
    text = _filled().summary()
    for needle in ("direction", "h2d", "update", "per layer", "per step", "overlapped", "lookahead hit rate"):
        assert needle in text
    assert max(len(line) for line in text.splitlines()) < 110
