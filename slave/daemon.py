"""The slave daemon: DEALER connection, hello/credit/heartbeat, worker slots, outbox of unacknowledged results."""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import platform
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import psutil
import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

import ticketfarm
from slave import resources
from slave.batches import CUT_AFTER, Batches, BatchedWorker, Shortness, batchable
from slave.cache import WorkerCache
from slave.config import SlaveConfig, finish, load_slave_config
from slave.pypool import PyPool, PyTask
from slave.relay import WAITING, Reach
from slave.runner import (
    MANIFEST,
    STDERR,
    STDOUT,
    Outcome,
    TicketSpec,
    Worker,
    remove_workdir,
)
from slave.watchdog import Watchdog
from slave.walltime import Walltime
from slave.workdirs import WorkDirs
from ticketfarm import messages, protocol
from ticketfarm.errors import ConfigError, KeyFileError, ProtocolError, UnsafePath
from ticketfarm.keys import ClientKeys, dealer
from ticketfarm.logs import configure_logging
from ticketfarm.protocol import Command

log = structlog.get_logger("ticketfarm.slave")

#: Results per RESULT message at most, and about this many bytes of inline outputs.
RESULT_BATCH = 256
RESULT_BYTES = 1024 * 1024
#: Progress bytes sent per ticket per heartbeat at most.
PROGRESS_CHUNK = 16 * 1024
#: Exit codes of the slave process: configuration error, and a master that speaks another protocol version.
EXIT_CONFIG = 2
EXIT_PROTOCOL_VERSION = 3


def platform_tag() -> str:
    """e.g. linux-x86_64: selects which shipped worker binaries fit this machine."""
    return f"{sys.platform}-{platform.machine().lower()}"


class Slave:
    """One slave process: runs up to `slots` workers and keeps their results until acknowledged."""

    def __init__(self, config: SlaveConfig, context: zmq.Context | None = None):
        self.config = config
        self.work_root = Path(config.work_root).resolve()
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.watchdog = Watchdog.start(self.work_root, config.keep_workdirs)
        self.context = context or zmq.Context.instance()
        self.keys = None if config.insecure else ClientKeys.load(config.master_key, config.secret_key)
        self.interval = config.heartbeat_interval
        self.liveness = config.liveness
        self.socket: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        """CURVE handshake events of `socket`: how a slave learns that the master refused its key."""
        self.welcomed = False
        self.master_expiry = 0.0
        self.last_sent = 0.0
        self.backoff = config.reconnect_min
        self.reconnect_at = 0.0
        self.outstanding = 0
        self.running: dict[int, Worker | PyTask] = {}
        """Tickets held: command workers, and python tasks (queued in the pool or running in a warm worker)."""
        self.commands = 0
        """How many of `running` are lone command workers (batches and python tasks share the slots with them)."""
        self.waiting: deque[TicketSpec] = deque()
        self.started: list[int] = []
        """Tickets started since the last REQUEST, which tells the master (till then it counts them as prefetched)."""
        self.prepared: dict[int, Worker] = {}
        """Waiting tickets whose work dir and files are ready (`_prepare_waiting`)."""
        self.outbox: dict[int, Outcome] = self._load_outbox()
        # Copied once: decoding os.environ for every ticket is a measurable share of a tiny task.
        self.base_env = {**os.environ, **self.watchdog.marker}
        self.shortness = Shortness()
        self.stuck = False
        """A slot is held by a batch cut behind a ticket that turned out long (slave/batches.py, CUT_AFTER)."""
        self.batches = Batches(self.base_env, self.shortness)
        """Runners starting several short tickets one after another, a slot each (slave/batches.py)."""
        self.last_step = 0.0
        self.confirming = False
        """Back from a freeze (SIGSTOP, a suspended VM): start no held ticket until the master has had its say."""
        self.pypool = PyPool(config.slots, self.work_root, config.name,
                             lambda digest: self.send(messages.CodeRequest(digest)),
                             lambda: 0 if self.confirming else self.config.slots - self.commands, self.watchdog)
        self.reports: list[Outcome] = []
        """Finished tickets to report at the end of this step, in one RESULT message."""
        self.sent_at: dict[int, float] = {}
        self.workdirs = WorkDirs(self.work_root, config.name)
        self.trash: list[Path] = []
        """Work dirs of acknowledged results, removed at the end of a step: never between a worker's exit and the
        next worker's start (rmdir is slow on a disk with online discard)."""
        self.stopping = False
        self.master_left = False
        self.exit_code = 0
        self.platform = config.platform or platform_tag()
        self.cpus, self.memory_mb = resources.capacity(config.cpus, config.memory_mb)
        self.cache = WorkerCache(Path(config.cache_dir).resolve() if config.cache_dir else self.work_root / ".workers",
                                 config.name, self.send,
                                 config.lock_stale)
        self.memory_watch = resources.MemoryWatch(min(config.heartbeat_interval / 2, 0.5))
        self.no_work = False
        self.walltime = Walltime(config.alloc_end, config.handback, config.idle_exit)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.reach = Reach(self._wake_w, config.relay_timeout)

    # -- outbox: finished tickets waiting for the master's ACK --------------------------
    def _load_outbox(self) -> dict[int, Outcome]:
        outbox = {}
        for manifest in self.work_root.glob(f"*/*/{MANIFEST}"):
            try:
                outcome = Outcome.load(manifest)
            except (OSError, ValueError, TypeError, KeyError):
                log.warning("bad_manifest", path=str(manifest))
                continue
            if outcome.slave == self.config.name:  # a shared work root may hold other slaves' results
                outbox[outcome.ticket] = outcome
        if outbox:
            log.info("outbox_loaded", results=len(outbox))
        return outbox

    def workdir(self, sweep: str, ticket: int) -> Path:
        return self.work_root / sweep / str(ticket)

    # -- connection ------------------------------------------------------------------
    def connect(self) -> None:
        self.socket = dealer(self.context, self.config.master, self.keys, hwm=100_000)
        if self.keys is not None:
            self.monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.welcomed = False
        self.outstanding = 0
        self.master_expiry = time.time() + self.interval * self.liveness
        self.say_hello()

    def say_hello(self) -> None:
        self.welcomed = False
        self.outstanding = 0
        self.started.clear()  # HELLO lists every ticket held; heartbeats say which of them run
        self.send(messages.Hello(
            name=self.config.name, slots=self.config.slots, platform=self.platform, cpus=self.cpus,
            memory_mb=self.memory_mb, version=ticketfarm.__version__, pid=os.getpid(),
            running=list(self.running) + [t.ticket for t in self.waiting], held=list(self.outbox)))

    def disconnect(self, backoff: bool) -> None:
        if self.monitor is not None:
            self.monitor.close(linger=0)
            self.monitor = None
        if self.socket is not None:
            self.socket.close(linger=0)
        self.socket = None
        self.welcomed = False
        if backoff:
            self.reconnect_at = time.time() + self.backoff
            log.warning("master_unreachable", retry_in=self.backoff)
            self.backoff = min(self.backoff * 2, self.config.reconnect_max)

    def send(self, msg: messages.AnyMessage) -> None:
        if self.socket is None:
            return
        try:
            self.socket.send_multipart(msg.encode(), zmq.NOBLOCK)
            self.last_sent = time.time()
        except zmq.Again:
            log.warning("send_queue_full", command=msg.COMMAND.name)

    # -- main loop ---------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        # SIGCHLD wakes the poller the moment a worker exits: no polling latency per ticket.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        log.info("slave_started", name=self.config.name, master=self.config.master, slots=self.config.slots)
        try:
            while not self.stopping:
                self.step()
        finally:
            self.shutdown()
        return self.exit_code

    def _on_term(self, *_: Any) -> None:
        self.stopping = True

    def step(self) -> None:
        if self.config.parent_pid and os.getppid() != self.config.parent_pid:
            log.warning("parent_gone", parent=self.config.parent_pid)
            self.stopping = True
            return
        now = time.time()
        self._notice_freeze()
        if self.socket is None and now >= self.reconnect_at:
            self.connect()
        poller = zmq.Poller()
        if self.socket is not None:
            poller.register(self.socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        for fd in self.pypool.fds() + self.batches.fds():
            poller.register(fd, zmq.POLLIN)
        ready = dict(poller.poll(self._poll_timeout_ms(now)))
        self._notice_freeze()  # a stop while polling: what woke us (a worker's end) must not start a held ticket
        if self._wake_r in ready:
            self._drain_wakeups()
        if self.socket is not None and self.socket in ready:
            self._drain_socket()
        self.reach.flush(self.send)
        self.pypool.pump()
        self._reap_workers()
        self._start_waiting()
        self._kill_overdue()
        self._semantics_step()
        self._allocation_step()
        if self.reports:
            self._send_reports()
        now = time.time()
        if self.socket is not None:
            if now > self.master_expiry:
                self._log_refusal()
                log.warning("master_silent", seconds=self.interval * self.liveness)
                self.disconnect(backoff=True)
            elif self.welcomed:
                self._request_work()
                self._resend_unacked(now)
                if now - self.last_sent >= self.interval:
                    self._heartbeat()
        self._prepare_waiting()
        self._empty_trash()

    def _notice_freeze(self) -> None:
        """After a gap between two steps long enough for the master to give this slave's held tickets away (its
        liveness window, or a held ticket's timeout: the deadline of a prefetched ticket), say HELLO again and
        start none of them until WELCOME: the master sends its CANCELs for what it gave away before that WELCOME,
        so a given-away ticket never starts here."""
        previous, self.last_step = self.last_step, time.monotonic()
        patience = min([self.interval * self.liveness, *(t.timeout for t in self.waiting)])
        if not previous or self.last_step - previous < max(patience, 2 * self.interval):
            return
        log.info("slave_resumed", seconds=round(self.last_step - previous, 2),
                 held=len(self.waiting) + len(self.pypool.not_started()))
        self.confirming = True
        self.welcomed = False  # nothing goes out before that HELLO
        self.master_expiry = time.time() + self.interval * self.liveness  # we were silent, not the master
        self._reap_workers()  # what ended meanwhile is told as held (to report), not as running (to cancel)
        if self.socket is not None:
            self.say_hello()

    def _log_refusal(self) -> None:
        """Say so when the master refused this slave's key (read once the master went silent: off the hot path)."""
        refusals, status = 0, None
        while self.monitor is not None:
            try:
                status = int(recv_monitor_message(self.monitor, zmq.NOBLOCK)["value"])
            except zmq.Again:
                break
            refusals += 1
        if refusals:
            log.error("master_refused_key", master=self.config.master, status=status, attempts=refusals,
                      secret_key=str(self.config.secret_key),
                      detail="the master does not accept this slave's key: authorise its public key on the master "
                             "(`ticketfarm keys add-slave NAME`, or deploy with the playbooks)")

    def _poll_timeout_ms(self, now: float) -> int:
        timeout = self.interval / 2
        if self.batches:
            timeout = min(timeout, CUT_AFTER / 2)  # a batch stuck behind a long ticket is cut in time
        if self.running:
            nearest = min(min(w.deadline for w in self.running.values()), self.pypool.next_deadline())
            timeout = min(timeout, max(nearest - time.monotonic(), 0.0))
        if self.socket is None:
            timeout = min(timeout, max(self.reconnect_at - now, 0.0))
        return max(1, int(timeout * 1000))

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _drain_socket(self) -> None:
        assert self.socket is not None
        while self.socket is not None:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.master_expiry = time.time() + self.interval * self.liveness
            try:
                self.handle(protocol.decode(frames))
            except ProtocolError as exc:
                log.warning("dropped_message", reason=str(exc))

    def handle(self, framed: protocol.Message) -> None:
        handler = self._handlers.get(framed.command)
        if handler is None:
            raise ProtocolError(f"{framed.command.name} is not a command a slave accepts")
        handler(self, messages.parse(framed))

    # -- commands from the master ----------------------------------------------------------
    def _on_welcome(self, msg: messages.Welcome) -> None:
        self.interval = float(msg.heartbeat_interval)
        self.liveness = msg.liveness
        self.master_expiry = time.time() + self.interval * self.liveness
        self.welcomed = True
        self.confirming = False
        self.backoff = self.config.reconnect_min
        log.info("connected", master=self.config.master, epoch=msg.epoch)
        policy = msg.policy
        if policy.on_no_work:
            self.config.on_no_work = policy.on_no_work
        if policy.delete_workers is not None:
            self.config.delete_workers = policy.delete_workers
        if policy.on_master_shutdown:
            self.config.on_master_shutdown = policy.on_master_shutdown
        for outcome in list(self.outbox.values()):
            self._report(outcome)
        self.pypool.request_missing()
        self.cache.reset()

    def _on_ticket(self, msg: messages.Ticket) -> None:
        specs = TicketSpec.batch(msg)
        self.outstanding = max(0, self.outstanding - len(specs))
        self.no_work = False
        for spec in specs:
            if spec.ticket in self.running or spec.ticket in self.outbox:
                continue
            if not self.walltime.fits(spec.timeout):
                self._hand_back(spec.ticket)
                continue
            if spec.kind == "python":  # the pool queues them and runs them on its warm workers
                self.running[spec.ticket] = self.pypool.start(spec)
            else:
                self.waiting.append(spec)
        self.pypool.assign()
        self._start_waiting()

    def _on_ack(self, msg: messages.Ack) -> None:
        for tid in msg.tickets:
            outcome = self.outbox.pop(tid, None)
            if outcome is not None:  # what scripts/chaos.py checks the master's store against
                log.debug("result_acknowledged", ticket=tid, ok=outcome.ok)
            self.sent_at.pop(tid, None)
            if outcome is not None and not outcome.in_memory:
                # Without its manifest a restarted slave never reports the result again: the ACK is done here.
                workdir = self.workdir(outcome.sweep, outcome.ticket)
                (workdir / MANIFEST).unlink(missing_ok=True)
                if not self.config.keep_workdirs:
                    self.trash.append(workdir)

    def _on_fetch(self, msg: messages.Fetch) -> None:
        tid, name = msg.ticket, msg.name
        outcome = self.outbox.get(tid)
        output = next((o for o in outcome.outputs if o.name == name), None) if outcome else None
        if output is None:
            raise ProtocolError(f"FETCH for unknown output {name!r} of ticket {tid}")
        with open(output.path, "rb") as fh:
            fh.seek(msg.offset)
            data = fh.read(msg.length)
        self.send(messages.Chunk(tid, name, msg.offset, data))

    def _on_cancel(self, msg: messages.Cancel) -> None:
        tid, reason = msg.ticket, msg.reason
        worker = self._forget(tid)
        if worker is not None:
            worker.kill(reason)
            if not self.config.keep_workdirs:
                remove_workdir(worker.workdir)
            log.info("ticket_cancelled", ticket=tid, reason=reason, started=True)
        elif any(t.ticket == tid for t in self.waiting):
            log.info("ticket_cancelled", ticket=tid, reason=reason, started=False)
        self.waiting = deque(t for t in self.waiting if t.ticket != tid)
        self._drop_prepared(tid)
        self.reach.forget(tid)
        for fetch in self.cache.fetches.values():
            fetch.parked = [t for t in fetch.parked if t.ticket != tid]
        outcome = self.outbox.pop(tid, None)
        if outcome is not None and not self.config.keep_workdirs:
            remove_workdir(self.workdir(outcome.sweep, tid))

    def _where(self, tid: int) -> Path | str | None:
        """A ticket's work dir for slave/relay.py: running or prepared; WAITING when only prefetched; None."""
        worker = self.running.get(tid) or self.prepared.get(tid)
        if isinstance(worker, Worker):
            return worker.workdir
        return WAITING if any(t.ticket == tid for t in self.waiting) else None

    def _on_sandbox(self, msg: messages.Sandbox) -> None:
        self.reach.sandbox(msg, self._where(msg.ticket))

    def _on_relay(self, msg: messages.Relay) -> None:
        self.reach.relay(msg, self._where(msg.ticket))

    def _on_recall(self, msg: messages.Recall) -> None:
        """Give back each of these tickets not started yet (its sweep was paused); a started one runs on."""
        for tid in msg.tickets:
            if self._unstart(tid):
                log.info("ticket_recalled", ticket=tid, reason=msg.reason)
                self.send(messages.Failure(tid, None, f"recalled: {msg.reason}", 0.0, handback=True))

    def _unstart(self, tid: int) -> bool:
        """Take a ticket that has not started out of every queue it waits in; False when it runs (or is unknown)."""
        task = self.running.get(tid)
        if isinstance(task, PyTask):
            if not self.pypool.recall(task):
                return False
            del self.running[tid]
            return True
        found = any(t.ticket == tid for t in self.waiting)
        self.waiting = deque(t for t in self.waiting if t.ticket != tid)
        self._drop_prepared(tid)
        for fetch in self.cache.fetches.values():  # waiting for its shipped worker to arrive
            found = found or any(t.ticket == tid for t in fetch.parked)
            fetch.parked = [t for t in fetch.parked if t.ticket != tid]
        return found

    def _on_disconnect(self, msg: messages.Disconnect) -> None:
        """Acts on `why`: exit (protocol version; shutdown with on_master_shutdown = "exit"), say HELLO again, or
        back off and try again later (shutdown otherwise, a revoked or refused key: an admin may fix it)."""
        if msg.why == messages.PROTOCOL_VERSION:
            log.error("master_speaks_another_protocol", reason=msg.reason)
            self.exit_code = EXIT_PROTOCOL_VERSION
            self.stopping = True
        elif msg.why == messages.SHUTDOWN and self.config.on_master_shutdown == "exit":
            log.info("master_says_goodbye", reason=msg.reason)
            self.stopping = True
            self.master_left = True
        elif msg.reconnect:
            # Not yet welcomed: our HELLO is on its way, and the other messages queued before it each drew a
            # DISCONNECT from a restarted master; answering each would replay the outbox once per message.
            if self.welcomed:
                log.info("master_asks_hello", reason=msg.reason)
                self.say_hello()
        else:
            log.info("master_ends_session", why=msg.why, reason=msg.reason)
            self.disconnect(backoff=True)

    # -- workers ------------------------------------------------------------------------------
    def _busy_slots(self) -> int:
        return self.commands + len(self.batches) + self.pypool.busy()

    def _forget(self, tid: int) -> Worker | PyTask | None:
        """Take a ticket out of `running` (finished, cancelled)."""
        worker = self.running.pop(tid, None)
        if isinstance(worker, Worker) and not isinstance(worker, BatchedWorker):
            self.commands -= 1
            self.watchdog.unwatch(worker.proc.pid)
        return worker

    def _start_waiting(self) -> None:
        self._notice_freeze()
        while self.waiting and self._busy_slots() < self.config.slots and not self.confirming:
            if not resources.fits_now(self.waiting[0].memory, self._busy_slots()):
                return  # the memory it claims is not free yet
            if self._start_batch():
                continue
            spec = self.waiting.popleft()
            if not self.walltime.fits(spec.timeout):  # it waited for a slot until the allocation grew too short
                self._drop_prepared(spec.ticket)
                self._hand_back(spec.ticket)
                continue
            worker = self.prepared.pop(spec.ticket, None) or self._prepare(spec)
            if worker is None:
                continue
            try:
                worker.start()
            except OSError as exc:
                self._fail_to_start(spec, worker.workdir, f"cannot start worker: {exc}")
                continue
            self.watchdog.watch(worker.proc.pid, worker.workdir)
            self.running[spec.ticket] = worker
            self.commands += 1
            self.started.append(spec.ticket)

    def _start_batch(self) -> bool:
        """Start the next tickets in line as one batch when their sweep's tickets are short here."""
        head = self.waiting[0]
        size = self.shortness.batch_size(head.sweep) if batchable(head) else 1
        if size < 2:
            return False
        specs = []
        while self.waiting and len(specs) < size and self.waiting[0].sweep == head.sweep \
                and self.walltime.fits(self.waiting[0].timeout):
            specs.append(self.waiting.popleft())
        if not specs:
            return False  # the head no longer fits the allocation: handed back alone
        members = []
        for spec in specs:
            self._drop_prepared(spec.ticket)  # prepared alone before its sweep proved short
            worker = self._prepare(spec, BatchedWorker)
            if worker is not None:
                members.append(worker)
        if members:
            self.batches.start(members)  # type: ignore[arg-type]
            for worker in members:  # told started when the runner starts it
                self.running[worker.spec.ticket] = worker
        return True

    def _wait_again(self, workers: list[BatchedWorker]) -> None:
        """Tickets of an ended batch its runner never started: first in line again."""
        for worker in reversed(workers):
            self._forget(worker.spec.ticket)
            self.workdirs.release(worker.workdir)
            self.waiting.appendleft(worker.spec)

    def _hand_back_surplus(self) -> None:
        """A slot is stuck behind a batch's ticket that turned out long: the tickets waiting here beyond what the
        free slots take go back to the master, to start on other slaves rather than wait behind it. While stuck the
        slave asks for no more than its free slots (`_capacity`), so a ticket handed back is not asked for again."""
        keep = max(0, self.config.slots - self._busy_slots())
        while len(self.waiting) > keep:
            spec = self.waiting.pop()
            self._drop_prepared(spec.ticket)
            log.info("ticket_handed_back", ticket=spec.ticket, reason="more than this slave should hold")
            self.send(messages.Failure(spec.ticket, None, "handed back: this slave holds enough", 0.0,
                                       handback=True))

    def _capacity(self) -> int:
        """Units of credit to hold: a slot's each and the prefetch; only a slot's each while a slot is stuck behind a
        long ticket of a batch. (For a short sweep the master sends a bundle of tickets per unit.)"""
        return self.config.slots + (0 if self.stuck else self.config.prefetch)

    def _waiting_units(self) -> int:
        """The waiting tickets as units of credit: a short sweep's by the batch, others one each."""
        counts = collections.Counter(spec.sweep for spec in self.waiting)
        return sum(-(-n // self.shortness.batch_size(sweep)) for sweep, n in counts.items())

    def _held_slots(self) -> int:
        """The tickets held in slots: running alone or in the pool, and a batch counted once."""
        batched = sum(isinstance(w, BatchedWorker) for w in self.running.values())
        return len(self.running) - batched + len(self.batches)

    def _prepare(self, spec: TicketSpec, kind: type[Worker] = Worker) -> Worker | None:
        """The ticket's work dir, inputs and output files, ready to start; None when its shipped worker is being
        fetched (parked) or it failed (reported)."""
        workdir = self.workdir(spec.sweep, spec.ticket)
        if spec.workers and not spec.worker and not self._resolve_worker(spec, workdir):
            return None
        try:
            self.workdirs.make(workdir)
            self.reach.place(spec.ticket, workdir)  # uploads a prefetched ticket got; its inputs go over them
            return kind(spec, workdir, self.config.name, self.base_env)
        except (OSError, UnsafePath, KeyError, IndexError) as exc:
            self._fail_to_start(spec, workdir, f"cannot start worker: {exc}")
            return None

    def _prepare_waiting(self) -> None:
        """Prepare the tickets next in line while the slots are busy: a slot that frees up only spawns a process."""
        for spec in list(itertools.islice(self.waiting, self.config.slots)):
            if spec.ticket in self.prepared or (spec.workers and not spec.worker):
                continue  # a shipped worker is resolved when the ticket starts: it may have to be fetched first
            if batchable(spec) and self.shortness.batch_size(spec.sweep) > 1:
                continue  # its batch prepares it
            worker = self._prepare(spec)
            if worker is None:
                self.waiting.remove(spec)
            else:
                self.prepared[spec.ticket] = worker

    def _drop_prepared(self, tid: int) -> None:
        worker = self.prepared.pop(tid, None)
        if worker is not None:
            worker.files.close()
            if not self.config.keep_workdirs:
                remove_workdir(worker.workdir)

    # -- shipped workers, memory limits, end of work (issue 6) -----------------------------------------
    def _resolve_worker(self, spec: TicketSpec, workdir: Path) -> bool:
        """Point the ticket at its cached worker; False when it was parked (fetching) or failed."""
        entry = (spec.workers or {}).get(self.platform)
        try:
            path = None if entry is None else self.cache.resolve(entry, spec)
        except (OSError, ValueError, KeyError) as exc:
            self._fail_to_start(spec, workdir, f"cannot start worker: {exc}")
            return False
        if entry is None:
            self._fail_to_start(spec, workdir, f"cannot start worker: none shipped for platform {self.platform}")
            return False
        if path is None:
            return False
        spec.worker = str(path)
        return True

    def _fail_to_start(self, spec: TicketSpec, workdir: Path, reason: str) -> None:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # a full or broken disk: the outcome is then kept in memory only (Outcome.save)
        outcome = Outcome(spec.ticket, spec.sweep, spec.task, False, None, 0.0, reason, slave=self.config.name)
        outcome.save(workdir)
        self._finished(outcome)

    def _on_worker_chunk(self, msg: messages.Worker) -> None:
        ready, failed, reason = self.cache.on_chunk(msg)
        self._unpark(ready, failed, reason)

    def _on_code(self, msg: messages.Code) -> None:
        self.pypool.on_code(msg.hash, msg.body, msg.error)

    def _on_refused(self, msg: messages.Refused) -> None:
        log.warning("sweep_refused", sweep=msg.sweep, reason=msg.reason)

    def _on_no_work(self, msg: messages.NoWork) -> None:
        log.info("master_has_no_work", reason=msg.reason)
        self.no_work = True

    def _unpark(self, ready: list[TicketSpec], failed: list[TicketSpec], reason: str) -> None:
        for spec in failed:
            self._fail_to_start(spec, self.workdir(spec.sweep, spec.ticket), reason)
        self.waiting.extendleft(reversed(ready))
        if ready:
            self._start_waiting()

    # -- the end of a batch allocation (issue 15) ---------------------------------------------------
    def _hand_back(self, ticket: int) -> None:
        """A ticket that would outlive the allocation goes back at once, not counted as an attempt."""
        self.walltime.closing = True
        left = max(0, int(self.walltime.limit - time.time()))
        self.send(messages.Failure(ticket, None, f"handed back: the allocation ends in {left}s", 0.0, handback=True))
        log.info("ticket_handed_back", ticket=ticket, seconds_left=left)

    def _allocation_step(self) -> None:
        """Leave at the hand-back point, when closing and done, or after idling for idle_exit."""
        now = time.time()
        held = bool(self.running or self.waiting or self.outbox or self.cache.fetches)
        if self.walltime.over(now):
            log.info("allocation_ends", running=len(self.running) + len(self.waiting))
            self.stopping = True  # shutdown() kills what runs and says goodbye: the master re-queues it
        elif self.walltime.closing and not held:
            log.info("allocation_closing_exit")
            self.stopping = True
        elif self.walltime.idle_too_long(not held, now):
            log.info("idle_exit", seconds=self.walltime.idle_exit)
            self.stopping = True

    def _semantics_step(self) -> None:
        if self.cache.fetches:
            self._unpark(self.cache.poll(), [], "")
        if self.running:
            self.memory_watch.check(self.running)
        if (self.no_work and self.config.on_no_work == "exit" and not self.running and not self.waiting
                and not self.outbox and not self.cache.fetches):
            log.info("no_more_work_exiting")
            self.stopping = True

    def _reap_workers(self) -> None:
        unstarted, started, stuck = self.batches.poll()
        self.started += started
        exited = [tid for tid, worker in self.running.items() if worker.poll() is not None]
        finished = [self._forget(tid) for tid in exited]
        self._wait_again(unstarted)
        self.stuck = stuck
        if stuck:
            self._hand_back_surplus()
        # The next ticket starts, and the one after is asked for, before the finished ones' outputs are gathered:
        # a slot never waits on bookkeeping, and the master answers while it is done.
        self._start_waiting()
        if finished:
            self._request_work()
        for worker in finished:
            outcome = worker.finish()  # type: ignore[union-attr]
            if isinstance(worker, Worker):
                self.shortness.record(outcome.sweep, outcome.elapsed)
            self._finished(outcome)

    def _empty_trash(self) -> None:
        for workdir in self.trash:
            self.workdirs.release(workdir)
        self.trash.clear()

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for worker in list(self.running.values()):
            if now >= worker.deadline:
                log.info("ticket_timeout", ticket=worker.spec.ticket, timeout=worker.spec.timeout)
                worker.kill(f"timeout after {worker.spec.timeout:g}s")

    def _finished(self, outcome: Outcome) -> None:
        self.outbox[outcome.ticket] = outcome
        if self.welcomed:
            self._report(outcome)

    def _report(self, outcome: Outcome) -> None:
        self.sent_at[outcome.ticket] = time.time()
        if not outcome.ok:
            self.send(messages.Failure(outcome.ticket, outcome.exit_code, outcome.reason, outcome.elapsed,
                                       outcome.final))
        else:
            self.reports.append(outcome)

    def _send_reports(self) -> None:
        """The results finished in this step, as few RESULT messages as their size allows."""
        reports, self.reports = self.reports, []
        entries: list[messages.ResultEntry] = []
        size = 0
        for outcome in reports:
            outputs = []
            for out in outcome.outputs:
                if out.size <= protocol.INLINE_LIMIT:
                    data = out.data if out.data is not None else Path(out.path).read_bytes()
                    outputs.append(messages.ResultOutput(out.name, len(data), data))
                    size += len(data)
                else:
                    outputs.append(messages.ResultOutput(out.name, out.size))
            entries.append(messages.ResultEntry(outcome.ticket, outcome.exit_code, outcome.elapsed, outputs,
                                                outcome.reason))
            if len(entries) >= RESULT_BATCH or size >= RESULT_BYTES:
                self.send(messages.Result(entries))
                entries, size = [], 0
        if entries:
            self.send(messages.Result(entries))

    def _resend_unacked(self, now: float) -> None:
        """Results not acknowledged within a few liveness periods are sent again (the master de-duplicates)."""
        patience = self.interval * self.liveness * 3
        for tid, sent in list(self.sent_at.items()):
            if now - sent > patience and tid in self.outbox:
                self._report(self.outbox[tid])

    def _request_work(self) -> None:
        """Ask for what the slots and prefetch can take, saying which tickets started since the last REQUEST."""
        if not self.welcomed:
            return
        want = 0
        if not self.walltime.closing:
            want = max(0, self._capacity() - self._held_slots() - self._waiting_units() - self.outstanding)
        started = self.started + self.pypool.take_started()
        if want or started:
            self.outstanding += want
            self.started = []
            self.send(messages.Request(want, started))

    def _heartbeat(self) -> None:
        self._send_progress()
        held = self.batches.waiting()
        unstarted = set(held)
        running = [tid for tid in self.running if tid not in unstarted]
        self.send(messages.Heartbeat(
            running=running, waiting=[t.ticket for t in self.waiting] + self.pypool.not_started() + held,
            load=os.getloadavg()[0], memory=psutil.virtual_memory().percent,
            disk=psutil.disk_usage(str(self.work_root)).percent, busy=self._busy_slots()))

    def _send_progress(self) -> None:
        """New stdout/stderr of each running worker since the last heartbeat, a bounded piece per stream."""
        for tid, worker in self.running.items():
            for stream, name in ((STDOUT, "stdout"), (STDERR, "stderr")):
                path = worker.workdir / stream
                sent = worker.progress_sent.get(name, 0)
                try:
                    if path.stat().st_size <= sent:
                        continue
                    with open(path, "rb") as fh:
                        fh.seek(sent)
                        data = fh.read(PROGRESS_CHUNK)
                except OSError:
                    continue
                worker.progress_sent[name] = sent + len(data)
                self.send(messages.Progress(tid, name, data))

    # -- shutdown -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Kill running workers (their tickets go back to the queue) and say goodbye."""
        self.batches.close()  # each runner kills the worker it runs
        for tid in list(self.running):
            worker = self.running[tid]
            worker.kill("slave shutting down")
            remove_workdir(worker.workdir)
            self._forget(tid)
        for tid in list(self.prepared):
            self._drop_prepared(tid)
        self._empty_trash()
        self.pypool.close()
        self.reach.close()
        if self.config.delete_workers:
            self.cache.delete_fetched()
        if not self.master_left:  # else nobody would read it, and the socket's linger would only delay the exit
            self.send(messages.Disconnect(messages.SHUTDOWN, "slave shutting down"))
        if self.socket is not None:
            self.socket.close(linger=0 if self.master_left else 200)
        self.watchdog.close()
        log.info("slave_stopped", name=self.config.name)

    _handlers: dict[Command, Callable[["Slave", Any], None]] = {
        Command.WELCOME: _on_welcome, Command.TICKET: _on_ticket, Command.ACK: _on_ack, Command.FETCH: _on_fetch,
        Command.CANCEL: _on_cancel, Command.DISCONNECT: _on_disconnect, Command.CODE: _on_code,
        Command.WORKER: _on_worker_chunk, Command.REFUSED: _on_refused, Command.NO_WORK: _on_no_work,
        Command.SANDBOX: _on_sandbox, Command.RELAY: _on_relay,
        Command.RECALL: _on_recall,
        Command.HEARTBEAT: lambda self, msg: None,  # any message counts as one: master_expiry is already pushed
    }
    """What the slave does with each command it accepts from the master."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ticketfarm-slave", description="Run a ticketfarm slave daemon.")
    parser.add_argument("--config", type=Path, help="slave TOML config file")
    parser.add_argument("--master", help="master address (overrides the config)")
    parser.add_argument("--name", help="slave name (overrides the config)")
    parser.add_argument("--slots", type=int, help="parallel workers (overrides the config)")
    parser.add_argument("--work-root", help="root of per-ticket work dirs (overrides the config)")
    parser.add_argument("--heartbeat", type=float, help="heartbeat interval in seconds")
    parser.add_argument("--prefetch", type=int, help="tickets held ready beyond the free slots (overrides the config)")
    parser.add_argument("--master-key", help="the master's CURVE public key file (overrides the config)")
    parser.add_argument("--secret-key", help="this slave's CURVE secret key file (overrides the config)")
    parser.add_argument("--insecure", action="store_true", help="plain TCP (a master with insecure = true)")
    parser.add_argument("--exit-on-shutdown", action="store_true", help="exit when the master shuts down")
    parser.add_argument("--exit-when-done", action="store_true",
                        help="exit when the master says every sweep is over (on_no_work = \"exit\")")
    parser.add_argument("--delete-workers", action="store_true", help="delete fetched worker executables on exit")
    parser.add_argument("--cache-dir", help="cache of shipped worker executables (overrides the config)")
    parser.add_argument("--platform", help="platform tag told to the master (overrides detection)")
    parser.add_argument("--cpus", type=int, help="CPUs offered to tasks that claim CPUs (overrides the config)")
    parser.add_argument("--memory-mb", type=int, help="MiB offered to tasks that claim memory (overrides the config)")
    parser.add_argument("--parent-pid", type=int, help="exit once process PARENT_PID is no longer this one's parent")
    parser.add_argument("--alloc-end", type=float, default=float(os.environ.get("TICKETFARM_ALLOC_END") or 0) or None,
                        help="epoch seconds when this slave's batch job ends (default: env TICKETFARM_ALLOC_END)")
    parser.add_argument("--handback", type=float, help="seconds before --alloc-end to hand back all tickets")
    parser.add_argument("--idle-exit", type=float, help="exit after this many seconds with nothing to do")
    parser.add_argument("--log-level", default=os.environ.get("TICKETFARM_LOG", "warning"))
    parser.add_argument("--log-json", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = load_slave_config(args.config) if args.config else SlaveConfig()
        for key in ("master", "name", "slots", "work_root", "prefetch", "cache_dir", "platform", "cpus", "memory_mb",
                    "master_key", "secret_key", "parent_pid", "alloc_end", "handback", "idle_exit"):
            if getattr(args, key) is not None:
                setattr(config, key, getattr(args, key))
        if args.heartbeat is not None:
            config.heartbeat_interval = args.heartbeat
            config.reconnect_min = min(config.reconnect_min, args.heartbeat)
        if args.exit_on_shutdown:
            config.on_master_shutdown = "exit"
        if args.insecure:
            config.insecure = True
        if args.exit_when_done:
            config.on_no_work = "exit"
        if args.delete_workers:
            config.delete_workers = True
        config = finish(config, str(args.config or "command line"))
        configure_logging(args.log_level, args.log_json or config.log_json)
        slave = Slave(config)
    except (ConfigError, KeyFileError) as exc:
        print(f"ticketfarm-slave: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return slave.run()


if __name__ == "__main__":
    sys.exit(main())
