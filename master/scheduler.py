"""The ticket table, in memory only: queued tasks per sweep, tickets in flight with deadlines, retries, outcomes.

The store is not touched here: master/lifecycle.py records every change this table makes (it is the one writer).
"""
from __future__ import annotations

import bisect
import heapq
import itertools
from array import array
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

from ticketfarm.spec import Sweep

#: Tasks taken from a TaskQueue's array before the taken part is cut off (when it is half the array, too).
COMPACT_AFTER = 4096


@dataclass
class Ticket:
    """One attempt at a task, held by one slave until a result, a failure or its deadline."""

    id: int
    sweep: str
    task: int
    slave: str
    attempt: int
    """Which attempt at its task this is (counted by the store when the lifecycle records the start; 0 until then)."""
    dispatched: float
    deadline: float
    params: dict[str, Any] | None = None
    """The task's parameters, known at dispatch (for the TICKET message); None for adopted tickets."""
    started: float | None = None
    """When its slave said it began running it; None while it is only prefetched (held ready)."""


class TaskQueue:
    """Task indices waiting for a slot, in order: a compact array (8 bytes a task instead of an int object and a
    deque slot each: a million queued tasks cost 8 MB) behind a small deque of the tasks put back in front."""

    def __init__(self, tasks: Iterable[int] = ()):
        self._front: deque[int] = deque()
        self._rest = array("q", tasks)
        self._head = 0

    def __len__(self) -> int:
        return len(self._front) + len(self._rest) - self._head

    def __bool__(self) -> bool:
        return bool(self._front) or self._head < len(self._rest)

    def __iter__(self) -> Iterator[int]:
        yield from self._front
        yield from itertools.islice(self._rest, self._head, None)

    def __contains__(self, task: int) -> bool:
        return task in self._front or self._position(task) is not None

    def popleft(self) -> int:
        if self._front:
            return self._front.popleft()
        if self._head >= len(self._rest):
            raise IndexError("pop from an empty TaskQueue")
        task = self._rest[self._head]
        self._head += 1
        if self._head >= COMPACT_AFTER and 2 * self._head >= len(self._rest):
            del self._rest[:self._head]  # the taken part, once it is half of the array
            self._head = 0
        return task

    def put_back(self, task: int) -> None:
        """First in line again (a retry, a resumed or a handed-back task), in task order among those put back:
        tickets two slaves hand back at once come out as they were queued, not one slave's lot before the other's."""
        bisect.insort(self._front, task)

    def extend(self, tasks: Iterable[int]) -> None:
        self._rest.extend(tasks)

    def clear(self) -> None:
        self._front.clear()
        self._rest = array("q")
        self._head = 0

    def first(self, n: int) -> list[int]:
        """The next `n` tasks (fewer when fewer wait), left in the queue."""
        out = list(itertools.islice(self._front, n))
        return out + self._rest[self._head:self._head + n - len(out)].tolist()

    def remove(self, task: int) -> None:
        """Take out the first occurrence of `task` (ValueError when it does not wait)."""
        if task in self._front:
            self._front.remove(task)
            return
        pos = self._position(task)
        if pos is None:
            raise ValueError(f"task {task} is not queued")
        del self._rest[pos]

    def _position(self, task: int) -> int | None:
        try:
            return self._rest.index(task, self._head)
        except ValueError:
            return None


#: A short sweep's tickets go out in bundles of about this much work (seconds) per unit of a slave's credit...
BUNDLE_WORK = 0.05
#: ... once this many of its tickets succeeded, and at most this many a unit.
BUNDLE_AFTER = 4
MAX_BUNDLE = 32
#: A bundle is at most the queue's 1/SHARES per slot of all connected slaves: a small sweep is still spread.
SHARES = 4


@dataclass
class ActiveSweep:
    """A sweep that still has work: its spec and the queue of task indices waiting for a slot."""

    sweep: Sweep
    created: float
    queued: TaskQueue = field(default_factory=TaskQueue)
    running: int = 0
    paused: bool = False
    held: set[int] = field(default_factory=set)
    """Paused tasks: neither queued nor running until resumed."""
    mean_elapsed: float = 0.0
    """Moving average of its successful tickets' run time (0: none yet): what `bundle` is sized by."""
    finished: int = 0

    def record(self, elapsed: float) -> None:
        self.finished += 1
        self.mean_elapsed = elapsed if self.finished == 1 else self.mean_elapsed + 0.2 * (elapsed - self.mean_elapsed)

    @property
    def bundle(self) -> int:
        """Tickets per unit of a slave's credit: one, or for a sweep whose tickets prove short, about BUNDLE_WORK
        seconds of them, which the slave runs in batches (slave/batches.py). Credit stays counted in slots, so a
        slave never holds a credit that outlives a short sweep."""
        if self.finished < BUNDLE_AFTER or self.mean_elapsed >= BUNDLE_WORK or self.sweep.restricted:
            return 1
        return max(1, min(MAX_BUNDLE, int(BUNDLE_WORK / max(self.mean_elapsed, 1e-4))))

    @property
    def name(self) -> str:
        return self.sweep.name

    def sort_key(self) -> tuple[int, float]:
        return (-self.sweep.priority, self.created)


class Scheduler:
    """Chooses the next task (priority, then FIFO), issues tickets and settles their outcomes."""

    def __init__(self, epoch: int, deadline_grace: float):
        self.issued_units = 0
        """Units of credit the last next_tickets used."""
        self.grace = deadline_grace
        self._ids = itertools.count((epoch << 32) + 1)
        self.active: dict[str, ActiveSweep] = {}
        self._order: list[ActiveSweep] = []
        self.tickets: dict[int, Ticket] = {}
        self._by_task: dict[tuple[str, int], set[int]] = {}
        self._by_slave: dict[str, set[int]] = {}
        self._deadlines: list[tuple[float, int]] = []
        #: Asked before a restricted sweep's task goes to a slave: platform and resources (see master/placement.py).
        self.slave_fits: Callable[[ActiveSweep, str], bool] = lambda active, slave: True
        #: Slaves a task should not go back to (they returned a rejected result), while others can take it.
        self.avoid: dict[tuple[str, int], set[str]] = {}

    # -- sweeps -----------------------------------------------------------------
    def activate(self, sweep: Sweep, created: float, queued: Iterable[int]) -> ActiveSweep:
        # Without its params: the store has them (each TICKET reads its own), and a million tasks' dicts would
        # be most of the master's memory.
        active = ActiveSweep(replace(sweep, params=[]), created, TaskQueue(queued))
        self.active[sweep.name] = active
        self._order = sorted(self.active.values(), key=ActiveSweep.sort_key)
        return active

    def deactivate(self, name: str) -> None:
        self.active.pop(name, None)
        self._order = sorted(self.active.values(), key=ActiveSweep.sort_key)

    def is_finished(self, name: str) -> bool:
        active = self.active.get(name)
        return active is not None and not active.queued and active.running == 0 and not active.held

    def queued_by_timeout(self) -> dict[float, int]:
        """Tasks waiting for a slot in sweeps that are not paused, by their sweep's timeout."""
        out: dict[float, int] = {}
        for a in self._order:
            if a.queued and not a.paused:
                out[a.sweep.timeout] = out.get(a.sweep.timeout, 0) + len(a.queued)
        return out

    def has_queued(self) -> bool:
        return any(a.queued and not a.paused for a in self._order)

    # -- dispatch -----------------------------------------------------------------
    def next_tickets(self, slave: str, limit: int, now: float, slots: int = 1) -> list[Ticket]:
        """Tickets for `limit` units of a slave's credit: queued tasks of the highest-priority sweep first, FIFO
        within it; a unit is one ticket, or a bundle of a short sweep's (ActiveSweep.bundle), never so big that the
        first slaves to ask take what the others' `slots` (all connected slaves') could share. `issued_units`: the
        units they used."""
        out: list[Ticket] = []
        units = 0
        while units < limit:
            active = self._first_open(slave)
            if active is None:
                break
            # A restricted sweep is re-checked per ticket: each one changes what the slave may still take.
            bundle = max(1, min(active.bundle, len(active.queued) // (SHARES * max(slots, 1))))
            take = 1 if active.sweep.restricted else min((limit - units) * bundle, len(active.queued))
            idxs = [self._take(active, slave) if self.avoid else active.queued.popleft() for _ in range(take)]
            out.extend(self._issue(active, idxs, slave, now))
            units += -(-take // bundle)
        self.issued_units = units
        return out

    def _first_open(self, slave: str) -> ActiveSweep | None:
        for active in self._order:
            if active.queued and not active.paused:
                if active.sweep.restricted and not self.admits(active, slave):
                    continue
                return active
        return None

    def admits(self, active: ActiveSweep, slave: str) -> bool:
        """Whether one more ticket of this sweep may go to this slave now (max_concurrent, platform, resources)."""
        limit = active.sweep.max_concurrent
        if limit and active.running >= limit:
            return False
        return self.slave_fits(active, slave)

    def _take(self, active: ActiveSweep, slave: str, scan: int = 32) -> int:
        """The first queued task this slave is not to avoid (among the next few); else the first one."""
        for idx in active.queued.first(scan):
            if slave not in self.avoid.get((active.name, idx), ()):
                active.queued.remove(idx)
                return idx
        return active.queued.popleft()

    def duplicate(self, ticket: Ticket, slave: str, now: float) -> Ticket | None:
        """A speculative copy of a running ticket for another slave (the first valid result wins)."""
        active = self.active.get(ticket.sweep)
        if active is None or slave == ticket.slave or not self.admits(active, slave):
            return None
        return self._issue(active, [ticket.task], slave, now)[0]

    def _issue(self, active: ActiveSweep, idxs: list[int], slave: str, now: float) -> list[Ticket]:
        deadline = now + active.sweep.timeout + self.grace
        tickets = [Ticket(next(self._ids), active.name, idx, slave, 0, now, deadline) for idx in idxs]
        for ticket in tickets:
            self._track(ticket)
        active.running += len(tickets)
        return tickets

    def _track(self, ticket: Ticket) -> None:
        self.tickets[ticket.id] = ticket
        self._by_task.setdefault((ticket.sweep, ticket.task), set()).add(ticket.id)
        self._by_slave.setdefault(ticket.slave, set()).add(ticket.id)
        heapq.heappush(self._deadlines, (ticket.deadline, ticket.id))

    def _untrack(self, ticket: Ticket) -> None:
        self.tickets.pop(ticket.id, None)
        siblings = self._by_task.get((ticket.sweep, ticket.task))
        if siblings is not None:
            siblings.discard(ticket.id)
            if not siblings:
                del self._by_task[(ticket.sweep, ticket.task)]
        held = self._by_slave.get(ticket.slave)
        if held is not None:
            held.discard(ticket.id)
            if not held:
                del self._by_slave[ticket.slave]
        active = self.active.get(ticket.sweep)
        if active is not None:
            active.running -= 1

    def adopt(self, ticket: Ticket) -> None:
        """Track a ticket found running in the store after a master restart."""
        self._track(ticket)
        active = self.active.get(ticket.sweep)
        if active is not None:
            active.running += 1

    def extend(self, ticket: Ticket, now: float) -> None:
        """Push a ticket's deadline out: while it waits in the slave's prefetch queue, and again when it starts."""
        active = self.active.get(ticket.sweep)
        if active is not None:
            ticket.deadline = now + active.sweep.timeout + self.grace
            heapq.heappush(self._deadlines, (ticket.deadline, ticket.id))

    def expired(self, now: float) -> list[Ticket]:
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, tid = heapq.heappop(self._deadlines)
            ticket = self.tickets.get(tid)
            if ticket is not None and ticket.deadline == deadline:
                out.append(ticket)
        return out

    def tickets_of(self, slave: str) -> list[Ticket]:
        """A slave's tickets in flight, in the order they were issued (an index: not a scan of every ticket)."""
        return sorted((self.tickets[t] for t in self._by_slave.get(slave, ())), key=lambda t: t.id)

    def siblings(self, sweep: str, task: int) -> list[Ticket]:
        return [self.tickets[t] for t in self._by_task.get((sweep, task), ())]

    # -- outcomes -----------------------------------------------------------------
    def settle_success(self, ticket: Ticket, elapsed: float | None = None) -> None:
        if elapsed is not None and (active := self.active.get(ticket.sweep)) is not None:
            active.record(elapsed)
        self._untrack(ticket)
        if self.avoid:
            self.avoid.pop((ticket.sweep, ticket.task), None)

    def settle_failure(self, ticket: Ticket, attempts: int, retry: bool = True) -> str:
        """A failed attempt, the task's `attempts` so far counted: requeue it, or fail it when they are used up
        (or at once without `retry`: no other attempt can succeed).

        Returns the task's new state: "queued", "failed", "running" when another ticket for the same task
        is still out, or "cancelled" when its sweep is no longer active.
        """
        self._untrack(ticket)
        if self.siblings(ticket.sweep, ticket.task):
            return "running"
        active = self.active.get(ticket.sweep)
        if active is None:
            return "cancelled"
        if not retry or attempts >= active.sweep.max_attempts:
            self.avoid.pop((ticket.sweep, ticket.task), None)
            return "failed"
        # Retries go first: a failing parameter set surfaces early, not at the end of a long sweep.
        active.queued.put_back(ticket.task)
        return "queued"

    def settle_cancelled(self, ticket: Ticket) -> None:
        self._untrack(ticket)
