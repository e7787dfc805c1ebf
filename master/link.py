"""The master's way out: send a message to a peer, and hold ACKs until the group commit that makes them true."""
from __future__ import annotations

import time
from typing import Iterable

import structlog
import zmq

from master.roster import Roster
from ticketfarm import messages

log = structlog.get_logger("ticketfarm.master")


class Link:
    """What a part of the master gets to talk to slaves and clients: `send`, and `ack` after the next commit."""

    def __init__(self, socket: zmq.Socket, roster: Roster):
        self.socket = socket
        self.roster = roster
        self.acks: dict[bytes, list[int]] = {}

    def send(self, identity: bytes, message: messages.AnyMessage) -> None:
        self._send(identity, message.encode(), message)

    def broadcast(self, identities: Iterable[bytes], message: messages.AnyMessage) -> None:
        """The same message to many peers, encoded once (heartbeats to a thousand idle slaves)."""
        frames = message.encode()
        for identity in identities:
            self._send(identity, frames, message)

    def _send(self, identity: bytes, frames: list[bytes], message: messages.AnyMessage) -> None:
        try:
            self.socket.send_multipart([identity, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("send_failed", peer=identity.hex(), command=message.COMMAND.name, error=str(exc))
        session = self.roster.get(identity)
        if session is not None:
            session.last_sent = time.time()

    def ack(self, identity: bytes, ticket: int) -> None:
        """Acknowledge a ticket's answer once the store holds it (sent by `send_acks` after the commit)."""
        self.acks.setdefault(identity, []).append(ticket)

    def pending_acks(self) -> int:
        return sum(len(tickets) for tickets in self.acks.values())

    def send_acks(self) -> None:
        """Call right after a commit: everything acknowledged now is durable."""
        acks, self.acks = self.acks, {}
        for identity, tickets in acks.items():
            self.send(identity, messages.Ack(tickets))
