"""TrafficMeter: every host<->device transfer and every CPU row operation, recorded and reported.

Owns the accounting of docs/design.md "Traffic, profiling, planning": per transfer (step, micro-batch,
layer, direction, bytes, rows, start/end, engine, pageable), per CPU operation (gather / accumulate /
update: rows, bytes touched, duration), compute intervals (`record_compute`), host-blocked intervals
(`record_blocked`: the thread that drives compute waiting for rows or a staging slot) and lookahead hit
counters.

Overlap: the share of transfer time that runs while the host does CPU row work or compute. Compute
intervals are host-timed, so the time the driving thread spends blocked inside them (waiting for the
very transfer being measured) is cut out first: a blocked wait never counts as overlap.

Memory is bounded: raw events are kept for the `keep_steps` most recent steps (for traces, plots and
overlap); totals, per-layer totals and the overlap of evicted steps are aggregated for all steps.
Times are `time.perf_counter()` seconds. Thread-safe (engine and worker threads record here).
Exports (JSON, Chrome trace, PNG, terminal table) live in `offload.meter_export`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from dataclasses import asdict, dataclass

from offload.meter_export import chrome_trace, plot_png, summary_table, to_json

__all__ = ["TrafficMeter", "Transfer", "CpuOp", "Compute", "interval_overlap", "interval_subtract"]

DIRECTIONS = ("h2d", "d2h", "ids", "collective")  # collective: torch.distributed row-gradient exchange


@dataclass(slots=True)
class Transfer:
    step: int
    micro_batch: int
    layer: int
    direction: str  # "h2d" rows down, "d2h" grads up, "ids" row ids / slots, "collective" ranks' row grads
    nbytes: int
    rows: int
    start: float
    end: float
    engine: str
    pageable: bool = False


@dataclass(slots=True)
class CpuOp:
    step: int
    layer: int
    op: str  # "gather" | "accumulate" | "update"
    rows: int
    nbytes: int  # bytes touched (read + written), an estimate documented by the recorder
    start: float
    end: float


@dataclass(slots=True)
class Compute:
    step: int
    name: str
    start: float
    end: float


def _union(intervals):
    """Sorted, merged list of (start, end)."""
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return out


def interval_subtract(a, b) -> list[list[float]]:
    """union(a) minus union(b), as a sorted list of [start, end]."""
    out, ub, j = [], _union(b), 0
    for s, e in _union(a):
        while j < len(ub) and ub[j][1] <= s:
            j += 1
        k, cur = j, s
        while k < len(ub) and ub[k][0] < e:
            if ub[k][0] > cur:
                out.append([cur, ub[k][0]])
            cur = max(cur, ub[k][1])
            k += 1
        if cur < e:
            out.append([cur, e])
    return out


def interval_overlap(a, b) -> tuple[float, float]:
    """(length of union(a), length of union(a) ∩ union(b)) for lists of (start, end) intervals."""
    ua, ub = _union(a), _union(b)
    total = sum(e - s for s, e in ua)
    inter, j = 0.0, 0
    for s, e in ua:
        while j < len(ub) and ub[j][1] <= s:
            j += 1
        k = j
        while k < len(ub) and ub[k][0] < e:
            inter += min(e, ub[k][1]) - max(s, ub[k][0])
            k += 1
    return total, inter


class _Agg:
    """Running totals of one kind of record."""

    __slots__ = ("count", "nbytes", "rows", "seconds")

    def __init__(self):
        self.count, self.nbytes, self.rows, self.seconds = 0, 0, 0, 0.0

    def add(self, nbytes: int, rows: int, seconds: float) -> None:
        self.count += 1
        self.nbytes += nbytes
        self.rows += rows
        self.seconds += seconds

    def as_dict(self) -> dict:
        gbps = self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        return {"count": self.count, "bytes": self.nbytes, "rows": self.rows,
                "ms": self.seconds * 1e3, "gbps": gbps}


class _StepRaw:
    __slots__ = ("transfers", "cpu", "compute", "blocked")

    def __init__(self):
        self.transfers: list[Transfer] = []
        self.cpu: list[CpuOp] = []
        self.compute: list[Compute] = []
        self.blocked: list[tuple[float, float]] = []  # the driving thread waiting on the scheduler


class TrafficMeter:
    """Records transfers, CPU row operations and compute; `report()` summarises them."""

    def __init__(self, keep_steps: int = 8):
        if not isinstance(keep_steps, int) or keep_steps < 1:
            raise ValueError(f"keep_steps={keep_steps!r} must be an int >= 1 (raw events of that many "
                             "recent steps are kept)")
        self.keep_steps = keep_steps
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.current_step = 0
            self._raw: OrderedDict[int, _StepRaw] = OrderedDict()
            self._dir = defaultdict(_Agg)  # direction -> totals
            self._layer_dir = defaultdict(_Agg)  # (layer, direction) -> totals
            self._cpu = defaultdict(_Agg)  # op -> totals
            self._compute_s = 0.0
            self._blocked_s = 0.0
            self._worker_blocked_s = 0.0  # of which waiting for the host worker's gathers
            self._worker_waits = 0  # row waits of the compute thread on the host worker
            self._pageable = 0
            self._evicted_upto = -(2**62)  # raw events of steps <= this were dropped
            self._evicted_xfer_s = 0.0  # union transfer time of evicted steps
            self._evicted_overlap_s = 0.0  # ...of which overlapped with CPU work or compute
            self._lookahead = defaultdict(lambda: [0, 0])  # layer -> [needed, hit]

    # ---------------------------------------------------------------------------------- recording
    def set_step(self, step: int) -> None:
        """The step that `record_compute` without `step=` belongs to (the scheduler calls this)."""
        with self._lock:
            self.current_step = step

    def _raw_for(self, step: int) -> _StepRaw:
        raw = self._raw.get(step)
        if raw is None:
            if step <= self._evicted_upto:  # late record of an evicted step: totals only
                return _StepRaw()
            raw = self._raw[step] = _StepRaw()
            while len(self._raw) > self.keep_steps:
                old_step, old = self._raw.popitem(last=False)
                self._evicted_upto = max(self._evicted_upto, old_step)
                tot, ov = _overlap_of(old)
                self._evicted_xfer_s += tot
                self._evicted_overlap_s += ov
        return raw

    def record_transfer(self, *, step: int, micro_batch: int, layer: int, direction: str, nbytes: int,
                        rows: int, start: float, end: float, engine: str, pageable: bool = False) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction={direction!r} must be one of {DIRECTIONS}")
        rec = Transfer(step, micro_batch, layer, direction, int(nbytes), int(rows), start, end, engine,
                       bool(pageable))
        with self._lock:
            self._raw_for(step).transfers.append(rec)
            self._dir[direction].add(rec.nbytes, rec.rows, end - start)
            self._layer_dir[(layer, direction)].add(rec.nbytes, rec.rows, end - start)
            self._pageable += int(rec.pageable)

    def record_cpu(self, *, step: int, layer: int, op: str, rows: int, nbytes: int, start: float,
                   end: float) -> None:
        """A CPU row operation: "gather", "accumulate" or "update" (the optimizer step)."""
        rec = CpuOp(step, layer, op, int(rows), int(nbytes), start, end)
        with self._lock:
            self._raw_for(step).cpu.append(rec)
            self._cpu[op].add(rec.nbytes, rec.rows, end - start)

    def record_update(self, *, step: int, layer: int, rows: int, nbytes: int, start: float,
                      end: float) -> None:
        """Shorthand for `record_cpu(op="update", ...)`."""
        self.record_cpu(step=step, layer=layer, op="update", rows=rows, nbytes=nbytes, start=start, end=end)

    def record_compute(self, name: str, start: float, end: float, step: int | None = None) -> None:
        """Compute interval (perf_counter seconds) for overlap accounting and the trace's compute track."""
        with self._lock:
            s = self.current_step if step is None else step
            self._raw_for(s).compute.append(Compute(s, name, start, end))
            self._compute_s += end - start

    def record_blocked(self, step: int, start: float, end: float, on: str = "scheduler") -> None:
        """The thread that drives compute was blocked waiting on the scheduler (rows, a slot) over
        [start, end]: cut out of the compute intervals before overlap is counted. `on`: what it waited
        for -- "worker" (the host worker's gather, the lockstep of a staged fetch without device flags),
        "device" (a device-side wait: on CUDA the host returns at once; on the CPU device the thread is
        the device) or "scheduler" (a staging slot, a push). Waits on the worker are counted apart."""
        if on == "worker":
            with self._lock:
                self._worker_waits += 1
        if end <= start:
            return
        with self._lock:
            self._raw_for(step).blocked.append((start, end))
            self._blocked_s += end - start
            if on == "worker":
                self._worker_blocked_s += end - start

    def record_lookahead(self, step: int, layer: int, needed: int, hit: int) -> None:
        """Lookahead counters: of `needed` rows of a fetch, `hit` had been prefetched."""
        if hit > needed or needed < 0 or hit < 0:
            raise ValueError(f"record_lookahead: need 0 <= hit ({hit}) <= needed ({needed})")
        with self._lock:
            c = self._lookahead[layer]
            c[0] += int(needed)
            c[1] += int(hit)

    # ---------------------------------------------------------------------------------- reporting
    def events(self) -> dict:
        """Raw events of the retained steps: {"transfers": [...], "cpu": [...], "compute": [...]}."""
        with self._lock:
            raws = list(self._raw.values())
        return {"transfers": [t for r in raws for t in r.transfers],
                "cpu": [c for r in raws for c in r.cpu],
                "compute": [c for r in raws for c in r.compute]}

    def report(self) -> dict:
        """Totals (all steps), per layer (all steps), per step (retained steps), overlap, lookahead."""
        with self._lock:
            raws = list(self._raw.items())
            retained = [_overlap_of(r) for _, r in raws]
            upd = [_update_overlap(r) for _, r in raws]  # retained steps only
            upd_s, upd_over_s = sum(t for t, _ in upd), sum(o for _, o in upd)
            xfer_s = self._evicted_xfer_s + sum(t for t, _ in retained)
            over_s = self._evicted_overlap_s + sum(o for _, o in retained)
            rep = {
                "totals": {d: a.as_dict() for d, a in sorted(self._dir.items())},
                "per_layer": _per_layer(self._layer_dir),
                "per_step": {step: _per_step(r) for step, r in raws},
                "cpu": {op: a.as_dict() for op, a in sorted(self._cpu.items())},
                "compute_ms": self._compute_s * 1e3,
                "overlap": {"transfer_ms": xfer_s * 1e3, "overlapped_ms": over_s * 1e3,
                            "share": over_s / xfer_s if xfer_s > 0 else 0.0, "blocked_ms": self._blocked_s * 1e3,
                            "worker_blocked_ms": self._worker_blocked_s * 1e3, "worker_waits": self._worker_waits,
                            "update_ms": upd_s * 1e3, "update_with_compute_ms": upd_over_s * 1e3,
                            "update_overlap_share": upd_over_s / upd_s if upd_s > 0 else 0.0},
                "pageable_copies": self._pageable,
                "lookahead": _lookahead(self._lookahead),
                "keep_steps": self.keep_steps,
            }
        return rep

    def summary(self) -> str:
        """A table for the terminal."""
        return summary_table(self.report())

    def to_json(self, path=None, *, events: bool = True) -> dict:
        return to_json(self, path, events=events)

    def export_chrome_trace(self, path) -> dict:
        return chrome_trace(self, path)

    def export_png(self, path) -> None:
        plot_png(self, path)

    @staticmethod
    def as_dict(rec) -> dict:
        return asdict(rec)


def _overlap_of(raw: _StepRaw) -> tuple[float, float]:
    xfer = [(t.start, t.end) for t in raw.transfers]
    compute = interval_subtract([(c.start, c.end) for c in raw.compute], raw.blocked)  # blocked waits are no work
    other = [(c.start, c.end) for c in raw.cpu] + [tuple(c) for c in compute]
    return interval_overlap(xfer, other)


def _update_overlap(raw: _StepRaw) -> tuple[float, float]:
    """(host row-update seconds, of which concurrent with compute): the update of layer l running while the
    device computes the backward of layer l - 1 shows here (compute intervals are recorded by profiling)."""
    upd = [(c.start, c.end) for c in raw.cpu if c.op == "update"]
    compute = interval_subtract([(c.start, c.end) for c in raw.compute], raw.blocked)
    return interval_overlap(upd, [tuple(c) for c in compute])


def _per_layer(layer_dir) -> dict:
    out: dict = {}
    for (layer, d), a in sorted(layer_dir.items()):
        out.setdefault(layer, {})[d] = a.as_dict()
    return out


def _per_step(raw: _StepRaw) -> dict:
    out = {d: {"bytes": 0, "rows": 0, "count": 0} for d in DIRECTIONS}
    for t in raw.transfers:
        o = out[t.direction]
        o["bytes"] += t.nbytes
        o["rows"] += t.rows
        o["count"] += 1
    tot, ov = _overlap_of(raw)
    out["transfer_ms"] = tot * 1e3
    out["overlap_share"] = ov / tot if tot > 0 else 0.0
    out["cpu_ms"] = sum(c.end - c.start for c in raw.cpu) * 1e3
    out["compute_ms"] = sum(c.end - c.start for c in raw.compute) * 1e3
    return out


def _lookahead(counters) -> dict:
    per = {layer: {"needed": n, "hit": h, "hit_rate": h / n if n else 0.0}
           for layer, (n, h) in sorted(counters.items())}
    n = sum(v["needed"] for v in per.values())
    h = sum(v["hit"] for v in per.values())
    return {"needed": n, "hit": h, "hit_rate": h / n if n else 0.0, "per_layer": per}
