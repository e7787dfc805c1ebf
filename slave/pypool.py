"""The slave's warm Python workers: one process per slot, function bodies cached by hash, python tickets as tasks.

A python ticket names its function by hash. The pool asks the master for a body
it has never seen (CODE_REQUEST, once per slave), hands the ticket to an idle
warm worker (slave/pyworker.py) and turns the worker's answer into an
`Outcome`. A worker that dies mid-task (os._exit, a segfault, the OOM killer)
fails that ticket with the reason and is started again; so is a worker killed
for a timeout or a cancel.

Tasks of a function known to be fast go to a worker in batches (one pipe write for many
tasks; see BATCH_SECONDS); a slow or new function's tasks go one at a time. The pool owns
python deadlines: the first unanswered task of a worker has been running since the
worker's previous answer. A worker lost (died, or killed at a deadline) with exactly one
unanswered task fails that task with the reason; with several, it cannot say which task
was to blame, so each of them runs again alone ("solo") and only a solo task is failed.

Small results stay in memory until the master acknowledges them (a slave that
dies re-runs them elsewhere: execution is at-least-once anyway); a result larger
than INLINE_LIMIT is a file in the ticket's work dir with a manifest, like any
command ticket's output, and is fetched in chunks.
"""
from __future__ import annotations

import math
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

import structlog

import slave
from slave.runner import Outcome, Output, TicketSpec, kill_tree
from slave.watchdog import Watchdog

log = structlog.get_logger("ticketfarm.pypool")

#: A batch for one worker holds about this many seconds of a function's tasks (by their recent run time) ...
BATCH_SECONDS = 0.002
#: ... and never more than this many tasks.
MAX_BATCH = 64


class WarmWorker:
    """One `python -m slave.pyworker` process with a request pipe, an answer pipe and its unanswered tasks."""

    def __init__(self, slot: int, directory: Path, watchdog: Watchdog):
        self.slot = slot
        self.watchdog = watchdog
        directory.mkdir(parents=True, exist_ok=True)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = {**os.environ, **watchdog.marker}
        # The worker runs the same code as this slave, wherever that was imported from.
        root = str(Path(slave.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        with open(directory / "output.log", "ab") as logfile:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "slave.pyworker", str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w), cwd=directory, env=env, stdin=subprocess.DEVNULL,
                stdout=logfile, stderr=logfile, start_new_session=True)
        watchdog.watch(self.proc.pid)
        os.close(to_child_r)
        os.close(from_child_w)
        self.tx = Connection(to_child_w, readable=False)
        self.rx = Connection(from_child_r, writable=False)
        self.known: set[str] = set()
        self.queue: deque[PyTask] = deque()
        self.head_started = 0.0

    def send(self, tasks: list["PyTask"], bodies: dict[str, bytes]) -> None:
        """One pipe write for a batch of tasks; each function body goes along the first time only."""
        requests = []
        for task in tasks:
            spec = task.spec
            body = None if spec.fn in self.known else bodies[spec.fn]
            self.known.add(spec.fn)
            requests.append((spec.ticket, spec.fn, body, spec.payload[0], task.result_dir))
        self.tx.send_bytes(pickle.dumps(requests, protocol=pickle.HIGHEST_PROTOCOL))
        if not self.queue:
            self.head_started = time.monotonic()
        for task in tasks:
            task.worker = self
        self.queue.extend(tasks)

    def deadline(self) -> float:
        """When the task it is running now overruns (infinity when idle)."""
        return self.head_started + self.queue[0].spec.timeout if self.queue else math.inf

    def death_reason(self) -> str:
        code = self.proc.wait()
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"python worker died: killed by {name}"
        return f"python worker died: exit code {code}"

    def close(self) -> None:
        for conn in (self.tx, self.rx):
            try:
                conn.close()
            except OSError:
                pass
        kill_tree(self.proc.pid)
        self.proc.wait()
        self.watchdog.unwatch(self.proc.pid)


class PyTask:
    """A python ticket as the daemon sees it; behaves like runner.Worker (poll, kill, finish, deadline).

    Its `deadline` is infinite for the daemon: the pool enforces python timeouts itself.
    """

    deadline = math.inf
    killed_for: str | None = None

    def __init__(self, pool: "PyPool", spec: TicketSpec):
        self.pool = pool
        self.spec = spec
        self.result_dir = f"{pool.work_root}/{spec.sweep}/{spec.ticket}"
        """The ticket's work dir, where a large result is written (as text: most tasks never need its Path)."""
        self.arrived = time.monotonic()
        self.progress_sent: dict[str, int] = {}
        self.worker: WarmWorker | None = None
        self.outcome: Outcome | None = None
        self.solo = False

    @property
    def workdir(self) -> Path:
        return Path(self.result_dir)

    def poll(self) -> int | None:
        if self.outcome is None:
            return None
        return 0 if self.outcome.ok else 1

    def kill(self, reason: str) -> None:
        if self.outcome is None:
            self.killed_for = reason
            self.pool.cancel(self, reason)

    def finish(self) -> Outcome:
        assert self.outcome is not None
        return self.outcome

    def fail(self, reason: str, exit_code: int | None = None) -> None:
        spec = self.spec
        self.outcome = Outcome(spec.ticket, spec.sweep, spec.task, False, exit_code,
                               time.monotonic() - self.arrived, reason, slave=self.pool.slave_name)


class PyPool:
    """Warm workers for one slave's slots, started on the first python ticket."""

    def __init__(self, slots: int, work_root: Path, slave_name: str, request_code: Callable[[str], None],
                 free_slots: Callable[[], int], watchdog: Watchdog):
        self.slots = slots
        self.watchdog = watchdog
        self.directory = work_root / ".pyworkers"
        self.work_root = str(work_root)
        self.slave_name = slave_name
        self.request_code = request_code
        #: Slots python tasks may use now (the slave's command tickets share the slots).
        self.free_slots = free_slots
        self.workers: list[WarmWorker | None] = [None] * slots
        self.bodies: dict[str, bytes] = {}
        self.requested: set[str] = set()
        self.blocked: dict[str, list[PyTask]] = {}
        self.ready: deque[PyTask] = deque()
        self.run_time: dict[str, float] = {}
        """Recent run time of each function's tasks (seconds, moving average): sets its batch size."""
        self.started: list[int] = []
        """Tickets handed to a warm worker since `take_started` (a batch behind its head has started too)."""

    # -- tickets in -------------------------------------------------------------------------
    def start(self, spec: TicketSpec) -> PyTask:
        """A python ticket, queued for a warm worker; its work dir (the daemon's work_root/sweep/ticket) is made
        only for a large result."""
        task = PyTask(self, spec)
        if not spec.payload:
            task.fail("python ticket without arguments payload")
        elif spec.fn in self.bodies:
            self.ready.append(task)
        else:
            self.blocked.setdefault(spec.fn, []).append(task)
            if spec.fn not in self.requested:
                self.requested.add(spec.fn)
                self.request_code(spec.fn)
        return task

    def on_code(self, digest: str, body: bytes | None, error: str | None) -> None:
        """A function body from the master (or its refusal): run the tickets that waited for it."""
        waiting = self.blocked.pop(digest, [])
        self.requested.discard(digest)
        if body is None:
            for task in waiting:
                task.fail(f"cannot run task: {error or 'function body missing'}")
            return
        self.bodies[digest] = body
        self.ready.extend(t for t in waiting if t.outcome is None)
        self.assign()

    def request_missing(self) -> None:
        """After a reconnect: ask again for every body that tickets still wait for."""
        for digest in self.blocked:
            self.requested.add(digest)
            self.request_code(digest)

    def busy(self) -> int:
        """Slots in use by python tasks."""
        return sum(1 for w in self.workers if w is not None and w.queue)

    def take_started(self) -> list[int]:
        started, self.started = self.started, []
        return started

    def recall(self, task: PyTask) -> bool:
        """Take back a task no worker has yet; False when one has it."""
        if task.worker is not None:
            return False
        self._unqueue(task)
        return True

    def _unqueue(self, task: PyTask) -> None:
        self.ready = deque(t for t in self.ready if t is not task)
        for waiting in self.blocked.values():
            if task in waiting:
                waiting.remove(task)

    def not_started(self) -> list[int]:
        """Tickets held but not running yet: queued here, or behind the running task in a worker's batch."""
        out = [t.spec.ticket for t in self.ready]
        out += [t.spec.ticket for tasks in self.blocked.values() for t in tasks]
        out += [t.spec.ticket for w in self.workers if w is not None for t in list(w.queue)[1:]]
        return out

    def assign(self) -> None:
        """Hand ready tasks to idle workers, in batches for functions known to be fast."""
        idle = [i for i, w in enumerate(self.workers) if w is None or not w.queue]
        room = self.free_slots() - (self.slots - len(idle))
        for slot in idle[:max(room, 0)]:
            batch = self._next_batch(len(idle))
            if not batch:
                return
            worker = self.workers[slot]
            if worker is None:
                worker = self.workers[slot] = WarmWorker(slot, self.directory / f"slot-{slot}", self.watchdog)
            try:
                worker.send(batch, self.bodies)
            except OSError:  # it died between tasks: start a fresh one next time round
                self._replace(worker)
                for task in batch:
                    task.worker = None
                self.ready.extendleft(reversed(batch))
                return
            self.started += [task.spec.ticket for task in batch]

    def _next_batch(self, workers: int) -> list[PyTask]:
        while self.ready and self.ready[0].outcome is not None:
            self.ready.popleft()
        if not self.ready:
            return []
        first = self.ready.popleft()
        if first.solo:
            return [first]
        seconds = self.run_time.get(first.spec.fn)
        size = 1 if seconds is None else max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(seconds, 1e-6))))
        # Idle workers share what is ready: none of them waits while another holds a long batch.
        size = min(size, math.ceil((len(self.ready) + 1) / workers))
        batch = [first]
        while self.ready and len(batch) < size and not self.ready[0].solo:
            task = self.ready.popleft()
            if task.outcome is None:
                batch.append(task)
        return batch

    # -- answers out -------------------------------------------------------------------------
    def fds(self) -> list[int]:
        return [w.rx.fileno() for w in self.workers if w is not None and w.queue]

    def next_deadline(self) -> float:
        return min((w.deadline() for w in self.workers if w is not None), default=math.inf)

    def pump(self) -> None:
        """Read every answer that has arrived, enforce deadlines, refill idle workers."""
        for worker in list(self.workers):
            while worker is not None and worker.queue:
                try:
                    if not worker.rx.poll(0):
                        break
                    raw = worker.rx.recv_bytes()
                except (EOFError, OSError):
                    self._lost(worker, worker.death_reason(), worker.proc.returncode)
                    break
                self._answers(worker, pickle.loads(raw))
        now = time.monotonic()
        for worker in list(self.workers):
            if worker is not None and now >= worker.deadline():
                head = worker.queue[0]
                log.info("ticket_timeout", ticket=head.spec.ticket, timeout=head.spec.timeout)
                self._lost(worker, f"timeout after {head.spec.timeout:g}s")
        self.assign()

    def _answers(self, worker: WarmWorker, answers: list[tuple]) -> None:
        for ticket, name, data, path, size, elapsed, printed in answers:
            if not worker.queue or worker.queue[0].spec.ticket != ticket:  # not from an honest worker: start afresh
                self._lost(worker, "python worker answered out of order")
                return
            task = worker.queue.popleft()
            fn = task.spec.fn
            previous = self.run_time.get(fn)
            self.run_time[fn] = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
            if task.outcome is None:
                spec = task.spec
                outputs = [Output(name, path or "", size, data)]
                outputs += [Output(s, "", len(text), text) for s, text in printed.items() if s in spec.results]
                task.outcome = Outcome(spec.ticket, spec.sweep, spec.task, True, 0, elapsed, outputs=outputs,
                                       slave=self.slave_name, in_memory=path is None)
                if path is not None:  # a large result: keep it on disk until acknowledged, like a command ticket's
                    try:
                        for out in outputs[1:]:
                            out.path = str(task.workdir / out.name)
                            Path(out.path).write_bytes(out.data or b"")
                    except OSError as exc:  # a full disk: this attempt failed, another may succeed
                        task.outcome = Outcome(spec.ticket, spec.sweep, spec.task, False, None, elapsed,
                                               f"cannot keep the result: {exc}", slave=self.slave_name)
                    task.outcome.save(task.workdir)
        worker.head_started = time.monotonic()

    def _lost(self, worker: WarmWorker, reason: str, exit_code: int | None = None) -> None:
        """A worker gone with tasks unanswered: one alone is to blame; several run again, each alone."""
        unanswered = [t for t in worker.queue if t.outcome is None]
        alone = len(worker.queue) == 1
        self._replace(worker)
        if not unanswered:
            return
        if alone:
            task = unanswered[0]
            log.warning("python_worker_lost", slot=worker.slot, ticket=task.spec.ticket, reason=reason)
            task.fail(reason, exit_code)
            return
        log.warning("python_worker_lost", slot=worker.slot, tickets=len(unanswered), reason=reason,
                    detail="running each of its tasks again alone")
        for task in unanswered:
            task.solo, task.worker = True, None
        self.ready.extendleft(reversed(unanswered))

    def cancel(self, task: PyTask, reason: str) -> None:
        """Stop `task` (cancelled, or the slave is shutting down); a worker running it alone is killed."""
        worker = task.worker
        if worker is not None and task in worker.queue:
            if len(worker.queue) == 1:
                self._replace(worker)
            # else: the worker runs it anyway and its answer is ignored (batched tasks are short ones)
        else:
            self._unqueue(task)
        task.fail(reason)

    def _replace(self, worker: WarmWorker) -> None:
        worker.close()
        worker.queue.clear()
        self.workers[worker.slot] = None  # started again lazily by the next ticket

    def close(self) -> None:
        for worker in self.workers:
            if worker is not None:
                worker.close()
        self.workers = [None] * self.slots
