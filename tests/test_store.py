"""The store's group commit with batched hot-path rows, on a real SQLite file: what is read, what survives."""
from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from master.store import Store, StoredOutput
from ticketfarm.spec import Sweep


def _store_with_sweep(path: Path, tasks: int = 4) -> Store:
    store = Store(path)
    store.add_sweep(Sweep(name="s", params=[{"x": i} for i in range(tasks)], command="true"))
    store.commit()
    return store


def test_started_tickets_get_attempts_and_params_in_the_order_asked(tmp_path: Path) -> None:
    store = _store_with_sweep(tmp_path / "state.db")
    started = store.start_tickets("s", [(11, 2), (12, 0), (13, 3)], "slave-a", 1.0)
    assert started == [(1, {"x": 2}), (1, {"x": 0}), (1, {"x": 3})]
    store.finish_ticket(11, "failed", reason="boom")
    store.requeue_task("s", 2)
    assert store.start_tickets("s", [(14, 2)], "slave-b", 2.0) == [(2, {"x": 2})]
    store.commit()
    assert [t.id for t in store.running_tickets()] == [12, 13, 14]


def test_batched_rows_are_seen_by_the_next_read_and_keep_their_order(tmp_path: Path) -> None:
    store = _store_with_sweep(tmp_path / "state.db")
    store.start_tickets("s", [(21, 1)], "slave-a", 1.0)
    store.complete_task("s", 1, 21, [StoredOutput("stdout", 3, b"one", None)])
    store.complete_task("s", 1, 21, [StoredOutput("stdout", 3, b"two", None)])  # a replace: the last one wins
    store.finish_ticket(21, "done", exit_code=0, elapsed=0.5)
    assert store.dirty
    # Reads in the same transaction see the batched rows (they are written before any use of the connection).
    assert store.task("s", 1)["state"] == "done"
    assert store.outputs("s", 1)["stdout"].data == b"two"
    assert store.ticket(21).state == "done"


def test_batched_rows_are_durable_only_after_commit(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = _store_with_sweep(path)
    store.start_tickets("s", [(31, 0), (32, 1)], "slave-a", 1.0)
    store.complete_task("s", 0, 31, [StoredOutput("stdout", 1, b"a", None)])
    store.finish_ticket(31, "done")
    store.commit()
    store.complete_task("s", 1, 32, [StoredOutput("stdout", 1, b"b", None)])
    store.finish_ticket(32, "done")
    store.close()  # a master that stops (or dies) before its next commit
    reopened = Store(path, readonly=True)
    assert reopened.task("s", 0)["state"] == "done" and reopened.outputs("s", 0)["stdout"].data == b"a"
    assert reopened.task("s", 1)["state"] == "running" and reopened.outputs("s", 1) == {}
    assert reopened.ticket(32).state == "running"
    reopened.close()


def test_the_stored_spec_holds_no_rows_and_the_parameter_names_come_from_the_tasks(tmp_path: Path) -> None:
    store = _store_with_sweep(tmp_path / "state.db", tasks=3)
    row = store.sweep("s")
    assert row is not None and row.sweep().params == [] and row.ntasks == 3
    assert row.digest == Sweep(name="s", params=[{"x": i} for i in range(3)], command="true").digest()
    assert store.param_names("s") == ["x"] and store.params("s", 2) == {"x": 2}
    assert store.param_names("nothing") == []


def test_a_ticket_started_after_another_finished_in_the_same_batch_is_made_before_it_is_finished(
        tmp_path: Path) -> None:
    store = _store_with_sweep(tmp_path / "state.db")
    store.start_tickets("s", [(41, 0)], "slave-a", 1.0)
    store.commit()
    store.finish_ticket(41, "done")  # the batch's first statement is a finish ...
    store.start_tickets("s", [(42, 1)], "slave-a", 2.0)  # ... of another ticket than this one's
    store.finish_ticket(42, "failed", reason="boom")
    store.commit()
    assert store.ticket(41).state == "done" and store.ticket(42).state == "failed"


def test_attempts_read_ahead_follow_every_change_of_the_store(tmp_path: Path) -> None:
    store = _store_with_sweep(tmp_path / "state.db")
    assert store.start_tickets("s", [(51, 0)], "slave-a", 1.0) == [(1, {"x": 0})]
    assert store.start_tickets("s", [(52, 0)], "slave-b", 1.0) == [(2, {"x": 0})]  # a speculative copy
    store.refund_attempt("s", 0)  # one given back: not counted
    assert store.start_tickets("s", [(53, 0)], "slave-a", 2.0) == [(2, {"x": 0})]
    store.retry_tasks("s", [0])  # a fresh budget
    assert store.start_tickets("s", [(54, 0)], "slave-a", 3.0)[0][0] == 1
    assert [store.start_tickets("s", [(60 + i, i)], "slave-a", 3.0)[0][0] for i in (1, 2, 3)] == [1, 1, 1]
    store.commit()
    assert store.task_attempts("s", 0) == 1 and store.ticket(53).attempt == 2


def test_a_background_commit_is_durable_once_finished_and_rows_written_meanwhile_join_the_next(
        tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = _store_with_sweep(path)
    reader = Store(path, readonly=True)
    try:
        store.start_tickets("s", [(71, 0)], "slave-a", 1.0)
        store.commit_in_background()
        assert store.committing and not store.dirty
        store.start_tickets("s", [(72, 1)], "slave-a", 1.0)  # batched while the commit runs
        assert store.finish_commit(wait=True) and not store.finish_commit(wait=True)
        assert reader.ticket(71) is not None and reader.ticket(72) is None
        store.commit()
        assert reader.ticket(72) is not None
    finally:
        reader.close()
        store.close()


def test_a_background_commit_that_fails_is_raised_and_nothing_after_it_is_committed(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        store = _store_with_sweep(disk / "state.db")
        store.start_tickets("s", [(81, 0), (82, 1)], "slave-a", 1.0)
        store.commit()
        store.complete_task("s", 0, 81, [StoredOutput("big", 1_500_000, b"x" * 1_500_000, None)])  # > the disk
        store.commit_in_background()
        with pytest.raises(sqlite3.OperationalError):
            store.finish_commit(wait=True)
        store.complete_task("s", 1, 82, [StoredOutput("stdout", 1, b"y", None)])
        with pytest.raises(sqlite3.OperationalError):
            store.commit()  # the store stays refused: no later commit can make a later ACK true
        store.close()
        reader = Store(disk / "state.db", readonly=True)
        assert reader.task("s", 0)["state"] == reader.task("s", 1)["state"] == "running"
        reader.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
