"""Workers never outlive their slave: a watchdog process per slave, and the clean-up of what a dead slave left.

The slave starts one watchdog (`python -m slave.watchdog`) at start-up, in a session of its own so that a
signal to the slave's process group does not reach it, and tells it over a pipe each worker process group it
spawns (`+PGID WORKDIR`) and reaps (`-PGID`): one small write per event, no process per ticket. When the pipe
closes, the slave is gone, however it died (SIGKILL, OOM killer, a crash): the watchdog kills every group
still listed and removes their work dirs. It ignores SIGINT, SIGTERM and SIGHUP: it ends when its slave does.

The watchdog also keeps the list in a file of the work root (`.tf-watchdog-*`), locked (flock) for its life. A
slave starting on that root reads every such file nobody holds (its watchdog died too, e.g. `kill -9` of both)
and kills those groups: `reap_leftovers`. Each group is recorded with its leader's start time, so a process
id used again by the system is never killed by mistake (a group whose leader is gone keeps its id reserved
while any member lives, so it can only be the group recorded).

A child that leaves its group (setsid, a double fork) would escape that: every worker's environment carries
`TICKETFARM_SLAVE_MARK`, this slave's state file, and the watchdog (or `reap_leftovers`) also kills every process
that still carries it. Chosen over cgroups, which need root or a delegated cgroup tree, and over a child
subreaper, which catches orphans only while the slave lives. A process that scrubs its environment escapes, as
it would escape any tracking in user space; systemd's control-group kill covers it where the unit runs.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import structlog

from slave.runner import MANIFEST, kill_marked

log = structlog.get_logger("ticketfarm.watchdog")

STATE_PREFIX = ".tf-watchdog-"
SLAVE_MARK = "TICKETFARM_SLAVE_MARK"
"""In the environment of every worker of a slave: its watchdog's state file (unique while the slave lives)."""
ROOT_LOCK = ".tf-root.lock"
#: Seconds between two rewrites of the state file at most (the pipe is read at once; the file is the fallback).
SAVE_EVERY = 0.2


class Watchdog:
    """The slave's end: starts the watchdog process and tells it each worker group; started again if it dies."""

    def __init__(self, work_root: Path, keep_workdirs: bool):
        self.state = work_root / f"{STATE_PREFIX}{os.getpid()}"
        self.keep_workdirs = keep_workdirs
        self.root_lock = -1
        self.groups: dict[int, str] = {}
        """Worker process groups alive now, with their work dir ("" for none): told again to a new watchdog."""
        self.pending = b""
        self._spawn()

    @classmethod
    def start(cls, work_root: Path, keep_workdirs: bool) -> "Watchdog":
        """At slave start-up: what dead slaves left on this root is killed and cleaned, then a watchdog starts."""
        killed = reap_leftovers(work_root, keep_workdirs)
        if killed:
            log.warning("leftover_workers_killed", groups=killed, work_root=str(work_root))
        watchdog = cls(work_root, keep_workdirs)
        watchdog.root_lock = hold_root(work_root, keep_workdirs)
        return watchdog

    def _spawn(self) -> None:
        read, self.fd = os.pipe()
        cmd = [sys.executable, "-m", "slave.watchdog", str(read), str(self.state)]
        if self.keep_workdirs:
            cmd.append("--keep-workdirs")
        self.proc = subprocess.Popen(cmd, pass_fds=(read,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     start_new_session=True)
        os.close(read)
        os.set_blocking(self.fd, False)
        self.pending = b"".join(b"+%d %s\n" % (pgid, os.fsencode(d)) for pgid, d in self.groups.items())
        self._flush()

    @property
    def marker(self) -> dict[str, str]:
        """To add to every worker's environment: what marks the processes this watchdog kills at the end."""
        return {SLAVE_MARK: str(self.state)}

    def watch(self, pgid: int, workdir: Path | str = "") -> None:
        self.groups[pgid] = str(workdir)
        self._tell(b"+%d %s\n" % (pgid, os.fsencode(str(workdir))))

    def unwatch(self, pgid: int) -> None:
        if self.groups.pop(pgid, None) is not None:
            self._tell(b"-%d\n" % pgid)

    def _tell(self, line: bytes) -> None:
        self.pending += line
        self._flush()

    def _flush(self) -> None:
        """Write what the pipe takes now (never block the slave on its watchdog); the rest goes with the next."""
        while self.pending:
            try:
                self.pending = self.pending[os.write(self.fd, self.pending):]
            except BlockingIOError:
                return
            except BrokenPipeError:
                self._respawn()
                return

    def _respawn(self) -> None:
        log.warning("watchdog_restarted", exit_code=self.proc.wait())
        os.close(self.fd)
        self._spawn()

    def close(self) -> None:
        """At the slave's orderly exit (its workers already killed): the watchdog removes its file and ends by
        itself (not waited for: it may still be starting, and the slave's goodbye must not wait on it)."""
        os.set_blocking(self.fd, True)
        try:
            self._flush()
        finally:
            os.close(self.fd)
        if self.root_lock >= 0:
            os.close(self.root_lock)


# -- the watchdog process ---------------------------------------------------------------------------------------
def leader_started(pgid: int) -> float:
    """The start time of the process `pgid`, 0.0 when it is gone."""
    try:
        return psutil.Process(pgid).create_time()
    except psutil.Error:
        return 0.0


def kill_group(pgid: int, started: float | None) -> None:
    """SIGKILL the group, unless its id now belongs to another process: a leader that started at another time
    than recorded (0.0: it was gone already). `started` None: not looked up yet, the group lived a moment ago."""
    now = leader_started(pgid)
    if now and started is not None and now != started:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def remove_unfinished(workdir: str) -> None:
    """A killed worker's work dir; never one holding a finished result (its manifest)."""
    if workdir and not os.path.exists(os.path.join(workdir, MANIFEST)):
        shutil.rmtree(workdir, ignore_errors=True)


Groups = dict[int, tuple["float | None", str]]
"""Worker process groups: pgid -> (its leader's start time, None until looked up; its work dir)."""


def read_state(fd: int) -> Groups:
    groups = {}
    for line in os.pread(fd, 1 << 24, 0).decode(errors="replace").splitlines():
        parts = line.split(" ", 2)
        try:
            groups[int(parts[0])] = (float(parts[1]), parts[2] if len(parts) > 2 else "")
        except (ValueError, IndexError):
            continue  # the tail of a write cut short
    return groups


def write_state(fd: int, groups: Groups) -> None:
    """The list as lines `PGID START WORKDIR`, rewritten in place: a write cut short leaves lines that parse or
    are skipped, and a stale line is harmless (its start time no longer matches)."""
    for pgid, (started, workdir) in groups.items():
        if started is None:  # looked up here, not per ticket: most groups come and go between two saves
            groups[pgid] = (leader_started(pgid), workdir)
    data = "".join(f"{pgid} {started!r} {workdir}\n" for pgid, (started, workdir) in groups.items()).encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def serve(pipe: int, state: Path, keep_workdirs: bool) -> None:
    """Follow the slave's list until its pipe closes, then kill and clean what is still listed."""
    fd = os.open(state, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    groups: Groups = {}
    buffer, dirty, saved = b"", False, 0.0
    while True:
        wait = None if not dirty else max(0.0, saved + SAVE_EVERY - time.monotonic())
        if select.select([pipe], [], [], wait)[0]:
            data = os.read(pipe, 65536)
            if not data:
                break
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                apply_line(groups, line)
            dirty = True
        if dirty and time.monotonic() - saved >= SAVE_EVERY:
            try:
                write_state(fd, groups)
                dirty = False
            except OSError:  # a full work disk: the pipe's list is what counts; the file is tried again later
                pass
            saved = time.monotonic()
    for pgid, (started, workdir) in groups.items():
        kill_group(pgid, started)
        if not keep_workdirs:
            remove_unfinished(workdir)
    kill_marked(SLAVE_MARK, str(state))
    state.unlink(missing_ok=True)
    os.close(fd)


def apply_line(groups: Groups, line: bytes) -> None:
    if line.startswith(b"+"):
        pgid, _, workdir = line[1:].partition(b" ")
        groups[int(pgid)] = (None, os.fsdecode(workdir))
    elif line.startswith(b"-"):
        groups.pop(int(line[1:]), None)


# -- a slave starting on a work root ------------------------------------------------------------------------------
def reap_leftovers(work_root: Path, keep_workdirs: bool) -> int:
    """Kill the worker groups of dead slaves' dead watchdogs on this root and remove their work dirs.

    Returns how many groups were killed (a group already gone counts too: its id was recorded).
    """
    killed = 0
    for state in work_root.glob(f"{STATE_PREFIX}*"):
        try:
            fd = os.open(state, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            os.close(fd)
            continue  # its watchdog lives and does this itself
        groups = read_state(fd)
        for pgid, (started, workdir) in groups.items():
            kill_group(pgid, started)
            if not keep_workdirs:
                remove_unfinished(workdir)
        killed += len(groups) + kill_marked(SLAVE_MARK, str(state))
        state.unlink(missing_ok=True)
        os.close(fd)
    return killed


def hold_root(work_root: Path, keep_workdirs: bool) -> int:
    """Share the root's lock for this slave's life; the first slave on a root nobody uses removes every
    unfinished work dir (no manifest) left there: prepared tickets and killed workers of slaves now gone.

    Returns the lock's file descriptor (kept open by the caller).
    """
    fd = os.open(work_root / ROOT_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # other slaves work here: only what their dead watchdogs listed is theirs to lose
    else:
        if not keep_workdirs:
            for workdir in work_root.glob("[!.]*/[0-9]*"):
                if workdir.is_dir():
                    remove_unfinished(str(workdir))
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    serve(int(argv[0]), Path(argv[1]), "--keep-workdirs" in argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
