"""meft profile on a tiny local model through the real CLI: files, bytes == analytic count, valid
Chrome trace with separate tracks, link prediction; and the prediction model on hand-made numbers."""

import json
import subprocess
import sys

import pytest

from meft.profile.report import predict_link

MEFT = [sys.executable, "-m", "meft.cli.main"]


def test_profile_cli_writes_json_trace_png_with_exact_bytes(tiny, tmp_path):
    out = tmp_path / "prof"
    res = subprocess.run(MEFT + ["profile", "--model", str(tiny / "model"), "--data", str(tiny / "train.jsonl"),
                                 "--output-dir", str(out), "--steps", "3", "--adapter-rows", "256",
                                 "--expert-size", "16", "--max-active-rows", "64", "--batch-size", "4",
                                 "--progress", "false", "--link", "pcie4"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "profile.json").read_text())
    m, a = rep["measured_bytes"], rep["analytic_bytes"]
    assert a["rows"] > 0 and m["h2d"] == a["h2d"] and m["d2h"] == a["d2h"]
    assert a["h2d"] == a["rows"] * 32 * 2  # width d = 32 (values; frozen keys are generated), bf16 wire
    assert rep["measured_equals_analytic"] is True
    assert rep["meft_original_over_measured"] > 2  # fp32 rows both ways + fp32 hidden states
    assert rep["run"]["steps"] == 3 and rep["run"]["tokens_per_s"] > 0
    assert set(rep["per_layer"]) == {"0", "1"}
    assert all(v["fwd_ms"] > 0 and v["bwd_ms"] > 0 for v in rep["per_layer"].values())
    assert rep["cpu"]["update"]["count"] == 3 * 2
    p = rep["link_prediction"]
    assert p["label"].startswith("PREDICTION") and p["gbps"] == 25.0 and p["exposed_ms_per_step"] > 0
    trace = json.loads((out / "trace.json").read_text())
    ev = trace["traceEvents"]
    assert all({"ph", "pid", "name"} <= set(e) for e in ev)
    spans = [e for e in ev if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and "ts" in e and "tid" in e for e in spans)
    tids = {e["cat"]: e["tid"] for e in spans}
    assert {"copy", "cpu", "compute"} <= set(tids) and len({tids["copy"], tids["cpu"], tids["compute"]}) == 3
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PREDICTION" in res.stdout and "MEFT's original" in res.stdout
    host = rep["host"]  # the thread plan; the compute thread never waited for the host worker (device flags)
    assert host["threads"]["busy"] == 1 + host["threads"]["host_threads"] and host["worker_waits"] == 0
    assert host["update_ms"] > 0 and 0.0 <= host["update_overlap_share"] <= 1.0
    assert "waited for the host worker 0 times" in res.stdout


def test_link_prediction_model():
    b = {0: {"h2d": 25e6, "d2h": 25e6}, 1: {"h2d": 25e6, "d2h": 25e6}}  # 1 ms each way per layer at 25 GB/s
    slow = {0: {"fwd_ms": 0.5, "bwd_ms": 5.0}, 1: {"fwd_ms": 0.5, "bwd_ms": 5.0}}
    p = predict_link("pcie4", b, slow, lookahead=False, latency_us=0.0)
    assert p["forward_exposed_ms"] == pytest.approx(2.0)  # fetches wait right after routing
    assert p["backward_exposed_ms"] == pytest.approx(1.0)  # the last grad copy runs past backward
    la = predict_link("pcie4", b, slow, lookahead=True, latency_us=0.0)
    assert la["forward_exposed_ms"] == pytest.approx(1.5)  # layer 1's fetch hides behind layer 0
    # each copy pays the link's fixed latency: 3 fetch copies per layer per step at 100 us = +0.3 ms a layer
    copies = {la: {"h2d": 3.0, "d2h": 1.0} for la in b}
    lat = predict_link("pcie4", b, slow, lookahead=False, copies_per_layer=copies, latency_us=100.0)
    assert lat["forward_exposed_ms"] == pytest.approx(2.0 + 2 * 0.3)
    assert lat["transfer_ms_per_step"] == pytest.approx(4.0 + 2 * 0.4)
    tiny = {la: {"h2d": 0.0, "d2h": 0.0} for la in b}  # latency-bound: no bytes, still one copy each way
    assert predict_link("pcie4", tiny, slow, lookahead=False, copies_per_layer={la: {"h2d": 1, "d2h": 1} for la in b},
                        latency_us=10.0)["forward_exposed_ms"] == pytest.approx(0.02)
    assert predict_link("50", b, slow, lookahead=False)["gbps"] == 50.0
    with pytest.raises(ValueError, match="--link"):
        predict_link("pcie9", b, slow, lookahead=False)


def test_profile_runs_the_locality_term_as_meft_train_does(tiny, tmp_path):
    """With --locality-weight the profiled steps carry the background questions meft train adds."""
    base = MEFT + ["profile", "--model", str(tiny / "model"), "--data", str(tiny / "train.jsonl"), "--steps", "2",
                   "--adapter-rows", "256", "--expert-size", "16", "--max-active-rows", "64", "--batch-size", "4",
                   "--progress", "false"]
    tokens = []
    for extra in ([], ["--locality-weight", "0.5", "--locality-background", "3"]):
        out = tmp_path / f"prof{len(extra)}"
        res = subprocess.run(base + ["--output-dir", str(out), *extra], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert ("meft: locality: 3 of" in res.stdout) == bool(extra)
        tokens.append(json.loads((out / "profile.json").read_text())["run"]["input_tokens"])
    assert tokens[1] > tokens[0]  # the same training batches plus the background questions
