"""Test helper: the master's owners wired as the master wires them, on a real store and a real inproc socket pair."""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import zmq

from master.dispatch import Dispatch
from master.events import EventBatch
from master.intake import Intake, Transfer
from master.lifecycle import Completion, Lifecycle, LifecycleHooks
from master.link import Link
from master.metrics import Metrics
from master.peerlog import PeerLog
from master.pysweep import PythonSweeps
from master.roster import Roster, SlaveSession
from master.sandbox import Staging
from master.scheduler import Scheduler, Ticket
from master.store import Store, StoredOutput
from master.validate import Validator
from ticketfarm import messages
from ticketfarm.spec import Sweep

ENDPOINTS = itertools.count()
SLAVE = b"id-a"


@dataclass
class Heard:
    """What the lifecycle told its listeners."""

    queued: int = 0
    settled: list[tuple[str, int, str]] = field(default_factory=list)
    ended_tickets: list[int] = field(default_factory=list)
    ended_sweeps: list[str] = field(default_factory=list)


@dataclass
class Bench:
    """Lifecycle, dispatch and intake with one connected slave socket (`slave`, named slave-a, routing id SLAVE)."""

    store: Store
    lifecycle: Lifecycle
    dispatch: Dispatch
    intake: Intake
    roster: Roster
    link: Link
    slave: zmq.Socket
    heard: Heard

    def add(self, name: str, tasks: int, **fields: Any) -> None:
        self.lifecycle.submit(Sweep(name=name, params=[{"x": i} for i in range(tasks)], command="true", **fields))

    def issue(self, limit: int, slave: str = "slave-a") -> list[Ticket]:
        return self.lifecycle.issue(slave, limit, 0.0)

    def done(self, ticket: Ticket, sweep: str = "s") -> None:
        self.lifecycle.complete(Completion(ticket.id, sweep, ticket.task, 0, 0.1,
                                           [StoredOutput("stdout", 2, b"ok", None)]))

    def task(self, task: int, sweep: str = "s") -> str:
        return self.store.task(sweep, task)["state"]

    def sweep_state(self, sweep: str = "s") -> str:
        row = self.store.sweep(sweep)
        assert row is not None
        return row.state

    def commit(self) -> None:
        """The master's group commit: commit, then the ACKs."""
        self.store.commit()
        self.link.send_acks()

    def received(self) -> list[Any]:
        """Every message the slave socket has been sent so far, decoded."""
        out = []
        while self.slave.poll(50):
            out.append(messages.decode(self.slave.recv_multipart()))
        return out


@contextlib.contextmanager
def open_bench(tmp_path: Path) -> Iterator[Bench]:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    endpoint = f"inproc://loopbench-{next(ENDPOINTS)}"
    router.bind(endpoint)
    slave = context.socket(zmq.DEALER)
    slave.setsockopt(zmq.IDENTITY, SLAVE)
    slave.connect(endpoint)
    store = Store(tmp_path / "state.db")
    roster = Roster()
    roster.add(SlaveSession(SLAVE, "slave-a", "linux", 4, "test", expiry=1e12))
    link = Link(router, roster)
    lifecycle = Lifecycle(store, Scheduler(1, deadline_grace=1.0), link, roster, EventBatch(),
                          Metrics())
    python = PythonSweeps(lifecycle, link, store, tmp_path, 1, store.commit)
    dispatch = Dispatch(lifecycle, roster, link, store, lifecycle.events, lifecycle.metrics, python,
                        Staging(tmp_path, 1 << 20))
    validator: Validator[Transfer] = Validator(1)
    intake = Intake(lifecycle, roster, link, store, tmp_path, validator, 1024, PeerLog(window=2.0),
                    lifecycle.metrics)
    heard = Heard()

    def work_queued() -> None:
        heard.queued += 1
        dispatch.serve_hungry()

    lifecycle.hooks = LifecycleHooks(
        work_queued=work_queued, ticket_ended=heard.ended_tickets.append,
        task_settled=lambda sweep, task, state, outputs: heard.settled.append((sweep, task, state)),
        sweep_ended=heard.ended_sweeps.append)
    try:
        yield Bench(store, lifecycle, dispatch, intake, roster, link, slave, heard)
    finally:
        validator.close()
        store.close()
        router.close(0)
        slave.close(0)
        context.term()
