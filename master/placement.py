"""Where a sweep may run: shipped worker executables per platform (served in chunks), refusals, slave resources."""
from __future__ import annotations

import time
from typing import Any, Callable

import structlog

from master.lifecycle import Lifecycle
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
        why = self.cannot_run(sweep, session)
        if why:
            self._refuse(session, sweep, why)
            return False
        if not (sweep.cpus or sweep.memory):
            return True
        cpus, memory = self.capacity.get(slave, (0, 0))
        used_cpus, used_memory = self.in_use(slave)
        if sweep.cpus and cpus and used_cpus + sweep.cpus > cpus:
            return False
        return not (sweep.memory and memory and used_memory + sweep.memory > memory)

    def cannot_run(self, sweep: Sweep, session: SlaveSession) -> str:
        """Why this slave can never run a task of this sweep, busy or not ("" when it can: a platform it has a
        worker for, the CPUs and memory a task claims; a slave that offers 0 does not count them)."""
        if sweep.workers and session.platform not in sweep.workers:
            return (f"sweep {sweep.name!r} has no worker for platform {session.platform!r} "
                    f"(it has: {', '.join(sorted(sweep.workers))})")
        cpus, memory = self.capacity.get(session.name, (0, 0))
        if (sweep.cpus and cpus and sweep.cpus > cpus) or (sweep.memory and memory and sweep.memory > memory):
            return (f"sweep {sweep.name!r} needs {sweep.cpus} CPUs and {sweep.memory} MiB per task; "
                    f"slave {session.name!r} offers {cpus} CPUs and {memory} MiB")
        return ""

    def unrunnable(self, sweep: Sweep) -> str | None:
        """Why none of the connected slaves can run this sweep, for people; None when one can (or none is
        connected: that is the caller's to judge)."""
        sessions = self.roster.sessions()
        if not sessions or not all(self.cannot_run(sweep, s) for s in sessions):
            return None
        why = []
        platforms = sorted({s.platform for s in sessions if sweep.workers and s.platform not in sweep.workers})
        if platforms:
            why.append(f"no worker for platform {', '.join(platforms)} (it ships {', '.join(sorted(sweep.workers))})")
        offered = [self.capacity.get(s.name, (0, 0)) for s in sessions]
        if sweep.cpus and any(cpus and sweep.cpus > cpus for cpus, _ in offered):
            why.append(f"no slave offers {sweep.cpus} CPUs (at most {max(c for c, _ in offered)})")
        if sweep.memory and any(memory and sweep.memory > memory for _, memory in offered):
            why.append(f"no slave offers {sweep.memory} MiB of memory (at most {max(m for _, m in offered)} MiB)")
        return "; ".join(why)

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


class Runnability:
    """Tells (through the lifecycle: the store and an event) which active sweeps no connected slave can run and
    why; quiet for `grace` seconds after the master starts, while slaves connect, and re-checked as they come and go."""

    def __init__(self, placement: Placement, lifecycle: Lifecycle, grace: float, interval: float,
                 slaves_expected: Callable[[], bool]):
        self.placement = placement
        self.lifecycle = lifecycle
        self.scheduler = lifecycle.scheduler  # read only
        self.quiet_until = time.time() + grace
        self.interval = interval
        #: True while an allocation queue submits slaves as batch jobs: having none connected is no reason then.
        self.slaves_expected = slaves_expected
        self.said: dict[str, str] = {}
        self.next_check = 0.0
        self.starting: Callable[[], bool] = lambda: False

    def expect(self, starting: Callable[[], bool]) -> None:
        """The slaves to come are known (a local run's): nothing is judged while `starting()`, and not a moment
        longer (no grace period)."""
        self.starting = starting
        self.quiet_until = 0.0

    def slaves_changed(self, *_: object) -> None:
        """A slave joined or left: the sweeps said to be unrunnable are judged again at once (before a joined
        slave takes their tickets), the others at the next tick."""
        self.next_check = 0.0
        for name in list(self.said):
            if (active := self.scheduler.active.get(name)) is not None:
                self._judge(name, active)

    def tick(self, now: float) -> None:
        if now < self.next_check or now < self.quiet_until or self.starting():
            return
        self.next_check = now + self.interval
        for name in [n for n in self.said if n not in self.scheduler.active]:
            del self.said[name]
            self.lifecycle.set_unrunnable(name, None)
        for name, active in self.scheduler.active.items():
            self._judge(name, active)

    def _judge(self, name: str, active: ActiveSweep) -> None:
        reason = self.reason(active, bool(self.placement.roster.sessions()))
        if reason != self.said.get(name):
            if reason:
                self.said[name] = reason
            else:
                self.said.pop(name, None)
            self.lifecycle.set_unrunnable(name, reason)

    def reason(self, active: ActiveSweep, connected: bool) -> str | None:
        if active.paused or not active.queued:
            return None
        if not connected:
            return None if self.slaves_expected() else "no slave connected"
        return self.placement.unrunnable(active.sweep)
