"""Interruptions cost no attempt, a resumed slave runs nothing the master gave away, a refusal that cannot
change is not retried."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from master.store import Store
from tests.conftest import HEARTBEAT, LIVENESS, MasterProcess, run_cli, wait_for, write_spec

LOGGING = """
    name = "{name}"
    command = "echo start {{n}} >> {log}; sleep {sleep}; echo end {{n}} >> {log}; echo {{n}}"
    timeout = 30
    max_attempts = {attempts}
    [parameters.grid]
    n = {{range = [{count}]}}
"""


def one_attempt_spec(tmp_path: Path, name: str, count: int, sleep: float, attempts: int = 1) -> tuple[Path, Path]:
    """A sweep whose tasks log their start and end, with a single attempt each unless told otherwise."""
    log = tmp_path / f"{name}.log"
    return write_spec(tmp_path, LOGGING.format(name=name, log=log, sleep=sleep, count=count, attempts=attempts),
                      f"{name}.toml"), log


def task_states(state: Path, name: str) -> Counter[str]:
    store = Store(state / "state.db", readonly=True)
    try:
        return Counter(s for (s,) in store.db.execute("SELECT state FROM tasks WHERE sweep = ?", (name,)))
    finally:
        store.close()


def lines(log: Path, word: str) -> Counter[str]:
    return Counter(line.split()[1] for line in log.read_text().splitlines() if line.startswith(word))


def test_ctrl_c_of_run_local_costs_no_attempt(tmp_path: Path) -> None:
    spec, log = one_attempt_spec(tmp_path, "interrupted", 6, 1.0)
    cmd = [sys.executable, "-m", "ticketfarm", "--state", "st", "run", str(spec), "--local", "2"]
    # A session of its own, as a terminal's foreground job: Ctrl-C reaches the run and its slaves together.
    first = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: log.exists() and len(lines(log, "start")) >= 2, 20, "two tasks started")
        os.killpg(first.pid, signal.SIGINT)
        assert first.wait(20) == 130, first.stderr.read()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    again = run_cli("--state", "st", "run", str(spec), "--local", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert task_states(tmp_path / "st", "interrupted") == {"done": 6}


def test_slave_stopped_with_sigterm_costs_no_attempt(master, start_slave, tmp_path: Path) -> None:
    spec, log = one_attempt_spec(tmp_path, "terminated", 4, 1.0)
    leaving = start_slave("leaving", 1)  # one running, one prefetched
    master.submit(spec)
    wait_for(lambda: log.exists() and lines(log, "start"), 20, "a task started")
    leaving.stop()
    start_slave("staying", 2)
    status = master.wait_finished("terminated", timeout=60)
    assert status["done"] == 4 and status["failed"] == 0, status


def promise_metrics(master: MasterProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The master's Prometheus samples (CONTROL op `metrics`, what /metrics serves), by name and labels."""
    text = master.control("metrics")["text"]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_resumed_slave_starts_nothing_given_away_and_the_metrics_count_it(master, start_slave, tmp_path: Path) -> None:
    spec, log = one_attempt_spec(tmp_path, "resumed", 2, 1.5, attempts=5)
    sleepy = start_slave("sleepy", 1)  # task 0 running, task 1 prefetched
    master.submit(spec)
    wait_for(lambda: log.exists() and lines(log, "start") == {"0": 1}, 20, "task 0 started")
    sleepy.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(HEARTBEAT * LIVENESS + 0.5)  # silent past the liveness: its tickets are given away
        start_slave("helper", 2)
        # both tasks done by the helper: sleepy's task 0, which ended while sleepy was stopped, is a duplicate
        master.wait_finished("resumed", timeout=30)
    finally:
        sleepy.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: "ticket_cancelled" in (tmp_path / "slave-sleepy.log").read_text(), 10,
             "the master to cancel what it gave away")
    wait_for(lambda: promise_metrics(master).get(("ticketfarm_duplicate_results_suppressed_total", ())), 10,
             "sleepy's late result of task 0 to be suppressed")
    time.sleep(2.0)  # longer than a task: a prefetched task 1 started on sleepy would have ended by now
    assert lines(log, "start")["1"] == 1 and lines(log, "end")["1"] == 1, log.read_text()
    samples = promise_metrics(master)
    silent = (("cause", "slave_silent"),)
    assert samples[("ticketfarm_tickets_lost_total", silent)] == 2, samples
    assert samples[("ticketfarm_reassignments_total", silent)] == 2, samples
    assert samples[("ticketfarm_duplicate_results_suppressed_total", ())] == 1, samples
    assert task_states(master.state, "resumed") == {"done": 2}


def test_result_refused_for_an_unsafe_path_is_not_retried(master, start_slave, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """
        name = "unsafe"
        command = "ln -s /etc/passwd out.txt"
        max_attempts = 3
        [parameters.grid]
        n = {range = [2]}
        [results]
        out = "file:out.txt"
    """)
    start_slave("careful", 2)
    master.submit(spec)
    status = master.wait_finished("unsafe", timeout=30)
    assert status["failed"] == 2, status
    store = Store(master.state / "state.db", readonly=True)
    try:
        assert store.db.execute("SELECT count(*) FROM tickets WHERE sweep = 'unsafe'").fetchone()[0] == 2
        reasons = [r for (r,) in store.db.execute("SELECT reason FROM tasks WHERE sweep = 'unsafe'")]
        assert all("result refused" in r and "not retried" in r for r in reasons), reasons
    finally:
        store.close()


CTRL_C_SCRIPT = """
import sys, time
from ticketfarm import Cluster

def slow(x):
    time.sleep(0.4)
    return x * x

with Cluster(local=2, state_dir=sys.argv[1], heartbeat=0.2) as cluster:
    if sys.argv[2] == "map":
        for result in cluster.map(slow, range(40)):
            print(result, flush=True)
    else:
        for future in [cluster.submit(slow, x) for x in range(40)]:
            print(future.result(), flush=True)
"""


def session_processes(sid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


@pytest.mark.parametrize("api", ["map", "submit"])
@pytest.mark.parametrize("whom", ["foreground job", "script alone"])
def test_ctrl_c_of_a_script_on_a_local_cluster_stops_it_cleanly(tmp_path: Path, whom: str, api: str) -> None:
    """Ctrl-C at a terminal reaches the whole foreground job (the script, its local master and slaves); `kill
    -INT` the script alone. Either way: prompt exit, no process left, no ticket left running, no attempt charged,
    every result the script got is stored."""
    script = tmp_path / "user.py"
    script.write_text(CTRL_C_SCRIPT)
    state = tmp_path / "st"
    user = subprocess.Popen([sys.executable, str(script), str(state), api], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert user.stdout is not None
        got = [int(user.stdout.readline()) for _ in range(4)]
        if whom == "foreground job":
            os.killpg(user.pid, signal.SIGINT)
        else:
            user.send_signal(signal.SIGINT)
        out, err = user.communicate(timeout=20)
        got += [int(line) for line in out.split()]
    finally:
        if user.poll() is None:
            os.killpg(user.pid, signal.SIGKILL)
            user.wait()
    assert "KeyboardInterrupt" in err, err
    wait_for(lambda: not session_processes(user.pid), 10, "every process of the script's session to end")
    store = Store(state / "state.db", readonly=True)
    try:
        tickets = Counter(s for (s,) in store.db.execute("SELECT state FROM tickets"))
        tasks = dict(store.db.execute("SELECT idx, state FROM tasks").fetchall())
        charged = store.db.execute("SELECT count(*) FROM tasks WHERE state = 'queued' AND attempts > 0").fetchone()[0]
    finally:
        store.close()
    assert tickets["running"] == 0 and tickets["lost"] == 0 and tickets["failed"] == 0, tickets
    # map's unfinished tasks are cancelled as Executor.map's are when its iterator is left; submit's stay queued
    assert len(tasks) == 40 and set(tasks.values()) <= {"done", "queued", "cancelled"}, tasks
    assert charged == 0
    assert set(got) <= {x * x for x, state in tasks.items() if state == "done"}, got
