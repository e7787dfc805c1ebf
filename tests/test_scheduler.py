"""The scheduler as pure state (no store, no sockets): order of tasks, retries, deadlines and the deadline heap."""
from __future__ import annotations

import pytest

from master.scheduler import BUNDLE_WORK, COMPACT_AFTER, MAX_BUNDLE, Scheduler, TaskQueue
from ticketfarm.spec import Sweep

GRACE = 1.0


def add(scheduler: Scheduler, name: str, tasks: int, priority: int = 0, created: float = 0.0,
        **fields: object) -> Sweep:
    sweep = Sweep(name=name, params=[{"x": i} for i in range(tasks)], command="true", priority=priority,
                  **fields)  # type: ignore[arg-type]
    scheduler.activate(sweep, created, list(range(tasks)))
    return sweep


def handed_out(scheduler: Scheduler, limit: int, now: float = 0.0) -> list[tuple[str, int]]:
    return [(t.sweep, t.task) for t in scheduler.next_tickets("slave-a", limit, now)]


def test_higher_priority_first_then_oldest_sweep_first_then_fifo() -> None:
    scheduler = Scheduler(epoch=1, deadline_grace=GRACE)
    add(scheduler, "late", 2, priority=0, created=2.0)
    add(scheduler, "early", 2, priority=0, created=1.0)
    add(scheduler, "urgent", 2, priority=5, created=3.0)
    assert handed_out(scheduler, 6) == [("urgent", 0), ("urgent", 1), ("early", 0), ("early", 1),
                                        ("late", 0), ("late", 1)]


def test_a_retry_goes_first_and_the_last_attempt_fails_the_task() -> None:
    scheduler = Scheduler(epoch=1, deadline_grace=GRACE)
    add(scheduler, "s", 3, max_attempts=2)
    first = scheduler.next_tickets("slave-a", 1, 0.0)[0]
    assert scheduler.settle_failure(first, attempts=1) == "queued"
    assert handed_out(scheduler, 1) == [("s", 0)]  # before tasks 1 and 2, which never ran
    second = scheduler.tickets_of("slave-a")[0]
    assert scheduler.settle_failure(second, attempts=2) == "failed"
    assert handed_out(scheduler, 5) == [("s", 1), ("s", 2)]


def test_a_failure_while_another_copy_runs_leaves_the_task_running() -> None:
    scheduler = Scheduler(epoch=1, deadline_grace=GRACE)
    add(scheduler, "s", 1)
    original = scheduler.next_tickets("slave-a", 1, 0.0)[0]
    copy = scheduler.duplicate(original, "slave-b", 0.0)
    assert copy is not None and {t.id for t in scheduler.siblings("s", 0)} == {original.id, copy.id}
    assert scheduler.settle_failure(original, attempts=2) == "running"
    assert handed_out(scheduler, 1) == []


def test_a_paused_sweep_hands_out_nothing() -> None:
    scheduler = Scheduler(epoch=1, deadline_grace=GRACE)
    add(scheduler, "held", 2, priority=9)
    add(scheduler, "open", 1)
    scheduler.active["held"].paused = True
    assert scheduler.has_queued()  # "open" still has work
    assert handed_out(scheduler, 5) == [("open", 0)]
    assert not scheduler.has_queued()


def test_deadlines_expire_at_timeout_plus_grace() -> None:
    scheduler = Scheduler(epoch=1, deadline_grace=GRACE)
    add(scheduler, "s", 2, timeout=10.0)
    a, b = scheduler.next_tickets("slave-a", 2, 100.0)
    assert scheduler.expired(100.0 + 10.0 + GRACE - 0.01) == []
    assert {t.id for t in scheduler.expired(100.0 + 10.0 + GRACE)} == {a.id, b.id}
    assert scheduler.expired(1000.0) == []  # each deadline is reported once


def test_stale_heap_entries_are_skipped() -> None:
    scheduler = Scheduler(epoch=1, deadline_grace=GRACE)
    add(scheduler, "s", 2, timeout=10.0)
    extended, settled = scheduler.next_tickets("slave-a", 2, 0.0)
    scheduler.extend(extended, 50.0)  # a new deadline: the old heap entry stays behind, stale
    scheduler.settle_success(settled)  # no longer in flight: its entry is stale too
    assert scheduler.expired(20.0) == []
    assert [t.id for t in scheduler.expired(50.0 + 10.0 + GRACE)] == [extended.id]


def test_ticket_ids_carry_the_epoch_so_a_restart_never_reuses_one() -> None:
    first, second = Scheduler(epoch=1, deadline_grace=GRACE), Scheduler(epoch=2, deadline_grace=GRACE)
    add(first, "s", 1)
    add(second, "s", 1)
    assert first.next_tickets("a", 1, 0.0)[0].id >> 32 == 1
    assert second.next_tickets("a", 1, 0.0)[0].id >> 32 == 2


def test_max_concurrent_limits_tickets_out_at_once() -> None:
    scheduler = Scheduler(epoch=1, deadline_grace=GRACE)
    add(scheduler, "s", 5, max_concurrent=2)
    assert len(scheduler.next_tickets("slave-a", 5, 0.0)) == 2
    scheduler.settle_success(scheduler.tickets_of("slave-a")[0])
    assert len(scheduler.next_tickets("slave-a", 5, 0.0)) == 1


def test_the_task_queue_keeps_order_with_retries_in_front_across_its_compaction() -> None:
    queue = TaskQueue(range(3 * COMPACT_AFTER))
    taken = [queue.popleft() for _ in range(2 * COMPACT_AFTER)]  # past the point where the taken part is cut off
    assert taken == list(range(2 * COMPACT_AFTER)) and len(queue) == COMPACT_AFTER
    queue.put_back(7)
    queue.extend([10**9])
    assert queue.first(3) == [7, 2 * COMPACT_AFTER, 2 * COMPACT_AFTER + 1] and 7 in queue and 5 not in queue
    queue.remove(2 * COMPACT_AFTER + 1)
    assert list(queue)[:3] == [7, 2 * COMPACT_AFTER, 2 * COMPACT_AFTER + 2] and list(queue)[-1] == 10**9
    with pytest.raises(ValueError):
        queue.remove(5)
    for task in (9, 3, 8):  # put back by two slaves at once: in task order, ahead of the rest
        queue.put_back(task)
    assert queue.first(5) == [3, 7, 8, 9, 2 * COMPACT_AFTER]
    queue.clear()
    assert not queue and len(queue) == 0
    with pytest.raises(IndexError):
        queue.popleft()


def test_a_short_sweep_goes_out_in_bundles_per_unit_of_credit_once_its_tickets_proved_short() -> None:
    scheduler = Scheduler(epoch=1, deadline_grace=0.0)
    scheduler.activate(Sweep(name="tiny", params=[{"i": i} for i in range(200)], command="true"), 0.0, range(200))
    first = scheduler.next_tickets("slave-a", 2, 0.0)
    assert len(first) == 2 and scheduler.issued_units == 2  # nothing known yet: a ticket a unit
    for ticket in first + scheduler.next_tickets("slave-a", 2, 0.0):
        scheduler.settle_success(ticket, 0.002)
    bundle = scheduler.active["tiny"].bundle
    assert 1 < bundle <= MAX_BUNDLE
    tickets = scheduler.next_tickets("slave-a", 2, 0.0)
    assert [t.task for t in tickets] == list(range(4, 4 + 2 * bundle)) and scheduler.issued_units == 2
    # a small queue is spread: with 50 slots connected, 100 queued make no bundle of more than one
    assert len(scheduler.next_tickets("slave-b", 2, 0.0, slots=50)) == 2
    for ticket in tickets:
        scheduler.settle_success(ticket, BUNDLE_WORK * 2)  # they grew long: one a unit again
    assert scheduler.active["tiny"].bundle == 1
