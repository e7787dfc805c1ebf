"""The master loop's group commit runs in the background: a result is acknowledged only after its commit ended."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest
import zmq

from master.config import MasterConfig
from master.server import Master
from master.store import Store
from ticketfarm import messages
from ticketfarm.spec import Sweep

TASKS = 40


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Master]:
    m = Master(MasterConfig(bind="tcp://127.0.0.1:*", insecure=True, commit_interval=0.0), tmp_path)
    try:
        yield m
    finally:
        m.close()


def test_every_ack_comes_after_the_commit_of_its_result(master: Master, tmp_path: Path) -> None:
    slave = master.context.socket(zmq.DEALER)
    slave.connect(master.inproc_endpoint)
    reader = Store(tmp_path / "state.db", readonly=True)
    acked: list[int] = []
    uncommitted: list[int] = []

    def answer_and_check() -> bool:
        """Run by the loop after each pass: answer TICKETs, and check each ACK's result is already committed."""
        while slave.poll(0):
            msg = messages.decode(slave.recv_multipart())
            if isinstance(msg, messages.Ticket):
                for entry in msg.tickets:
                    slave.send_multipart(messages.Result([messages.ResultEntry(
                        entry.ticket, 0, 0.0, [messages.ResultOutput("stdout", 1, b"x")])]).encode())
                slave.send_multipart(messages.Request(credit=len(msg.tickets)).encode())
            elif isinstance(msg, messages.Ack):
                acked.extend(msg.tickets)
                uncommitted.extend(t for t in msg.tickets if reader.ticket(t).state != "done")  # type: ignore
        return len(acked) >= TASKS or time.time() > deadline

    try:
        slave.send_multipart(messages.Hello(name="a", slots=4).encode())
        master.submit(Sweep(name="s", params=[{"i": i} for i in range(TASKS)], command="true"))
        slave.send_multipart(messages.Request(credit=4).encode())
        deadline = time.time() + 60
        master.serve(until=answer_and_check)
        tickets = [a["ticket"] for i in range(TASKS) for a in reader.attempts_of("s", i)]
        assert sorted(acked) == sorted(tickets) and len(acked) == TASKS
        assert uncommitted == []
    finally:
        reader.close()
        slave.close(0)

