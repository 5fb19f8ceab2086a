"""Section a of the GPU validation kit: `pytest -q -m cuda tests/` in a subprocess, read back from its
JUnit XML (passed / failed / skipped, failing test names, modules that did not import here).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from experiments.gpu_check_sections.common import ROOT


def sec_cuda_tests(a, dev, deadline):
    if dev != "cuda" or importlib.util.find_spec("pytest") is None:
        why = "needs CUDA" if dev != "cuda" else "pytest is not installed"
        return {"skipped": why, "passed": None, "summary": f"skipped ({why})"}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/", "--continue-on-collection-errors",
               "-p", "no:cacheprovider", f"--junitxml={xml}"]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                               text=True, timeout=max(10.0, deadline - time.monotonic()))
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = "timeout", e.stdout if isinstance(e.stdout, str) else (e.stdout or b"").decode(errors="replace")
        res = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(cmd[2:7])}
        if not xml.exists():
            return {**res, "passed": False, "output_tail": out[-3000:], "summary": f"no junit xml (rc {rc})"}
        counts, failing, uncollected = Counter(), [], []
        for tc in ET.parse(xml).getroot().iter("testcase"):
            bad = next((c for c in tc if c.tag in ("failure", "error", "skipped")), None)
            name = f"{tc.get('classname')}::{tc.get('name')}".lstrip(":")
            if bad is not None and "collection failure" in bad.get("message", ""):
                uncollected.append(name)  # a module that did not import here (e.g. a missing optional dep)
                continue
            counts["passed" if bad is None else bad.tag] += 1
            if bad is not None and bad.tag != "skipped":
                failing.append(name)
    res.update(passed_tests=counts["passed"], failed=counts["failure"], errors=counts["error"],
               skipped=counts["skipped"], failing=failing, collection_errors=uncollected,
               passed=not failing and counts["passed"] > 0)
    if failing or uncollected or rc not in (0, 5):
        res["output_tail"] = out[-3000:]
    res["summary"] = (f"{counts['passed']} passed, {counts['failure']} failed, {counts['error']} errors, "
                      f"{counts['skipped']} skipped, {len(uncollected)} modules not collected")
    return res
