"""Tiny command tickets started by a runner process: a slot runs a batch of them near the fork/exec floor.

A ticket of a few milliseconds costs a slave more than its worker does when each goes through the slave's loop on
its own (a Popen, a wake-up, a pass over every queue, a message each way). Once a sweep's tickets have proved short
here (`Shortness`), the slave hands several of that sweep's waiting tickets at once to a runner (slave/spawner.py, a
small process kept for the slot) that starts them one after another with posix_spawn, each in a session of its own
as a lone worker is, within its timeout, and reports their starts and ends in one write per batch (or per
FLUSH_EVERY). The slave handles those ends together: one pass of its loop and one RESULT message for many tickets.

The promise is untouched: each ticket keeps its own work dir, output files, manifest and result, reported and
acknowledged one by one. A ticket its runner did not start (the slave froze, the runner died) goes back to the
slave's queue; a cancelled one is killed or never started.
"""
from __future__ import annotations

import marshal
import math
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from slave import spawner
from slave.runner import STDERR, STDOUT, WORKDIR_MARK, Outcome, TicketSpec, Worker, kill_marked, kill_tree

log = structlog.get_logger("ticketfarm.slave")

#: A sweep whose tickets take less than this here on average (seconds) has them run in batches.
SHORT_TASK = 0.05
#: Tickets of a sweep that finish here before it may be judged short.
SEEN_BEFORE_BATCHING = 4
#: About this much work (seconds) per batch (the master bundles a short sweep's tickets by the same measure:
#: master/scheduler.py BUNDLE_WORK): long enough to spread a batch's cost, short enough to keep a slot's queue small.
BATCH_WORK = 0.05
MAX_BATCH = 32
#: A batch whose ticket has run this long (seconds) gives back the tickets after it: they start elsewhere, or later,
#: instead of waiting behind a ticket that turned out long.
CUT_AFTER = 0.2
#: Weight of the newest ticket in a sweep's moving average of durations.
SMOOTHING = 0.2


class Shortness:
    """How long each sweep's command tickets have taken here: which run in batches, and how many per batch."""

    def __init__(self) -> None:
        self.average: dict[str, float] = {}
        self.seen: dict[str, int] = {}

    def record(self, sweep: str, elapsed: float) -> None:
        seen = self.seen[sweep] = self.seen.get(sweep, 0) + 1
        average = self.average.get(sweep, elapsed)
        self.average[sweep] = elapsed if seen == 1 else average + SMOOTHING * (elapsed - average)

    def batch_size(self, sweep: str) -> int:
        """Tickets per batch for this sweep: 1 (no batches) until its tickets have proved short."""
        if self.seen.get(sweep, 0) < SEEN_BEFORE_BATCHING or self.average[sweep] >= SHORT_TASK:
            return 1
        return max(2, min(MAX_BATCH, int(BATCH_WORK / max(self.average[sweep], 1e-4))))

    def forget(self, sweep: str) -> None:
        self.average.pop(sweep, None)
        self.seen.pop(sweep, None)


def batchable(spec: TicketSpec) -> bool:
    """A ticket a runner may start: a command needing no memory watch (per process tree) and no shipped worker."""
    return spec.kind == "command" and not spec.memory and not spec.workers


@dataclass
class Spawned:
    """What a runner told of one ticket's process (the stand-in for a Popen)."""

    pid: int = 0
    returncode: int | None = None
    error: OSError | None = None
    """posix_spawn refused it: the ticket failed to start."""


class BatchedWorker(Worker):
    """A ticket of a batch: prepared like any worker; the runner opens its streams and starts it."""

    def __init__(self, spec: TicketSpec, workdir: Path, slave: str, base_env: dict[str, str]):
        super().__init__(spec, workdir, slave, base_env)
        self.proc = Spawned()  # type: ignore[assignment]
        self.deadline = math.inf  # the runner keeps the timeout
        self.batch: Batch | None = None

    def _open_streams(self) -> ExitStack:
        return ExitStack()  # opened in the spawned process: a batch holds no descriptors

    def start(self) -> None:
        raise RuntimeError("a batched ticket is started by its batch's runner")

    def poll(self) -> int | None:
        proc = self.proc
        return -1 if proc.error is not None else proc.returncode  # type: ignore[union-attr]

    def kill(self, reason: str) -> None:
        self.killed_for = self.killed_for or reason
        if self.batch is not None:
            self.batch.kill(self)

    def finish(self) -> Outcome:
        error = self.proc.error  # type: ignore[union-attr]
        if error is None:
            return super().finish()
        spec = self.spec
        outcome = Outcome(spec.ticket, spec.sweep, spec.task, False, None, 0.0, f"cannot start worker: {error}",
                          slave=self.slave)
        outcome.save(self.workdir)
        return outcome


Programs = dict[tuple[str, str], "str | None"]
"""Where a program name was found on a PATH: looked up once per slave, not per ticket."""


def launch(worker: Worker, programs: Programs) -> tuple | OSError:
    """What the runner needs to start this worker as Popen would (spawner.py's launch), or why it cannot."""
    args, env = worker.args, worker.added_env
    path = args[0]
    if os.sep not in path:
        search = env.get("PATH") or worker.base_env.get("PATH") or os.defpath
        if (path, search) not in programs:
            programs[path, search] = shutil.which(path, path=search)
        path = programs[path, search]
    if path is None:
        return FileNotFoundError(2, os.strerror(2), args[0])
    return (path, args, env, str(worker.spec.cwd or worker.workdir), str(worker.stdin_path or ""),
            str(worker.workdir / STDOUT), str(worker.workdir / STDERR), worker.spec.timeout)


class Runner:
    """The slave's end of one runner process (slave/spawner.py)."""

    def __init__(self, base_env: dict[str, str]):
        # -I -S: the standard library only, started in milliseconds, whatever the environment says of Python.
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", spawner.__file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.commands = self.proc.stdin.fileno()
        self.status = self.proc.stdout.fileno()
        os.set_blocking(self.status, False)
        self.buffer = b""
        self.gone = False
        self.send(("env", base_env))

    def send(self, record: tuple) -> None:
        data = marshal.dumps(record)
        try:
            self.proc.stdin.write(spawner.HEADER.pack(len(data)) + data)  # type: ignore[union-attr]
        except (BrokenPipeError, ValueError):
            self.gone = True

    def lines(self) -> list[list[bytes]]:
        """The lines the runner wrote since the last call; `gone` once it has exited."""
        try:
            while chunk := os.read(self.status, 65536):
                self.buffer += chunk
            else:
                self.gone = True  # end of file: it exited
        except BlockingIOError:
            pass
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.split() for line in lines]

    def close(self) -> None:
        """SIGTERM: the runner kills the worker it runs and exits."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.stdout.close()  # type: ignore[union-attr]


@dataclass
class Batch:
    """Tickets handed to one runner, in the order it starts them."""

    members: list[BatchedWorker]
    runner: Runner
    number: int
    done: bool = False
    stops: set[int] = field(default_factory=set)
    """Members told not to start (cancelled)."""
    current: int = -1
    """The member running now, -1 for none."""
    cut: bool = False
    """Told to start no more (CUT_AFTER)."""
    returned: list[BatchedWorker] = field(default_factory=list)
    """Members the runner gave back unstarted since the last look (K lines)."""
    started: list[int] = field(default_factory=list)
    """Tickets the runner started since the last look (S lines)."""

    def start(self, programs: Programs) -> None:
        launches = []
        for member in self.members:
            member.batch = self
            plan = launch(member, programs)
            if isinstance(plan, OSError):
                member.proc.error = plan  # type: ignore[union-attr]
                plan = (None,) * 8  # a place keeper: indexes stay the members' (the runner skips it)
            launches.append(plan)
        self.runner.send(("batch", self.number, launches))

    def apply(self, words: list[bytes]) -> None:
        """One line of the runner's about this batch."""
        kind = words[0]
        if kind == b"D":
            self.done = True
            return
        member = self.members[int(words[2])]
        proc: Spawned = member.proc  # type: ignore[assignment]
        if kind == b"S":
            proc.pid, member.started = int(words[3]), float(words[4])
            self.current = int(words[2])
            self.started.append(member.spec.ticket)
        elif kind == b"K":
            self.stops.add(int(words[2]))
            self.returned.append(member)
        elif kind == b"E":
            proc.returncode, member.ended = int(words[3]), float(words[4])
            self.current = -1
            if words[5] == b"1":
                member.killed_for = member.killed_for or f"timeout after {member.spec.timeout:g}s"
                kill_marked(WORKDIR_MARK, str(member.workdir))  # descendants that left its session
        elif kind == b"F":
            errno = int(words[3])
            proc.error = OSError(errno, os.strerror(errno), member.args[0])

    def unstarted(self) -> list[BatchedWorker]:
        """The members not started yet (nor told to skip); once done, those the runner never started."""
        return [m for i, m in enumerate(self.members) if i not in self.stops and m.poll() is None and not m.proc.pid]

    def cut_if_stuck(self, now: float) -> bool:
        """Ask the runner for the members after one that runs longer than CUT_AFTER; True when asked now."""
        if self.cut or self.current < 0 or now - self.members[self.current].started <= CUT_AFTER:
            return False
        self.cut = True
        self.runner.send(("cut", self.number))
        return True

    def kill(self, member: BatchedWorker) -> None:
        """Stop one ticket: the runner kills it if it runs, and never starts it if not yet."""
        index = self.members.index(member)
        self.stops.add(index)
        self.runner.send(("stop", self.number, index))
        proc: Spawned = member.proc  # type: ignore[assignment]
        if proc.pid and proc.returncode is None:  # and whatever of it left its session, as for a lone worker
            kill_tree(proc.pid, str(member.workdir))


class Batches:
    """The batches running now, a slot each, and the runners kept for them."""

    def __init__(self, base_env: dict[str, str], shortness: Shortness):
        self.base_env = base_env
        self.shortness = shortness
        self.running: list[Batch] = []
        self.idle: list[Runner] = []
        self.numbers = 0
        self.programs: Programs = {}

    def __len__(self) -> int:
        return len(self.running)

    def fds(self) -> list[int]:
        return [batch.runner.status for batch in self.running]

    def start(self, members: list[BatchedWorker]) -> None:
        runner = self.idle.pop() if self.idle else Runner(self.base_env)
        self.numbers += 1
        batch = Batch(members, runner, self.numbers)
        batch.start(self.programs)
        self.running.append(batch)

    def waiting(self) -> list[int]:
        """Tickets of running batches not started yet: held, not running, as the slave tells the master."""
        return [m.spec.ticket for batch in self.running for m in batch.unstarted()]

    def poll(self) -> tuple[list[BatchedWorker], list[int], bool]:
        """Read every runner's news: the members to queue again (given back, or never started by an ended batch),
        the tickets started since the last call, and whether a slot is held by a cut batch's long ticket."""
        again: list[BatchedWorker] = []
        started: list[int] = []
        cut = False
        now = time.monotonic()
        for batch in list(self.running):
            runner = batch.runner
            for words in runner.lines():
                if int(words[1]) == batch.number:
                    batch.apply(words)
            if batch.cut_if_stuck(now):
                self.shortness.forget(batch.members[0].spec.sweep)  # short no more, till shown again
            cut = cut or (batch.cut and not batch.done)
            again += batch.returned
            started += batch.started
            batch.returned, batch.started = [], []
            if runner.gone and not batch.done:
                log.warning("batch_runner_died", exit_code=runner.proc.poll())
                runner.close()
                batch.done = True
                for member in batch.members:  # what ran unreported ran for nothing: its result is unknown
                    if member.proc.pid and member.proc.returncode is None:  # type: ignore[union-attr]
                        spawner.kill_session(member.proc.pid)  # type: ignore[union-attr]
                        member.proc.returncode = -9  # type: ignore[union-attr]
                        member.killed_for = "the batch runner died"
            elif batch.done:
                self.idle.append(runner)
            if batch.done:
                self.running.remove(batch)
                again += batch.unstarted()
        return again, started, cut

    def close(self) -> None:
        for runner in [batch.runner for batch in self.running] + self.idle:
            runner.close()
        self.running.clear()
        self.idle.clear()
