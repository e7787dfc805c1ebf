"""The master's way out: send a message to a peer, and hold ACKs until the group commit that makes them true."""
from __future__ import annotations

import time
from typing import Iterable

import structlog
import zmq

from master.roster import Roster
from ticketfarm import messages

log = structlog.get_logger("ticketfarm.master")

#: The socket's own send, without pyzmq's Python wrapper: its checks and flag enums cost ~4 µs of a 4-frame
#: message's ~6, and every TICKET and ACK at many slaves is a message of its own.
_send_frame = zmq.backend.Socket.send
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


class Link:
    """What a part of the master gets to talk to slaves and clients: `send`, and `ack` after the next commit."""

    def __init__(self, socket: zmq.Socket, roster: Roster):
        self.socket = socket
        self.roster = roster
        self.acks: dict[bytes, list[int]] = {}
        self._pending = 0

    def send(self, identity: bytes, message: messages.AnyMessage) -> None:
        self._send(identity, message.encode(), message)

    def broadcast(self, identities: Iterable[bytes], message: messages.AnyMessage) -> None:
        """The same message to many peers, encoded once (heartbeats to a thousand idle slaves)."""
        frames = message.encode()
        for identity in identities:
            self._send(identity, frames, message)

    def _send(self, identity: bytes, frames: list[bytes], message: messages.AnyMessage) -> None:
        socket = self.socket
        try:
            _send_frame(socket, identity, _MORE)
            for frame in frames[:-1]:
                _send_frame(socket, frame, _MORE)
            _send_frame(socket, frames[-1], _LAST)
        except zmq.ZMQError as exc:
            log.warning("send_failed", peer=identity.hex(), command=message.COMMAND.name, error=str(exc))
        session = self.roster.get(identity)
        if session is not None:
            session.last_sent = time.time()

    def ack(self, identity: bytes, ticket: int) -> None:
        """Acknowledge a ticket's answer once the store holds it (sent by `send_acks` after the commit)."""
        self.acks.setdefault(identity, []).append(ticket)
        self._pending += 1

    def pending_acks(self) -> int:
        return self._pending

    def take_acks(self) -> dict[bytes, list[int]]:
        """The ACKs held so far, to send once the commit that is about to start has ended (see `send_acks`)."""
        acks, self.acks, self._pending = self.acks, {}, 0
        return acks

    def send_acks(self, acks: dict[bytes, list[int]] | None = None) -> None:
        """Call right after a commit: everything acknowledged now (or in `acks`, taken before it) is durable."""
        for identity, tickets in (self.take_acks() if acks is None else acks).items():
            self.send(identity, messages.Ack(tickets))
