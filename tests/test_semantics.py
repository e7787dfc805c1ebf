"""Sweep semantics with real masters and slaves: shipped workers, validation, stragglers, many sweeps, control, pruning."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from master.store import Store
from slave.daemon import platform_tag
from tests.conftest import (
    HEARTBEAT,
    MasterProcess,
    free_port,
    run_cli,
    slave_key_args,
    wait_for,
    write_spec,
)
from ticketfarm.errors import ConfigError
from ticketfarm.spec import parse_spec

WORKER_SCRIPT = "#!/bin/sh\necho \"simulated $1\"\n"


def open_store(master) -> Store:
    return Store(master.state / "state.db", readonly=True)


def events(master, kind: str) -> list[dict]:
    store = open_store(master)
    try:
        return [e for e in store.events_of(0) if e["kind"] == kind]
    finally:
        store.close()


def tickets(master, sweep: str) -> list[dict]:
    store = open_store(master)
    try:
        rows = store.db.execute("SELECT id, task, slave, state, dispatched, finished, reason FROM tickets "
                                "WHERE sweep = ? ORDER BY id", (sweep,)).fetchall()
    finally:
        store.close()
    cols = ("id", "task", "slave", "state", "dispatched", "finished", "reason")
    return [dict(zip(cols, r)) for r in rows]


def max_overlap(rows: list[dict]) -> int:
    """Most tickets out at once, from their dispatch and settle times."""
    marks = sorted([(r["dispatched"], 1) for r in rows] + [(r["finished"] or time.time(), -1) for r in rows])
    level = peak = 0
    for _, step in marks:
        level += step
        peak = max(peak, level)
    return peak


def shipped_worker_spec(tmp_path: Path, name: str, tasks: int, platforms: list[str]) -> Path:
    (tmp_path / "sim.sh").write_text(WORKER_SCRIPT)
    lines = "\n".join(f'{p} = "sim.sh"' for p in platforms)
    return write_spec(tmp_path, f"""
        name = "{name}"
        command = "{{worker}} {{n}}"
        [parameters.grid]
        n = {{range = [{tasks}]}}
        [workers]
        {lines}
    """, f"{name}.toml")


# -- spec fields ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, error", [
    ({"workers": {"Linux x86": "sim.sh"}}, "workers.Linux x86: a platform tag looks like linux-x86_64"),
    ({"workers": {"linux-x86_64": "missing.sh"}}, "workers.linux-x86_64: cannot read"),
    ({"memory": "lots"}, "field 'memory' must be MiB"),
    ({"max_concurrent": -1}, "field 'max_concurrent' must be >= 0"),
    ({"validate": {"python": "bad.py:validate"}}, "validate.python: bad.py:1:"),
    ({"validate": {"command": "x", "shell": "bash"}}, "unknown field 'validate.shell'"),
    ({"validate": "test {nope}"}, "validate.command: unknown placeholder {nope}"),
    ({"command": "{worker} 1"}, "unknown placeholder {worker}"),
])
def test_new_spec_fields_are_checked_by_name(tmp_path: Path, extra: dict, error: str) -> None:
    (tmp_path / "sim.sh").write_text(WORKER_SCRIPT)
    (tmp_path / "bad.py").write_text("def validate(:\n")
    data = {"name": "s", "command": "echo {n}", "parameters": {"grid": {"n": [1]}}, **extra}
    with pytest.raises(ConfigError, match=None) as info:
        parse_spec(data, tmp_path, "spec.toml")
    assert error in str(info.value)


def test_new_spec_fields_parse_and_survive_the_store(tmp_path: Path) -> None:
    from ticketfarm.spec import Sweep

    (tmp_path / "sim.sh").write_text(WORKER_SCRIPT)
    sweep = parse_spec({"name": "s", "command": "{worker} {n}", "parameters": {"grid": {"n": [1]}},
                        "workers": {"linux-x86_64": "sim.sh"}, "memory": "2G", "cpus": 2, "speculate": 3,
                        "max_concurrent": 5, "validate": {"command": "test -s {results}/stdout", "timeout": 5}},
                       tmp_path, "spec.toml")
    assert sweep.memory == 2048 and sweep.workers["linux-x86_64"].sha256 == hashlib.sha256(WORKER_SCRIPT.encode()).hexdigest()
    assert Sweep.from_json(sweep.to_json()) == sweep


# -- shipped workers ---------------------------------------------------------------------------------
def test_fake_platform_is_refused_and_a_wrong_cached_copy_is_replaced(master, start_slave, tmp_path: Path) -> None:
    spec = shipped_worker_spec(tmp_path, "shipped", 6, [platform_tag()])
    sha = hashlib.sha256(WORKER_SCRIPT.encode()).hexdigest()
    cache = tmp_path / "cache-real"
    (cache / sha).mkdir(parents=True)
    (cache / sha / "sim.sh").write_text("#!/bin/sh\necho stale copy\n")  # a wrong copy under the right hash
    fake = start_slave("fake", 2, "--platform", "linux-fake")
    start_slave("real", 2, "--cache-dir", str(cache))
    wait_for(lambda: master.control("ping")["slaves"] == 2, 10, "2 slaves")
    master.submit(spec)
    master.wait_finished("shipped", timeout=30)
    store = open_store(master)
    outputs = [store.outputs("shipped", i)["stdout"].data for i in range(6)]
    store.close()
    assert outputs == [f"simulated {i}\n".encode() for i in range(6)]
    assert {t["slave"] for t in tickets(master, "shipped")} == {"real"}  # the fake platform got no ticket
    refused = events(master, "slave_refused")
    assert [e["detail"]["slave"] for e in refused] == ["fake"]
    assert "no worker for platform 'linux-fake'" in refused[0]["detail"]["reason"]
    wait_for(lambda: "sweep_refused" in (tmp_path / "slave-fake.log").read_text(), 5, "the refusal in the slave log")
    assert fake.proc.poll() is None  # refused, not thrown out: it may still run other sweeps
    assert (cache / sha / "sim.sh").read_text() == WORKER_SCRIPT  # the wrong copy was replaced
    assert os.access(cache / sha / "sim.sh", os.X_OK)
    assert len(events(master, "worker_fetched")) == 1


def test_four_slaves_sharing_one_cache_fetch_the_worker_once(master, start_slave, tmp_path: Path) -> None:
    cache = tmp_path / "shared-cache"
    for i in range(4):
        start_slave(f"nfs{i}", 1, "--cache-dir", str(cache))
    wait_for(lambda: master.control("ping")["slaves"] == 4, 10, "4 slaves")
    master.submit(shipped_worker_spec(tmp_path, "shared", 12, [platform_tag(), "linux-aarch64"]))
    master.wait_finished("shared", timeout=30)
    fetched = events(master, "worker_fetched")
    assert len(fetched) == 1, fetched
    assert len({t["slave"] for t in tickets(master, "shared")}) >= 2  # several slaves used the one copy
    entries = sorted(p.name for p in cache.rglob("*"))
    assert entries == sorted([hashlib.sha256(WORKER_SCRIPT.encode()).hexdigest(), "sim.sh"])  # no lock, no temp file


def test_slave_exits_when_told_there_is_no_more_work_and_deletes_its_worker(master, start_slave, tmp_path: Path) -> None:
    leaver = start_slave("leaver", 2, "--exit-when-done", "--delete-workers")
    stayer = start_slave("stayer", 1, "--cache-dir", str(tmp_path / "stayer-cache"))
    wait_for(lambda: master.control("ping")["slaves"] == 2, 10, "2 slaves")
    master.submit(shipped_worker_spec(tmp_path, "short", 6, [platform_tag()]))
    master.wait_finished("short", timeout=30)
    assert wait_for(lambda: leaver.proc.poll() is not None, 10, "the leaver to exit") is not None
    assert leaver.proc.returncode == 0
    assert not [p for p in (leaver.work_root / ".workers").rglob("*") if p.is_file()]  # fetched worker deleted
    time.sleep(3 * HEARTBEAT)
    assert stayer.proc.poll() is None  # "stay" is the default: a service waits for the next sweep


def test_the_master_can_tell_slaves_to_exit_when_done(tmp_path: Path) -> None:
    m = MasterProcess(tmp_path / "policy-state", f"tcp://127.0.0.1:{free_port()}",
                      extra_config='slave_on_no_work = "exit"\nslave_delete_workers = "yes"\n').start()
    proc = None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "slave", "--master", m.endpoint, "--name", "obedient",
                                 "--work-root", str(tmp_path / "w"), "--heartbeat", str(HEARTBEAT),
                                 *slave_key_args(m.state)])
        wait_for(lambda: m.control("ping")["slaves"] == 1, 10, "the slave")
        m.submit(shipped_worker_spec(tmp_path, "policy", 3, [platform_tag()]))
        m.wait_finished("policy", timeout=30)
        assert proc.wait(timeout=10) == 0  # its own config says "stay": the master's policy won
        assert not [p for p in (tmp_path / "w" / ".workers").rglob("*") if p.is_file()]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        m.stop()


# -- validation ----------------------------------------------------------------------------------------
def test_validator_rejections_are_retried_and_never_collected(master, start_slave, tmp_path: Path) -> None:
    (tmp_path / "check.py").write_text(
        "def validate(params, results):\n"
        "    n, attempt = results['out'].read_text().split()\n"
        "    if int(n) % 3 == 0 and attempt == '1':\n"
        "        return f'first attempt of {n} is suspect'\n"
        "    return True\n")
    write_spec(tmp_path, """
        name = "checked"
        command = "echo {n} {attempt}"
        max_attempts = 3
        validate = {python = "check.py:validate"}
        [parameters.grid]
        n = {range = [9]}
        [results]
        out = "stdout"
    """, "checked.toml")
    write_spec(tmp_path, """
        name = "cmdcheck"
        command = "echo value-{n}"
        max_attempts = 2
        validate = "grep -q value-1 {results}/stdout && { echo 'value 1 is not allowed'; exit 1; } || true"
        [parameters.grid]
        n = {range = [3]}
    """, "cmdcheck.toml")
    start_slave("v1", 2)
    start_slave("v2", 2)
    master.submit(tmp_path / "checked.toml")
    master.submit(tmp_path / "cmdcheck.toml")
    master.wait_finished("checked", timeout=30)
    master.wait_finished("cmdcheck", timeout=30)
    store = open_store(master)
    try:
        done = {idx: store.outputs("checked", idx)["out"].data.decode().split() for idx, _ in store.done_tasks("checked")}
        assert sorted(done) == list(range(9))
        for n, (value, attempt) in done.items():
            assert int(value) == n and attempt == ("2" if n % 3 == 0 else "1")
            states = [a["state"] for a in store.attempts_of("checked", n)]
            assert states == (["rejected", "done"] if n % 3 == 0 else ["done"])
        rejected = store.attempts_of("checked", 3)[0]
        assert rejected["reason"] == "rejected: first attempt of 3 is suspect"
        failed = store.failed_tasks("cmdcheck")
        assert [(i, r) for i, _, r in failed] == [(1, "rejected: value 1 is not allowed (after 2 attempts)")]
        assert store.outputs("cmdcheck", 1) == {}  # a rejected result is never stored
        assert [i for i, _ in store.done_tasks("cmdcheck")] == [0, 2]
    finally:
        store.close()
    report = run_cli("--state", str(master.state), "stats", cwd=tmp_path).stdout
    tables = [[line.split() for line in part.splitlines()[1:] if line and not line.startswith("-")]
              for part in report.split("\n\n")[:2]]
    (sweep_header, *sweep_rows), (slave_header, *slave_rows) = tables
    rejected = {row[0]: int(dict(zip(sweep_header, row))["rejected"]) for row in sweep_rows}
    assert rejected == {"checked": 3, "cmdcheck": 2}, report  # every rejected attempt, per sweep ...
    by_slave = {row[0]: int(dict(zip(slave_header, row))["rejected"]) for row in slave_rows}
    assert set(by_slave) == {"v1", "v2"} and sum(by_slave.values()) == 5, report  # ... and per slave
    collect = run_cli("--state", str(master.state), "collect", "checked", "--out", "o", cwd=tmp_path)
    assert collect.returncode == 0
    lines = (tmp_path / "o" / "checked-results.csv").read_text().splitlines()[1:]
    assert len(lines) == 9  # each task once, only valid results


def test_slow_validators_do_not_block_the_master(master, start_slave, tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name = "slowcheck"
        command = "echo {n}"
        validate = "sleep 3"
        [parameters.grid]
        n = {range = [2]}
    """)
    start_slave("sv", 2)
    started = time.time()
    master.submit(tmp_path / "spec.toml")
    worst = 0.0
    while master.sweep_status("slowcheck")["state"] != "finished" and time.time() - started < 20:
        sent = time.time()
        assert master.control("ping")["ok"]
        worst = max(worst, time.time() - sent)
        time.sleep(0.05)
    took = time.time() - started
    # both validations ran at once, in the pool: one after the other would take 6 s (a wide margin for a busy machine)
    assert 3 <= took < 5.5
    assert worst < 0.3, f"the master took {worst:.3f}s to answer while validating"


# -- stragglers ------------------------------------------------------------------------------------------
def run_straggler_sweep(master, tmp_path: Path, name: str, speculate: float) -> float:
    marker = tmp_path / f"{name}.slow-once"
    write_spec(tmp_path, f"""
        name = "{name}"
        command = "case {{workdir}} in */slow/*) if mkdir {marker} 2>/dev/null; then sleep 4; fi;; esac; sleep 0.2; echo {{n}}"
        speculate = {speculate}
        [parameters.grid]
        n = {{range = [8]}}
    """, f"{name}.toml")
    master.submit(tmp_path / f"{name}.toml")
    master.wait_finished(name, timeout=30)
    store = open_store(master)
    try:
        row = store.sweep(name)
        assert [idx for idx, _ in store.done_tasks(name)] == list(range(8))  # each task collected once
        assert all(store.outputs(name, i)["stdout"].data == f"{i}\n".encode() for i in range(8))
        return row.finished - row.created
    finally:
        store.close()


def test_a_straggler_is_duplicated_and_the_sweep_finishes_early(master, start_slave, tmp_path: Path) -> None:
    start_slave("fast", 1)
    start_slave("slow", 1)
    wait_for(lambda: master.control("ping")["slaves"] == 2, 10, "2 slaves")
    plain = run_straggler_sweep(master, tmp_path, "plain", 0)
    speculative = run_straggler_sweep(master, tmp_path, "speculative", 3)
    print(f"\nstraggler sweep: {plain:.2f}s without duplication, {speculative:.2f}s with it")
    (tmp_path.parent / "straggler-timings.json").write_text(json.dumps({"plain": plain, "speculative": speculative}))
    assert plain >= 4.0
    assert speculative < 3.0
    duplicated = events(master, "ticket_duplicated")
    assert duplicated and {e["sweep"] for e in duplicated} == {"speculative"}
    cancelled = [t for t in tickets(master, "speculative") if t["state"] == "cancelled"]
    assert cancelled and all(t["reason"] == "another copy finished first" for t in cancelled)


# -- many sweeps -----------------------------------------------------------------------------------------
def test_priorities_dispatch_first_and_max_concurrent_is_respected(master, start_slave, tmp_path: Path) -> None:
    for name, priority in (("low", 0), ("high", 5)):  # submitted low first: priority beats FIFO
        write_spec(tmp_path, f"""
            name = "{name}"
            command = "sleep 0.05; echo {{n}}"
            priority = {priority}
            [parameters.grid]
            n = {{range = [6]}}
        """, f"{name}.toml")
        master.submit(tmp_path / f"{name}.toml")
    start_slave("one", 1, "--prefetch", "0")
    master.wait_finished("low", timeout=30)
    order = sorted(tickets(master, "high") + tickets(master, "low"), key=lambda t: t["dispatched"])
    assert [t["id"] in {x["id"] for x in tickets(master, "high")} for t in order] == [True] * 6 + [False] * 6

    write_spec(tmp_path, """
        name = "limited"
        command = "sleep 0.3; echo {n}"
        max_concurrent = 2
        [parameters.grid]
        n = {range = [8]}
    """, "limited.toml")
    start_slave("two", 2)
    wait_for(lambda: master.control("ping")["slaves"] == 2, 10, "2 slaves")
    master.submit(tmp_path / "limited.toml")
    master.wait_finished("limited", timeout=30)
    assert max_overlap(tickets(master, "limited")) == 2  # 3 slots free, never more than 2 out


# -- control -------------------------------------------------------------------------------------------------
def test_cancel_kills_running_tickets_within_two_heartbeats(master, start_slave, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    write_spec(tmp_path, f"""
        name = "doomed"
        command = "echo $$ > {pids}/{{n}}.tmp && mv {pids}/{{n}}.tmp {pids}/{{n}}; exec sleep 30"
        [parameters.grid]
        n = {{range = [8]}}
    """)
    a, b = start_slave("c1", 2), start_slave("c2", 2)
    master.submit(tmp_path / "spec.toml")
    wait_for(lambda: len([p for p in pids.iterdir() if p.suffix != ".tmp"]) == 4, 15, "4 workers running")
    workers = [int(p.read_text()) for p in pids.iterdir() if p.suffix != ".tmp"]
    started = time.time()
    result = run_cli("--state", str(master.state), "cancel", "doomed", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    replied = time.time()

    def all_dead() -> bool:
        return all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in workers)

    wait_for(all_dead, 5, "workers killed", every=0.02)
    assert time.time() - replied < 2 * HEARTBEAT, f"killed {time.time() - replied:.3f}s after the cancel"
    assert time.time() - started < 10
    status = master.sweep_status("doomed")
    assert status["state"] == "cancelled" and status["done"] == 0
    wait_for(lambda: not list(a.work_root.glob("doomed/*")) and not list(b.work_root.glob("doomed/*")), 5,
             "cancelled work dirs removed")


def test_pause_and_resume_a_sweep_and_a_task_from_the_cli(master, start_slave, tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name = "pausable"
        command = "sleep 0.2; echo {n}"
        [parameters.grid]
        n = {range = [6]}
    """)
    master.submit(tmp_path / "spec.toml")
    state = str(master.state)
    assert run_cli("--state", state, "pause", "pausable", "--task", "5", cwd=tmp_path).returncode == 0
    assert run_cli("--state", state, "pause", "pausable", cwd=tmp_path).returncode == 0
    start_slave("p1", 1)
    time.sleep(6 * HEARTBEAT)
    assert tickets(master, "pausable") == []  # paused: nothing dispatched
    assert run_cli("--state", state, "resume", "pausable", cwd=tmp_path).returncode == 0
    wait_for(lambda: (s := master.sweep_status("pausable")) and s["done"] == 5, 20, "the 5 unpaused tasks")
    time.sleep(3 * HEARTBEAT)
    assert master.sweep_status("pausable")["state"] == "active"  # task 5 is still held
    again = run_cli("--state", state, "resume", "pausable", "--task", "5", cwd=tmp_path)
    assert again.returncode == 0 and "resumed" in again.stdout
    master.wait_finished("pausable", timeout=20)
    wrong = run_cli("--state", state, "resume", "pausable", "--task", "5", cwd=tmp_path)
    assert wrong.returncode == 6 and "is done" in wrong.stderr, wrong.stderr  # refused (docs/CLI.md)


# -- housekeeping -----------------------------------------------------------------------------------------------
def test_pruning_removes_only_expired_uncollected_results(master, start_slave, tmp_path: Path) -> None:
    for name in ("old", "recent"):
        write_spec(tmp_path, f"""
            name = "{name}"
            command = "head -c 100000 /dev/zero > big.bin; echo {{n}}"
            [parameters.grid]
            n = {{range = [3]}}
            [results]
            out = "stdout"
            big = "file:big.bin"
        """, f"{name}.toml")
    start_slave("h1", 2)
    for name in ("old", "recent"):
        master.submit(tmp_path / f"{name}.toml")
        master.wait_finished(name, timeout=30)
    assert list((master.state / "results" / "old").rglob("big")), "large results are files"
    db = sqlite3.connect(master.state / "state.db", timeout=10)
    db.execute("UPDATE tasks SET finished = finished - 40 * 86400 WHERE sweep = 'old'")  # settled 40 days ago
    db.commit()
    db.close()
    result = run_cli("--state", str(master.state), "prune", cwd=tmp_path)  # keep_days = 30 by default
    assert result.returncode == 0, result.stderr
    assert "pruned 6 results of 1 sweeps" in result.stdout
    store = open_store(master)
    try:
        assert all(store.outputs("old", i) == {} for i in range(3))
        assert all(set(store.outputs("recent", i)) == {"out", "big"} for i in range(3))
        assert store.task_counts("old") == {"done": 3}  # the tasks' record stays
    finally:
        store.close()
    assert not (master.state / "results" / "old").exists()
    assert len(list((master.state / "results" / "recent").rglob("big"))) == 3
    assert [e["sweep"] for e in events(master, "results_pruned")] == ["old"]


# -- resources -------------------------------------------------------------------------------------------------
def test_tasks_claiming_cpus_and_memory(master, start_slave, tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name = "wide"
        command = "sleep 0.3; echo {n}"
        cpus = 2
        [parameters.grid]
        n = {range = [4]}
    """, "wide.toml")
    write_spec(tmp_path, """
        name = "hungry"
        command = "python3 -c 'import time; a = bytearray(300 * 1024 * 1024); time.sleep(20)'"
        memory = "64M"
        max_attempts = 1
        timeout = 30
        [parameters.grid]
        n = [1]
    """, "hungry.toml")
    start_slave("r1", 2, "--cpus", "2")
    master.submit(tmp_path / "wide.toml")
    master.submit(tmp_path / "hungry.toml")
    master.wait_finished("wide", timeout=30)
    assert max_overlap(tickets(master, "wide")) == 1  # 2 slots but 2 CPUs: one 2-CPU task at a time
    master.wait_finished("hungry", timeout=15)
    store = open_store(master)
    try:
        [(_, _, reason)] = store.failed_tasks("hungry")
    finally:
        store.close()
    assert reason.startswith("memory: the worker used") and "limit of 64 MiB" in reason


def master_with_heartbeat(tmp_path: Path, heartbeat: float, extra: str = "") -> MasterProcess:
    """A master whose housekeeping passes are far apart (every heartbeat/4): what waits for one shows."""
    m = MasterProcess(tmp_path / "slow-hb-state", f"tcp://127.0.0.1:{free_port()}", extra_config=extra)
    config = m.state / "master.toml"
    config.write_text(config.read_text().replace(f"heartbeat_interval = {HEARTBEAT}", f"heartbeat_interval = {heartbeat}"))
    return m.start()


def test_max_concurrent_one_refills_its_slot_as_soon_as_a_ticket_ends(tmp_path: Path) -> None:
    m = master_with_heartbeat(tmp_path, 1.0)
    slave = None
    try:
        slave = subprocess.Popen([sys.executable, "-m", "slave", "--master", m.endpoint, "--name", "serial",
                                  "--slots", "2", "--work-root", str(tmp_path / "w"), *slave_key_args(m.state)])
        wait_for(lambda: m.control("ping")["slaves"] == 1, 10, "the slave")
        write_spec(tmp_path, """
            name = "serial"
            command = "sleep 0.3; echo {n}"
            max_concurrent = 1
            [parameters.grid]
            n = {range = [8]}
        """)
        started = time.time()
        m.submit(tmp_path / "spec.toml")
        m.wait_finished("serial", timeout=60)
        wall = time.time() - started
        rows = sorted(tickets(m, "serial"), key=lambda t: t["dispatched"])
        assert max_overlap(rows) == 1
        # The next ticket goes out in the same pass that settles the one before (before: at the next housekeeping
        # pass, 0-0.25 s later with this heartbeat)
        gaps = sorted(b["dispatched"] - a["finished"] for a, b in zip(rows, rows[1:]))
        print(f"\nmax_concurrent = 1: 8 x 0.3 s in {wall:.2f}s; gaps between tickets {[round(g, 4) for g in gaps]}")
        assert gaps[-1] < 0.05, gaps
    finally:
        if slave is not None:
            slave.terminate()
            slave.wait(10)
        m.stop()
