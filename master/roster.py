"""The connected slaves: one session per slave (by routing id and by name) and the names told to drain."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ticketfarm import messages


@dataclass
class SlaveSession:
    """A connected slave as the master sees it: identity, capacity, credit and liveness."""

    identity: bytes
    name: str
    platform: str
    slots: int
    version: str
    expiry: float
    credit: int = 0
    last_sent: float = 0.0
    heartbeat: messages.Heartbeat | None = None
    """The last HEARTBEAT it sent (kept as it came: most change nothing, and nothing is built from them)."""
    info_saved: float = 0.0
    last_heartbeat: float = 0.0
    key: bytes = b""  # the CURVE public key (z85) it authenticated with; empty when insecure

    @property
    def info(self) -> dict[str, Any]:
        """Its load, memory, disk and busy as the last heartbeat said, and the tickets it holds waiting (prefetched,
        not running: the HTTP API tells them apart)."""
        beat = self.heartbeat
        return {} if beat is None else {**beat.info(), "waiting": beat.waiting}


class Roster:
    """Who is connected; the sessions owner adds and removes, everyone else reads."""

    def __init__(self) -> None:
        self.by_identity: dict[bytes, SlaveSession] = {}
        self.by_name: dict[str, SlaveSession] = {}
        #: Slaves that get no new tickets (connected or not: a drain outlives a reconnection).
        self.draining: set[str] = set()

    def add(self, session: SlaveSession) -> None:
        self.by_identity[session.identity] = session
        self.by_name[session.name] = session

    def remove(self, session: SlaveSession) -> bool:
        """Forget a session; True when it was the slave's current one (not replaced by a newer connection)."""
        self.by_identity.pop(session.identity, None)
        if self.by_name.get(session.name) is session:
            del self.by_name[session.name]
            return True
        return False

    def get(self, identity: bytes) -> SlaveSession | None:
        return self.by_identity.get(identity)

    def named(self, name: str) -> SlaveSession | None:
        return self.by_name.get(name)

    def sessions(self) -> list[SlaveSession]:
        return list(self.by_identity.values())

    def state_of(self, name: str) -> str:
        """The slave's state as the store records it: draining, alive, or gone."""
        if name not in self.by_name:
            return "gone"
        return "draining" if name in self.draining else "alive"

    def __len__(self) -> int:
        return len(self.by_identity)
