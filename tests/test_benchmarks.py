"""Smoke tests of the benchmark scripts: each runs at a tiny scale and prints figures that make sense (no timings)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_scale_runs_small_and_reports_sane_figures(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_scale.py"), "--slaves", "8",
                           "--tasks", "20000", "--queued", "40000", "--window", "1", "--curve", "on",
                           "--sim-procs", "2", "--timeout", "60", "--json", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["case"]["slaves"], r["case"]["tasks"], r["case"]["queued"]) for r in rows] == \
        [(8, 20000, False), (8, 40000, True)]
    for row in rows:
        assert row["tickets_per_s"] > 0 and row["cpu_ms"] > 0 and 0 < row["master_busy"] < 4
        assert 0 < row["rtt_p50_ms"] <= row["rtt_p99_ms"]
        assert row["rss_mb"] > 10 and row["store_bytes_per_task"] > 0
        assert row["false_deaths"] == 0 and row["note"] == ""
    table = proc.stdout.splitlines()
    assert table[-len(rows) - 2].startswith("| CURVE | slaves |") and table[-1].startswith("| on | 8 | 40,000 queued |")


def test_bench_http_runs_small_and_reports_every_partys_cpu() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_http.py"), "--tasks", "100", "--rounds", "1",
                           "--pollers", "10"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "0 errors" in out and "dispatch rate with  10 pollers:" in out and "load average" in out
    rate = float(out.split("GET /api/v1/status per s")[0].rsplit("~", 1)[1])
    assert rate > 10  # 10 pollers every 0.1 s: some polls were answered
    cpu = {line.split()[2]: float(line.split()[-1]) for line in out.splitlines() if line.startswith("CPU s/s ")}
    assert set(cpu) == {"master", "http", "slaves", "pollers"} and all(v > 0 for v in cpu.values())


def test_bench_commands_runs_small_and_reports_every_figure(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_commands.py"), "--tasks", "20",
                           "--rounds", "1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines if line.startswith(("/bin/true", "sleep"))] == ["/bin/true", "sleep"]
    assert any(line.startswith("run --local 4, 6 tasks: ended") and "(exit code 0, 0 warnings)" in line
               for line in lines), proc.stdout
    assert any(line.startswith("status with no master:") and "(exit code 0)" in line for line in lines), proc.stdout
