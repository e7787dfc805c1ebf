"""The short chaos run: a seeded storm of faults against a real master and slaves deployed by the playbooks onto
2 test hosts (loopback slaves without root); the promise must hold and the master's metrics must agree."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.testhosts import why_not

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "chaos.py"
SEED = 13
"""A schedule with every kind the 25 s can hold but the second master (2 hosts): disk_full five times."""


def test_short_chaos_run_keeps_the_promise(tmp_path: Path) -> None:
    hosts = why_not("cx") is None
    cmd = [sys.executable, str(SCRIPT), "--seed", str(SEED), "--duration", "25", "--tasks", "800",
           "--slaves", "2", "--keep", str(tmp_path / "run"), *([] if hosts else ["--local"])]
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=290)
    print(f"chaos run: {time.monotonic() - started:.0f}s in all\n", result.stdout[-4000:], result.stderr[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert report["problems"] == []
    injected = report["injected"]
    assert sum(injected.values()) >= 10 and len(injected) >= 5, injected
    if hosts:
        assert injected.get("disk_full") and injected.get("link_cut"), injected
    counts = report["counts"]
    assert counts["reassigned"] > 0 and counts["acknowledged"] >= 800
    assert counts["results_lost"] == counts["collected_twice"] == counts["wrong_results"] == 0
    assert counts["orphaned_workers"] == 0 and counts["integrity"] == "ok"
