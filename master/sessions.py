"""Slave sessions and liveness: HELLO, HEARTBEAT and DISCONNECT, expiry of silent slaves, revoked keys."""
from __future__ import annotations

import time
from typing import Any, Callable

import structlog

from master.config import MasterConfig
from master.lifecycle import Lifecycle
from master.link import Link
from master.roster import Roster, SlaveSession
from master.store import Store
from ticketfarm import keys, protocol
from ticketfarm.errors import ProtocolError
from ticketfarm.keys import KeyRing, Peer
from ticketfarm.protocol import Command, Message, field_of

log = structlog.get_logger("ticketfarm.master")

#: Who sent a message on the inproc endpoint (the master's own HTTP threads), or anything when insecure.
LOCAL_PEER = Peer(keys.LOCAL, "local")


class Sessions:
    """Admits slaves, keeps each one's expiry, and ends sessions (goodbye, silence, revoked key, replacement)."""

    def __init__(self, config: MasterConfig, epoch: int, roster: Roster, link: Link, lifecycle: Lifecycle,
                 store: Store, keyring: KeyRing | None, welcome: dict[str, Any]):
        self.config = config
        self.epoch = epoch
        self.roster = roster
        self.link = link
        self.lifecycle = lifecycle
        self.store = store
        self.keyring = keyring
        self.welcome = welcome
        self.refused_peers: set[bytes] = set()
        self.next_key_check = 0.0
        #: Told about each session that starts (with its HELLO) and each that ends.
        self.joined: list[Callable[[SlaveSession, Message], None]] = []
        self.left: list[Callable[[SlaveSession], None]] = []

    @property
    def window(self) -> float:
        """Seconds of silence after which a slave counts as dead."""
        return self.config.heartbeat_interval * self.config.liveness

    def heard(self, identity: bytes) -> SlaveSession | None:
        """Any message counts as a heartbeat: push the sender's expiry out."""
        session = self.roster.get(identity)
        if session is not None:
            session.expiry = time.time() + self.window
        return session

    # -- roles and keys ------------------------------------------------------------------------------
    def permitted(self, identity: bytes, msg: Message, peer: Peer | None) -> bool:
        """Roles: a client key may send CONTROL, a slave key may register as a slave; a revoked key nothing."""
        if peer is None:
            session = self.roster.get(identity)
            if session is not None:
                self.revoke(session)
            elif identity not in self.refused_peers:
                self.refused_peers.add(identity)
                log.warning("revoked_key_refused", peer=identity.hex(), command=msg.command.name)
            return False
        if msg.command == Command.CONTROL and peer.role != keys.CLIENT and msg.header.get("op") != "ping":
            log.warning("control_refused", peer=identity.hex(), key_name=peer.name, op=str(msg.header.get("op")))
            reply: dict[str, Any] = {"ok": False, "code": "forbidden",
                                     "error": "control operations need an authorised client key"}
            if "rid" in msg.header:
                reply["rid"] = msg.header["rid"]
            self.link.send(identity, Command.REPLY, reply)
            return False
        if msg.command == Command.HELLO and peer.role != keys.SLAVE:
            self.link.send(identity, Command.DISCONNECT, {"reason": "this key is not a slave key", "reconnect": False})
            log.warning("slave_refused", peer=identity.hex(), key_name=peer.name, reason="not a slave key")
            return False
        return True

    def check_keys(self, now: float) -> None:
        """Reload the authorised keys when they changed; slaves whose key was revoked are dropped."""
        if self.keyring is None or now < self.next_key_check:
            return
        self.next_key_check = now + self.config.keys_reload_interval
        if not self.keyring.refresh():
            return
        self.refused_peers.clear()
        for session in self.roster.sessions():
            if session.key and self.keyring.lookup(session.key) is None:
                self.revoke(session)

    def revoke(self, session: SlaveSession) -> None:
        log.warning("slave_revoked", slave=session.name, peer=session.identity.hex())
        self.link.send(session.identity, Command.DISCONNECT, {"reason": "key revoked", "reconnect": False})
        self.drop(session, reason="key revoked", lose_tickets=True)

    # -- hello, heartbeat, goodbye -----------------------------------------------------------------------
    def on_hello(self, identity: bytes, msg: Message, peer: Peer | None) -> None:
        version = msg.header.get("protocol")
        if version != protocol.VERSION:
            self.link.send(identity, Command.DISCONNECT, {"reason": f"protocol version {version!r} not supported, "
                                                                    f"master speaks {protocol.VERSION}",
                                                          "reconnect": False})
            log.warning("slave_refused", peer=identity.hex(), reason="protocol version", version=version)
            return
        name = field_of(msg, "name", str)
        slots = field_of(msg, "slots", int)
        if not name or slots < 1:
            raise ProtocolError("HELLO: name must be non-empty and slots >= 1")
        remote = peer if peer is not LOCAL_PEER else None  # the key a remote slave authenticated with
        if remote is not None and not remote.may_be_slave(name):
            self.link.send(identity, Command.DISCONNECT, {"reason": f"key {remote.name!r} may not act as slave {name!r}",
                                                          "reconnect": False})
            log.warning("slave_refused", peer=identity.hex(), slave=name, key_name=remote.name,
                        reason="name not allowed for this key")
            return
        held = {int(t) for t in msg.header.get("running", []) + msg.header.get("held", [])}
        old = self.roster.named(name)
        if old is not None and old.identity != identity:
            self.drop(old, reason="replaced by a new connection", lose_tickets=False)
        now = time.time()
        session = SlaveSession(identity, name, str(msg.header.get("platform", "")), slots,
                               str(msg.header.get("version", "")), now + self.window)
        if remote is not None:
            session.key = remote.key
        self.roster.add(session)
        for listener in self.joined:
            listener(session, msg)
        self.store.slave_seen(name, session.platform, slots, session.version, self.roster.state_of(name))
        # Tickets the master thinks this slave holds but the slave does not know are lost.
        for ticket in self.lifecycle.scheduler.tickets_of(name):
            if ticket.id not in held:
                self.lifecycle.lose(ticket, f"slave {name} restarted without it")
            else:
                self.lifecycle.extend(ticket, now)
        self.link.send(identity, Command.WELCOME, {
            "heartbeat_interval": self.config.heartbeat_interval,
            "liveness": self.config.liveness,
            "epoch": self.epoch,
            **self.welcome,
        })
        log.info("slave_joined", slave=name, platform=session.platform, slots=slots, held=len(held))

    def on_heartbeat(self, identity: bytes, msg: Message) -> None:
        session = self.roster.by_identity[identity]
        now = time.time()
        for tid in msg.header.get("waiting", []):
            ticket = self.lifecycle.in_flight(tid)
            if ticket is not None and ticket.slave == session.name:
                self.lifecycle.extend(ticket, now)
        info = {k: msg.header[k] for k in ("load", "memory", "disk", "busy") if k in msg.header}
        session.info = info
        if now - session.info_saved > 5 * self.config.heartbeat_interval:
            session.info_saved = now
            self.store.slave_state(session.name, self.roster.state_of(session.name), info)
        session.last_heartbeat = now

    def on_disconnect(self, identity: bytes, msg: Message) -> None:
        session = self.roster.get(identity)
        if session is not None:
            self.drop(session, reason=str(msg.header.get("reason", "slave said goodbye")), lose_tickets=True)

    def drop(self, session: SlaveSession, reason: str, lose_tickets: bool) -> None:
        if self.roster.remove(session):
            self.store.slave_state(session.name, "gone")
        for listener in self.left:
            listener(session)
        if lose_tickets and self.roster.named(session.name) is None:
            for ticket in self.lifecycle.scheduler.tickets_of(session.name):
                self.lifecycle.lose(ticket, f"lost: slave {session.name} {reason}")
        log.info("slave_left", slave=session.name, reason=reason)

    # -- liveness ----------------------------------------------------------------------------------------
    def purge_dead(self, now: float) -> None:
        for session in [s for s in self.roster.sessions() if s.expiry < now]:
            self.store.event("slave_dead", detail={"slave": session.name})
            self.drop(session, reason=f"silent for {self.window:.1f}s", lose_tickets=True)

    def send_heartbeats(self, now: float) -> None:
        """HEARTBEAT only to slaves nothing else went to for a heartbeat interval."""
        for session in self.roster.sessions():
            if now - session.last_sent >= self.config.heartbeat_interval:
                self.link.send(session.identity, Command.HEARTBEAT, {})

    def goodbye(self) -> None:
        """At shutdown: every slave is marked gone (the caller commits, then `say_goodbye` tells them)."""
        for session in self.roster.sessions():
            self.store.slave_state(session.name, "gone")

    def say_goodbye(self) -> None:
        for session in self.roster.sessions():
            self.link.send(session.identity, Command.DISCONNECT, {
                "reason": "master shutting down", "reconnect": not self.config.slave_exit_when_done})
