"""The task lifecycle on a real SQLite store and a real inproc socket pair: each transition, read from the store."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from master.pysweep import PythonSweeps
from tests.loopbench import Bench, open_bench
from ticketfarm import messages
from ticketfarm.errors import RetryRefused, SweepExists
from ticketfarm.messages import Cancel
from ticketfarm.spec import Sweep


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    with open_bench(tmp_path) as b:
        yield b


def test_submit_queues_every_task_and_a_same_spec_resubmit_is_running(bench: Bench) -> None:
    bench.add("s", 3)
    assert bench.heard.queued == 1
    assert [bench.task(i) for i in range(3)] == ["queued"] * 3
    assert bench.lifecycle.submit(Sweep(name="s", params=[{"x": i} for i in range(3)], command="true")) == "running"


def test_a_resubmit_or_retry_with_other_rows_is_refused_naming_params(bench: Bench) -> None:
    """The stored spec holds no rows: a change of rows alone is still told apart from a same-spec resubmit."""
    bench.add("s", 3)
    other = Sweep(name="s", params=[{"x": i} for i in (0, 1, 5)], command="true")
    with pytest.raises(SweepExists, match=r"\(params changed\)"):
        bench.lifecycle.submit(other)
    with pytest.raises(RetryRefused, match="params differs"):
        bench.lifecycle.retry("s", spec=other)
    longer = Sweep(name="s", params=[{"x": i} for i in range(3)], command="true", timeout=99)
    assert bench.lifecycle.retry("s", spec=longer) == []
    assert bench.store.sweep("s").sweep().timeout == 99  # type: ignore[union-attr]


def test_complete_stores_the_result_and_the_last_one_finishes_the_sweep(bench: Bench) -> None:
    bench.add("s", 2)
    first, second = bench.issue(2)
    bench.done(first)
    assert bench.task(0) == "done" and bench.store.ticket(first.id).state == "done"  # type: ignore[union-attr]
    assert bench.store.outputs("s", 0)["stdout"].data == b"ok"
    assert bench.sweep_state() == "active"
    bench.done(second)
    assert bench.sweep_state() == "finished" and bench.heard.ended_sweeps == ["s"]
    assert bench.heard.settled == [("s", 0, "done"), ("s", 1, "done")]
    assert bench.heard.ended_tickets == [first.id, second.id]


def test_a_failure_requeues_first_until_attempts_are_used_up(bench: Bench) -> None:
    bench.add("s", 2, max_attempts=2)
    ticket = bench.issue(1)[0]
    queued_before = bench.heard.queued
    bench.lifecycle.fail(ticket, "failed", "exit 1", "worker_failed", exit_code=1)
    assert bench.task(0) == "queued" and bench.heard.queued == queued_before + 1
    retry = bench.issue(1)[0]
    assert retry.task == 0 and retry.attempt == 2  # retries go first
    bench.lifecycle.fail(retry, "timeout", "timeout", "timeout")
    assert bench.task(0) == "failed" and ("s", 0, "failed") in bench.heard.settled
    assert bench.store.ticket(retry.id).state == "timeout"  # type: ignore[union-attr]


def test_a_lost_ticket_puts_its_task_back(bench: Bench) -> None:
    bench.add("s", 1)
    ticket = bench.issue(1)[0]
    bench.lifecycle.lose(ticket, "lost: slave went away", "slave_gone")
    assert bench.store.ticket(ticket.id).state == "lost"  # type: ignore[union-attr]
    assert bench.task(0) == "queued" and bench.lifecycle.in_flight(ticket.id) is None


def test_a_ticket_handed_back_at_the_end_of_an_allocation_costs_no_attempt(bench: Bench) -> None:
    bench.add("s", 1, max_attempts=1)
    for _ in range(3):  # with one attempt allowed, a counted failure would have failed the task the first time
        ticket = bench.issue(1)[0]
        bench.lifecycle.release(ticket, "handed back: the allocation ends in 5s", "returned")
        assert bench.store.ticket(ticket.id).state == "returned"  # type: ignore[union-attr]
        assert bench.task(0) == "queued"
    assert bench.issue(1)[0].attempt == 1


def test_a_late_result_after_a_requeue_wins_and_the_new_copy_is_cancelled(bench: Bench) -> None:
    bench.add("s", 1)
    given_up = bench.issue(1)[0]
    bench.lifecycle.lose(given_up, "lost: silent", "slave_silent")
    again = bench.issue(1)[0]
    assert again.task == given_up.task
    assert not bench.lifecycle.is_late_duplicate(given_up.id, "s", 0)  # the task is still open: it counts
    bench.done(given_up)
    assert bench.task(0) == "done" and bench.store.ticket(given_up.id).state == "done"  # type: ignore[union-attr]
    assert bench.store.ticket(again.id).state == "cancelled"  # type: ignore[union-attr]
    assert [m.ticket for m in bench.received() if isinstance(m, Cancel)] == [again.id]
    assert bench.sweep_state() == "finished"
    assert bench.lifecycle.is_late_duplicate(again.id, "s", 0)  # its answer, if any, can never count


def test_a_late_result_for_a_requeued_task_takes_it_out_of_the_queue(bench: Bench) -> None:
    bench.add("s", 1)
    given_up = bench.issue(1)[0]
    bench.lifecycle.lose(given_up, "lost: silent", "slave_silent")
    bench.done(given_up)
    assert bench.issue(5) == []  # not dispatched again
    assert bench.sweep_state() == "finished"


def test_deadline_kills_on_a_connected_slave_and_loses_on_a_gone_one(bench: Bench) -> None:
    bench.add("s", 2, timeout=5.0)
    on_a = bench.issue(1)[0]
    on_b = bench.lifecycle.issue("slave-b", 1, 0.0)[0]  # slave-b is not connected
    bench.lifecycle.expire(100.0)
    assert bench.store.ticket(on_a.id).state == "timeout"  # type: ignore[union-attr]
    assert bench.store.ticket(on_b.id).state == "lost"  # type: ignore[union-attr]
    assert bench.received() == [Cancel(on_a.id, "deadline")]


def test_cancel_task_kills_its_tickets_and_refuses_a_settled_task(bench: Bench) -> None:
    bench.add("s", 2)
    running = bench.issue(1)[0]
    assert bench.lifecycle.cancel_task("s", 0, "task cancelled")
    assert bench.task(0) == "cancelled"
    assert bench.store.ticket(running.id).state == "cancelled"  # type: ignore[union-attr]
    assert bench.received() == [Cancel(running.id, "task cancelled")]
    assert not bench.lifecycle.cancel_task("s", 0, "again")
    assert not bench.lifecycle.cancel_task("s", 99, "no such task")
    bench.lifecycle.cancel_task("s", 1, "task cancelled")  # a queued one
    assert bench.issue(5) == [] and bench.sweep_state() == "finished"


def test_cancelling_a_paused_task_lets_the_sweep_finish(bench: Bench) -> None:
    """Regression: the python clients' cancel did not clear `held`, so such a sweep never finished."""
    bench.add("s", 2)
    bench.lifecycle.pause_task("s", 1)
    bench.done(bench.issue(5)[0])
    assert bench.sweep_state() == "active"  # task 1 is paused, not settled
    assert bench.lifecycle.cancel_task("s", 1, "task cancelled")
    assert bench.sweep_state() == "finished"


def test_a_python_clients_cancel_of_a_paused_task_lets_the_sweep_finish(bench: Bench, tmp_path: Path) -> None:
    """Regression: py_cancel had a copy of cancel-task of its own that left the task in `held`."""
    bench.add("s", 2)
    python = PythonSweeps(bench.lifecycle, bench.link, bench.store, tmp_path, 1, bench.store.commit)
    bench.lifecycle.pause_task("s", 1)
    bench.done(bench.issue(5)[0])
    reply, _ = python.cancel(b"client", messages.Control("py_cancel", {"sweep": "s", "tasks": [1]}))
    assert reply == {"cancelled": 1}
    assert bench.task(1) == "cancelled" and bench.sweep_state() == "finished"


def test_pause_refunds_a_killed_attempt_and_resume_queues_first(bench: Bench) -> None:
    bench.add("s", 3)
    running = bench.issue(1)[0]
    bench.lifecycle.pause_task("s", running.task)
    assert bench.task(0) == "paused" and bench.store.task_attempts("s", 0) == 0
    assert bench.received() == [Cancel(running.id, "task paused")]
    bench.lifecycle.resume_task("s", 0)
    assert bench.task(0) == "queued"
    assert [t.task for t in bench.issue(3)] == [0, 1, 2]


def test_cancel_sweep_settles_queued_paused_and_running_tasks(bench: Bench) -> None:
    bench.add("s", 3)
    running = bench.issue(1)[0]
    bench.lifecycle.pause_task("s", 2)
    assert bench.lifecycle.cancel_sweep("s") == [0, 1, 2]
    assert [bench.task(i) for i in range(3)] == ["cancelled"] * 3
    assert bench.store.ticket(running.id).state == "cancelled"  # type: ignore[union-attr]
    assert bench.sweep_state() == "cancelled" and bench.heard.ended_sweeps == ["s"]
    assert sorted(t for _, t, state in bench.heard.settled if state == "cancelled") == [0, 1, 2]
    assert bench.lifecycle.cancel_sweep("s") is None


def test_finish_if_done_waits_for_running_and_paused_tasks(bench: Bench) -> None:
    bench.add("s", 2)
    first, second = bench.issue(2)
    bench.done(first)
    bench.lifecycle.finish_if_done("s")
    assert bench.sweep_state() == "active"
    bench.lifecycle.fail(second, "failed", "boom", "worker_failed")  # back in the queue
    bench.lifecycle.pause_task("s", 1)
    bench.lifecycle.finish_if_done("s")
    assert bench.sweep_state() == "active"


def test_a_rejected_result_sends_the_task_to_another_slave(bench: Bench) -> None:
    bench.add("s", 2)
    ticket = bench.issue(1)[0]
    bench.lifecycle.reject(ticket.id, "rejected: wrong answer", 0, 0.1)
    assert bench.store.ticket(ticket.id).state == "rejected"  # type: ignore[union-attr]
    assert [t.task for t in bench.issue(1)] == [1]  # slave-a is to avoid task 0 while another can take it
    assert [t.task for t in bench.lifecycle.issue("slave-b", 1, 0.0)] == [0]
