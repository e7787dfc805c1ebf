"""Hostile traffic costs the master a bounded log: a few lines per peer, then one summary; an over-size message
is dropped with a log line, not in silence."""
from __future__ import annotations

from pathlib import Path

import zmq

from tests.conftest import HEARTBEAT, wait_for
from ticketfarm import protocol
from ticketfarm.protocol import Command

GARBAGE = [
    [b"junk"], [protocol.PROTOCOL], [protocol.PROTOCOL, b"\x99", b"{}"],
    [protocol.PROTOCOL, bytes([Command.HELLO]), b"not json"],
    protocol.encode(Command.HELLO, {"protocol": 1, "name": "", "slots": "many"}),
    protocol.encode(Command.ACK, {"tickets": [1]}),
]
MESSAGES = 21_000


def authorised_dealer(master) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    master.slave_keys().apply(sock)  # the worst case: hostile frames over an authorised key
    sock.connect(master.endpoint)
    return sock


def ping_through(sock: zmq.Socket) -> None:
    """One connection keeps order: once the ping is answered, everything sent before it was handled."""
    sock.send_multipart(protocol.encode(Command.CONTROL, {"op": "ping"}))
    while sock.poll(10_000):
        if "epoch" in protocol.decode(sock.recv_multipart()).header:
            return
    raise AssertionError("no answer to ping")


def test_21000_hostile_messages_log_a_few_lines_and_a_summary(master, tmp_path: Path) -> None:
    before = master.log.stat().st_size
    attacker = authorised_dealer(master)
    for i in range(MESSAGES):
        attacker.send_multipart(GARBAGE[i % len(GARBAGE)])
    ping_through(attacker)
    attacker.close()
    summary = wait_for(lambda: "peer_messages_suppressed" in (text := master.log.read_text()[before:]) and text,
                       20 * HEARTBEAT + 10, "the summary line")
    grown = master.log.stat().st_size - before
    print(f"log grew {grown} bytes for {MESSAGES} hostile messages")
    assert grown < 4096
    assert master.alive()
    line = next(line for line in summary.splitlines() if "peer_messages_suppressed" in line)
    suppressed = sum(int(part.split("=")[1]) for part in line.split() if part.startswith("dropped_message="))
    logged = summary.count("dropped_message ")
    assert logged + suppressed == MESSAGES  # every one counted


def test_message_over_max_message_size_is_dropped_with_a_log_line(master) -> None:
    before = master.log.stat().st_size
    attacker = authorised_dealer(master)
    attacker.send_multipart(protocol.encode(Command.HELLO, {"protocol": 1, "name": "big", "slots": 1},
                                            [b"x" * (10 * 1024 * 1024)]))
    wait_for(lambda: "connection_closed_silently" in master.log.read_text()[before:], 10, "the drop to be logged")
    attacker.close()
    text = master.log.read_text()[before:]
    assert "max_message_size" in text and "127.0.0.1:" in text
    assert master.alive()
