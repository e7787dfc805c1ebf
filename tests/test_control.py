"""Control operations in one table, on an in-process master: documented, answered, and refusals named."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import zmq

from master.config import MasterConfig
from master.server import Master
from ticketfarm import messages
from ticketfarm.messages import Control, Reply

PROTOCOL_DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Master]:
    m = Master(MasterConfig(bind="tcp://127.0.0.1:*", insecure=True), tmp_path)
    try:
        yield m
    finally:
        m.close()


def ask(master: Master, op: str, **fields: Any) -> Reply:
    """One CONTROL from a real socket, read off the master's socket and routed as its loop does."""
    client = master.context.socket(zmq.DEALER)
    client.connect(master.inproc_endpoint)
    try:
        client.send_multipart(Control(op, fields, rid=7).encode())
        assert master.socket.poll(2000)
        master.handle(master.socket.recv_multipart())
        assert client.poll(2000), f"no REPLY to {op}"
        reply = messages.decode(client.recv_multipart())
    finally:
        client.close(0)
    assert isinstance(reply, Reply) and reply.rid == 7
    return reply


def test_every_op_of_the_table_is_documented_and_every_documented_python_op_is_in_it(master: Master) -> None:
    doc = PROTOCOL_DOC.read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| 0x0E | CONTROL"))
    documented = set(re.findall(r"`([a-z_]+)`", row)) | set(re.findall(r"`(py_[a-z]+)`", doc))
    table = set(master.control.ops) | set(master.control.later)
    assert table - documented == set()
    assert {op for op in documented if op.startswith("py_")} <= table


def test_an_unknown_op_is_answered_not_dropped(master: Master) -> None:
    reply = ask(master, "no_such_op")
    assert not reply.ok and "no_such_op" in reply.error


def test_a_bad_field_is_refused_with_the_fields_name(master: Master) -> None:
    reply = ask(master, "cancel_task", sweep="s", task="three")
    assert not reply.ok and "'task'" in reply.error


def test_refusals_carry_the_http_apis_codes(master: Master) -> None:
    assert ask(master, "cancel_sweep", sweep="nothing").fields["code"] == "not_found"
    assert ask(master, "drain", slave="nobody").fields["code"] == "not_found"
    assert ask(master, "ping").fields == {"epoch": master.epoch, "slaves": 0, "slots": 0}
