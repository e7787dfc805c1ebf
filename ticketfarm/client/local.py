"""The embedded default: a master in this process plus N slave processes on this machine."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import psutil

from master.config import (
    MasterConfig,
    load_master_config,
    master_config_path,
    write_default_master_config,
)
from master.server import Master
from ticketfarm import keys
from ticketfarm.spec import Sweep


#: Seconds a connected slave has to end by itself after the master's goodbye (it takes ~0.05 s) before SIGTERM.
GOODBYE_EXIT = 2.0


class LocalCluster:
    """A master (in this process) and `n` local slaves (child processes), cleaned up on close()."""

    def __init__(self, state_dir: Path, n: int, slots: int = 1, config: MasterConfig | None = None,
                 log_level: str = "warning", slave_args: tuple[str, ...] = (), http_bind: str | None = None,
                 fork: bool = False):
        """`fork`: the slaves are forked from this process, which must have no threads yet (see ForkedSlave), and
        meet the master at a Unix socket in `state_dir` (whose path must be short: about 100 bytes at most)."""
        self.state_dir = Path(state_dir)
        self.slave_args = tuple(slave_args)
        if config is None:
            if not master_config_path(self.state_dir).exists():
                write_default_master_config(self.state_dir)
            config = load_master_config(self.state_dir)
        # Local slaves live and die with this run, on a port of loopback nobody else needs to know.
        config.bind = "tcp://127.0.0.1:*"
        config.slave_exit_when_done = True
        if http_bind:
            config.http_bind = http_bind
        self.config = config
        self.slaves: list[subprocess.Popen[bytes] | ForkedSlave] = []
        if fork:
            # Forked before the master exists (its threads and sockets must not be copied), the slaves meet it at
            # a Unix socket of the state dir named in advance; the keys they need are made first.
            if not config.insecure:
                keys.init_state_keys(self.state_dir)
            config.bind = f"ipc://{self.state_dir.resolve()}/master.ipc"
            self.slaves = [ForkedSlave(self._slave_args(f"local-{i}", config.bind, slots, log_level))
                           for i in range(1, n + 1)]
        self.master = Master(config, self.state_dir)
        if not fork:
            self.slaves = [subprocess.Popen([sys.executable, "-m", "slave",
                                             *self._slave_args(f"local-{i}", self.master.endpoint, slots, log_level)],
                                            stdin=subprocess.DEVNULL) for i in range(1, n + 1)]
        self.master.runnability.expect(self._slaves_starting)

    def _slaves_starting(self) -> bool:
        """Some local slave is alive but not connected yet."""
        return len(self.master.roster) < sum(proc.poll() is None for proc in self.slaves)

    def _slave_args(self, name: str, endpoint: str, slots: int, log_level: str) -> list[str]:
        return ["--master", endpoint, "--name", name, "--slots", str(slots),
                "--work-root", str(self.state_dir / "work" / name), "--heartbeat", str(self.config.heartbeat_interval),
                "--exit-on-shutdown", "--log-level", log_level, "--parent-pid", str(os.getpid()),
                *self.security_args(), *self.slave_args]

    def security_args(self) -> list[str]:
        """Local slaves use the state dir's shared slave key (CURVE even on loopback), or --insecure."""
        if self.config.insecure:
            return ["--insecure"]
        kdir = keys.keys_dir(self.state_dir)
        return ["--master-key", str(kdir / "master.key"), "--secret-key", str(kdir / "slave.key_secret")]

    def run_until(self, done: Callable[[], bool], tick: Callable[[], None] | None = None) -> None:
        """Serve until `done()`; a slave process that dies is reported, the sweep goes on without it."""
        self.master.serve(until=done, tick=tick)

    def run_sweep(self, sweep: Sweep) -> dict[str, int]:
        """Submit (or resume) a sweep, serve until it is over, and return its task counts by state."""
        self.master.submit(sweep)
        self.run_until(lambda: self.master.sweep_done(sweep.name))
        return self.master.store.task_counts(sweep.name)

    def close(self, interrupted: bool = False) -> None:
        """The master says goodbye (its tickets given back without cost when the user `interrupted` the run) and
        every slave ends: a connected one by itself on that goodbye; one still starting (or reconnecting), which
        would otherwise wait for a master that is gone, by SIGTERM, sent first so that it ends meanwhile."""
        if interrupted:
            self.master.release_all("interrupted by the user")
        told = {session.name for session in self.master.roster.sessions()}
        for name, proc in self._named_slaves():
            if name not in told and proc.poll() is None:
                proc.terminate()
        self.master.close()
        for name, proc in self._named_slaves():
            if name in told and not _ended(proc, GOODBYE_EXIT):
                proc.terminate()
        for _, proc in self._named_slaves():
            if not _ended(proc, 5.0):
                proc.kill()
                proc.wait()
        self._wait_for_watchdogs()

    def _named_slaves(self) -> list[tuple[str, subprocess.Popen[bytes] | ForkedSlave]]:
        return [(f"local-{i}", proc) for i, proc in enumerate(self.slaves, 1)]

    def _wait_for_watchdogs(self) -> None:
        """Once close() returns, nothing of this cluster touches the state dir (which may then be removed): the
        watchdog of a slave that ended in order (or by SIGTERM's default action: before its loop began, or after
        it ended, it ran no worker) has nothing left to guard and is ended now, it may still be starting; that of
        one that did not is waited for while it kills what is left."""
        marks = {f"{self.state_dir.resolve() / 'work' / f'local-{i}'}/.tf-watchdog-{p.pid}":
                 p.returncode in (0, -signal.SIGTERM) for i, p in enumerate(self.slaves, 1)}
        waiting = []
        for proc in psutil.process_iter(["cmdline"]):
            found = [orderly for mark, orderly in marks.items() if mark in (proc.info["cmdline"] or ())]
            if found and found[0]:
                _kill_quietly(proc)
            if found:
                waiting.append(proc)
        deadline = time.monotonic() + 10
        while any(_alive(proc) for proc in waiting) and time.monotonic() < deadline:
            time.sleep(0.005)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ended(proc: subprocess.Popen[bytes] | ForkedSlave, timeout: float) -> bool:
    """Whether a slave process ended within `timeout` s."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _alive(proc: psutil.Process) -> bool:
    """Still running: a zombie is done (its reaper, init for an orphan, may take its time)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_quietly(proc: psutil.Process) -> None:
    try:
        proc.kill()
    except psutil.Error:
        pass


class ForkedSlave:
    """A slave daemon in a child forked from this process (which has imported it already): it starts in
    milliseconds, where a new interpreter takes most of a second. Fork only from a process without threads.

    Has the parts of subprocess.Popen that LocalCluster uses.
    """

    def __init__(self, argv: list[str]):
        from slave import daemon

        self.returncode: int | None = None
        sys.stdout.flush()  # what this process buffered is its own to write, not the child's too
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                code = daemon.main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - the child's last word; it must never return into the parent's code
                traceback.print_exc()
            finally:
                os._exit(code or 0)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"slave {self.pid}", timeout or 0)
            time.sleep(0.005)
        assert self.returncode is not None
        return self.returncode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)
