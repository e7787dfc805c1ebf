"""Slave sessions and liveness: HELLO, HEARTBEAT and DISCONNECT, expiry of silent slaves, revoked keys."""
from __future__ import annotations

import time
from typing import Callable

import structlog

from master.config import MasterConfig
from master.lifecycle import Lifecycle
from master.link import Link
from master.roster import Roster, SlaveSession
from master.store import Store
from ticketfarm import keys, messages, protocol
from ticketfarm.keys import KeyRing, Peer

log = structlog.get_logger("ticketfarm.master")

#: Who sent a message on the inproc endpoint (the master's own HTTP threads), or anything when insecure.
LOCAL_PEER = Peer(keys.LOCAL, "local")


class Sessions:
    """Admits slaves, keeps each one's expiry, and ends sessions (goodbye, silence, revoked key, replacement)."""

    def __init__(self, config: MasterConfig, epoch: int, roster: Roster, link: Link, lifecycle: Lifecycle,
                 store: Store, keyring: KeyRing | None, policy: messages.SlavePolicy):
        self.config = config
        self.epoch = epoch
        self.roster = roster
        self.link = link
        self.lifecycle = lifecycle
        self.store = store
        self.keyring = keyring
        self.policy = policy
        self.refused_peers: set[bytes] = set()
        self.next_key_check = 0.0
        #: Told about each session that starts (with its HELLO) and each that ends.
        self.joined: list[Callable[[SlaveSession, messages.Hello], None]] = []
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
    def permitted(self, identity: bytes, msg: messages.AnyMessage, peer: Peer | None) -> bool:
        """Roles: a client key may send CONTROL, a slave key may register as a slave; a revoked key nothing."""
        if peer is None:
            session = self.roster.get(identity)
            if session is not None:
                self.revoke(session)
            elif identity not in self.refused_peers:
                self.refused_peers.add(identity)
                log.warning("revoked_key_refused", peer=identity.hex(), command=msg.COMMAND.name)
            return False
        if isinstance(msg, messages.Control) and peer.role != keys.CLIENT and msg.op != "ping":
            log.warning("control_refused", peer=identity.hex(), key_name=peer.name, op=msg.op)
            self.link.send(identity, messages.Reply(False, {
                "code": "forbidden", "error": "control operations need an authorised client key"}, msg.rid))
            return False
        if isinstance(msg, messages.Hello) and peer.role != keys.SLAVE:
            self.link.send(identity, messages.Disconnect(messages.REFUSED, "this key is not a slave key"))
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
        self.link.send(session.identity, messages.Disconnect(messages.REVOKED, "key revoked"))
        self.drop(session, reason="key revoked", lose_tickets=True, cause="key_revoked")

    # -- hello, heartbeat, goodbye -----------------------------------------------------------------------
    def on_hello(self, identity: bytes, msg: messages.Hello, peer: Peer | None) -> None:
        if msg.protocol != protocol.VERSION:
            self.link.send(identity, messages.Disconnect(messages.PROTOCOL_VERSION, f"protocol version {msg.protocol} "
                                                         f"not supported, master speaks {protocol.VERSION}"))
            log.warning("slave_refused", peer=identity.hex(), reason="protocol version", version=msg.protocol)
            return
        name, slots = msg.name, msg.slots
        remote = peer if peer is not LOCAL_PEER else None  # the key a remote slave authenticated with
        if remote is not None and not remote.may_be_slave(name):
            self.link.send(identity, messages.Disconnect(messages.REFUSED,
                                                         f"key {remote.name!r} may not act as slave {name!r}"))
            log.warning("slave_refused", peer=identity.hex(), slave=name, key_name=remote.name,
                        reason="name not allowed for this key")
            return
        held = {*msg.running, *msg.held}
        old = self.roster.named(name)
        if old is not None and old.identity != identity:
            self.drop(old, reason="replaced by a new connection", lose_tickets=False)
        now = time.time()
        session = SlaveSession(identity, name, msg.platform, slots, msg.version, now + self.window)
        if remote is not None:
            session.key = remote.key
        self.roster.add(session)
        for listener in self.joined:
            listener(session, msg)
        self.store.slave_seen(name, session.platform, slots, session.version, self.roster.state_of(name))
        # Tickets the master thinks this slave holds but the slave does not know are lost.
        for ticket in self.lifecycle.tickets_of(name):
            if ticket.id not in held:
                self.lifecycle.lose(ticket, f"slave {name} restarted without it", "slave_restarted")
            else:
                self.lifecycle.extend(ticket, now)
        # CANCEL before WELCOME: a slave back from a freeze starts none of its held tickets until WELCOME, so what
        # was given away meanwhile never starts there.
        self.cancel_given_away(session, msg.running)
        self.link.send(identity, messages.Welcome(self.config.heartbeat_interval, self.config.liveness, self.epoch,
                                                  self.policy))
        log.info("slave_joined", slave=name, platform=session.platform, slots=slots, held=len(held))

    def on_heartbeat(self, identity: bytes, msg: messages.Heartbeat) -> None:
        """Liveness (`heard` did that), what the slave holds, and its load: kept as the message itself, and stored
        every few intervals (a heartbeat that changes nothing costs no allocation and no SQL)."""
        session = self.roster.by_identity[identity]
        now = time.time()
        if msg.running or msg.waiting:
            self.held(session, msg, now)
        session.heartbeat = msg
        if now - session.info_saved > 5 * self.config.heartbeat_interval:
            session.info_saved = now
            self.store.slave_info(session.name, self.roster.state_of(session.name), msg.info())
        session.last_heartbeat = now

    def held(self, session: SlaveSession, msg: messages.Heartbeat, now: float) -> None:
        """Tickets a heartbeat says the slave runs or holds waiting: waiting ones get their deadline pushed out."""
        for tid in msg.waiting:
            ticket = self.lifecycle.in_flight(tid)
            if ticket is not None and ticket.slave == session.name:
                self.lifecycle.extend(ticket, now)
        # What its REQUESTs said, said again (a REQUEST sent just before a reconnection may have been lost).
        waiting = set(msg.waiting)
        self.lifecycle.mark_started(session.name, [t for t in msg.running if t not in waiting], now)
        self.cancel_given_away(session, [*msg.running, *msg.waiting])

    def cancel_given_away(self, session: SlaveSession, tickets: list[int]) -> None:
        """Tickets a slave runs or holds ready that are no longer its own (it was away past its deadline or its
        liveness, e.g. stopped, and they went to another slave or were settled): CANCEL, so it never starts them."""
        for tid in tickets:
            ticket = self.lifecycle.in_flight(tid)
            if ticket is None or ticket.slave != session.name:
                self.link.send(session.identity, messages.Cancel(tid, "given to another slave meanwhile"))

    def on_disconnect(self, identity: bytes, msg: messages.Disconnect) -> None:
        session = self.roster.get(identity)
        if session is not None:
            # A slave stopped in order (SIGTERM, Ctrl-C) gives its tickets back: that costs them no attempt.
            self.drop(session, reason=msg.reason or "slave said goodbye", lose_tickets=True,
                      interrupted=msg.why == messages.SHUTDOWN, cause="disconnected")

    def drop(self, session: SlaveSession, reason: str, lose_tickets: bool, interrupted: bool = False,
             cause: str = "") -> None:
        """End a session; its tickets are lost for `cause` (or given back when `interrupted`) if `lose_tickets`."""
        if self.roster.remove(session):
            self.store.slave_state(session.name, "gone")
        for listener in self.left:
            listener(session)
        if lose_tickets and self.roster.named(session.name) is None:
            for ticket in self.lifecycle.tickets_of(session.name):
                if interrupted:
                    self.lifecycle.release(ticket, f"interrupted: slave {session.name} {reason}")
                else:
                    self.lifecycle.lose(ticket, f"lost: slave {session.name} {reason}", cause)
        log.info("slave_left", slave=session.name, reason=reason)

    # -- liveness ----------------------------------------------------------------------------------------
    def purge_dead(self, now: float) -> None:
        for session in [s for s in self.roster.sessions() if s.expiry < now]:
            self.store.event("slave_dead", detail={"slave": session.name})
            self.drop(session, reason=f"silent for {self.window:.1f}s", lose_tickets=True, cause="slave_silent")

    def send_heartbeats(self, now: float) -> None:
        """HEARTBEAT only to slaves nothing else went to for a heartbeat interval."""
        interval = self.config.heartbeat_interval
        self.link.broadcast([s.identity for s in self.roster.sessions() if now - s.last_sent >= interval],
                            messages.Heartbeat())

    def goodbye(self) -> None:
        """At shutdown: every slave is marked gone (the caller commits, then `say_goodbye` tells them)."""
        for session in self.roster.sessions():
            self.store.slave_state(session.name, "gone")

    def say_goodbye(self) -> None:
        """The session is over (`reconnect` false); whether a slave waits for the master or exits is its
        `on_master_shutdown`, which the master's WELCOME policy may have set."""
        for session in self.roster.sessions():
            self.link.send(session.identity, messages.Disconnect(messages.SHUTDOWN, "master shutting down"))
