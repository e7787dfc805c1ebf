"""The short chaos run: a seeded storm of faults against a real master and slaves; the promise must hold."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "chaos.py"
SEED = 11


def test_short_chaos_run_keeps_the_promise(tmp_path: Path) -> None:
    netns = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("sshd") is not None
    cmd = [sys.executable, str(SCRIPT), "--seed", str(SEED), "--duration", "25", "--tasks", "800",
           "--slaves", "3", "--keep", str(tmp_path / "run"), *([] if netns else ["--local"])]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert report["problems"] == []
    injected = report["injected"]
    assert sum(injected.values()) >= 10 and len(injected) >= 5, injected
    counts = report["counts"]
    assert counts["reassigned"] > 0 and counts["acknowledged"] >= 800
    assert counts["results_lost"] == counts["collected_twice"] == counts["wrong_results"] == 0
    assert counts["orphaned_workers"] == 0
