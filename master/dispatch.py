"""Dispatch: slaves' credit, the slaves waiting for work, and tickets sent out in TICKET batches."""
from __future__ import annotations

import itertools
import time
from typing import Protocol

from master.events import EventBatch
from master.lifecycle import Lifecycle
from master.link import Link
from master.metrics import Metrics
from master.placement import Placement
from master.roster import Roster, SlaveSession
from master.sandbox import Staging
from master.scheduler import Ticket
from master.store import Store
from ticketfarm import messages

#: Tickets of a command sweep per TICKET message at most.
TICKET_BATCH = 256


class PythonTickets(Protocol):
    """How python sweeps' tickets are worded (master/pysweep.py)."""

    def owns(self, sweep: str) -> bool: ...

    def ticket_messages(self, tickets: list[Ticket]) -> list[messages.Ticket]: ...


class Dispatch:
    """Hands tickets to slaves as far as their credit goes; a slave with credit left waits in `hungry`."""

    def __init__(self, lifecycle: Lifecycle, roster: Roster, link: Link, store: Store, events: EventBatch,
                 metrics: Metrics, python: PythonTickets, staging: Staging):
        self.lifecycle = lifecycle
        self.roster = roster
        self.link = link
        self.store = store
        self.events = events
        self.metrics = metrics
        self.python = python
        self.staging = staging
        self.hungry: dict[bytes, SlaveSession] = {}
        self.static: dict[str, messages.TicketSweep] = {}
        #: When the loop's current pass began reading messages (REQUEST to TICKET latency is measured from it).
        self.pass_started = 0.0
        self._slots_of, self._slots = -1, 0

    def on_request(self, identity: bytes, msg: messages.Request) -> None:
        session = self.roster.by_identity[identity]
        if msg.started:
            self.lifecycle.mark_started(session.name, msg.started, time.time())
        session.credit += msg.credit
        self.serve(session, since=self.pass_started)

    def serve(self, session: SlaveSession, since: float = 0.0) -> None:
        """Send a slave what its credit allows; remember it as hungry when nothing is queued for it."""
        if session.name in self.roster.draining:
            self.hungry.pop(session.identity, None)
            return
        if session.credit > 0:
            tickets = self.lifecycle.issue(session.name, session.credit, time.time(), self.connected_slots())
            if tickets:
                session.credit -= self.lifecycle.scheduler.issued_units  # a short sweep's come in bundles
                self.send_tickets(session, tickets)
                if since:
                    self.metrics.dispatch_latency.observe(time.time() - since)
        if session.credit > 0:
            self.hungry[session.identity] = session  # nothing queued for it now: served when work appears
        else:
            self.hungry.pop(session.identity, None)

    def connected_slots(self) -> int:
        """The slots of all connected slaves (how widely a short sweep's bundles must leave room), summed again
        only when the number of slaves changed: a hint, not worth a pass over 1,000 sessions per REQUEST."""
        if len(self.roster.by_identity) != self._slots_of:
            self._slots_of = len(self.roster.by_identity)
            self._slots = sum(s.slots for s in self.roster.by_identity.values())
        return self._slots

    def serve_hungry(self) -> None:
        for session in list(self.hungry.values()):
            self.serve(session)

    def spend(self, session: SlaveSession, tickets: list[Ticket]) -> None:
        """Send tickets chosen elsewhere (speculative copies) against the slave's credit."""
        session.credit -= len(tickets)
        if session.credit <= 0:
            self.hungry.pop(session.identity, None)
        self.send_tickets(session, tickets)

    def forget(self, session: SlaveSession) -> None:
        self.hungry.pop(session.identity, None)

    def forget_sweep(self, name: str) -> None:
        self.static.pop(name, None)

    def send_tickets(self, session: SlaveSession, tickets: list[Ticket]) -> None:
        """TICKET messages for a slave: one per sweep and batch (tickets of one sweep share their static part)."""
        for sweep, group in itertools.groupby(tickets, key=lambda t: t.sweep):
            batch = list(group)
            if self.python.owns(sweep):
                out = self.python.ticket_messages(batch)
            else:
                out = [self.command_tickets(sweep, batch[i:i + TICKET_BATCH])
                       for i in range(0, len(batch), TICKET_BATCH)]
            for message in out:
                self.link.send(session.identity, message)
            for ticket in batch:
                self.events.dispatched(sweep, ticket.id, ticket.task, session.name)
            self.metrics.tickets_dispatched.inc(len(batch))

    def command_tickets(self, sweep: str, batch: list[Ticket]) -> messages.Ticket:
        static = self.ticket_static(sweep)
        entries, extra = [], []
        for t in batch:
            files = []
            for name, data in self.staging.of(t):  # uploaded into its sandbox: frames after the sweep's own
                files.append(messages.InputFile(name, frame=len(static.frames) + len(extra)))
                extra.append(data)
            entries.append(messages.TicketEntry(t.id, t.task, t.attempt,
                                                t.params if t.params is not None else self.store.params(sweep, t.task),
                                                files=files))
        return messages.Ticket(static, entries, extra)

    def ticket_static(self, name: str) -> messages.TicketSweep:
        """The part of a TICKET that is the same for every task of a sweep (built once per sweep)."""
        cached = self.static.get(name)
        if cached is None:
            active = self.lifecycle.active(name)
            assert active is not None
            sweep = active.sweep
            inputs, frames = [], []
            for inp in sweep.inputs:
                if inp.content is not None:
                    inputs.append(messages.InputFile(inp.name, frame=len(frames)))
                    frames.append(inp.content)
                else:
                    inputs.append(messages.InputFile(inp.name, template=inp.template))
            cached = self.static[name] = messages.TicketSweep(
                name, sweep.timeout, sweep.results, command=sweep.command, argv=sweep.argv, env=sweep.env,
                inputs=inputs, frames=frames, cwd=sweep.cwd, **Placement.ticket_fields(sweep))
        return cached
