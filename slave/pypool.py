"""The slave's warm Python workers: one process per slot, function bodies cached by hash, python tickets as tasks.

A python ticket names its function by hash. The pool asks the master for a body
it has never seen (CODE_REQUEST, once per slave), hands the ticket to an idle
warm worker (slave/pyworker.py) and turns the worker's answer into an
`Outcome`. A worker that dies mid-task (os._exit, a segfault, the OOM killer)
fails that ticket with the reason and is started again; so is a worker killed
for a timeout or a cancel.

Small results stay in memory until the master acknowledges them (a slave that
dies re-runs them elsewhere: execution is at-least-once anyway); a result larger
than INLINE_LIMIT is a file in the ticket's work dir with a manifest, like any
command ticket's output, and is fetched in chunks.
"""
from __future__ import annotations

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

log = structlog.get_logger("ticketfarm.pypool")


class WarmWorker:
    """One `python -m slave.pyworker` process with a request pipe and an answer pipe."""

    def __init__(self, slot: int, directory: Path):
        self.slot = slot
        directory.mkdir(parents=True, exist_ok=True)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        # The worker runs the same code as this slave, wherever that was imported from.
        root = str(Path(slave.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        with open(directory / "output.log", "ab") as logfile:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "slave.pyworker", str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w), cwd=directory, env=env, stdin=subprocess.DEVNULL,
                stdout=logfile, stderr=logfile, start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self.tx = Connection(to_child_w, readable=False)
        self.rx = Connection(from_child_r, writable=False)
        self.known: set[str] = set()
        self.task: PyTask | None = None

    def send(self, task: "PyTask", body: bytes | None, result_dir: Path) -> None:
        spec = task.spec
        self.tx.send_bytes(pickle.dumps((spec.ticket, spec.fn, body, spec.payload[0], str(result_dir)),
                                        protocol=pickle.HIGHEST_PROTOCOL))
        self.known.add(spec.fn)
        self.task = task

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


class PyTask:
    """A python ticket as the daemon sees it; behaves like runner.Worker (poll, kill, finish, deadline)."""

    def __init__(self, pool: "PyPool", spec: TicketSpec, workdir: Path):
        self.pool = pool
        self.spec = spec
        self.workdir = workdir
        self.started = time.monotonic()
        self.deadline = self.started + spec.timeout
        self.killed_for: str | None = None
        self.progress_sent: dict[str, int] = {}
        self.worker: WarmWorker | None = None
        self.outcome: Outcome | None = None

    def poll(self) -> int | None:
        if self.outcome is None:
            return None
        return 0 if self.outcome.ok else 1

    def kill(self, reason: str) -> None:
        if self.outcome is None:
            self.killed_for = reason
            self.pool.abort(self, reason)

    def finish(self) -> Outcome:
        assert self.outcome is not None
        return self.outcome

    def fail(self, reason: str, exit_code: int | None = None) -> None:
        spec = self.spec
        self.outcome = Outcome(spec.ticket, spec.sweep, spec.task, False, exit_code,
                               time.monotonic() - self.started, reason, slave=self.pool.slave_name)


class PyPool:
    """Warm workers for one slave's slots, started on the first python ticket."""

    def __init__(self, slots: int, work_root: Path, slave_name: str, request_code: Callable[[str], None]):
        self.slots = slots
        self.directory = work_root / ".pyworkers"
        self.slave_name = slave_name
        self.request_code = request_code
        self.workers: list[WarmWorker | None] = [None] * slots
        self.bodies: dict[str, bytes] = {}
        self.requested: set[str] = set()
        self.blocked: dict[str, list[PyTask]] = {}
        self.ready: deque[PyTask] = deque()

    # -- tickets in -------------------------------------------------------------------------
    def start(self, spec: TicketSpec, workdir: Path) -> PyTask:
        task = PyTask(self, spec, workdir)
        if not spec.payload:
            task.fail("python ticket without arguments payload")
        elif spec.fn in self.bodies:
            self.ready.append(task)
            self._assign()
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
        self._assign()

    def request_missing(self) -> None:
        """After a reconnect: ask again for every body that tickets still wait for."""
        for digest in self.blocked:
            self.requested.add(digest)
            self.request_code(digest)

    def _assign(self) -> None:
        while self.ready:
            slot = next((i for i, w in enumerate(self.workers) if w is None or w.task is None), None)
            if slot is None:
                return
            task = self.ready.popleft()
            if task.outcome is not None:
                continue
            worker = self.workers[slot]
            if worker is None:
                worker = self.workers[slot] = WarmWorker(slot, self.directory / f"slot-{slot}")
            body = None if task.spec.fn in worker.known else self.bodies[task.spec.fn]
            task.worker = worker
            try:
                worker.send(task, body, task.workdir)
            except OSError:  # it died between tasks: start a fresh one and try again
                self._replace(worker)
                task.worker = None
                self.ready.appendleft(task)

    # -- answers out -------------------------------------------------------------------------
    def fds(self) -> list[int]:
        return [w.rx.fileno() for w in self.workers if w is not None and w.task is not None]

    def pump(self) -> None:
        """Read every answer that has arrived; a closed pipe means the worker died with its task."""
        for worker in list(self.workers):
            while worker is not None and worker.task is not None:
                try:
                    if not worker.rx.poll(0):
                        break
                    raw = worker.rx.recv_bytes()
                except (EOFError, OSError):
                    task = worker.task
                    reason = worker.death_reason()
                    log.warning("python_worker_died", slot=worker.slot, ticket=task.spec.ticket, reason=reason)
                    task.fail(reason, exit_code=worker.proc.returncode)
                    self._replace(worker)
                    break
                self._answer(worker, pickle.loads(raw))
        self._assign()

    def _answer(self, worker: WarmWorker, answer: tuple) -> None:
        ticket, name, data, path, size, elapsed = answer
        task = worker.task
        worker.task = None
        if task is None or task.spec.ticket != ticket or task.outcome is not None:
            return
        spec = task.spec
        output = Output(name, path or "", size, data)
        task.outcome = Outcome(spec.ticket, spec.sweep, spec.task, True, 0, elapsed, outputs=[output],
                               slave=self.slave_name)
        if path is not None:  # a large result: keep it on disk until acknowledged, like a command ticket's
            task.outcome.save(task.workdir)

    def abort(self, task: PyTask, reason: str) -> None:
        """Kill the worker running `task` (timeout, cancel, shutdown) and start a fresh one in its place."""
        if task.worker is not None and task.worker.task is task:
            self._replace(task.worker)
        else:
            self.ready = deque(t for t in self.ready if t is not task)
            for waiting in self.blocked.values():
                if task in waiting:
                    waiting.remove(task)
        task.fail(reason)

    def _replace(self, worker: WarmWorker) -> None:
        worker.close()
        worker.task = None
        self.workers[worker.slot] = None  # started again lazily by the next ticket

    def close(self) -> None:
        for worker in self.workers:
            if worker is not None:
                worker.close()
        self.workers = [None] * self.slots
