"""The dashboard in headless Chromium against a real master: throughput, slots busy per slave, every sweep with
done and failed apart, and one sweep's page with its tasks and failures — the numbers the API gives, on the page."""
from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.httpcluster import ROOT, HttpCluster, module_cluster, spec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Where the screenshots go (look at them after a change to the page).
SCREENS = Path(os.environ.get("TICKETFARM_SCREENS", ROOT / "artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1320,1100"]
#: A sweep of 40 tasks: 0-9 end at once (2 and 5 fail, for good), the rest sleep: 4 run on the 4 slots.
MIXED = ('case {x} in 2|5) echo bad input {x} >&2; exit 3;; esac; '
         'if [ {x} -ge 10 ]; then sleep 60; fi; echo {x}')

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="tf-chromium-") as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],  # type: ignore[list-item]
                              capture_output=True, text=True, timeout=60)


def dom(url: str) -> str:
    """The DOM after the page's scripts ran (virtual time lets fetches and rendering finish)."""
    page = chromium("--virtual-time-budget=4000", "--dump-dom", url).stdout
    assert 'data-loaded="1"' in page, page[:2000]
    return page


def screenshot(url: str, name: str) -> Path:
    SCREENS.mkdir(parents=True, exist_ok=True)
    shot = SCREENS / name
    shot.unlink(missing_ok=True)
    r = chromium("--virtual-time-budget=4000", f"--screenshot={shot}", url)
    assert shot.exists() and shot.stat().st_size > 10_000, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return shot


def text(fragment: str) -> str:
    """A fragment of the DOM as a person reads it: tags gone, white space folded."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def element(page: str, attrs: str) -> str:
    """The markup from the element whose attributes start with `attrs` to the next element of its kind."""
    start = page.index(attrs)
    tag = page.rindex("<", 0, start)
    kind = page[tag + 1:page.index(" ", tag)]
    end = page.find(f"<{kind} {attrs.split('=')[0]}=", start)
    return page[tag:end if end > 0 else None]


cluster = module_cluster("dash")


@pytest.fixture(scope="module")
def sweeps(cluster: HttpCluster) -> Any:
    """'dash-done': finished, 29 done and 1 failed; 'dash-mixed': 8 done, 2 failed, 4 running, the rest waiting."""
    cmd = "if [ {x} = 3 ]; then echo 'disk full' >&2; exit 2; fi; echo {x}"
    assert cluster.submit(spec("dash-done", 30, command=cmd, max_attempts=1)).status == 201
    cluster.wait_state("dash-done", "finished")
    assert cluster.submit(spec("dash-mixed", 40, command=MIXED, max_attempts=1, timeout=120)).status == 201
    cluster.wait_for(lambda: (lambda s: (s["done"], s["failed"], s["running"]) == (8, 2, 4))(
        cluster.sweep("dash-mixed")), what="8 done, 2 failed, 4 running")
    yield
    cluster.post("/api/v1/sweeps/dash-mixed/cancel")


def test_overview_shows_throughput_busy_slots_and_done_apart_from_failed(cluster: HttpCluster, sweeps: Any) -> None:
    page = dom(cluster.url + "/")
    done = element(page, 'data-sweep="dash-done"')
    assert 'data-state="finished" data-done="29" data-failed="1"' in done and 'data-total="30"' in done
    # a finished sweep with a failed task is not "100 %": done, failed and total are three figures
    assert "29 / 30 done (96%)" in text(done) and "1 failed" in text(done) and "finished · 1 failed" in text(done)
    assert "100%" not in text(done)
    mixed = element(page, 'data-sweep="dash-mixed"')
    assert 'data-done="8" data-failed="2" data-running="4" data-total="40"' in mixed
    assert "8 / 40 done (20%)" in text(mixed) and "2 failed" in text(mixed) and "4 running" in text(mixed)

    slaves = dict(re.findall(r'data-slave="(s\d)" data-busy="(\d+)" data-slots="2"', page))
    assert slaves == {"s1": "2", "s2": "2"}
    assert re.search(r'id="t-busy">4<small> / 4</small>', page)
    assert re.search(r'id="t-failed">3<', page)
    # the chart counts every task that ended in its window: 29 + 8 done, 1 + 2 failed
    assert re.search(r'<svg [^>]*data-done="37" data-failed="3"', page), page[page.index('id="chart"'):][:400]
    failures = text(element(page, 'id="failures"'))
    assert "dash-done 3" in failures and "disk full" in failures and "bad input 5" in failures

    shot = screenshot(cluster.url + "/", "dashboard.png")
    assert shot.stat().st_size > 20_000


def test_sweep_page_lists_tasks_with_slave_attempts_elapsed_and_failures(cluster: HttpCluster, sweeps: Any) -> None:
    page = dom(cluster.url + "/sweep/dash-mixed")
    assert re.search(r'id="s-done">8<small> / 40</small>', page) and re.search(r'id="s-failed">2<', page)
    assert re.search(r'id="s-running">4<', page)
    rows = re.findall(r'<tr data-task="(\d+)" data-state="(\w+)">(.*?)</tr>', page[page.index('id="s-tasks"'):], re.S)
    assert len(rows) == 40 and [int(t) for t, _, _ in rows] == list(range(40))
    states = [s for _, s, _ in rows]
    assert states.count("done") == 8 and states.count("failed") == 2
    assert states.count("running") >= 4  # and the prefetched ones: running in the store, held ready on a slave
    for task, state, cells in rows:
        words = text(cells).split()
        if state in ("done", "failed", "running"):  # task, state, attempts, slave, elapsed
            assert words[1] == state and words[2] == "1" and words[3] in ("s1", "s2"), (task, words)
            assert float(words[4]) >= 0 and words[5] in ("ms", "s"), words
    failed = {int(t): text(c) for t, s, c in rows if s == "failed"}
    assert sorted(failed) == [2, 5] and "exit code 3" in failed[2] and "bad input 2" in failed[2]
    failures = re.findall(r'<tr data-task="(\d+)">', element(page, 'id="s-failures"'))
    assert failures == ["2", "5"]
    assert re.search(r'<svg [^>]*data-done="8" data-failed="2"', page)

    ended = dom(cluster.url + "/sweep/dash-done")
    assert "finished · 1 failed" in text(ended) and re.search(r'id="s-done">29<small> / 30</small>', ended)
    assert re.search(r'<svg [^>]*data-done="29" data-failed="1"', ended)
    # an ended sweep's chart is its life, however long ago: the window ends where the sweep did
    finished = cluster.sweep("dash-done")["finished"]
    for end, counts in ((finished, (29, 1)), (finished + 600, (0, 0))):
        tp = cluster.get(f"/api/v1/throughput?sweep=dash-done&window=60&intervals=6&end={end}").json()
        assert (sum(tp["done"]), sum(tp["failed"])) == counts and tp["start"] + 6 * tp["step"] > end >= tp["start"]
    screenshot(cluster.url + "/sweep/dash-mixed", "sweep.png")
