"""The master under a backlog: a slave is judged silent only on what the master has read."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

import master.server
from master.config import MasterConfig
from master.server import Master
from ticketfarm import messages


def test_a_slave_whose_heartbeat_waits_behind_a_backlog_is_not_declared_dead(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    config = MasterConfig(bind="tcp://127.0.0.1:*", insecure=True, heartbeat_interval=0.1, liveness=3)
    server = Master(config, tmp_path / "state")
    ctx = zmq.Context()
    slave = ctx.socket(zmq.DEALER)
    others = [ctx.socket(zmq.DEALER) for _ in range(100)]
    try:
        for sock in (slave, *others):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(server.endpoint)
        slave.send_multipart(messages.Hello(name="s1", slots=1).encode())
        server.serve(until=lambda: server.roster.named("s1") is not None)
        # While the master is not reading for longer than the liveness window (a join storm, a long submit),
        # the slave's heartbeat arrives among many peers' messages; ROUTER reads them in turn, a pass at a time
        # (one message per pass here, as a join storm of thousands of slaves does with the real limit).
        monkeypatch.setattr(master.server, "DRAIN_LIMIT", 1)
        for sock in others:
            sock.send_multipart(messages.Request(1).encode())
        slave.send_multipart(messages.Heartbeat().encode())
        time.sleep(0.5)
        stop = time.time() + 0.25
        server.serve(until=lambda: time.time() > stop)
        assert server.roster.named("s1") is not None
        assert not [e for e in server.store.events() if e["kind"] == "slave_dead"]
    finally:
        for sock in (slave, *others):
            sock.close()
        ctx.term()
        server.close()
