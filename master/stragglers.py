"""Speculative duplicates: when a sweep has nothing queued and slots sit idle, copy its slowest running tickets."""
from __future__ import annotations

import time
import structlog

from master.dispatch import Dispatch
from master.lifecycle import Lifecycle
from master.roster import Roster, SlaveSession
from master.scheduler import ActiveSweep, Ticket
from master.store import Store

log = structlog.get_logger("ticketfarm.stragglers")

#: Seconds a sweep's median task time is reused before it is read from the store again.
MEDIAN_TTL = 1.0


class Stragglers:
    """Once per housekeeping pass: duplicate tickets running longer than `speculate` x the sweep's median, timed from
    their start on the slave (a ticket prefetched behind a straggler is not one), onto an idle slot."""

    def __init__(self, lifecycle: Lifecycle, dispatch: Dispatch, roster: Roster, store: Store,
                 heartbeat_interval: float):
        self.lifecycle = lifecycle
        self.scheduler = lifecycle.scheduler  # read only: copies are made through the lifecycle
        self.dispatch = dispatch
        self.roster = roster
        self.store = store
        self.heartbeat_interval = heartbeat_interval
        self._medians: dict[str, tuple[float, float | None]] = {}

    def tick(self, now: float) -> None:
        if not self.dispatch.hungry:
            return
        for active in list(self.scheduler.active.values()):
            if active.sweep.speculate > 0 and not active.queued and not active.paused and active.running:
                self._speculate(active, now)

    def _speculate(self, active: ActiveSweep, now: float) -> None:
        median = self.median(active.name, now)
        if median is None:
            return
        threshold = max(median * active.sweep.speculate, self.heartbeat_interval)
        scheduler = self.scheduler
        late = sorted((t for t in scheduler.tickets.values()
                       if t.sweep == active.name and t.started is not None and now - t.started > threshold
                       and len(scheduler.siblings(t.sweep, t.task)) == 1), key=lambda t: t.started or now)
        for ticket in late:
            session = self._idle_slave(ticket)
            if session is None:
                return
            copy = self.lifecycle.duplicate(ticket, session.name, now)
            if copy is None:
                continue
            self.dispatch.spend(session, [copy])
            self.store.event("ticket_duplicated", sweep=ticket.sweep, task=ticket.task, ticket=copy.id,
                                    detail={"of": ticket.id, "slave": session.name, "running_for":
                                            round(now - (ticket.started or now), 3), "median": round(median, 3)})
            log.info("ticket_duplicated", sweep=ticket.sweep, task=ticket.task, original=ticket.id, copy=copy.id,
                     slave=session.name)

    def _idle_slave(self, ticket: Ticket) -> SlaveSession | None:
        """The slave with the most idle slots (slots its tickets, started or held ready, leave free) that asks for
        work and holds no copy of this task; None when every slot is taken: a copy would wait behind other work."""
        holders = {t.slave for t in self.scheduler.siblings(ticket.sweep, ticket.task)}
        best, most = None, 0
        for session in self.dispatch.hungry.values():
            if session.credit > 0 and session.name not in holders and session.name not in self.roster.draining:
                idle = session.slots - len(self.scheduler.tickets_of(session.name))
                if idle > most:
                    best, most = session, idle
        return best

    def median(self, sweep: str, now: float) -> float | None:
        """The median run time of the sweep's successful tickets (None before the first one)."""
        cached = self._medians.get(sweep)
        if cached is not None and now - cached[0] < MEDIAN_TTL:
            return cached[1]
        value = self.store.median_elapsed(sweep)
        self._medians[sweep] = (time.time(), value)
        return value
