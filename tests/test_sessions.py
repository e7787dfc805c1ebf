"""Slave sessions on a real store and a real inproc socket pair: HELLO, heartbeats, replacement, expiry, goodbye."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from master.config import MasterConfig
from master.sessions import LOCAL_PEER, Sessions
from tests.loopbench import SLAVE, Bench, open_bench
from ticketfarm import messages
from ticketfarm.messages import Disconnect, Heartbeat, Hello, SlavePolicy, Welcome

CONFIG = MasterConfig(heartbeat_interval=0.2, liveness=5)


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    with open_bench(tmp_path) as b:
        yield b


@pytest.fixture
def sessions(bench: Bench) -> Sessions:
    s = Sessions(CONFIG, 7, bench.roster, bench.link, bench.lifecycle, bench.store, None,
                 SlavePolicy(on_no_work="exit"))
    s.left.append(bench.dispatch.forget)
    s.drop(bench.roster.by_identity[SLAVE], reason="the bench starts without it", lose_tickets=False)
    bench.received()
    return s


def hello(name: str = "slave-a", running: list[int] | None = None) -> Hello:
    return Hello(name=name, slots=2, platform="linux", running=running or [])


def test_hello_registers_and_welcomes_with_the_masters_settings(bench: Bench, sessions: Sessions) -> None:
    sessions.on_hello(SLAVE, hello(), LOCAL_PEER)
    assert bench.roster.named("slave-a") is bench.roster.get(SLAVE)
    assert bench.received() == [Welcome(0.2, 5, 7, SlavePolicy(on_no_work="exit"))]
    assert [s["name"] for s in bench.store.slaves()] == ["slave-a"]


def test_hello_loses_the_tickets_the_slave_no_longer_has_and_keeps_the_others(bench: Bench,
                                                                            sessions: Sessions) -> None:
    bench.add("s", 2, timeout=5.0)
    kept, forgotten = bench.issue(2)
    sessions.on_hello(SLAVE, hello(running=[kept.id]), LOCAL_PEER)
    assert bench.store.ticket(forgotten.id).state == "lost"  # type: ignore[union-attr]
    assert bench.task(forgotten.task) == "queued"
    assert bench.lifecycle.in_flight(kept.id) is kept and kept.deadline > time.time()


def test_a_new_connection_under_the_same_name_replaces_the_old_one_without_losing_tickets(
        bench: Bench, sessions: Sessions) -> None:
    bench.add("s", 1)
    sessions.on_hello(b"old-connection", hello(), LOCAL_PEER)
    ticket = bench.issue(1)[0]
    sessions.on_hello(SLAVE, hello(running=[ticket.id]), LOCAL_PEER)
    assert bench.roster.get(b"old-connection") is None and bench.roster.named("slave-a").identity == SLAVE
    assert bench.lifecycle.in_flight(ticket.id) is ticket


def test_a_silent_slave_is_dropped_and_its_tickets_go_back_to_the_queue(bench: Bench, sessions: Sessions) -> None:
    bench.add("s", 1)
    sessions.on_hello(SLAVE, hello(), LOCAL_PEER)
    ticket = bench.issue(1)[0]
    sessions.heard(SLAVE)
    sessions.purge_dead(time.time() + sessions.window - 0.1)
    assert bench.roster.get(SLAVE) is not None  # any message counts as a heartbeat
    sessions.purge_dead(time.time() + sessions.window + 0.1)
    assert bench.roster.get(SLAVE) is None
    assert bench.store.ticket(ticket.id).state == "lost"  # type: ignore[union-attr]
    assert bench.task(0) == "queued"


def test_a_heartbeat_pushes_the_deadline_of_tickets_waiting_on_the_slave(bench: Bench, sessions: Sessions) -> None:
    bench.add("s", 1, timeout=5.0)
    sessions.on_hello(SLAVE, hello(), LOCAL_PEER)
    ticket = bench.issue(1)[0]  # dispatched "at" 0.0: its deadline has long passed
    sessions.on_heartbeat(SLAVE, Heartbeat(waiting=[ticket.id], load=0.5))
    assert ticket.deadline > time.time()
    # the waiting (prefetched) tickets are kept too: the HTTP API counts them apart from running ones (issue 14)
    assert bench.roster.get(SLAVE).info == {"load": 0.5, "waiting": [ticket.id]}  # type: ignore[union-attr]


def test_another_protocol_version_is_refused_with_its_reason_as_a_field(bench: Bench, sessions: Sessions) -> None:
    sessions.on_hello(SLAVE, Hello(protocol=99), LOCAL_PEER)
    [answer] = bench.received()
    assert isinstance(answer, Disconnect) and answer.why == messages.PROTOCOL_VERSION and not answer.reconnect
    assert bench.roster.get(SLAVE) is None


def test_goodbye_tells_each_slave_the_session_is_over(bench: Bench, sessions: Sessions) -> None:
    sessions.on_hello(SLAVE, hello(), LOCAL_PEER)
    bench.received()
    sessions.say_goodbye()
    assert bench.received() == [Disconnect(messages.SHUTDOWN, "master shutting down")]
