"""Task lifecycle: the one writer of task, ticket and sweep state (issue, accept, fail, lose, cancel, pause, finish)."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import structlog

from master.events import EventBatch
from master.link import Link
from master.metrics import Metrics
from master.roster import Roster
from master.scheduler import ActiveSweep, Scheduler, Ticket
from master.store import FINAL_TASK_STATES, Store, StoredOutput
from ticketfarm import messages
from ticketfarm.errors import RetryRefused, SweepExists
from ticketfarm.spec import ParamLines, Sweep

log = structlog.get_logger("ticketfarm.lifecycle")


def _nothing(*_: Any) -> None:
    return None


@dataclass
class LifecycleHooks:
    """Who hears what the lifecycle settled (wired by the master; each part listens only to what it needs)."""

    work_queued: Callable[[], None] = _nothing
    """Tasks went (back) into a queue: serve the slaves waiting for work."""
    ticket_ended: Callable[[int], None] = _nothing
    """A ticket is no longer in flight."""
    task_settled: Callable[[str, int, str, list[StoredOutput]], None] = _nothing
    """A task reached done, failed or cancelled (sweep, task, state, outputs)."""
    sweep_ended: Callable[[str], None] = _nothing
    """A sweep finished or was cancelled: nothing of it is dispatched again."""
    spec_changed: Callable[[str], None] = _nothing
    """A sweep's spec was replaced (a retry with a new timeout or max_attempts): forget what was built from it."""


@dataclass
class Completion:
    """A task's one result, complete and checked: what `complete` stores."""

    ticket: int
    sweep: str
    task: int
    exit_code: int | None
    elapsed: float | None
    outputs: list[StoredOutput]
    warning: str = ""
    """Kept as the ticket's reason: see messages.ResultEntry.warning."""


#: The spec fields a retry may change on an existing sweep.
RETRY_CHANGEABLE = ("timeout", "max_attempts")


class Lifecycle:
    """Every change of a task's or ticket's state goes through here: the scheduler's table and the store agree."""

    def __init__(self, store: Store, scheduler: Scheduler, link: Link, roster: Roster,
                 events: EventBatch, metrics: Metrics):
        self.store = store
        self.scheduler = scheduler
        self.link = link
        self.roster = roster
        self.events = events
        self.metrics = metrics
        self._done_counter = metrics.tickets_finished.labels("done")  # once: a labels() lookup costs µs per ticket
        self.hooks = LifecycleHooks()

    # -- reading ----------------------------------------------------------------------------
    def in_flight(self, ticket: int) -> Ticket | None:
        return self.scheduler.tickets.get(ticket)

    def tickets_of(self, slave: str) -> list[Ticket]:
        return self.scheduler.tickets_of(slave)

    def tickets_for(self, sweep: str, task: int) -> list[Ticket]:
        """The task's tickets in flight (more than one while a speculative copy runs)."""
        return self.scheduler.siblings(sweep, task)

    def active(self, sweep: str) -> ActiveSweep | None:
        return self.scheduler.active.get(sweep)

    def task_state(self, sweep: str, task: int) -> str | None:
        row = self.store.task(sweep, task)
        return None if row is None else row["state"]

    def is_late_duplicate(self, ticket: int, sweep: str, task: int,
                          settled: tuple[str, ...] = FINAL_TASK_STATES) -> bool:
        """An answer for a ticket no longer in flight whose task has settled meanwhile: it can never count."""
        return ticket not in self.scheduler.tickets and self.task_state(sweep, task) in settled

    # -- sweeps -----------------------------------------------------------------------------
    def resume(self, reclaim_until: float) -> None:
        """After a restart: reload active sweeps, and adopt the tickets that were out (their slaves may claim them)."""
        self.store.clear_unrunnable()
        for row in self.store.sweeps():
            if row.state in ("active", "paused"):
                queued = self.store.tasks_in_state(row.name, "queued")
                active = self.scheduler.activate(row.sweep(), row.created, queued)
                active.paused = row.state == "paused"
                active.held.update(self.store.tasks_in_state(row.name, "paused"))
        for t in self.store.running_tickets():
            self.scheduler.adopt(Ticket(t.id, t.sweep, t.task, t.slave, t.attempt, t.dispatched, reclaim_until,
                                        started=t.started))
        for name in list(self.scheduler.active):
            self.finish_if_done(name)
        self.store.commit()

    def submit(self, sweep: Sweep, rows: ParamLines | None = None) -> str:
        """Add a sweep, or resume the one of the same name; returns "submitted", "running" or "finished".

        `rows`: the tasks' parameters as a submit carries them (then `sweep.params` is empty)."""
        rows = rows if rows is not None else ParamLines.of(sweep.params)
        row = self.store.sweep(sweep.name)
        if row is not None:
            if row.digest != sweep.digest(rows):
                changed = ", ".join(sweep.differing_fields(row.sweep()) or ["params"])
                raise SweepExists(f"sweep {sweep.name!r} already exists with a different spec ({changed} changed): "
                                  f"rename it, `ticketfarm forget {sweep.name}` to start anew, or "
                                  f"`run --retry-failed` if only {' or '.join(RETRY_CHANGEABLE)} changed")
            return "finished" if row.state in ("finished", "cancelled") else "running"
        self.store.add_sweep(sweep, rows)
        self.scheduler.activate(sweep, time.time(), range(rows.count))
        self.store.commit()
        log.info("sweep_submitted", sweep=sweep.name, tasks=rows.count)
        self.hooks.work_queued()
        return "submitted"

    def add_sweep(self, sweep: Sweep) -> None:
        """Store a sweep that starts without tasks (a python sweep: its tasks come with `add_tasks`)."""
        self.store.add_sweep(sweep)

    def add_tasks(self, name: str, first: int, rows: list[str]) -> list[int]:
        """Append tasks (their params as JSON text) to a stored sweep (python sweeps grow as clients submit); reopens
        a finished one."""
        new = self.store.add_tasks(name, first, rows)
        if new:
            active = self.scheduler.active.get(name)
            if active is None:
                row = self.store.sweep(name)
                assert row is not None
                self.store.reopen_sweep(name)
                self.scheduler.activate(row.sweep(), row.created, new)
            else:
                active.queued.extend(new)
            self.hooks.work_queued()
        return new

    def retry(self, name: str, task: int | None = None, spec: Sweep | None = None) -> list[int]:
        """Queue a sweep's failed tasks (or one failed or cancelled task) again with a fresh attempt budget,
        under `spec` when given (it may differ from the stored one in RETRY_CHANGEABLE only); returns the tasks
        (none when nothing had failed: a changed spec still applies to what runs next)."""
        row = self.store.sweep(name)
        if row is None:
            raise RetryRefused(f"no sweep named {name!r}")
        if row.sweep().kind == "python":
            raise RetryRefused(f"sweep {name!r} runs python functions: submit them again from the client")
        if spec is not None:
            stored = row.sweep()
            changed = [f for f in spec.differing_fields(stored) if f not in RETRY_CHANGEABLE]
            if replace(stored, params=spec.params).digest() != row.digest:  # the stored spec with these rows
                changed.append("params")
            if changed:
                raise RetryRefused(f"sweep {name!r}: a retry may change only {', '.join(RETRY_CHANGEABLE)}, but "
                                   f"{', '.join(changed)} differ{'s' if len(changed) == 1 else ''} from the stored "
                                   f"spec; `ticketfarm forget {name}` to start anew")
        tasks = self._retryable(name, task)
        if spec is not None and spec.digest() != row.digest:
            self.store.replace_spec(spec)
            self.hooks.spec_changed(name)
            if (active := self.scheduler.active.get(name)) is not None:
                active.sweep = replace(spec, params=[])
        if not tasks:
            return []
        self.store.retry_tasks(name, tasks)
        for idx in tasks:
            self.scheduler.avoid.pop((name, idx), None)
        active = self.scheduler.active.get(name)
        if active is None:
            self.store.reopen_sweep(name)
            self.scheduler.activate(spec or row.sweep(), row.created, tasks)
        else:
            active.queued.extend(tasks)
        log.info("tasks_retried", sweep=name, tasks=len(tasks))
        self.hooks.work_queued()
        return tasks

    def _retryable(self, name: str, task: int | None) -> list[int]:
        if task is None:
            return self.store.tasks_in_state(name, "failed")
        state = self.task_state(name, task)
        if state is None:
            raise RetryRefused(f"sweep {name!r} has no task {task}")
        if state not in ("failed", "cancelled"):
            raise RetryRefused(f"task {task} of {name!r} is {state}: only a failed or cancelled task can be retried")
        return [task]

    def forget(self, name: str) -> list[str]:
        """Delete a settled sweep with its tasks, tickets and results; returns its result files (state-relative)."""
        row = self.store.sweep(name)
        if row is None:
            raise RetryRefused(f"no sweep named {name!r}")
        if name in self.scheduler.active:
            raise RetryRefused(f"sweep {name!r} is {row.state}: cancel it first (`ticketfarm cancel {name}`)")
        return self.store.delete_sweep(name)

    def set_unrunnable(self, name: str, reason: str | None) -> None:
        """Say why no connected slave can run a sweep (master/placement.py's Runnability), or that one can again
        (of a sweep that has ended: only forget what was said)."""
        if name not in self.scheduler.active:
            self.store.set_unrunnable(name, None, event=False)
            return
        self.store.set_unrunnable(name, reason)
        if reason:
            log.warning("sweep_unrunnable", sweep=name, reason=reason)
        else:
            log.info("sweep_runnable", sweep=name)

    def set_paused(self, name: str, paused: bool) -> None:
        """Pause or resume a sweep; pausing recalls its tickets not started yet (running ones finish)."""
        active = self.scheduler.active[name]
        if active.paused != paused:
            active.paused = paused
            self.store.set_sweep_state(name, "paused" if paused else "active")
            if paused:
                self._recall_unstarted(name)
            else:
                self.hooks.work_queued()

    def _recall_unstarted(self, name: str) -> None:
        """RECALL to each slave holding prefetched tickets of the sweep: it gives back those it has not started."""
        by_slave: dict[str, list[int]] = {}
        for ticket in self.scheduler.tickets.values():
            if ticket.sweep == name and ticket.started is None:
                by_slave.setdefault(ticket.slave, []).append(ticket.id)
        for slave, ids in by_slave.items():
            if (session := self.roster.named(slave)) is not None:
                self.link.send(session.identity, messages.Recall(ids, "sweep paused"))

    def cancel_sweep(self, name: str) -> list[int] | None:
        """Cancel a sweep: queued and paused tasks dropped, running tickets killed; the tasks cancelled, or None."""
        active = self.scheduler.active.get(name)
        if active is None:
            return None
        tasks = sorted(self.store.tasks_in_state(name, "queued") + self.store.tasks_in_state(name, "running")
                       + self.store.tasks_in_state(name, "paused"))
        self.events.flush(self.store)  # the sweep's last tasks_done comes before its sweep_cancelled
        active.queued.clear()
        active.held.clear()
        for ticket in [t for t in self.scheduler.tickets.values() if t.sweep == name]:
            self.cancel_ticket(ticket, "sweep cancelled")
        self.store.cancel_tasks(name)
        self.store.set_sweep_state(name, "cancelled")
        self.scheduler.deactivate(name)
        for task in tasks:
            self.hooks.task_settled(name, task, "cancelled", [])
        self.hooks.sweep_ended(name)
        return tasks

    def finish_if_done(self, name: str) -> None:
        if self.scheduler.is_finished(name):
            self.events.flush(self.store)  # a sweep's last tasks_done comes before its sweep_finished
            self.store.set_sweep_state(name, "finished")
            self.scheduler.deactivate(name)
            self.hooks.sweep_ended(name)
            log.info("sweep_finished", sweep=name)

    # -- tickets out --------------------------------------------------------------------------
    def issue(self, slave: str, limit: int, now: float, slots: int = 1) -> list[Ticket]:
        """Tickets for `limit` units of a slave's credit (see Scheduler.next_tickets), recorded as started."""
        return self._started(self.scheduler.next_tickets(slave, limit, now, slots), slave, now)

    def duplicate(self, ticket: Ticket, slave: str, now: float) -> Ticket | None:
        """A speculative copy of a running ticket for another slave, recorded as started."""
        copy = self.scheduler.duplicate(ticket, slave, now)
        return None if copy is None else self._started([copy], slave, now)[0]

    def _started(self, tickets: list[Ticket], slave: str, now: float) -> list[Ticket]:
        """Record new tickets in the store; each learns its attempt number and its task's parameters."""
        for sweep, group in itertools.groupby(tickets, key=lambda t: t.sweep):
            batch = list(group)
            started = self.store.start_tickets(sweep, [(t.id, t.task) for t in batch], slave, now)
            for ticket, (attempt, params) in zip(batch, started):
                ticket.attempt, ticket.params = attempt, params
        return tickets

    def extend(self, ticket: Ticket, now: float) -> None:
        self.scheduler.extend(ticket, now)

    def mark_started(self, slave: str, ids: list[int], now: float) -> None:
        """Tickets this slave says it began running: from now on they count as running, not prefetched, and a
        ticket that waited long for its slot has its timeout counted from now."""
        started = []
        for tid in ids:
            ticket = self.scheduler.tickets.get(tid)
            if ticket is not None and ticket.slave == slave and ticket.started is None:
                ticket.started = now
                # Most start within a moment of their dispatch: their deadline stands (one heap entry each).
                if now - ticket.dispatched > self.scheduler.grace / 2:
                    self.scheduler.extend(ticket, now)
                started.append(tid)
        if started:
            self.store.mark_started(started, now)

    def expire(self, now: float) -> None:
        """Tickets past their deadline: killed and counted as a timeout, or lost when their slave is gone."""
        for ticket in self.scheduler.expired(now):
            session = self.roster.named(ticket.slave)
            if session is None:
                self.lose(ticket, f"lost: slave {ticket.slave} did not come back", "slave_gone")
                continue
            self.link.send(session.identity, messages.Cancel(ticket.id, "deadline"))
            self.fail(ticket, "timeout", "timeout (no answer before the deadline)", "deadline")

    # -- outcomes -----------------------------------------------------------------------------------
    def complete(self, done: Completion) -> None:
        """Store a task's one result; any other copies still running are cancelled."""
        self.store.complete_task(done.sweep, done.task, done.ticket, done.outputs)
        self.events.done(done.sweep, done.task)
        self._done_counter.inc()
        self.hooks.task_settled(done.sweep, done.task, "done", done.outputs)
        self.store.finish_ticket(done.ticket, "done", exit_code=done.exit_code, reason=done.warning or None,
                                 elapsed=done.elapsed)
        ticket = self.scheduler.tickets.get(done.ticket)
        if ticket is not None:
            self.scheduler.settle_success(ticket, done.elapsed)
        else:
            # A late answer from a slave given up on: still the first valid result for this task.
            self._unqueue(done.sweep, done.task)
        self.hooks.ticket_ended(done.ticket)
        for other in self.scheduler.siblings(done.sweep, done.task):
            self.cancel_ticket(other, "another copy finished first")
        self.finish_if_done(done.sweep)
        self._slot_freed(done.sweep)

    def fail(self, ticket: Ticket, state: str, reason: str, cause: str,
             exit_code: int | None = None, elapsed: float | None = None, final: bool = False) -> None:
        """A failed attempt (failed, timeout, lost, rejected, interrupted): the task is retried first, or fails
        for good (its attempts used up, or at once when `final`: the slave says no attempt can succeed).
        `cause` is the metrics' name for why (master.metrics.LOST_CAUSES)."""
        self.hooks.ticket_ended(ticket.id)
        self.store.finish_ticket(ticket.id, state, exit_code=exit_code, reason=reason, elapsed=elapsed)
        attempts = self.store.task_attempts(ticket.sweep, ticket.task)
        outcome = self.scheduler.settle_failure(ticket, attempts, retry=not final)
        self.metrics.tickets_finished.labels(state).inc()
        self.metrics.ticket_lost(cause, requeued=outcome == "queued")
        if outcome == "queued":
            self.store.requeue_task(ticket.sweep, ticket.task)
            self.hooks.work_queued()
        elif outcome == "failed":
            self.store.fail_task(ticket.sweep, ticket.task, f"{reason} (not retried: no attempt can succeed)"
                                 if final else f"{reason} (after {attempts} attempts)")
            log.info("task_failed", sweep=ticket.sweep, task=ticket.task, reason=reason)
            self.hooks.task_settled(ticket.sweep, ticket.task, "failed", [])
        self.finish_if_done(ticket.sweep)
        if outcome != "queued":
            self._slot_freed(ticket.sweep)

    def _slot_freed(self, sweep: str) -> None:
        """A ticket of a sweep with a per-slave or per-sweep limit ended: its queued tasks may go out now, to the
        slaves already waiting (their REQUEST came before this answer), not at the next housekeeping pass."""
        active = self.scheduler.active.get(sweep)
        if active is not None and active.sweep.restricted and active.queued and not active.paused:
            self.hooks.work_queued()

    def lose(self, ticket: Ticket, reason: str, cause: str) -> None:
        log.info("ticket_lost", ticket=ticket.id, slave=ticket.slave, reason=reason, cause=cause)
        self.fail(ticket, "lost", reason, cause)

    def release(self, ticket: Ticket, reason: str, state: str = "interrupted") -> None:
        """A ticket given back through no fault of its task, so its attempt is not counted and the task goes first
        in line again: "interrupted" (its slave stopped in order, the user's Ctrl-C; started or only prefetched) or
        "returned" (handed back unstarted by a slave whose batch allocation ends)."""
        log.info("ticket_released", ticket=ticket.id, slave=ticket.slave, reason=reason, state=state)
        self.store.refund_attempt(ticket.sweep, ticket.task)
        self.fail(ticket, state, reason, state)

    def release_all(self, reason: str) -> None:
        for ticket in list(self.scheduler.tickets.values()):
            self.release(ticket, reason)

    def reject(self, ticket_id: int, reason: str, exit_code: int | None, elapsed: float | None) -> None:
        """A result its validator refused: the task goes to another slave if it can; a late one is only recorded."""
        ticket = self.scheduler.tickets.get(ticket_id)
        if ticket is not None:
            self.scheduler.avoid.setdefault((ticket.sweep, ticket.task), set()).add(ticket.slave)
            self.fail(ticket, "rejected", reason, "rejected", exit_code, elapsed)
        elif (row := self.store.ticket(ticket_id)) is not None and row.state == "running":
            self.store.finish_ticket(ticket_id, "rejected", exit_code=exit_code, reason=reason, elapsed=elapsed)

    def cancel_ticket(self, ticket: Ticket, reason: str) -> None:
        """Kill one ticket on its slave (if connected) and settle it as cancelled; its task is not touched."""
        session = self.roster.named(ticket.slave)
        if session is not None:
            self.link.send(session.identity, messages.Cancel(ticket.id, reason))
        self.hooks.ticket_ended(ticket.id)
        self.store.finish_ticket(ticket.id, "cancelled", reason=reason)
        self.scheduler.settle_cancelled(ticket)
        self.metrics.tickets_finished.labels("cancelled").inc()

    # -- one task ---------------------------------------------------------------------------------------
    def cancel_task(self, name: str, task: int, reason: str) -> bool:
        """Cancel one unsettled task (queued, paused or running); False when it had already settled or is unknown."""
        if self.task_state(name, task) in (None, *FINAL_TASK_STATES):
            return False
        self._unqueue(name, task)
        if (active := self.scheduler.active.get(name)) is not None:
            active.held.discard(task)  # a paused task is neither queued nor running: only `held` keeps the sweep open
        for ticket in self.scheduler.siblings(name, task):
            self.cancel_ticket(ticket, reason)
        self.store.cancel_task(name, task)
        self.hooks.task_settled(name, task, "cancelled", [])
        self.finish_if_done(name)
        self._slot_freed(name)
        return True

    def pause_task(self, name: str, task: int) -> None:
        """Hold a task back; a running attempt is killed and not counted against max_attempts."""
        active = self.scheduler.active[name]
        self._unqueue(name, task)
        running = self.scheduler.siblings(name, task)
        for ticket in running:
            self.cancel_ticket(ticket, "task paused")
        self.store.hold_task(name, task, refund=bool(running))
        active.held.add(task)

    def resume_task(self, name: str, task: int) -> None:
        """Queue a paused task again, first in line."""
        active = self.scheduler.active[name]
        active.held.discard(task)
        self.store.requeue_task(name, task)
        self.store.event("task_resumed", sweep=name, task=task)
        active.queued.put_back(task)
        self.hooks.work_queued()

    def _unqueue(self, sweep: str, task: int) -> None:
        active = self.scheduler.active.get(sweep)
        if active is not None and task in active.queued:
            active.queued.remove(task)
