"""Say what is happening, with real masters and slaves: unrunnable sweeps, started against prefetched tickets,
paused sweeps that start nothing more, speculation from a ticket's start onto idle slots, columns that add up."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from master.store import Store
from slave.daemon import platform_tag
from tests.conftest import HEARTBEAT, MasterProcess, free_port, run_cli, slave_key_args, wait_for, write_spec
from tests.httpcluster import HttpCluster

STATUS_SUM = ("queued", "prefetched", "running", "paused", "done", "failed", "cancelled")


def events(state: Path, kind: str) -> list[dict]:
    store = Store(state / "state.db", readonly=True)
    try:
        return [e for e in store.events_of(0) if e["kind"] == kind]
    finally:
        store.close()


def status_rows(text: str) -> dict[str, dict[str, str]]:
    """`ticketfarm status` as {sweep: {column: cell}}."""
    lines = text.splitlines()
    header = lines[0].split()
    return {cells[0]: dict(zip(header, cells)) for line in lines[2:] if (cells := line.split())
            and len(cells) == len(header)}


@pytest.fixture
def http_cluster(tmp_path: Path):
    c = HttpCluster(tmp_path / "state", n=0, extra_config="unrunnable_grace = 1.0\n")
    yield c
    c.close()


def test_a_sweep_no_slave_can_run_is_reported_with_its_reason_and_run_exits_5(http_cluster: HttpCluster,
                                                                               tmp_path: Path) -> None:
    c, state = http_cluster, str(http_cluster.state)
    c.slaves.append(c.start_slave("small", 2, "--cpus", "2"))
    c.wait_for(lambda: c.get("/api/v1/status").json()["slaves"]["alive"] == 1, what="the small slave")
    write_spec(tmp_path, """
        name = "wide"
        command = "echo {n}"
        cpus = 64
        [parameters.grid]
        n = {range = [2]}
    """, "wide.toml")
    (tmp_path / "sim.sh").write_text("#!/bin/sh\necho simulated\n")
    write_spec(tmp_path, """
        name = "exotic"
        command = "{worker} {n}"
        [parameters.grid]
        n = {range = [2]}
        [workers]
        linux-fake = "sim.sh"
    """, "exotic.toml")
    write_spec(tmp_path, """
        name = "checked"
        command = "echo value-{n}"
        max_attempts = 2
        validate = "grep -q value-1 {results}/stdout && exit 1 || true"
        [parameters.grid]
        n = {range = [3]}
    """, "checked.toml")
    # CURVE client keys are in the state dir: `submit` uses them, not the HTTP API (that would want a token).
    for spec in ("exotic", "checked"):
        submitted = run_cli("--state", state, "submit", str(tmp_path / f"{spec}.toml"), cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
    started = time.time()
    run = run_cli("--state", state, "run", str(tmp_path / "wide.toml"), cwd=tmp_path, timeout=60)
    took = time.time() - started
    assert run.returncode == 5, (run.returncode, run.stderr)
    assert "'wide' is unrunnable: no slave offers 64 CPUs (at most 2)" in run.stderr
    assert "--wait-for-slaves" in run.stderr
    assert took < 20, f"reported after {took:.1f}s"

    sweeps = {s["name"]: s for s in c.get("/api/v1/status").json()["sweeps"]}
    assert sweeps["wide"]["unrunnable"] == "no slave offers 64 CPUs (at most 2)"
    assert sweeps["exotic"]["unrunnable"] == f"no worker for platform {platform_tag()} (it ships linux-fake)"
    assert sweeps["wide"]["queued"] == 2 and sweeps["wide"]["state"] == "active"
    status = run_cli("--state", state, "status", cwd=tmp_path)
    rows = status_rows(status.stdout)
    assert rows["wide"]["state"] == "unrunnable" and rows["exotic"]["state"] == "unrunnable", status.stdout
    assert "wide: unrunnable: no slave offers 64 CPUs (at most 2)" in status.stdout
    said = {e["sweep"]: e["detail"]["reason"] for e in events(c.state, "sweep_unrunnable")}
    assert said == {"wide": sweeps["wide"]["unrunnable"], "exotic": sweeps["exotic"]["unrunnable"]}

    # Told to wait, `run` waits; a slave that can run the sweep joins, it is re-checked and runs.
    waiting = subprocess.Popen([sys.executable, "-m", "ticketfarm", "--state", state, "run", "--wait-for-slaves",
                                str(tmp_path / "wide.toml"), "--out", str(tmp_path / "out")],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)
        assert waiting.poll() is None, waiting.communicate()
        c.slaves.append(c.start_slave("big", 1, "--cpus", "64"))
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, err
    sweeps = {s["name"]: s for s in c.get("/api/v1/status").json()["sweeps"]}
    assert sweeps["wide"]["state"] == "finished" and sweeps["wide"]["unrunnable"] is None
    assert sweeps["exotic"]["unrunnable"]  # still nobody for linux-fake
    assert [e["sweep"] for e in events(c.state, "sweep_runnable")] == ["wide"]
    c.wait_state("checked", "finished")
    stats = c.get("/api/v1/stats").json()
    assert {s["name"]: s["rejected"] for s in stats["sweeps"]} == {"wide": 0, "exotic": 0, "checked": 2}
    assert sum(s["rejected"] for s in stats["slaves"]) == 2 and set(s["name"] for s in stats["slaves"]) == {"small", "big"}
    for s in stats["sweeps"]:
        assert sum(s[k] for k in STATUS_SUM) == s["total"], s


def test_a_local_run_of_a_sweep_its_slaves_cannot_run_exits_5(tmp_path: Path) -> None:
    state = tmp_path / "local-state"
    state.mkdir()
    # No grace period: a local run knows its slaves, and judges once they are connected (a grace of 600 s would
    # outlast the run's timeout if it were waited for).
    (state / "master.toml").write_text(f'heartbeat_interval = {HEARTBEAT}\ndurability = "normal"\n'
                                       'unrunnable_grace = 600\n')
    write_spec(tmp_path, """
        name = "huge"
        command = "echo {n}"
        memory = "100000G"
        [parameters.grid]
        n = {range = [2]}
    """)
    run = run_cli("--state", str(state), "run", str(tmp_path / "spec.toml"), "--local", "2", cwd=tmp_path, timeout=60)
    assert run.returncode == 5, (run.returncode, run.stderr)
    assert "'huge' is unrunnable: no slave offers 102400000 MiB of memory" in run.stderr


def test_no_slave_yet_is_not_unrunnable_until_the_grace_period_ends(tmp_path: Path) -> None:
    m = MasterProcess(tmp_path / "state", f"tcp://127.0.0.1:{free_port()}",
                      extra_config="unrunnable_grace = 6.0\n").start()
    slave = None
    try:
        write_spec(tmp_path, """
            name = "early"
            command = "echo {n}"
            [parameters.grid]
            n = {range = [3]}
        """, "early.toml")
        m.submit(tmp_path / "early.toml")  # no slave yet, right after the master's start
        time.sleep(1.0)
        assert m.sweep_status("early")["unrunnable"] is None
        slave = subprocess.Popen([sys.executable, "-m", "slave", "--master", m.endpoint, "--name", "late",
                                  "--work-root", str(tmp_path / "w"), "--heartbeat", str(HEARTBEAT),
                                  *slave_key_args(m.state)])
        m.wait_finished("early", timeout=30)
        assert events(m.state, "sweep_unrunnable") == []
        slave.terminate()
        slave.wait(10)
        wait_for(lambda: m.control("ping")["slaves"] == 0, 10, "the slave gone")
        write_spec(tmp_path, """
            name = "orphan"
            command = "echo {n}"
            [parameters.grid]
            n = {range = [3]}
        """, "orphan.toml")
        m.submit(tmp_path / "orphan.toml")
        wait_for(lambda: m.sweep_status("orphan")["unrunnable"] == "no slave connected", 20, "no slave connected")
    finally:
        if slave is not None and slave.poll() is None:
            slave.kill()
            slave.wait()
        m.stop()


def test_prefetched_tickets_are_not_running_and_a_paused_sweep_starts_none_of_them(master, start_slave,
                                                                                    tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    starts.mkdir()
    write_spec(tmp_path, f"""
        name = "held"
        command = "date +%s.%N > {starts}/{{n}}; sleep 1.5"
        [parameters.grid]
        n = {{range = [6]}}
    """)
    start_slave("one", 1, "--prefetch", "2")
    wait_for(lambda: master.control("ping")["slaves"] == 1, 10, "the slave")
    master.submit(tmp_path / "spec.toml")
    s = wait_for(lambda: (s := master.sweep_status("held")) and s["running"] == 1 and s["prefetched"] == 2 and s,
                 10, "1 running, 2 prefetched")
    assert s["queued"] + s["done"] == 3

    def slave_row() -> dict[str, str]:
        lines = run_cli("--state", str(master.state), "stats", cwd=tmp_path).stdout.splitlines()
        header = next(line.split() for line in lines if line.startswith("slave "))
        return dict(zip(header, next(line.split() for line in lines if line.startswith("one "))))

    wait_for(lambda: (row := slave_row())["running"] == "1" and row["prefetched"] == "2", 20, "the slave's row")

    paused = run_cli("--state", str(master.state), "pause", "held", cwd=tmp_path)
    assert paused.returncode == 0, paused.stderr
    acknowledged = time.time()
    # The running ticket finishes; those held ready are given back, not started.
    s = wait_for(lambda: (s := master.sweep_status("held")) and s["running"] == 0 and s["prefetched"] == 0 and s,
                 10, "the running one done, the prefetched ones back")
    time.sleep(1.0)
    begun = {int(p.name): float(p.read_text()) for p in starts.iterdir()}
    assert all(t < acknowledged for t in begun.values()), (begun, acknowledged)
    s = master.sweep_status("held")
    assert s["done"] == len(begun) and s["queued"] == 6 - len(begun) and s["state"] == "paused", s
    store = Store(master.state / "state.db", readonly=True)
    try:
        returned = store.db.execute("SELECT count(*), min(reason) FROM tickets WHERE sweep = 'held' "
                                    "AND state = 'returned'").fetchone()
        assert returned[0] >= 1 and returned[1] == "recalled: sweep paused", returned
        assert all(a["attempts"] == 0 for a in store.tasks_page("held", "queued", 0, 10))  # not counted
    finally:
        store.close()
    assert run_cli("--state", str(master.state), "resume", "held", cwd=tmp_path).returncode == 0
    master.wait_finished("held", timeout=30)


def test_speculation_times_tickets_from_their_start_and_copies_onto_an_idle_slot(master, start_slave,
                                                                                 tmp_path: Path) -> None:
    marker = tmp_path / "slow-once"
    write_spec(tmp_path, f"""
        name = "spec"
        command = "case {{workdir}} in */work/a/*) if mkdir {marker} 2>/dev/null; then sleep 8; fi;; esac; sleep 0.2"
        speculate = 3
        [parameters.grid]
        n = {{range = [6]}}
    """)
    start_slave("a", 1)  # prefetch 1: its second ticket waits behind the straggler
    start_slave("b", 1)
    wait_for(lambda: master.control("ping")["slaves"] == 2, 10, "2 slaves")
    started = time.time()
    master.submit(tmp_path / "spec.toml")
    master.wait_finished("spec", timeout=30)
    took = time.time() - started
    copies = events(master.state, "ticket_duplicated")
    store = Store(master.state / "state.db", readonly=True)
    try:
        straggler = store.db.execute("SELECT task FROM tickets WHERE sweep = 'spec' AND slave = 'a' "
                                     "AND started IS NOT NULL ORDER BY started LIMIT 1").fetchone()[0]
    finally:
        store.close()
    # Only the straggler was copied, onto b's idle slot: a ticket held ready behind it had not started.
    assert [(e["task"], e["detail"]["slave"]) for e in copies] == [(straggler, "b")], copies
    assert copies[0]["detail"]["running_for"] < 8.0
    assert took < 8.0, f"{took:.2f}s"


def test_status_columns_add_up_for_a_sweep_in_mixed_states(master, start_slave, tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name = "mixed"
        command = "case {n} in 0) exit 1;; 1) echo one;; *) sleep 30;; esac"
        max_attempts = 1
        [parameters.grid]
        n = {range = [10]}
    """)
    master.submit(tmp_path / "spec.toml")
    state = str(master.state)
    assert run_cli("--state", state, "pause", "mixed", "--task", "8", cwd=tmp_path).returncode == 0
    assert run_cli("--state", state, "cancel", "mixed", "--task", "9", cwd=tmp_path).returncode == 0
    start_slave("m1", 1)
    want = {"failed": 1, "done": 1, "running": 1, "prefetched": 1, "queued": 4, "paused": 1, "cancelled": 1}
    s = wait_for(lambda: (s := master.sweep_status("mixed")) and all(s[k] == v for k, v in want.items()) and s,
                 20, f"the sweep in {want}")
    assert sum(s[k] for k in STATUS_SUM) == s["total"] == 10
    rows = status_rows(run_cli("--state", state, "status", cwd=tmp_path).stdout)["mixed"]
    assert sum(int(rows[k]) for k in STATUS_SUM) == int(rows["tasks"]) == 10
    assert {k: int(rows[k]) for k in want} == want
    assert run_cli("--state", state, "cancel", "mixed", cwd=tmp_path).returncode == 0
