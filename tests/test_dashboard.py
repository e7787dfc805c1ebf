"""The dashboard in headless Chromium against a real master: progress, slave table and failures are on the page."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from typing import Any

import pytest

from tests.httpcluster import ROOT, HttpCluster, spec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="tf-chromium-") as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],  # type: ignore[list-item]
                              capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = HttpCluster(tmp_path_factory.mktemp("dash") / "state")
    yield c
    c.close()


def test_dashboard_shows_progress_slaves_and_failures(cluster: HttpCluster) -> None:
    cmd = "if [ {x} = 3 ]; then echo 'disk full' >&2; exit 2; fi; echo {x}"
    assert cluster.submit(spec("dash-done", 30, command=cmd, max_attempts=1)).status == 201
    cluster.wait_state("dash-done", "finished")
    assert cluster.submit(spec("dash-running", 200, command="sleep 0.3; echo {x}")).status == 201
    cluster.wait_for(lambda: cluster.sweep("dash-running")["done"] >= 4, what="some progress")

    # The DOM after the page's scripts ran (virtual time lets fetches and rendering finish).
    dom = chromium("--virtual-time-budget=4000", "--dump-dom", cluster.url + "/").stdout
    assert 'data-loaded="1"' in dom, dom[:2000]
    done = re.search(r'<div class="sweep" data-sweep="dash-done" data-state="finished" data-done="29" data-total="30">'
                     r'.*?<span class="pct">(\d+)%</span>', dom, re.S)
    assert done and done.group(1) == "100"
    running = re.search(r'data-sweep="dash-running" data-state="active" data-done="(\d+)" data-total="200">', dom)
    assert running and int(running.group(1)) >= 4
    rows = re.findall(r'<tr data-slave="(s\d)">', dom)
    assert sorted(rows) == ["s1", "s2"]
    failures = dom[dom.index('id="failures"'):]
    assert "dash-done" in failures and '{"x":3}' in failures.replace("&quot;", '"') and "disk full" in failures

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    r = chromium("--virtual-time-budget=4000", "--window-size=1280,1000", f"--screenshot={shot}", cluster.url + "/")
    assert shot.exists() and shot.stat().st_size > 10_000, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cluster.post("/api/v1/sweeps/dash-running/cancel")
