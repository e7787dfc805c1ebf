"""The store's group commit with batched hot-path rows, on a real SQLite file: what is read, what survives."""
from __future__ import annotations

from pathlib import Path

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
