"""Short tickets run in batches by a runner process (slave/batches.py, slave/spawner.py): each task's own result,
exit code and timeout, as if it had run alone."""
from __future__ import annotations

import os
import select
import time
from pathlib import Path

import psutil
import pytest

from master.config import MasterConfig
from slave.batches import SEEN_BEFORE_BATCHING, SHORT_TASK, Runner, Shortness
from ticketfarm.client.local import LocalCluster
from ticketfarm.spec import Sweep


# -- which sweeps run in batches ---------------------------------------------------------------------------------
def test_a_sweep_runs_in_batches_only_once_its_tickets_proved_short() -> None:
    short = Shortness()
    for _ in range(SEEN_BEFORE_BATCHING - 1):
        short.record("tiny", 0.002)
    assert short.batch_size("tiny") == 1
    short.record("tiny", 0.002)
    assert short.batch_size("tiny") > 1
    for _ in range(20):
        short.record("slow", SHORT_TASK * 4)
    assert short.batch_size("slow") == 1


def test_a_sweep_whose_tickets_grow_long_leaves_batches() -> None:
    short = Shortness()
    for _ in range(10):
        short.record("s", 0.001)
    assert short.batch_size("s") > 1
    for _ in range(30):
        short.record("s", 1.0)
    assert short.batch_size("s") == 1


# -- the runner process ------------------------------------------------------------------------------------------
def read_until_done(runner: Runner, batch: int, timeout: float = 30) -> list[list[bytes]]:
    lines: list[list[bytes]] = []
    deadline = time.monotonic() + timeout
    while not any(w[0] == b"D" and int(w[1]) == batch for w in lines):
        assert time.monotonic() < deadline, f"batch {batch} never ended: {lines}"
        select.select([runner.status], [], [], 1)
        lines += runner.lines()
    return lines


def launch(tmp: Path, name: str, argv: list[str], timeout: float = 30, stdin: str = "") -> tuple:
    work = tmp / name
    work.mkdir()
    return (argv[0], argv, {"TASK_NAME": name}, str(work), stdin, str(work / "out"), str(work / "err"), timeout)


@pytest.fixture
def runner() -> Runner:
    r = Runner({"PATH": os.environ["PATH"]})
    yield r
    r.close()


def test_the_runner_starts_each_task_in_its_own_dir_with_its_own_streams_and_exit_code(tmp_path: Path,
                                                                                    runner: Runner) -> None:
    (tmp_path / "input").write_text("from stdin\n")
    launches = [launch(tmp_path, "a", ["/bin/sh", "-c", "echo a $TASK_NAME $(pwd); echo oops >&2"]),
                launch(tmp_path, "b", ["/bin/sh", "-c", "cat; exit 3"], stdin=str(tmp_path / "input")),
                launch(tmp_path, "c", ["/bin/sh", "-c", "kill -9 $$"])]
    runner.send(("batch", 7, launches))
    lines = read_until_done(runner, 7)
    ends = {int(w[2]): int(w[3]) for w in lines if w[0] == b"E"}
    assert ends == {0: 0, 1: 3, 2: -9}
    assert (tmp_path / "a" / "out").read_text() == f"a a {tmp_path / 'a'}\n"
    assert (tmp_path / "a" / "err").read_text() == "oops\n"
    assert (tmp_path / "b" / "out").read_text() == "from stdin\n"
    starts = [w for w in lines if w[0] == b"S"]
    assert [int(w[2]) for w in starts] == [0, 1, 2]  # in order, one at a time
    assert all(float(w[4]) <= time.monotonic() for w in starts)


def test_the_runner_kills_a_task_at_its_timeout_and_goes_on_with_the_next(tmp_path: Path, runner: Runner) -> None:
    runner.send(("batch", 1, [launch(tmp_path, "slow", ["/bin/sleep", "30"], timeout=0.5),
                              launch(tmp_path, "next", ["/bin/sh", "-c", "echo next"])]))
    started = time.monotonic()
    lines = read_until_done(runner, 1)
    assert time.monotonic() - started < 10
    ends = {int(w[2]): (int(w[3]), w[5]) for w in lines if w[0] == b"E"}
    assert ends == {0: (-9, b"1"), 1: (0, b"0")}
    assert (tmp_path / "next" / "out").read_text() == "next\n"


def test_a_stopped_task_is_killed_if_it_runs_and_never_started_if_not(tmp_path: Path, runner: Runner) -> None:
    runner.send(("batch", 2, [launch(tmp_path, "long", ["/bin/sleep", "30"]),
                              launch(tmp_path, "never", ["/bin/sh", "-c", "echo ran"]),
                              launch(tmp_path, "last", ["/bin/sh", "-c", "echo last"])]))
    lines: list[list[bytes]] = []
    while not any(w[0] == b"S" for w in lines):  # S lines come at the latest with the next flush
        select.select([runner.status], [], [], 1)
        lines += runner.lines()
    runner.send(("stop", 2, 1))  # not started yet: never starts
    runner.send(("stop", 2, 0))  # running: killed
    lines += read_until_done(runner, 2)
    assert {int(w[2]) for w in lines if w[0] == b"S"} == {0, 2}
    assert not (tmp_path / "never" / "out").exists()
    assert (tmp_path / "last" / "out").read_text() == "last\n"


def test_a_program_that_cannot_start_is_told_with_its_errno(tmp_path: Path, runner: Runner) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    runner.send(("batch", 3, [launch(tmp_path, "x", [str(script)])]))
    lines = read_until_done(runner, 3)
    assert [w for w in lines if w[0] == b"F"] == [[b"F", b"3", b"0", b"%d" % 13]]  # EACCES


def test_when_the_slave_goes_its_runner_kills_the_running_task_and_exits(tmp_path: Path, runner: Runner) -> None:
    runner.send(("batch", 4, [launch(tmp_path, "long", ["/bin/sleep", "30"])]))
    pid = 0
    deadline = time.monotonic() + 30
    while not pid:
        assert time.monotonic() < deadline
        select.select([runner.status], [], [], 1)
        pid = next((int(w[3]) for w in runner.lines() if w[0] == b"S"), 0)
    runner.proc.stdin.close()  # what a slave killed with SIGKILL leaves: the pipe's end
    runner.proc.wait(timeout=10)
    psutil.wait_procs([psutil.Process(pid)], timeout=10) if psutil.pid_exists(pid) else None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# -- through a real master and slaves ------------------------------------------------------------------------------
@pytest.fixture
def cluster(tmp_path: Path) -> LocalCluster:
    local = LocalCluster(tmp_path / "state", 2, slots=1, config=MasterConfig(heartbeat_interval=1.0))
    local.run_until(lambda: len(local.master.roster) == 2)
    yield local
    local.close()


def outputs(cluster: LocalCluster, sweep: str) -> dict[int, bytes]:
    rows = cluster.master.store.db.execute("SELECT task, data FROM results WHERE sweep = ? AND name = 'out'",
                                           (sweep,)).fetchall()
    return {task: data for task, data in rows}


def test_a_sweep_of_tiny_tasks_runs_in_batches_each_result_and_failure_its_own(cluster: LocalCluster) -> None:
    n = 200
    sweep = Sweep(name="tiny", params=[{"i": i} for i in range(n)], max_attempts=1, timeout=30,
                  argv=["/bin/sh", "-c", "echo {i}; tr '\\0' ' ' < /proc/$PPID/cmdline; exit $(( {i} % 7 == 3 ))"],
                  results={"out": "stdout"})
    counts = cluster.run_sweep(sweep)
    failing = {i for i in range(n) if i % 7 == 3}
    assert counts == {"done": n - len(failing), "failed": len(failing)}
    out = outputs(cluster, "tiny")
    assert set(out) == set(range(n)) - failing
    assert all(data.split(b"\n")[0] == b"%d" % i for i, data in out.items())  # each its own stdout
    parents = [data.split(b"\n")[1] for data in out.values()]
    batched = sum(b"spawner.py" in p for p in parents)
    assert batched > n // 2, f"only {batched} of {n} tickets ran in batches"
    assert any(b"-m slave" in p for p in parents)  # the first ones ran alone, to learn they are short
    for i in failing:
        *returned, attempt = cluster.master.store.attempts_of("tiny", i)
        assert attempt["exit_code"] == 1 and attempt["state"] == "failed", attempt
        assert all(a["state"] == "returned" for a in returned), returned  # handed back unstarted, if at all


def test_a_batched_task_that_outlives_its_timeout_fails_alone(cluster: LocalCluster) -> None:
    n, slow = 60, 50
    sweep = Sweep(name="one-slow", params=[{"i": i} for i in range(n)], max_attempts=1, timeout=1.0,
                  argv=["/bin/sh", "-c", f"[ {{i}} = {slow} ] && exec sleep 30; echo {{i}}"],
                  results={"out": "stdout"})
    counts = cluster.run_sweep(sweep)
    assert counts == {"done": n - 1, "failed": 1}
    *_, attempt = cluster.master.store.attempts_of("one-slow", slow)
    assert "timeout" in attempt["reason"], attempt
    assert set(outputs(cluster, "one-slow")) == set(range(n)) - {slow}


def test_tickets_behind_one_that_turns_out_long_are_given_back_and_start_elsewhere(cluster: LocalCluster) -> None:
    """Task 20 sleeps: the tickets batched after it must not wait for it, and the store counts it running and
    them not (the dashboard's `running` is what really runs)."""
    n, slow = 60, 20
    sweep = Sweep(name="long-one", params=[{"i": i} for i in range(n)], max_attempts=1, timeout=60,
                  argv=["/bin/sh", "-c", f"[ {{i}} = {slow} ] && exec sleep 30; echo {{i}}"],
                  results={"out": "stdout"})
    cluster.master.submit(sweep)
    store = cluster.master.store
    cluster.run_until(lambda: store.task_counts("long-one").get("done") == n - 1)
    assert store.task_counts("long-one") == {"done": n - 1, "running": 1}
    assert store.started_tasks("long-one") == 1


def test_a_batched_program_that_is_not_found_fails_alone(cluster: LocalCluster) -> None:
    n, missing = 40, 30
    sweep = Sweep(name="not-found", max_attempts=1, timeout=30, argv=["{prog}", "-c", "echo {i}"],
                  params=[{"i": i, "prog": "no-such-program-here" if i == missing else "sh"} for i in range(n)],
                  results={"out": "stdout"})
    counts = cluster.run_sweep(sweep)
    assert counts == {"done": n - 1, "failed": 1}
    *_, attempt = cluster.master.store.attempts_of("not-found", missing)
    assert "cannot start worker" in attempt["reason"] and "no-such-program-here" in attempt["reason"], attempt
