"""The master process: ROUTER socket, slave sessions and liveness, dispatch, result intake, group commit."""
from __future__ import annotations

import itertools
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import structlog
import zmq

from master import ops
from master.allocation import Allocator, Demand
from master.callbacks import CallbackSender
from master.config import MasterConfig
from master.events import EventBatch
from master.housekeeping import Housekeeping
from master.metrics import Metrics
from master.pysweep import PythonSweeps
from master.scheduler import Scheduler, Ticket
from master.stats import all_sweep_stats, format_report
from master.store import FINAL_TASK_STATES, Store, StoredOutput
from master.stragglers import Stragglers
from master.validate import Validator
from master.workers import Placement
from ticketfarm import keys, messages, protocol
from ticketfarm.errors import ConfigError, KeyFileError, ProtocolError, SweepExists
from ticketfarm.keys import KeyRing, Peer, ZapHandler
from ticketfarm.protocol import Command
from ticketfarm.spec import Sweep

log = structlog.get_logger("ticketfarm.master")

#: Chunks of one large output requested ahead of the one being written (flow-control window).
FETCH_WINDOW = 4
#: Messages handled between two group commits at most.
DRAIN_LIMIT = 2000
#: Tickets of a command sweep per TICKET message at most.
TICKET_BATCH = 256
#: Who sent a message on the inproc endpoint (the master's own HTTP threads), or anything when insecure.
LOCAL_PEER = Peer(keys.LOCAL, "local")


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
    info: dict[str, Any] = field(default_factory=dict)
    info_saved: float = 0.0
    last_heartbeat: float = 0.0
    key: bytes = b""  # the CURVE public key (z85) it authenticated with; empty when insecure


@dataclass
class IncomingFile:
    """One large output being pulled from a slave in chunks, written straight to disk."""

    name: str
    size: int
    path: Path
    requested: int = 0
    received: int = 0


@dataclass
class Transfer:
    """A finished ticket whose large outputs are still arriving."""

    ticket_id: int
    sweep: str
    task: int
    identity: bytes
    exit_code: int | None
    elapsed: float | None
    outputs: list[StoredOutput]
    files: dict[str, IncomingFile]



class Master:
    """Owns the socket, the store and the scheduler; `serve()` runs the event loop."""

    def __init__(self, config: MasterConfig, state_dir: Path, context: zmq.Context | None = None):
        self.config = config
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.results_dir = self.state_dir / "results"
        self.incoming_dir = self.state_dir / "incoming"
        shutil.rmtree(self.incoming_dir, ignore_errors=True)
        self.incoming_dir.mkdir()
        self.store = Store(self.state_dir / "state.db", config.durability)
        self.epoch = self.store.next_epoch()
        self.scheduler = Scheduler(self.store, self.epoch, config.deadline_grace)
        self.started = time.time()
        self.sessions: dict[bytes, SlaveSession] = {}
        self.by_name: dict[str, SlaveSession] = {}
        self.hungry: dict[bytes, SlaveSession] = {}
        self.transfers: dict[int, Transfer] = {}
        self.progress: dict[int, bytearray] = {}
        self.pending_acks: dict[bytes, list[int]] = {}
        self._ticket_headers: dict[str, messages.TicketSweep] = {}
        self._stopping = False
        self._next_housekeeping = 0.0
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.keyring, self.zap = self._security()
        self._peer: Peer | None = LOCAL_PEER
        self._refused_peers: set[bytes] = set()
        self._next_key_check = 0.0
        self.socket = self._bind()
        self._endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        # HTTP API: its threads only read the store and send CONTROL messages here (see master/http.py).
        self.events = EventBatch()
        self.metrics = Metrics(self.store.path)
        self.draining: set[str] = set()
        self._pass_started = 0.0
        self.callbacks = CallbackSender(self.store.path, self.store.last_event_id(),
                                        config.callback_attempts, config.callback_backoff)
        self.inproc_endpoint = f"inproc://ticketfarm-master-{id(self):x}"
        self.socket.bind(self.inproc_endpoint)
        self._resume_state()
        self.http = None
        if config.http_bind:
            from master.http import HttpApi
            self.http = HttpApi.start(self)
        if config.http_bind or self.store.has_callbacks():
            self.callbacks.ensure_started()
        self._handlers: dict[Command, Callable[[bytes, Any], None]] = {
            Command.HELLO: self.on_hello,
            Command.REQUEST: self.on_request,
            Command.PROGRESS: self.on_progress,
            Command.RESULT: self.on_result,
            Command.CHUNK: self.on_chunk,
            Command.FAILURE: self.on_failure,
            Command.HEARTBEAT: self.on_heartbeat,
            Command.DISCONNECT: self.on_disconnect,
            Command.CONTROL: self.on_control,
        }
        self.python = PythonSweeps(self)
        # Sweep semantics beyond the hot path (issue 6): where a sweep may run, validation, stragglers, chores.
        self.placement = Placement(self)
        self.validator = Validator(self, config.validate_workers)
        self.stragglers = Stragglers(self)
        self.housekeeping = Housekeeping(self)
        # Slaves from a batch scheduler (issue 15): told the demand on each housekeeping tick, nothing more.
        self.allocator = Allocator.for_master(config, self.state_dir, self.store, self.endpoint)

    # -- setup ----------------------------------------------------------------
    def _security(self) -> tuple[KeyRing | None, ZapHandler | None]:
        """CURVE keys and the ZAP handler (before the socket binds), or a loud warning when insecure."""
        cfg = self.config
        if cfg.insecure:
            log.warning("insecure_transport", bind=cfg.bind,
                        detail="insecure = true: plain TCP, any peer may act as slave or submit work; "
                               "use only on a trusted network")
            return None, None
        secret = self.state_dir / cfg.secret_key
        if not secret.exists():
            if cfg.secret_key != MasterConfig.secret_key:
                raise ConfigError(f"secret_key {str(secret)!r}: no such file")
            for path in keys.init_state_keys(self.state_dir):
                log.info("key_created", path=str(path))
        try:
            self._public_key, self._secret_key = keys.load_keypair(secret)
        except KeyFileError as exc:
            raise ConfigError(str(exc)) from None
        ring = KeyRing(self.state_dir / cfg.authorized_slaves, self.state_dir / cfg.authorized_clients)
        try:
            zap = ZapHandler(self.context, ring)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot start the CURVE authenticator in this ZeroMQ context: {exc}") from None
        return ring, zap

    def _bind(self) -> zmq.Socket:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keyring is not None:
            sock.curve_server = True
            sock.curve_publickey = self._public_key
            sock.curve_secretkey = self._secret_key
            sock.zap_domain = keys.ZAP_DOMAIN
            self._recv = self._recv_authenticated
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_size)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.bind(self.config.bind)
        return sock

    @property
    def endpoint(self) -> str:
        """The endpoint slaves and clients connect to (the bound one, with a picked port filled in)."""
        return self._endpoint

    def _resume_state(self) -> None:
        """Reload active sweeps and the tickets that were out when the previous master stopped."""
        for row in self.store.sweeps():
            if row.state in ("active", "paused"):
                active = self.scheduler.activate(row.sweep(), row.created, self.store.tasks_in_state(row.name, "queued"))
                active.paused = row.state == "paused"
                active.held.update(self.store.tasks_in_state(row.name, "paused"))
        now = time.time()
        # Slaves get one liveness period (plus grace) to come back and claim what they hold.
        reclaim = now + self._liveness_window() * 2
        for t in self.store.running_tickets():
            self.scheduler.adopt(Ticket(t.id, t.sweep, t.task, t.slave, t.attempt, t.dispatched, reclaim))
        for name in list(self.scheduler.active):
            self._finish_if_done(name)
        self.store.commit()

    def _liveness_window(self) -> float:
        return self.config.heartbeat_interval * self.config.liveness

    # -- public API (also reached through CONTROL messages) ------------------------
    def submit(self, sweep: Sweep) -> str:
        """Add a sweep, or resume the one of the same name; returns "submitted", "running" or "finished"."""
        row = self.store.sweep(sweep.name)
        if row is not None:
            if row.digest != sweep.digest():
                raise SweepExists(f"sweep {sweep.name!r} already exists with a different spec; rename it to start anew")
            return "finished" if row.state in ("finished", "cancelled") else "running"
        self.store.add_sweep(sweep)
        self.scheduler.activate(sweep, time.time(), list(range(len(sweep.params))))
        self.store.commit()
        log.info("sweep_submitted", sweep=sweep.name, tasks=len(sweep.params))
        self._dispatch_hungry()
        return "submitted"

    def cancel(self, name: str) -> bool:
        """Cancel a sweep: queued tasks dropped, running tickets killed on their slaves."""
        active = self.scheduler.active.get(name)
        if active is None:
            return False
        active.queued.clear()
        for ticket in [t for t in self.scheduler.tickets.values() if t.sweep == name]:
            self._cancel_ticket(ticket, "sweep cancelled")
        self.store.cancel_tasks(name)
        self.store.set_sweep_state(name, "cancelled")
        self.scheduler.deactivate(name)
        return True

    def stop(self) -> None:
        self._stopping = True

    def sweep_done(self, name: str) -> bool:
        row = self.store.sweep(name)
        return row is not None and row.state in ("finished", "cancelled")

    # -- event loop ---------------------------------------------------------------
    def serve(self, until: Callable[[], bool] | None = None, tick: Callable[[], None] | None = None) -> None:
        """Run until stop() (or until `until()` is true); `tick` is called about every heartbeat/4."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.validator.wake_r, zmq.POLLIN)
        next_tick = 0.0
        while not self._stopping and not (until and until()):
            if poller.poll(self._poll_timeout_ms()):
                self._drain()
                self.validator.pump()
            now = time.time()
            self._expire_tickets(now)
            if now >= self._next_housekeeping:
                self._housekeeping(now)
            if self.keyring is not None and now >= self._next_key_check:
                self._check_keys(now)
            if self._commit_due():
                self._commit_and_ack()
            if tick and now >= next_tick:
                tick()
                next_tick = now + self.config.heartbeat_interval / 4

    def _drain(self) -> None:
        self._pass_started = time.time()
        for _ in range(DRAIN_LIMIT):
            try:
                frames = self._recv()
            except zmq.Again:
                if self.python.pending:
                    # A client is blocked on these results: commit now that the queue is empty.
                    self._commit_and_ack()
                return
            self.handle(frames)
            if self._commit_due():
                self._commit_and_ack()

    def _recv(self) -> list[bytes]:
        """One message, routing id first (insecure: every peer is trusted)."""
        return self.socket.recv_multipart(zmq.NOBLOCK, copy=True)

    def _recv_authenticated(self) -> list[bytes]:
        """One message; sets self._peer to the sender's authorised key (None: revoked since it connected)."""
        first = self.socket.recv(zmq.NOBLOCK, copy=False)
        try:
            user = first.get("User-Id")
        except zmq.ZMQError:  # inproc: the master's own HTTP threads, no CURVE there
            self._peer = LOCAL_PEER
        else:
            self._peer = self.keyring.lookup(user.encode()) if user else None  # type: ignore[union-attr]
        if not first.more:
            return [first.bytes]
        return [first.bytes, *self.socket.recv_multipart()]

    def _commit_due(self) -> bool:
        """Group commit: one commit per `commit_interval` (or per 512 results), not one per message."""
        if not self.store.dirty:
            return False
        return (time.monotonic() - self.store.txn_started >= self.config.commit_interval
                or sum(len(v) for v in self.pending_acks.values()) >= 512)

    def _poll_timeout_ms(self) -> int:
        timeout = self.config.heartbeat_interval / 4
        if self.store.dirty:
            timeout = min(timeout, self.store.txn_started + self.config.commit_interval - time.monotonic())
        return max(1, int(timeout * 1000))

    def handle(self, frames: list[bytes]) -> None:
        """Decode and route one message; anything malformed is logged and dropped."""
        if len(frames) < 2:
            log.warning("dropped_message", reason="no routing id")
            return
        identity = frames[0]
        try:
            framed = protocol.decode(frames[1:])
            handler = self._handlers.get(framed.command)
            if handler is None:
                raise ProtocolError(f"{framed.command.name} is not a command a master accepts")
            msg = messages.parse(framed)
            if self._peer is not LOCAL_PEER and not self._permitted(identity, msg):
                return
            session = self.sessions.get(identity)
            if session is not None:
                session.expiry = time.time() + self._liveness_window()
            elif msg.COMMAND not in (Command.HELLO, Command.CONTROL, Command.DISCONNECT):
                # A slave the master does not know (e.g. after a master restart): it must say hello again.
                self._send(identity, messages.Disconnect(messages.UNKNOWN_PEER, "unknown slave: send HELLO",
                                                         reconnect=True))
                return
            handler(identity, msg)
        except ProtocolError as exc:
            log.warning("dropped_message", peer=identity.hex(), reason=str(exc))
        except Exception:  # noqa: BLE001 - one bad message must never take the master down
            log.exception("message_handler_failed", peer=identity.hex())

    def _permitted(self, identity: bytes, msg: messages.AnyMessage) -> bool:
        """Roles: a client key may send CONTROL, a slave key may register as a slave; a revoked key nothing."""
        peer = self._peer
        if peer is None:
            session = self.sessions.get(identity)
            if session is not None:
                self._revoke_session(session)
            elif identity not in self._refused_peers:
                self._refused_peers.add(identity)
                log.warning("revoked_key_refused", peer=identity.hex(), command=msg.COMMAND.name)
            return False
        if isinstance(msg, messages.Control) and peer.role != keys.CLIENT and msg.op != "ping":
            log.warning("control_refused", peer=identity.hex(), key_name=peer.name, op=msg.op)
            self._send(identity, messages.Reply(False, {"code": "forbidden",
                                                        "error": "control operations need an authorised client key"},
                                                msg.rid))
            return False
        if isinstance(msg, messages.Hello) and peer.role != keys.SLAVE:
            self._send(identity, messages.Disconnect(messages.REFUSED, "this key is not a slave key"))
            log.warning("slave_refused", peer=identity.hex(), key_name=peer.name, reason="not a slave key")
            return False
        return True

    def _check_keys(self, now: float) -> None:
        """Reload the authorised keys when they changed; slaves whose key was revoked are dropped."""
        self._next_key_check = now + self.config.keys_reload_interval
        if self.keyring is None or not self.keyring.refresh():
            return
        self._refused_peers.clear()
        for session in list(self.sessions.values()):
            if session.key and self.keyring.lookup(session.key) is None:
                self._revoke_session(session)

    def _revoke_session(self, session: SlaveSession) -> None:
        log.warning("slave_revoked", slave=session.name, peer=session.identity.hex())
        self._send(session.identity, messages.Disconnect(messages.REVOKED, "key revoked"))
        self._drop_session(session, reason="key revoked", lose_tickets=True)

    def _send(self, identity: bytes, msg: messages.AnyMessage) -> None:
        try:
            self.socket.send_multipart([identity, *msg.encode()], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("send_failed", peer=identity.hex(), command=msg.COMMAND.name, error=str(exc))
        session = self.sessions.get(identity)
        if session is not None:
            session.last_sent = time.time()

    def _commit_and_ack(self) -> None:
        self.events.flush(self.store)
        if not self.store.dirty:
            return
        self.store.commit()
        acks, self.pending_acks = self.pending_acks, {}
        for identity, tickets in acks.items():
            self._send(identity, messages.Ack(tickets))
        self.python.after_commit()

    # -- slaves: hello, liveness, goodbye ------------------------------------------
    def on_hello(self, identity: bytes, msg: messages.Hello) -> None:
        if msg.protocol != protocol.VERSION:
            self._send(identity, messages.Disconnect(messages.PROTOCOL_VERSION, f"protocol version {msg.protocol} "
                                                     f"not supported, master speaks {protocol.VERSION}"))
            log.warning("slave_refused", peer=identity.hex(), reason="protocol version", version=msg.protocol)
            return
        name, slots = msg.name, msg.slots
        peer = self._peer
        if peer is not None and peer is not LOCAL_PEER and not peer.may_be_slave(name):
            self._send(identity, messages.Disconnect(messages.REFUSED, f"key {peer.name!r} may not act as slave "
                                                                       f"{name!r}"))
            log.warning("slave_refused", peer=identity.hex(), slave=name, key_name=peer.name,
                        reason="name not allowed for this key")
            return
        held = {*msg.running, *msg.held}
        old = self.by_name.get(name)
        if old is not None and old.identity != identity:
            self._drop_session(old, reason="replaced by a new connection", lose_tickets=False)
        now = time.time()
        session = SlaveSession(identity, name, msg.platform, slots, msg.version, now + self._liveness_window())
        if peer is not None and peer is not LOCAL_PEER:
            session.key = peer.key
        self.sessions[identity] = session
        self.by_name[name] = session
        self.placement.on_hello(session, msg)
        self.store.slave_seen(name, session.platform, slots, session.version,
                              "draining" if name in self.draining else "alive")
        # Tickets the master thinks this slave holds but the slave does not know are lost.
        for ticket in self.scheduler.tickets_of(name):
            if ticket.id not in held:
                self._lose_ticket(ticket, f"slave {name} restarted without it")
            else:
                self.scheduler.extend(ticket, now)
        self._send(identity, messages.Welcome(self.config.heartbeat_interval, self.config.liveness, self.epoch,
                                              self.housekeeping.slave_policy()))
        log.info("slave_joined", slave=name, platform=session.platform, slots=slots, held=len(held))

    def on_disconnect(self, identity: bytes, msg: messages.Disconnect) -> None:
        session = self.sessions.get(identity)
        if session is not None:
            self._drop_session(session, reason=msg.reason or "slave said goodbye", lose_tickets=True)

    def on_heartbeat(self, identity: bytes, msg: messages.Heartbeat) -> None:
        session = self.sessions[identity]
        now = time.time()
        for tid in msg.waiting:
            ticket = self.scheduler.tickets.get(tid)
            if ticket is not None and ticket.slave == session.name:
                self.scheduler.extend(ticket, now)
        info = msg.info()
        session.info = info
        if now - session.info_saved > 5 * self.config.heartbeat_interval:
            session.info_saved = now
            self.store.slave_state(session.name, "draining" if session.name in self.draining else "alive", info)
        session.last_heartbeat = now

    def _drop_session(self, session: SlaveSession, reason: str, lose_tickets: bool) -> None:
        self.sessions.pop(session.identity, None)
        self.hungry.pop(session.identity, None)
        if self.by_name.get(session.name) is session:
            del self.by_name[session.name]
            self.store.slave_state(session.name, "gone")
        for tid in [t for t, tr in self.transfers.items() if tr.identity == session.identity]:
            self._abort_transfer(tid)
        if lose_tickets and session.name not in self.by_name:
            for ticket in self.scheduler.tickets_of(session.name):
                self._lose_ticket(ticket, f"lost: slave {session.name} {reason}")
        log.info("slave_left", slave=session.name, reason=reason)

    def _housekeeping(self, now: float) -> None:
        """Purge dead slaves, reclaim orphaned tickets, send heartbeats (about 4 times per interval)."""
        self._next_housekeeping = now + self.config.heartbeat_interval / 4
        self.metrics.slaves.set(len(self.sessions))
        for session in [s for s in self.sessions.values() if s.expiry < now]:
            self.store.event("slave_dead", detail={"slave": session.name})
            self._drop_session(session, reason=f"silent for {self._liveness_window():.1f}s", lose_tickets=True)
        for session in self.sessions.values():
            if now - session.last_sent >= self.config.heartbeat_interval:
                self._send(session.identity, messages.Heartbeat())
        self.stragglers.tick(now)
        self.housekeeping.tick(now)
        if self.allocator.active:
            self.allocator.tick(now, Demand(self.scheduler.queued_by_timeout(), len(self.scheduler.tickets),
                                            {s.name: s.slots for s in self.sessions.values()}))

    def _expire_tickets(self, now: float) -> None:
        for ticket in self.scheduler.expired(now):
            if ticket.slave not in self.by_name:
                self._lose_ticket(ticket, f"lost: slave {ticket.slave} did not come back")
                continue
            self._send(self.by_name[ticket.slave].identity, messages.Cancel(ticket.id, "deadline"))
            self._fail_ticket(ticket, "timeout", "timeout (no answer before the deadline)")

    # -- dispatch -------------------------------------------------------------------
    def on_request(self, identity: bytes, msg: messages.Request) -> None:
        session = self.sessions[identity]
        session.credit += msg.credit
        self._dispatch(session, since=self._pass_started)

    def _dispatch(self, session: SlaveSession, since: float = 0.0) -> None:
        if session.name in self.draining:
            self.hungry.pop(session.identity, None)
            return
        if session.credit > 0:
            tickets = self.scheduler.next_tickets(session.name, session.credit, time.time())
            if tickets:
                session.credit -= len(tickets)
                self._send_tickets(session, tickets)
                if since:
                    self.metrics.dispatch_latency.observe(time.time() - since)
        if session.credit > 0:
            self.hungry[session.identity] = session  # nothing queued for it now: served when work appears
        else:
            self.hungry.pop(session.identity, None)

    def _dispatch_hungry(self) -> None:
        for session in list(self.hungry.values()):
            self._dispatch(session)

    def _send_tickets(self, session: SlaveSession, tickets: list[Ticket]) -> None:
        """TICKET messages for a slave: one per sweep and batch (tickets of one sweep share their static part)."""
        for sweep, group in itertools.groupby(tickets, key=lambda t: t.sweep):
            batch = list(group)
            if self.python.owns(sweep):
                tickets_out = self.python.ticket_messages(batch)
            else:
                tickets_out = [self._command_tickets(sweep, batch[i:i + TICKET_BATCH])
                               for i in range(0, len(batch), TICKET_BATCH)]
            for message in tickets_out:
                self._send(session.identity, message)
            for ticket in batch:
                self.events.dispatched(sweep, ticket.id, ticket.task, session.name)
            self.metrics.tickets_dispatched.inc(len(batch))

    def _command_tickets(self, sweep: str, batch: list[Ticket]) -> messages.Ticket:
        return messages.Ticket(self._ticket_static(sweep), [
            messages.TicketEntry(t.id, t.task, t.attempt,
                                 t.params if t.params is not None else self.store.params(sweep, t.task))
            for t in batch])

    def _ticket_static(self, name: str) -> messages.TicketSweep:
        """The part of a TICKET that is the same for every task of a sweep (built once per sweep)."""
        cached = self._ticket_headers.get(name)
        if cached is None:
            sweep = self.scheduler.active[name].sweep
            inputs, frames = [], []
            for inp in sweep.inputs:
                if inp.content is not None:
                    inputs.append(messages.InputFile(inp.name, frame=len(frames)))
                    frames.append(inp.content)
                else:
                    inputs.append(messages.InputFile(inp.name, template=inp.template))
            cached = self._ticket_headers[name] = messages.TicketSweep(
                name, sweep.timeout, sweep.results, command=sweep.command, argv=sweep.argv, env=sweep.env,
                inputs=inputs, frames=frames, **Placement.ticket_fields(sweep))
        return cached

    # -- progress ---------------------------------------------------------------------
    def on_progress(self, identity: bytes, msg: messages.Progress) -> None:
        tid = msg.ticket
        ticket = self.scheduler.tickets.get(tid)
        if ticket is None or ticket.slave != self.sessions[identity].name:
            return
        buf = self.progress.setdefault(tid, bytearray())
        buf += msg.data
        if len(buf) > self.config.progress_bytes:
            del buf[: len(buf) - self.config.progress_bytes]

    # -- results ------------------------------------------------------------------------
    def on_failure(self, identity: bytes, msg: messages.Failure) -> None:
        session = self.sessions[identity]
        tid, reason, exit_code, elapsed = msg.ticket, msg.reason, msg.exit_code, msg.elapsed
        ticket = self.scheduler.tickets.get(tid)
        if ticket is not None and ticket.slave == session.name:
            state = "timeout" if reason.startswith("timeout") else "failed"
            if msg.handback:  # never started: its slave's batch allocation is ending
                state = "returned"
                self.store.refund_attempt(ticket.sweep, ticket.task)
            self._fail_ticket(ticket, state, reason, exit_code, elapsed)
        elif self.store.ticket(tid) is None:
            log.warning("foreign_ticket", slave=session.name, ticket=tid, command="FAILURE")
        self.pending_acks.setdefault(identity, []).append(tid)

    def on_result(self, identity: bytes, msg: messages.Result) -> None:
        """A batch of finished tickets; an entry with a refused output name is dropped, the others are taken."""
        for entry in msg.results:
            try:
                self._take_result(identity, entry)
            except ProtocolError as exc:
                log.warning("dropped_message", peer=identity.hex(), reason=str(exc))

    def _take_result(self, identity: bytes, entry: messages.ResultEntry) -> None:
        session = self.sessions[identity]
        tid = entry.ticket
        if tid in self.transfers:
            return  # already being fetched (the slave re-sent it after a reconnect)
        row = self.scheduler.tickets.get(tid) or self.store.ticket(tid)
        if row is None or row.slave != session.name:
            log.warning("foreign_ticket", slave=session.name, ticket=tid, command="RESULT")
            self.pending_acks.setdefault(identity, []).append(tid)  # the slave may forget it: it can never count
            return
        # A ticket still in flight belongs to an unsettled task; only late answers need the store's word.
        if tid not in self.scheduler.tickets and self._task_state(row.sweep, row.task) in FINAL_TASK_STATES:
            self._duplicate_result(identity, tid, row.sweep, row.task)
            return
        outputs, files = self._parse_outputs(entry, row.sweep, tid)
        transfer = Transfer(tid, row.sweep, row.task, identity, entry.exit_code, entry.elapsed, outputs, files)
        if files:
            self.transfers[tid] = transfer
            for f in files.values():
                self._request_chunks(transfer, f)
        else:
            self._accept(transfer)

    def _task_state(self, sweep: str, task: int) -> str:
        return self.store.db.execute("SELECT state FROM tasks WHERE sweep = ? AND idx = ?", (sweep, task)).fetchone()[0]

    def _duplicate_result(self, identity: bytes, tid: int, sweep: str, task: int) -> None:
        log.info("duplicate_result", ticket=tid, sweep=sweep, task=task)
        ticket = self.scheduler.tickets.get(tid)
        if ticket is not None:
            self.scheduler.settle_cancelled(ticket, "duplicate: task already settled")
        self.pending_acks.setdefault(identity, []).append(tid)

    def _parse_outputs(self, entry: messages.ResultEntry, sweep: str,
                       tid: int) -> tuple[list[StoredOutput], dict[str, IncomingFile]]:
        result_names = self.scheduler.active[sweep].sweep.results if sweep in self.scheduler.active else {}
        outputs: list[StoredOutput] = []
        files: dict[str, IncomingFile] = {}
        for out in entry.outputs:
            name = out.name
            check_output_name(name, result_names)
            if out.data is not None:
                outputs.append(StoredOutput(name, out.size, out.data, None))
            else:
                files[name] = IncomingFile(name, out.size, self.incoming_dir / str(tid) / name)
        return outputs, files

    def _request_chunks(self, transfer: Transfer, f: IncomingFile) -> None:
        while f.requested < f.size and f.requested - f.received < FETCH_WINDOW * protocol.CHUNK_SIZE:
            length = min(protocol.CHUNK_SIZE, f.size - f.requested)
            self._send(transfer.identity, messages.Fetch(transfer.ticket_id, f.name, f.requested, length))
            f.requested += length
        if f.size == 0:
            f.path.parent.mkdir(parents=True, exist_ok=True)
            f.path.touch()
            self._file_complete(transfer)

    def on_chunk(self, identity: bytes, msg: messages.Chunk) -> None:
        tid = msg.ticket
        transfer = self.transfers.get(tid)
        if transfer is None or transfer.identity != identity:
            return  # a chunk for a transfer that was aborted; harmless
        name, offset, data = msg.name, msg.offset, msg.data
        f = transfer.files.get(name)
        if f is None or offset != f.received:
            self._abort_transfer(tid)
            raise ProtocolError(f"CHUNK: unexpected chunk {name!r}@{offset} for ticket {tid}")
        if f.received + len(data) > f.size:
            self._abort_transfer(tid)
            raise ProtocolError(f"CHUNK: {name!r} longer than its declared size")
        f.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f.path, "r+b" if offset else "wb") as fh:
            fh.seek(offset)
            fh.write(data)
        f.received += len(data)
        if f.received == f.size:
            self._file_complete(transfer)
        else:
            self._request_chunks(transfer, f)

    def _file_complete(self, transfer: Transfer) -> None:
        if all(f.received == f.size for f in transfer.files.values()):
            del self.transfers[transfer.ticket_id]
            self._accept(transfer)

    def _abort_transfer(self, tid: int) -> None:
        self.transfers.pop(tid, None)
        shutil.rmtree(self.incoming_dir / str(tid), ignore_errors=True)

    def _accept(self, transfer: Transfer) -> None:
        """Store a complete result as the task's one result; cancel any other copies still running."""
        sweep, task, tid = transfer.sweep, transfer.task, transfer.ticket_id
        if tid not in self.scheduler.tickets and self._task_state(sweep, task) in ("done", "cancelled"):
            shutil.rmtree(self.incoming_dir / str(tid), ignore_errors=True)
            self._duplicate_result(transfer.identity, tid, sweep, task)
            return
        if self.validator.intercept(transfer):
            return  # back here from Validator.pump() once accepted
        outputs = list(transfer.outputs)
        for f in transfer.files.values():
            final = self.results_dir / sweep / str(task) / f.name
            final.parent.mkdir(parents=True, exist_ok=True)
            f.path.replace(final)
            outputs.append(StoredOutput(f.name, f.size, None, str(final.relative_to(self.state_dir))))
        if transfer.files:  # only fetched outputs ever had an incoming dir
            shutil.rmtree(self.incoming_dir / str(tid), ignore_errors=True)
        self.store.complete_task(sweep, task, tid, outputs)
        self.events.done(sweep, task)
        self.metrics.tickets_finished.labels("done").inc()
        self.python.settled(sweep, task, "done", outputs)
        ticket = self.scheduler.tickets.get(tid)
        if ticket is not None:
            self.scheduler.settle_success(ticket, transfer.elapsed, transfer.exit_code)
        else:
            # A late answer from a slave given up on: still the first valid result for this task.
            self.store.finish_ticket(tid, "done", exit_code=transfer.exit_code, elapsed=transfer.elapsed)
            self._unqueue(sweep, task)
        self.progress.pop(tid, None)
        for other in self.scheduler.siblings(sweep, task):
            self._cancel_ticket(other, "another copy finished first")
        self.pending_acks.setdefault(transfer.identity, []).append(tid)
        self._finish_if_done(sweep)

    def _unqueue(self, sweep: str, task: int) -> None:
        active = self.scheduler.active.get(sweep)
        if active is not None and task in active.queued:
            active.queued.remove(task)

    # -- failures, losses, cancellations -------------------------------------------------
    def _fail_ticket(self, ticket: Ticket, state: str, reason: str,
                     exit_code: int | None = None, elapsed: float | None = None) -> None:
        self.progress.pop(ticket.id, None)
        outcome = self.scheduler.settle_failure(ticket, state, reason, exit_code, elapsed)
        self.metrics.tickets_finished.labels(state).inc()
        if outcome == "queued":
            self.metrics.reassignments.inc()
            self._dispatch_hungry()
        elif outcome == "failed":
            self.python.settled(ticket.sweep, ticket.task, "failed")
        self._finish_if_done(ticket.sweep)

    def _lose_ticket(self, ticket: Ticket, reason: str) -> None:
        log.info("ticket_lost", ticket=ticket.id, slave=ticket.slave, reason=reason)
        self._fail_ticket(ticket, "lost", reason)

    def _cancel_ticket(self, ticket: Ticket, reason: str) -> None:
        session = self.by_name.get(ticket.slave)
        if session is not None:
            self._send(session.identity, messages.Cancel(ticket.id, reason))
        self.progress.pop(ticket.id, None)
        self.scheduler.settle_cancelled(ticket, reason)
        self.metrics.tickets_finished.labels("cancelled").inc()

    def _finish_if_done(self, name: str) -> None:
        if self.scheduler.is_finished(name):
            self.events.flush(self.store)  # a sweep's last tasks_done comes before its sweep_finished
            self.store.set_sweep_state(name, "finished")
            self.scheduler.deactivate(name)
            self._ticket_headers.pop(name, None)
            log.info("sweep_finished", sweep=name)

    # -- control ----------------------------------------------------------------------------
    def on_control(self, identity: bytes, msg: messages.Control) -> None:
        op = msg.op
        payload: list[bytes] = []
        try:
            if op.startswith("py_"):
                reply, payload = self.python.control(identity, msg)
            elif op == "submit":
                reply = ops.submit(self, msg.fields)
            elif op == "cancel":
                reply = {"ok": self.cancel(msg.args().text("sweep"))}
            elif op == "progress":
                buf = self.progress.get(msg.args().count("ticket"), b"")
                reply = {"ok": True, "output": bytes(buf).decode(errors="replace")}
            elif op == "status":
                reply = {"ok": True, "sweeps": [asdict(s) for s in all_sweep_stats(self.store)]}
            elif op == "report":
                reply = {"ok": True, "report": format_report(self.store)}
            elif op == "ping":
                reply = {"ok": True, "epoch": self.epoch, "slaves": len(self.sessions)}
            elif op in ops.OPS:
                reply = ops.OPS[op](self, msg.fields)
            else:
                reply = {"ok": False, "error": f"unknown control op {op!r}"}
        except (ConfigError, KeyError, TypeError, ValueError, OSError) as exc:
            reply = {"ok": False, "error": str(exc)}
        ok = bool(reply.pop("ok", False))
        # Read-your-writes: whoever asked reads the store next (HTTP, CLI), so commit before answering.
        self._commit_and_ack()
        # A client with several requests in flight matches replies by its request id.
        self._send(identity, messages.Reply(ok, reply, msg.rid, payload))

    # -- shutdown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Commit, tell slaves the master is going away, close the socket and the store."""
        if self.http is not None:
            self.http.stop()
        self.callbacks.stop()
        self.validator.close()
        self.allocator.close()
        for session in list(self.sessions.values()):
            self.store.slave_state(session.name, "gone")
        self._commit_and_ack()
        for session in list(self.sessions.values()):
            self._send(session.identity, messages.Disconnect(messages.SHUTDOWN, "master shutting down"))
        self.socket.close(linger=500)
        if self.zap is not None:
            self.zap.stop()
        if self._own_context:
            self.context.destroy(linger=0)
        self.store.close()


def check_output_name(name: str, result_names: dict[str, str]) -> None:
    """An output is `result` or `result/relative/path` (for globs); nothing may escape its folder."""
    head = name.partition("/")[0]
    if result_names and head not in result_names:
        raise ProtocolError(f"RESULT: {name!r} is not a result of this sweep")
    if any(p in ("", ".", "..") for p in name.split("/")) or "\\" in name or "\x00" in name:
        raise ProtocolError(f"RESULT: unsafe output name {name!r}")

