"""Where a sweep may run: shipped worker executables per platform (served in chunks), refusals, slave resources."""
from __future__ import annotations

from typing import Any

import structlog

from master.link import Link
from master.roster import Roster, SlaveSession
from master.scheduler import ActiveSweep, Scheduler
from master.store import Store
from ticketfarm import messages
from ticketfarm.spec import ShippedWorker, Sweep

log = structlog.get_logger("ticketfarm.placement")


class Placement:
    """The master's answers to "may this slave run this sweep?" and "send me the worker"."""

    def __init__(self, roster: Roster, scheduler: Scheduler, link: Link, store: Store):
        self.roster = roster
        self.scheduler = scheduler
        self.link = link
        self.store = store
        #: Slave name -> (CPUs, memory MiB) it offers, from its HELLO.
        self.capacity: dict[str, tuple[int, int]] = {}
        #: (slave, sweep) pairs already told REFUSED in this session of the slave.
        self.refused: set[tuple[str, str]] = set()
        scheduler.slave_fits = self.fits

    # -- hooks called by the sessions and dispatch -----------------------------------------------------------
    def on_hello(self, session: SlaveSession, msg: messages.Hello) -> None:
        """Remember what the slave offers; refusals are said again to a slave that comes back."""
        self.capacity[session.name] = (msg.cpus, msg.memory_mb)
        self.refused = {r for r in self.refused if r[0] != session.name}

    @staticmethod
    def ticket_fields(sweep: Sweep) -> dict[str, Any]:
        """What a TICKET of this sweep adds (`messages.TicketSweep` fields): workers per platform, resource claims."""
        return {"workers": {tag: messages.WorkerFile(w.name, w.sha256, len(w.content))
                            for tag, w in sweep.workers.items()},
                "memory": sweep.memory, "cpus": sweep.cpus}

    # -- may this slave take a ticket of this sweep now? -------------------------------------
    def fits(self, active: ActiveSweep, slave: str) -> bool:
        sweep = active.sweep
        session = self.roster.named(slave)
        if session is None or (sweep.slaves and slave not in sweep.slaves):
            return False
        if sweep.workers and session.platform not in sweep.workers:
            self._refuse(session, sweep, f"sweep {sweep.name!r} has no worker for platform {session.platform!r} "
                                         f"(it has: {', '.join(sorted(sweep.workers))})")
            return False
        if not (sweep.cpus or sweep.memory):
            return True
        cpus, memory = self.capacity.get(slave, (0, 0))
        if (sweep.cpus and cpus and sweep.cpus > cpus) or (sweep.memory and memory and sweep.memory > memory):
            self._refuse(session, sweep, f"sweep {sweep.name!r} needs {sweep.cpus} CPUs and {sweep.memory} MiB "
                                         f"per task; slave {slave!r} offers {cpus} CPUs and {memory} MiB")
            return False
        used_cpus, used_memory = self.in_use(slave)
        if sweep.cpus and cpus and used_cpus + sweep.cpus > cpus:
            return False
        return not (sweep.memory and memory and used_memory + sweep.memory > memory)

    def in_use(self, slave: str) -> tuple[int, int]:
        """CPUs and MiB claimed by the tickets this slave holds."""
        cpus = memory = 0
        active = self.scheduler.active
        for ticket in self.scheduler.tickets.values():
            if ticket.slave == slave and ticket.sweep in active:
                sweep = active[ticket.sweep].sweep
                cpus += sweep.cpus
                memory += sweep.memory
        return cpus, memory

    def _refuse(self, session: SlaveSession, sweep: Sweep, reason: str) -> None:
        """Tell a slave once (per connection) why it gets no tickets of a sweep (seed 004's 415)."""
        key = (session.name, sweep.name)
        if key in self.refused:
            return
        self.refused.add(key)
        self.link.send(session.identity, messages.Refused(sweep.name, session.platform, reason))
        self.store.event("slave_refused", sweep=sweep.name, detail={"slave": session.name, "reason": reason})
        log.warning("slave_refused", slave=session.name, sweep=sweep.name, reason=reason)

    # -- serving executables ----------------------------------------------------------------------
    def worker(self, sha256: str) -> ShippedWorker | None:
        """The executable with this hash, from the sweeps that are running (a few sweeps, a few platforms)."""
        for active in self.scheduler.active.values():
            for w in active.sweep.workers.values():
                if w.sha256 == sha256:
                    return w
        return None

    def on_worker_request(self, identity: bytes, msg: messages.WorkerRequest) -> None:
        """WORKER_REQUEST {sha256, offset, length} -> WORKER {sha256, offset, size} + the bytes (or an error)."""
        session = self.roster.by_identity[identity]
        sha, offset, length = msg.sha256, msg.offset, msg.length
        shipped = self.worker(sha)
        if shipped is None:
            self.link.send(identity, messages.Worker(sha, error="no active sweep ships this worker"))
            return
        if offset == 0:
            self.store.event("worker_fetched", detail={"slave": session.name, "sha256": sha,
                                                              "name": shipped.name, "platform": session.platform})
            log.info("worker_fetched", slave=session.name, worker=shipped.name, sha256=sha[:12])
        self.link.send(identity, messages.Worker(sha, offset, len(shipped.content),
                                                 shipped.content[offset:offset + length]))
