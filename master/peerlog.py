"""Bounded logging of what peers get wrong, and of connections ZeroMQ closes on its own (over-size messages).

Warnings about one peer's messages: a few per window, then one summary of the rest.

A message over `max_message_size` never reaches the master: libzmq (4.3) fails the connection's decoder,
closes the connection and reports only DISCONNECTED on the socket monitor, the very event a peer closing its
own socket gives (no reason, no routing id; the value is the file descriptor). What tells them apart is that
every honest peer sends a message first (HELLO, CONTROL): `ConnectionWatch` marks each connection a
message arrives on (the SRCFD of its first frame) and warns about one that closes having delivered
nothing; that also catches a peer that connected and left (a port probe, a failed handshake). A connection
dropped for an over-size message after earlier ones shows as its slave reconnecting and saying HELLO again.
Only CURVE connections are watched (the descriptor is read where the key is): insecure masters are not.
"""
from __future__ import annotations

import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

log = structlog.get_logger("ticketfarm.master")

#: Lines logged per peer and window; the rest are counted and summed up when the window ends.
BURST = 5
#: Peers tracked at most; beyond that (a flood of new connections) they share one budget.
MAX_PEERS = 1024
OTHERS = "(other peers)"


@dataclass
class Budget:
    since: float
    logged: int = 0
    suppressed: Counter[str] = field(default_factory=Counter)
    last_reason: str = ""


class PeerLog:
    """Warnings about peers' messages, at most BURST per peer per `window` seconds, then a summary line."""

    def __init__(self, window: float):
        self.window = window
        self.peers: dict[str, Budget] = {}

    def warn(self, event: str, peer: str, **fields: object) -> None:
        now = time.monotonic()
        budget = self.peers.get(peer)
        if budget is not None and now - budget.since >= self.window:
            self._summarize(peer, self.peers.pop(peer))
            budget = None
        if budget is None:
            if len(self.peers) >= MAX_PEERS:
                peer = OTHERS
            budget = self.peers.setdefault(peer, Budget(now))
        if budget.logged < BURST:
            budget.logged += 1
            log.warning(event, peer=peer, **fields)
        else:
            budget.suppressed[event] += 1
            budget.last_reason = str(fields.get("reason", budget.last_reason))

    def flush(self) -> None:
        """Sum up the windows that ended (called by the master's housekeeping)."""
        now = time.monotonic()
        for peer in [p for p, b in self.peers.items() if now - b.since >= self.window]:
            self._summarize(peer, self.peers.pop(peer))

    def _summarize(self, peer: str, budget: Budget) -> None:
        if budget.suppressed:
            log.warning("peer_messages_suppressed", peer=peer, seconds=round(self.window, 1),
                        last_reason=budget.last_reason, **budget.suppressed)


@dataclass
class Connection:
    address: str
    delivered: bool = False


class ConnectionWatch:
    """The ROUTER's connections from its socket monitor: one that closes before any message is logged."""

    def __init__(self, sock: zmq.Socket, peer_log: PeerLog, max_message_size: int):
        self.monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.peer_log = peer_log
        self.max_message_size = max_message_size
        self.open: dict[int, Connection] = {}
        self.delivered: set[int] = set()
        """Descriptors a message came in on since the last `drain` (one set add per message, nothing more)."""

    def drain(self) -> None:
        """Take the monitor's events so far (the master's housekeeping). A descriptor that delivered since the
        last drain counts as delivered for every connection it had meanwhile: a descriptor closed and opened
        again between two drains never makes a false warning (at worst one goes unwarned)."""
        marks, self.delivered = self.delivered, set()
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.open[fd] = Connection(peer_address(fd), delivered=fd in marks)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                conn = self.open.pop(fd, None)
                if conn is not None and not conn.delivered and fd not in marks:
                    self.peer_log.warn("connection_closed_silently", conn.address, reason=(
                        f"closed before any message arrived: a message over max_message_size "
                        f"({self.max_message_size} bytes, dropped by ZeroMQ), or a peer that connected and left"))
        for fd in marks:
            if (conn := self.open.get(fd)) is not None:
                conn.delivered = True

    def close(self) -> None:
        self.monitor.close(linger=0)


def peer_address(fd: int) -> str:
    """host:port of the peer on a descriptor libzmq owns (read through a duplicate, which is closed); "local" for
    an ipc:// peer, whose Unix socket has no address."""
    try:
        with socket.socket(fileno=socket.dup(fd)) as sock:
            address = sock.getpeername()
    except OSError:
        return "unknown"
    if not isinstance(address, tuple):
        return "local"
    return f"{address[0]}:{address[1]}"
