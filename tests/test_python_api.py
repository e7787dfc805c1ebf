"""The Python API for real: a master and slaves as processes, cloudpickled functions, futures (issue 7)."""
from __future__ import annotations

import concurrent.futures
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zmq

from master.store import Store
from tests import fixtures_tasks as tasks
from tests.conftest import HEARTBEAT, run_cli, wait_for
from ticketfarm import Cluster, protocol
from ticketfarm.errors import (
    ClusterClosed,
    ConfigError,
    MasterRefused,
    MasterUnreachable,
    NotEnoughSlaves,
    RemoteTraceback,
    TaskFailed,
)
from ticketfarm.keys import dealer
from ticketfarm.protocol import Command
from ticketfarm.spec import PYTHON_RESULTS, Sweep

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    """One master and two local slaves (one slot each) shared by the tests that leave them intact."""
    with Cluster(local=2, heartbeat=HEARTBEAT, durability="normal", max_attempts=2) as c:
        c.wait_for_slaves(2, timeout=20)
        yield c


def test_map_over_1000_items_returns_results_in_input_order(cluster):
    results = list(cluster.map(tasks.square, range(1000)))
    assert results == [x * x for x in range(1000)]


def test_submit_with_kwargs_closures_and_as_completed(cluster):
    offset = 100
    futures = [cluster.submit(tasks.add, i, 1, offset=offset) for i in range(20)]
    futures.append(cluster.submit(lambda: offset * 2))  # a closure travels by value
    done = list(concurrent.futures.as_completed(futures, timeout=30))
    assert len(done) == 21
    assert [f.result() for f in futures] == [i + 1 + offset for i in range(20)] + [200]


def test_exception_is_reraised_with_the_remote_traceback(cluster):
    future = cluster.submit(tasks.fail_with, "no good")
    with pytest.raises(ValueError, match="no good") as info:
        future.result(timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "inner_helper_that_raises" in cause.tb and "fixtures_tasks.py" in cause.tb
    assert any("remote traceback" in note for note in info.value.__notes__)


def test_worker_that_exits_is_retried_then_failed_with_the_reason(cluster):
    handle = cluster.sweep(tasks.exit_hard, [3], max_attempts=2)
    with pytest.raises(TaskFailed) as info:
        list(handle)
    assert "python worker died: exit code 3" in info.value.reason
    assert "after 2 attempts" in info.value.reason
    # The warm worker was replaced: the next task runs normally.
    assert cluster.submit(tasks.square, 12).result(timeout=30) == 144


def test_timeout_kills_the_task_and_the_pool_recovers(cluster):
    handle = cluster.sweep(tasks.sleep_for, [30.0], timeout=0.5, max_attempts=1)
    with pytest.raises(TaskFailed, match="timeout"):
        handle.futures[0].result(timeout=30)
    assert cluster.submit(tasks.square, 3).result(timeout=30) == 9


def test_a_task_that_kills_its_worker_inside_a_batch_fails_alone(cluster, tmp_path):
    # Fast tasks travel to warm workers in batches; a death there cannot be pinned on one task,
    # so the batch's unanswered tasks run again one by one and only the culprit fails.
    runs = tmp_path / "runs"
    runs.mkdir()
    assert list(cluster.map(tasks.square_or_exit, range(300), [-1] * 300, [str(runs)] * 300)) == \
        [x * x for x in range(300)]  # teaches the slaves that this function is fast
    handle = cluster.sweep(tasks.square_or_exit, range(2000), [1234] * 2000, [str(runs)] * 2000, max_attempts=1)
    assert handle.wait(60)
    for i, fut in enumerate(handle.futures):
        if i == 1234:
            assert isinstance(fut.exception(), TaskFailed) and "exit code 3" in fut.exception().reason
        else:
            assert fut.result() == i * i
    reruns = [p.name for p in runs.iterdir() if len(p.read_text().split()) > 1 and p.name != "1234"]
    assert reruns, "the death happened in a batch, so some innocent task ran again"


def test_a_task_that_hangs_inside_a_batch_times_out_alone(cluster):
    assert list(cluster.map(tasks.square_or_hang, range(300), [-1] * 300)) == [x * x for x in range(300)]
    handle = cluster.sweep(tasks.square_or_hang, range(1000), [700] * 1000, timeout=1.0, max_attempts=1)
    assert handle.wait(60)
    failed = [i for i, fut in enumerate(handle.futures) if fut.exception() is not None]
    assert failed == [700]
    assert "timeout after 1s" in handle.futures[700].exception().reason
    assert all(fut.result() == i * i for i, fut in enumerate(handle.futures) if i != 700)


def test_cancel_a_running_task_and_a_queued_one(cluster):
    running = [cluster.submit(tasks.sleep_for, 20.0) for _ in range(2)]
    queued = cluster.submit(tasks.sleep_for, 20.0)
    time.sleep(0.5)
    assert all(f.cancel() for f in [*running, queued])
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result()
    # Both slots are free again well before the 20 s tasks would have ended.
    assert cluster.submit(tasks.square, 5).result(timeout=10) == 25


def test_50_mb_bytes_result_round_trips(cluster):
    size = 50 * 1024 * 1024 + 7
    value = cluster.submit(tasks.blob, size).result(timeout=120)
    assert value == tasks.blob(size)


def test_the_clusters_own_failures_are_ticketfarm_errors(cluster):
    with pytest.raises(NotEnoughSlaves, match="fewer than 3 slaves"):
        cluster.wait_for_slaves(3, timeout=0.3)
    with pytest.raises(ConfigError) as info:
        cluster.map(tasks.square, range(3), task_timeout=0)  # map's own `timeout` bounds the wait, as Executor.map
    assert info.value.field == "timeout"
    with pytest.raises(MasterRefused, match="no sweep named 'never-submitted'"):
        cluster.attach("never-submitted")


def test_slave_killed_mid_map_the_map_completes():
    with Cluster(local=2, heartbeat=HEARTBEAT, durability="normal", prefetch=8) as c:
        c.wait_for_slaves(2, timeout=20)
        handle = c.sweep(tasks.slow_square, range(200))
        wait_for(lambda: sum(f.done() for f in handle.futures) >= 20, 30, "first results")
        os.kill(c.local_slaves[0], signal.SIGKILL)
        assert list(handle.results(timeout=60)) == [x * x for x in range(200)]
    with pytest.raises(ClusterClosed):
        c.submit(tasks.square, 2)


FIRST = """
import sys
from ticketfarm import Cluster
from tests import fixtures_tasks as tasks
c = Cluster(address=sys.argv[1])
handle = c.sweep(tasks.slow_square, range(40), name="keep-me")
print(len(handle), flush=True)
c.close()  # returns once the master has stored the tasks; they run on without this process
"""

SECOND = """
import json, sys
from ticketfarm import Cluster
with Cluster(address=sys.argv[1]) as c:
    print(json.dumps(list(c.attach("keep-me").results(timeout=60))))
"""


def test_reattach_by_name_from_a_second_process(master, start_slave):
    start_slave("py-1")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TICKETFARM_KEYS": str(master.state / "keys")}
    first = subprocess.run([sys.executable, "-c", textwrap.dedent(FIRST), master.endpoint], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "40"
    status = master.sweep_status("keep-me")
    assert status is not None and status["state"] != "finished"  # the first process left before the end
    second = subprocess.run([sys.executable, "-c", textwrap.dedent(SECOND), master.endpoint], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=90)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == [x * x for x in range(40)]


def _py_add(sock: zmq.Socket, rid: int, sizes: list[int], args: bytes) -> dict:
    """Send a hand-made py_add of two tasks (no function body: nothing runs them) and return the REPLY header."""
    spec = Sweep(name="hand-made", params=[], kind="python", timeout=30.0, max_attempts=1, results=dict(PYTHON_RESULTS))
    header = {"op": "py_add", "rid": rid, "sweep": spec.name, "spec": spec.to_json(), "first": 0,
              "fns": ["0" * 64] * 2, "reprs": ["a", "b"], "functions": [], "sizes": sizes}
    sock.send_multipart(protocol.encode(Command.CONTROL, header, [args]))
    assert sock.poll(5000), "no REPLY to py_add"
    reply = protocol.decode(sock.recv_multipart())
    assert reply.command == Command.REPLY and reply.header["rid"] == rid
    return reply.header


def test_py_add_whose_sizes_do_not_match_its_frame_is_refused_and_the_master_keeps_serving(master):
    sock = dealer(zmq.Context.instance(), master.endpoint, master.keys)
    try:
        refused = _py_add(sock, 1, [3, 4], b"abcdef")  # 7 bytes announced, 6 sent
        assert refused["ok"] is False and "sizes" in refused["error"], refused
        assert master.sweep_status("hand-made") is None  # nothing of the refused add was stored
        accepted = _py_add(sock, 2, [3, 3], b"abcdef")
        assert accepted["ok"] is True and accepted["added"] == 2, accepted
    finally:
        sock.close()


def test_ticketfarm_collect_writes_a_python_sweeps_pickles_and_failures(master, start_slave, tmp_path):
    start_slave("py-c")
    with Cluster(address=master.endpoint, keys=master.state / "keys") as c:
        handle = c.sweep(tasks.square, range(5), name="to-collect", max_attempts=1)
        assert list(handle.results(timeout=30)) == [0, 1, 4, 9, 16]
        raised = c.sweep(tasks.fail_with, ["bad input"], name="to-collect-errors", max_attempts=1)
        died = c.sweep(tasks.exit_hard, [3], name="to-collect-deaths", max_attempts=1)
        assert raised.wait(30) and died.wait(30)
    for name in ("to-collect", "to-collect-errors", "to-collect-deaths"):
        done = run_cli("--state", str(master.state), "collect", name, "--out", "out", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    values = [pickle.loads((out / "to-collect" / str(i) / "result").read_bytes()) for i in range(5)]
    assert values == [0, 1, 4, 9, 16]
    assert json.loads((out / "to-collect" / "3" / "params.json").read_text())["repr"] == "(3,)"
    error, tb = pickle.loads((out / "to-collect-errors" / "0" / "error").read_bytes())
    assert isinstance(error, ValueError) and "inner_helper_that_raises" in tb
    failed = (out / "to-collect-deaths-failed.csv").read_text()
    assert "python worker died: exit code 3" in failed


def test_what_a_task_prints_is_kept_with_its_result(master, start_slave, tmp_path):
    start_slave("py-p")
    with Cluster(address=master.endpoint, keys=master.state / "keys") as c:
        assert list(c.map(tasks.chatty, range(3), name="chatty")) == [1, 2, 3]
        assert c.submit(tasks.square, 4).result(timeout=30) == 16  # printed nothing: no stdout kept
    done = run_cli("--state", str(master.state), "collect", "chatty", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    task = tmp_path / "out" / "chatty" / "2"
    assert (task / "stdout").read_text() == "working on 2\n"
    assert (task / "stderr").read_text() == "warning about 2\n"
    store = Store(master.state / "state.db", readonly=True)
    quiet = store.db.execute("SELECT name FROM sweeps WHERE name LIKE 'py-%'").fetchone()[0]
    assert set(store.outputs(quiet, 0)) == {"result"}
    store.close()


def test_master_killed_mid_map_the_map_completes_each_result_once(master, start_slave):
    start_slave("py-k1")
    start_slave("py-k2")
    with Cluster(address=master.endpoint, keys=master.state / "keys") as c:
        handle = c.sweep(tasks.slow_square, range(300), name="survives")
        wait_for(lambda: sum(f.done() for f in handle.futures) >= 30, 30, "first results")
        master.kill()  # SIGKILL: whatever was not committed is gone; the slaves hold their results
        time.sleep(HEARTBEAT * 2)
        master.start()
        assert list(handle.results(timeout=90)) == [x * x for x in range(300)]
    counts = master.sweep_status("survives")
    assert (counts["state"], counts["done"], counts["total"]) == ("finished", 300, 300)


def test_close_says_so_when_the_master_stored_not_every_submitted_task(master):
    """A master that stops answering (SIGSTOP) before it stored a sweep: close() gives up after its timeout with
    an error naming what may not be submitted, never silently."""
    c = Cluster(address=master.endpoint, keys=master.state / "keys")
    os.kill(master.proc.pid, signal.SIGSTOP)
    try:
        c.sweep(tasks.square, range(50), name="never-stored")
        with pytest.raises(MasterUnreachable, match=r"stored nothing more within 1s: .*submit the rest again"):
            c.close(timeout=1)
    finally:
        os.kill(master.proc.pid, signal.SIGCONT)
