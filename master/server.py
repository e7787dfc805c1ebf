"""The master process: wires its owners together, runs the poll loop and the group commit (commit, then ACK)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import structlog
import zmq

from master.allocation import Allocator, Demand
from master.callbacks import CallbackSender
from master.config import MasterConfig, master_config_path
from master.control import Control
from master.dispatch import Dispatch
from master.events import EventBatch
from master.housekeeping import Housekeeping
from master.intake import Intake, Transfer
from master.lifecycle import Lifecycle, LifecycleHooks
from master.link import Link
from master.metrics import Metrics
from master.peerlog import ConnectionWatch, PeerLog
from master.placement import Placement, Runnability
from master.pysweep import PythonSweeps
from master.relay import Relay
from master.roster import Roster
from master.sandbox import Staging
from master.scheduler import Scheduler
from master.sessions import LOCAL_PEER, Sessions
from master.startup import StateLock, bind_failed
from master.store import Store
from master.stragglers import Stragglers
from master.validate import Validator
from master.web.supervisor import WebProcess
from ticketfarm import keys, messages, protocol
from ticketfarm.errors import ConfigError, KeyFileError, ProtocolError
from ticketfarm.keys import KeyRing, Peer, ZapHandler
from ticketfarm.protocol import Command
from ticketfarm.spec import Sweep

log = structlog.get_logger("ticketfarm.master")

#: Messages handled between two group commits at most.
DRAIN_LIMIT = 2000
#: ACKs waiting for a commit that make it due at once.
ACK_LIMIT = 512
#: Seconds the loop polls for at most while a commit runs in the background (it takes about a millisecond).
COMMIT_POLL = 0.001
#: Connections the kernel queues before the master accepts them (ZeroMQ's default is 100): a join storm of
#: 10,000 slaves otherwise has most connects dropped and retried for minutes. Linux caps it at somaxconn.
LISTEN_BACKLOG = 4096

#: The socket's own recv, without pyzmq's Python wrapper (as master/link.py sends: the wrapper costs more than the call).
_recv_frame = zmq.backend.Socket.recv
_NOBLOCK = int(zmq.NOBLOCK)

#: An owner's handler of one command: (sender's routing id, the decoded message of that command's class).
Handler = Callable[[bytes, Any], None]


class Master:
    """Owns the socket and the store; `serve()` runs the event loop and hands each message to its owner."""

    def __init__(self, config: MasterConfig, state_dir: Path, context: zmq.Context | None = None):
        self.config = config
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_lock = StateLock(self.state_dir)  # before anything in the state dir is touched
        self.store = Store(self.state_dir / "state.db", config.durability)
        self.epoch = self.store.next_epoch()
        self.started = time.time()
        self._stopping = False
        self._next_housekeeping = 0.0
        #: The ACKs of the commit in the background, sent when it has ended.
        self._acks_committing: dict[bytes, list[int]] = {}
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.keyring, self.zap = self._security()
        self._peer: Peer | None = LOCAL_PEER
        self.socket = self._bind()
        #: The endpoint slaves and clients connect to (the bound one, with a picked port filled in).
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.state_lock.record(self.endpoint)
        self.peer_log = PeerLog(window=10 * config.heartbeat_interval)
        # Only CURVE traffic is watched: the descriptor of a message is read where its key is (_recv_authenticated).
        self.connections = (None if self.keyring is None
                            else ConnectionWatch(self.socket, self.peer_log, config.max_message_size))
        self.inproc_endpoint = f"inproc://ticketfarm-master-{id(self):x}"
        self.socket.bind(self.inproc_endpoint)
        self._wire()
        self.lifecycle.resume(time.time() + self.sessions.window * 2)  # slaves get a liveness period to come back
        self.http: WebProcess | None = None
        if config.http_bind:
            # HTTP API: a process of its own (master/web/) that reads the store and sends CONTROL here as a client.
            self.http = WebProcess(config, self.state_dir, self.endpoint, self.epoch, self.started)
        if config.http_bind or self.store.has_callbacks():
            self.callbacks.ensure_started()

    def _wire(self) -> None:
        """The owners, each given only what it needs; the lifecycle's hooks tell the others what settled."""
        config, store = self.config, self.store
        self.events = EventBatch()
        self.metrics = Metrics()
        self.callbacks = CallbackSender(store.path, store.last_event_id(), config.callback_attempts,
                                        config.callback_backoff)
        self.roster = roster = Roster()
        self.link = link = Link(self.socket, roster)
        scheduler = Scheduler(self.epoch, config.deadline_grace)
        self.lifecycle = lifecycle = Lifecycle(store, scheduler, link, roster, self.events, self.metrics)
        placement = Placement(roster, scheduler, link, store)
        self.python = PythonSweeps(lifecycle, link, store, self.state_dir, self.epoch, self.commit_and_ack,
                                   config.max_message_size)
        staging = Staging(self.state_dir, config.sandbox_task_bytes)
        self.dispatch = dispatch = Dispatch(lifecycle, roster, link, store, self.events, self.metrics, self.python,
                                            staging)
        self.relay = Relay(lifecycle, roster, link, staging, config.relay_timeout, config.relay_channels)
        self.validator: Validator[Transfer] = Validator(config.validate_workers)
        self.intake = intake = Intake(lifecycle, roster, link, store, self.state_dir, self.validator,
                                      config.progress_bytes, self.peer_log, self.metrics)
        self.housekeeping = Housekeeping(config, store, self.state_dir, link, scheduler, dispatch, intake,
                                         self.commit_and_ack)
        self.sessions = Sessions(config, self.epoch, roster, link, lifecycle, store, self.keyring,
                                 self.housekeeping.slave_policy())
        self.sessions.joined.append(placement.on_hello)
        self.sessions.left += [dispatch.forget, intake.session_left, self.relay.slave_left]
        self.stragglers = Stragglers(lifecycle, dispatch, roster, store, config.heartbeat_interval)
        self.runnability = Runnability(placement, lifecycle, config.unrunnable_grace, config.heartbeat_interval,
                                       lambda: self.allocator.active)
        self.sessions.joined.append(self.runnability.slaves_changed)
        self.sessions.left.append(self.runnability.slaves_changed)
        self.control = Control(epoch=self.epoch, state_dir=self.state_dir, callback_secret=config.callback_secret,
                               store=store, lifecycle=lifecycle, roster=roster, dispatch=dispatch, intake=intake,
                               python=self.python, housekeeping=self.housekeeping, callbacks=self.callbacks,
                               link=link, commit=self.commit_and_ack, liveness_window=self.sessions.window,
                               metrics_text=self.metrics.render, stop=self.stop,
                               refusals=self.zap.refusals if self.zap is not None else list)
        self.control.later.update(self.relay.ops)
        # Slaves from a batch scheduler (issue 15): told the demand on each housekeeping tick, nothing more.
        self.allocator = Allocator.for_master(config, self.state_dir, store, self.endpoint)
        self.control.ops["alloc"] = lambda _, msg: (self.allocator.control(msg.fields), [])
        self._demand = lambda: Demand(scheduler.queued_by_timeout(), len(scheduler.tickets),
                                      {s.name: s.slots for s in roster.sessions()})
        lifecycle.hooks = LifecycleHooks(work_queued=dispatch.serve_hungry, ticket_ended=intake.ticket_ended,
                                         task_settled=self.python.settled, sweep_ended=self._sweep_ended,
                                         spec_changed=dispatch.forget_sweep)
        self._handlers: dict[Command, Handler] = {
            Command.HELLO: lambda identity, msg: self.sessions.on_hello(identity, msg, self._peer),
            Command.HEARTBEAT: self.sessions.on_heartbeat,
            Command.DISCONNECT: self.sessions.on_disconnect,
            Command.REQUEST: dispatch.on_request,
            Command.PROGRESS: intake.on_progress,
            Command.RESULT: intake.on_result,
            Command.CHUNK: intake.on_chunk,
            Command.FAILURE: intake.on_failure,
            Command.CODE_REQUEST: self.python.on_code_request,
            Command.WORKER_REQUEST: placement.on_worker_request,
            Command.CONTROL: self.control.on_control,
            Command.SANDBOX_REPLY: self.relay.on_sandbox_reply,
            Command.RELAY_REPLY: self.relay.on_relay_reply,
        }

    def _sweep_ended(self, name: str) -> None:
        """Nothing of the sweep is dispatched again: its TICKET part and its staged sandbox files go."""
        self.dispatch.forget_sweep(name)
        self.dispatch.staging.drop_sweep(name)

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
                raise ConfigError(f"{master_config_path(self.state_dir)}: field 'secret_key': no such file {secret} "
                                  "(fix the path, or remove the line to use the keys made at first start)",
                                  field="secret_key")
            for path in keys.init_state_keys(self.state_dir):
                log.info("key_created", path=str(path))
        try:
            self._public_key, self._secret_key = keys.load_keypair(secret)
        except KeyFileError as exc:
            raise ConfigError(f"{master_config_path(self.state_dir)}: field 'secret_key': {exc}",
                              field="secret_key") from None
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
        sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
        try:
            sock.bind(self.config.bind)
        except zmq.ZMQError as exc:
            sock.close()
            self.state_lock.release()
            raise bind_failed("bind", self.config.bind, exc) from None
        return sock

    # -- public API ---------------------------------------------------------------
    def submit(self, sweep: Sweep) -> str:
        """Add a sweep, or resume the one of the same name; returns "submitted", "running" or "finished"."""
        return self.lifecycle.submit(sweep)

    def stop(self) -> None:
        self._stopping = True

    def release_all(self, reason: str) -> None:
        """Give back every ticket out, none charged an attempt (the user interrupted the run); committed at close.
        Only on the way out: the tasks go back in the queue and nothing is dispatched any more."""
        self._stopping = True
        self.lifecycle.hooks.work_queued = lambda: None
        self.lifecycle.release_all(reason)

    def unrunnable(self, name: str) -> str | None:
        """Why no connected slave can run this sweep (None: some can, or it is too early to say)."""
        return self.runnability.said.get(name)

    def sweep_done(self, name: str) -> bool:
        if self.lifecycle.active(name) is not None:  # in memory: asked on every pass of a local run's loop
            return False
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
                self.intake.apply_verdicts()
            now = time.time()
            self.lifecycle.expire(now)
            if now >= self._next_housekeeping:
                self._housekeeping(now)
            self.sessions.check_keys(now)
            self._group_commit()
            if tick and now >= next_tick:
                tick()
                next_tick = now + self.config.heartbeat_interval / 4

    def _drain(self) -> None:
        self.dispatch.pass_started = time.time()
        for _ in range(DRAIN_LIMIT):
            try:
                frames = self._recv()
            except zmq.Again:
                if self.python.pending:
                    # A client is blocked on these results: commit now that the queue is empty.
                    self.commit_and_ack()
                return
            self.handle(frames)
            self._group_commit()

    def _recv(self) -> list[bytes]:
        """One message, routing id first (insecure: every peer is trusted)."""
        return _frames(self.socket, _recv_frame(self.socket, _NOBLOCK, False))

    def _recv_authenticated(self) -> list[bytes]:
        """One message; sets self._peer to the sender's authorised key (None: revoked since it connected)."""
        first = _recv_frame(self.socket, _NOBLOCK, False)
        try:
            user = first.get("User-Id")
        except zmq.ZMQError:  # inproc: an in-process client (no CURVE there)
            self._peer = LOCAL_PEER
        else:
            self._peer = self.keyring.lookup(user.encode()) if user else None  # type: ignore[union-attr]
            self.connections.delivered.add(first.get(zmq.SRCFD))  # type: ignore[union-attr]
        return _frames(self.socket, first)

    def _housekeeping(self, now: float) -> None:
        """Purge dead slaves, send heartbeats, duplicate stragglers, chores (about 4 times per interval)."""
        self._next_housekeeping = now + self.config.heartbeat_interval / 4
        self.metrics.slaves.set(len(self.roster))
        # A slave is silent only to a master that has read what arrived: while messages wait in the socket (a
        # join storm, a long submit), a slave's heartbeat may be among them, and it is judged at the next pass.
        if not self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.sessions.purge_dead(now)
        self.sessions.send_heartbeats(now)
        self.stragglers.tick(now)
        self.relay.expire(now)
        self.runnability.tick(now)
        self.housekeeping.tick(now)
        self.peer_log.flush()
        if self.connections is not None:
            self.connections.drain()
        if self.allocator.active:
            self.allocator.tick(now, self._demand())

    def handle(self, frames: list[bytes]) -> None:
        """Decode and route one message; anything malformed is logged and dropped."""
        if len(frames) < 2:
            self.peer_log.warn("dropped_message", "unknown", reason="no routing id")
            return
        identity = frames[0]
        try:
            framed = protocol.decode(frames[1:])
            handler = self._handlers.get(framed.command)
            if handler is None:
                raise ProtocolError(f"{framed.command.name} is not a command a master accepts")
            msg = messages.parse(framed)
            if self._peer is not LOCAL_PEER and not self.sessions.permitted(identity, msg, self._peer):
                return
            if self.sessions.heard(identity) is None \
                    and msg.COMMAND not in (Command.HELLO, Command.CONTROL, Command.DISCONNECT):
                # A slave the master does not know (e.g. after a master restart): it must say hello again.
                self.link.send(identity, messages.Disconnect(messages.UNKNOWN_PEER, "unknown slave: send HELLO",
                                                             reconnect=True))
                return
            handler(identity, msg)
        except ProtocolError as exc:
            self.peer_log.warn("dropped_message", identity.hex(), reason=str(exc))
        except Exception:  # noqa: BLE001 - one bad message must never take the master down
            log.exception("message_handler_failed", peer=identity.hex())

    # -- group commit ---------------------------------------------------------------
    def _group_commit(self) -> None:
        """The loop's commit: the ACKs of a background commit go out once it has ended, and a commit that is due
        starts in the background (the loop reads and dispatches on while SQLite syncs)."""
        if self.store.finish_commit(wait=False):
            self.link.send_acks(self._acks_committing)
            self._acks_committing = {}
        if not self._commit_due():
            return
        if self.python.pending:
            self.commit_and_ack()  # what settled is pushed to clients right after its commit: all of it, at once
            return
        self.events.flush(self.store)
        self._acks_committing = self.link.take_acks()  # exactly the results written so far: this commit's
        self.store.commit_in_background()

    def _commit_due(self) -> bool:
        """Group commit: one commit per `commit_interval` (or per ACK_LIMIT results), not one per message, and one
        at a time."""
        if not self.store.dirty or self.store.committing:
            return False
        return (time.monotonic() - self.store.txn_started >= self.config.commit_interval
                or self.link.pending_acks() >= ACK_LIMIT)

    def _poll_timeout_ms(self) -> int:
        timeout = self.config.heartbeat_interval / 4
        if self.store.committing:
            timeout = COMMIT_POLL  # its ACKs go out soon after it ends
        elif self.store.dirty:
            timeout = min(timeout, self.store.txn_started + self.config.commit_interval - time.monotonic())
        return max(1, int(timeout * 1000))

    def commit_and_ack(self) -> None:
        """Commit what the loop changed, then ACK the results it holds: nothing is acknowledged before it is durable."""
        if self.store.finish_commit(wait=True):
            self.link.send_acks(self._acks_committing)
            self._acks_committing = {}
        self.events.flush(self.store)
        if not self.store.dirty:
            return
        self.store.commit()
        self.link.send_acks()
        self.python.after_commit()

    # -- shutdown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Commit, tell slaves the master is going away, close the socket and the store."""
        if self.http is not None:
            self.http.stop()
        self.callbacks.stop()
        self.validator.close()
        self.allocator.close()
        self.sessions.goodbye()
        self.commit_and_ack()
        self.sessions.say_goodbye()
        if self.connections is not None:
            self.connections.close()
        self.socket.close(linger=500)
        if self.zap is not None:
            self.zap.stop()
        if self._own_context:
            self.context.destroy(linger=0)
        self.store.close()
        self.state_lock.release()


def _frames(socket: zmq.Socket, first: zmq.Frame) -> list[bytes]:
    """A message's frames as bytes, from its first one (each frame, received uncopied, says whether more follow)."""
    frames = [first.bytes]
    frame = first
    while frame.more:
        frame = _recv_frame(socket, 0, False)
        frames.append(frame.bytes)
    return frames
