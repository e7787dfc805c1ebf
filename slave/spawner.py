"""The runner process of slave/batches.py: starts batches of tiny workers one after another, near the fork/exec floor.

Run by the slave as `python -I -S spawner.py`, one per slot that runs batches (standard library only: it starts in
milliseconds). Its stdin carries records from the slave, each a 4-byte little-endian length and a marshal'd tuple:

    ("env", {name: value})                    the environment every worker starts from (sent first)
    ("batch", b, [launch, ...])               run these in order; launch = (path, args, env, cwd, stdin, stdout,
                                              stderr, timeout), env being what the worker adds to the base one
                                              (path None: a place keeper, skipped)
    ("stop", b, i)                            do not start launch i of batch b, or kill it if it runs
    ("cut", b)                                start no more of batch b: each launch given back is told (K)

Its stdout carries lines, written together at the end of a batch and at least every FLUSH_EVERY seconds:

    S b i PID STARTED      E b i CODE ENDED TIMED_OUT      F b i ERRNO      K b i      D b

(K: launch i was given back unstarted after a cut; the slave queues it again.)
(CODE negative: the signal that killed it; STARTED/ENDED: CLOCK_MONOTONIC.) Each worker runs in a session of its
own, as a worker the slave starts alone does. The runner leaves the rest of a batch unstarted (and says `D`) when the
slave is stopped (SIGSTOP: the master may be giving its tickets away meanwhile), and kills the worker it runs and
exits when the slave goes (its stdin closes) or sends SIGTERM.
"""
from __future__ import annotations

import marshal
import os
import select
import signal
import struct
import sys
import time

FLUSH_EVERY = 0.02
HEADER = struct.Struct("<I")


class Runner:
    def __init__(self, commands: int, status: int):
        self.commands = commands
        self.status = status
        self.buffer = b""
        self.out = b""
        self.base_env: dict[str, str] = {}
        self.batches: list[tuple[int, list[tuple]]] = []
        self.stopped: set[tuple[int, int]] = set()
        self.current = (-1, -1, 0)
        """(batch, index, pid) of the worker running now."""
        self.active: tuple[int, list[tuple]] = (-1, [])
        self.next_index = 0
        """The batch being run, and the index of its next launch."""
        self.flushed = time.monotonic()
        self.closed = False
        self.parent = os.getppid()
        self.looked, self.frozen = 0.0, False

    # -- records from the slave --------------------------------------------------------------------------
    def read_commands(self, block: bool) -> None:
        if not select.select([self.commands], [], [], None if block else 0)[0]:
            return
        data = os.read(self.commands, 1 << 20)
        if not data:
            self.closed = True
            return
        self.buffer += data
        while len(self.buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buffer)
            if len(self.buffer) < HEADER.size + size:
                break
            record = marshal.loads(self.buffer[HEADER.size:HEADER.size + size])
            self.buffer = self.buffer[HEADER.size + size:]
            self.apply(record)

    def apply(self, record: tuple) -> None:
        if record[0] == "env":
            self.base_env = record[1]
        elif record[0] == "batch":
            self.batches.append((record[1], record[2]))
        elif record[0] == "stop":
            key = (record[1], record[2])
            self.stopped.add(key)
            batch, index, pid = self.current
            if (batch, index) == key:
                kill_session(pid)
        elif record[0] == "cut" and self.active[0] == record[1]:
            batch, launches = self.active
            for index in range(self.next_index, len(launches)):
                if (batch, index) not in self.stopped:
                    self.stopped.add((batch, index))
                    self.say(b"K %d %d\n" % (batch, index))
            self.flush()

    # -- lines to the slave --------------------------------------------------------------------------------
    def say(self, line: bytes, flush: bool = False) -> None:
        self.out += line
        if flush or time.monotonic() - self.flushed >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        out, self.out = self.out, b""
        while out:
            out = out[os.write(self.status, out):]
        self.flushed = time.monotonic()

    # -- running -----------------------------------------------------------------------------------------------
    def serve(self) -> None:
        while not self.closed:
            if not self.batches:
                self.flush()
                self.read_commands(block=True)
                continue
            batch, launches = self.batches.pop(0)
            self.active = (batch, launches)
            for index, launch in enumerate(launches):
                self.next_index = index + 1
                self.read_commands(block=False)
                if self.closed:
                    return
                if launch[0] is None or (batch, index) in self.stopped or self.slave_stopped():
                    continue  # None: a place keeper for a launch the slave could not make (it reports why)
                self.run(batch, index, launch)
            self.stopped = {key for key in self.stopped if key[0] != batch}
            self.active = (-1, [])
            self.say(b"D %d\n" % batch, flush=True)

    def slave_stopped(self) -> bool:
        """Looked at once per FLUSH_EVERY, not per worker: a stop is noticed within that time."""
        now = time.monotonic()
        if now - self.looked < FLUSH_EVERY:
            return self.frozen
        self.looked, self.frozen = now, parent_stopped(self.parent)
        return self.frozen

    def run(self, batch: int, index: int, launch: tuple) -> None:
        path, args, env, cwd, stdin, stdout, stderr, timeout = launch
        streams = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        actions = [(os.POSIX_SPAWN_OPEN, 0, stdin or os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, stdout, streams, 0o644),
                   (os.POSIX_SPAWN_OPEN, 2, stderr, streams, 0o644)]
        started = time.monotonic()
        try:
            os.chdir(cwd)
            pid = os.posix_spawn(path, args, {**self.base_env, **env}, file_actions=actions, setsid=True,
                                 setsigmask=(), setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        except OSError as exc:
            self.say(b"F %d %d %d\n" % (batch, index, exc.errno or 0))
            return
        self.current = (batch, index, pid)
        self.say(b"S %d %d %d %r\n" % (batch, index, pid, started))
        code, timed_out = self.wait(pid, started + timeout)
        self.current = (-1, -1, 0)
        self.say(b"E %d %d %d %r %d\n" % (batch, index, code, time.monotonic(), timed_out))

    def wait(self, pid: int, deadline: float) -> tuple[int, bool]:
        """The worker's exit code, killing its session at the deadline; the slave's records are read meanwhile."""
        exited = os.pidfd_open(pid)
        try:
            while True:
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    kill_session(pid)
                    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), True
                if self.out:  # what is said is told within FLUSH_EVERY, however long this worker runs
                    left = min(left, max(0.0, self.flushed + FLUSH_EVERY - now))
                ready = select.select([exited, self.commands], [], [], left)[0]
                if not ready and self.out:
                    self.flush()
                if exited in ready:
                    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), False
                if ready:
                    self.read_commands(block=False)
                    if self.closed:
                        kill_session(pid)
        finally:
            os.close(exited)


def kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def parent_stopped(pid: int) -> bool:
    """Whether the slave is stopped (SIGSTOP): Linux's /proc; elsewhere never."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def main() -> None:
    runner = Runner(sys.stdin.fileno(), sys.stdout.fileno())

    def end(*_: object) -> None:
        kill_session(runner.current[2]) if runner.current[2] else None
        os._exit(0)

    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the slave's to handle: it ends its runners
    try:
        runner.serve()
    finally:
        end()


if __name__ == "__main__":
    main()
